"""`import lstm_fused` from a copy of the package that has no compiled _C (a source tree nobody
built in place) says in one ImportError what happened and how to fix it, instead of Python's
"partially initialized module ... circular import". The copy carries a _build_info.py, as
setup.py leaves one in the tree, since that file once made an unbuilt tree look built."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import lstm_fused

PACKAGE = Path(lstm_fused.__file__).resolve().parent


def unbuilt_source_tree(root: Path) -> Path:
    """root/lstm_fused: the package's Python files without _C, beside a setup.py, as in a checkout."""
    copy = root / "lstm_fused"
    copy.mkdir()
    for source in PACKAGE.glob("*.py"):
        shutil.copy(source, copy / source.name)
    (copy / "_build_info.py").write_text("TORCH_VERSION = 'any'\nWITH_CUDA = False\n")
    (root / "setup.py").write_text("# stands for the checkout's setup.py\n")
    return copy


def import_from(cwd: Path, *python_flags, env=None):
    return subprocess.run(
        [sys.executable, *python_flags, "-c", "import lstm_fused"],
        cwd=cwd, capture_output=True, text=True, timeout=120, env=env,
    )


def test_a_source_tree_shadowing_the_installed_package_says_so(tmp_path):
    copy = unbuilt_source_tree(tmp_path)
    # The current directory comes first on sys.path, so the copy shadows the lstm_fused these
    # tests import (installed, or built in place and on PYTHONPATH).
    result = import_from(tmp_path)
    assert result.returncode != 0
    message = result.stderr.strip().splitlines()[-1]
    assert message.startswith("ImportError: lstm_fused: the source tree at")
    assert str(copy) in message and f"shadows the installed package at {PACKAGE}" in message
    assert "run from another directory" in message and "pip install -e" in message
    assert "circular" not in result.stderr


def test_an_unbuilt_source_tree_with_nothing_installed_says_how_to_build(tmp_path):
    copy = unbuilt_source_tree(tmp_path)
    # -S leaves site-packages off sys.path, and without PYTHONPATH no built lstm_fused is in reach.
    # (The check runs before torch is imported, so torch being out of reach too does not matter.)
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    result = import_from(tmp_path, "-S", env=env)
    assert result.returncode != 0
    message = result.stderr.strip().splitlines()[-1]
    assert message.startswith(f"ImportError: lstm_fused: the source tree at {copy} has not been built")
    assert "pip install -e" in message and "build_ext --inplace" in message


def test_the_built_package_imports_from_another_directory(tmp_path):
    result = subprocess.run(
        [sys.executable, "-c", "import lstm_fused, torch; print(lstm_fused.__file__, lstm_fused.__version__)"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    path, version = result.stdout.split()
    assert Path(path).resolve().parent == PACKAGE and version == lstm_fused.__version__


def test_the_build_summary_describes_this_build():
    """setup.py's one line (shown by `pip install -v` and the benchmark) names what was built."""
    summary = lstm_fused.BUILD_INFO.SUMMARY
    kernels = summary.split(";")[0]
    for name in lstm_fused.supported_cpu_capabilities():
        assert name in kernels, summary
    assert ("CUDA kernels built" in summary) == lstm_fused.WITH_CUDA, summary

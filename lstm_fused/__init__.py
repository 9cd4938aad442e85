"""lstm_fused: a fused LSTM cell for PyTorch, drop-ins for torch.nn.LSTMCell and torch.nn.LSTM."""
from ._version import __version__


def _installed_copy_elsewhere(here: str):
    """The directory of another lstm_fused that has its compiled _C (an installed one), or None."""
    import importlib.machinery
    import importlib.metadata
    import os
    import sys

    def has_extension(directory):
        return any(
            os.path.exists(os.path.join(directory, "_C" + suffix)) for suffix in importlib.machinery.EXTENSION_SUFFIXES
        )

    candidates = []
    try:
        distribution = importlib.metadata.distribution("lstm_fused")
        for file in distribution.files or []:
            if file.parts[:1] == ("lstm_fused",) and file.name == "__init__.py":
                candidates.append(os.path.dirname(str(distribution.locate_file(file))))
    except importlib.metadata.PackageNotFoundError:
        pass
    # Editable installs and PYTHONPATH entries have no file list in the metadata: look on sys.path.
    candidates += [os.path.join(entry or os.getcwd(), "lstm_fused") for entry in sys.path]
    for candidate in candidates:
        if os.path.realpath(candidate) != os.path.realpath(here) and has_extension(candidate):
            return os.path.realpath(candidate)
    return None


def _explain_a_missing_extension():
    """Raises one ImportError saying why and what to do when this copy of lstm_fused has no
    compiled _C. Without it, `from . import _C` fails with Python's "partially initialized module
    ... circular import", which points nowhere useful, and the build's _build_info.py in a source
    tree makes the tree look built."""
    import importlib.machinery
    import os

    here = os.path.dirname(os.path.abspath(__file__))
    if any(os.path.exists(os.path.join(here, "_C" + suffix)) for suffix in importlib.machinery.EXTENSION_SUFFIXES):
        return
    tree = os.path.dirname(here)
    is_source_tree = os.path.exists(os.path.join(tree, "setup.py"))
    installed = _installed_copy_elsewhere(here)
    if installed is not None:
        raise ImportError(
            f"lstm_fused: the source tree at {here} (which has no compiled _C) shadows the installed package at "
            f"{installed}, because {tree} comes first on sys.path (the current directory, PYTHONPATH or "
            "`python -m`). Fix: run from another directory (and `pytest tests`, not `python -m pytest`), or make "
            f"this tree the package Python imports, built in place: `pip install -e {tree} --no-build-isolation`."
        )
    if is_source_tree:
        raise ImportError(
            f"lstm_fused: the source tree at {here} has not been built (no compiled _C) and no installed copy was "
            f"found. Fix: build it in place with `pip install -e {tree} --no-build-isolation` (or `python setup.py "
            "build_ext --inplace`), or `pip install .` and import lstm_fused from another directory."
        )
    raise ImportError(
        f"lstm_fused at {here} has no compiled extension (_C): the installation is incomplete. Reinstall it, "
        "e.g. `pip install --force-reinstall --no-deps --no-build-isolation .` from the source tree."
    )


_explain_a_missing_extension()

from . import reference  # noqa: E402  (after the check: these import the compiled extension)
from ._ops import BUILD_INFO, cpu_capability, supported_cpu_capabilities  # noqa: E402
from .convert import convert  # noqa: E402
from .functional import LSTMGates, lstm_cell  # noqa: E402
from .modules import LSTM, LSTMCell, LSTMCellMasks, LSTMLayerStates  # noqa: E402
from . import regularised  # noqa: E402

WITH_CUDA = BUILD_INFO.WITH_CUDA

__all__ = [
    "LSTM", "LSTMCell", "LSTMCellMasks", "LSTMGates", "LSTMLayerStates", "convert", "lstm_cell", "reference", "WITH_CUDA",
    "__version__", "cpu_capability", "supported_cpu_capabilities",
]

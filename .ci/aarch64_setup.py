"""Runs the project's setup.py for an aarch64 cross build (called by .ci/aarch64).

setup.py runs on the host's (x86_64) Python, where `import torch` is the host's torch; this points
torch.utils.cpp_extension at the aarch64 torch wheel's headers and libraries instead
(LSTM_FUSED_AARCH64_TORCH, the torch package directory inside the arm64 root) and adds the aarch64
Python headers (LSTM_FUSED_AARCH64_PYTHON_INCLUDE, os.pathsep-separated) ahead of the host's. The
compiler and linker come from CC/CXX/LDSHARED, the extension's file suffix from
SETUPTOOLS_EXT_SUFFIX, the wheel's platform tag from bdist_wheel --plat-name."""
import os
import runpy
import sys

from torch.utils import cpp_extension

arm_torch = os.environ["LSTM_FUSED_AARCH64_TORCH"]
arm_python_include = [d for d in os.environ.get("LSTM_FUSED_AARCH64_PYTHON_INCLUDE", "").split(os.pathsep) if d]
for required in ("include/torch/library.h", "lib/libtorch_cpu.so"):
    if not os.path.exists(os.path.join(arm_torch, required)):
        sys.exit(f"aarch64_setup: no {required} under {arm_torch}")

# include_paths() and library_paths() read these module globals at call time.
cpp_extension._TORCH_PATH = arm_torch
cpp_extension.TORCH_LIB_PATH = os.path.join(arm_torch, "lib")
_include_paths = cpp_extension.include_paths


def include_paths(*args, **kwargs):
    # An extension's include_dirs come before the build's (the host Python's), so Python.h and
    # pyconfig.h are the aarch64 ones.
    return _include_paths(*args, **kwargs) + arm_python_include


cpp_extension.include_paths = include_paths

sys.argv = ["setup.py"] + sys.argv[1:]
sys.path.insert(0, os.getcwd())
runpy.run_path("setup.py", run_name="__main__")

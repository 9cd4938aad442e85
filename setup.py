"""Builds lstm_fused._C: the CPU kernels always, the CUDA kernels when torch and nvcc allow.

LSTM_FUSED_CUDA=1 forces the CUDA build (and fails if it is impossible), LSTM_FUSED_CUDA=0 forces
a CPU-only build; unset, CUDA is built when torch is a CUDA build and a CUDA toolkit is found.
"""
import glob
import os
import sys

from setuptools import find_packages, setup

# torch locates the toolkit from `which nvcc` when CUDA_HOME is unset; a wrapper script on PATH
# (as /usr/local/bin/nvcc on some machines) sends it to the wrong prefix and -lcudart fails.
if "CUDA_HOME" not in os.environ and "CUDA_PATH" not in os.environ and os.path.exists("/usr/local/cuda/bin/nvcc"):
    os.environ["CUDA_HOME"] = "/usr/local/cuda"

import torch  # noqa: E402
from torch.utils import cpp_extension  # noqa: E402

ROOT = os.path.dirname(os.path.abspath(__file__))
PACKAGE = "lstm_fused"


def want_cuda():
    forced = os.environ.get("LSTM_FUSED_CUDA")
    possible = torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
    if forced == "1" and not possible:
        sys.exit(
            f"LSTM_FUSED_CUDA=1 but a CUDA build is impossible: torch.version.cuda={torch.version.cuda}, "
            f"CUDA toolkit={cpp_extension.CUDA_HOME}"
        )
    return possible if forced is None else forced == "1"


def cuda_include_dirs():
    # ATen/cuda/CUDAContext.h includes cuBLAS headers, which the pip CUDA wheels ship beside torch
    # rather than in the toolkit.
    dirs = []
    for site in sys.path:
        dirs += glob.glob(os.path.join(site, "nvidia", "cu*", "include"))
        dirs += glob.glob(os.path.join(site, "nvidia", "cublas", "include"))
    return sorted(set(d for d in dirs if os.path.isdir(d)))


def write_build_info(with_cuda):
    # Read at import time, before the extension is loaded, so a torch other than the one this was
    # built against gets a clear message instead of an undefined-symbol crash.
    with open(os.path.join(ROOT, PACKAGE, "_build_info.py"), "w") as f:
        f.write(
            '"""Written by setup.py at build time."""\n'
            f"TORCH_VERSION = {torch.__version__!r}\n"
            f"WITH_CUDA = {with_cuda!r}\n"
        )


def sanitizer_flags():
    # LSTM_FUSED_SANITIZE=address,undefined: a CPU build for the sanitizer step of CI (.ci/sanitize).
    # -O2 keeps the vector paths the ones tested; every UBSan finding aborts (no recovery), so a
    # report cannot scroll by in a passing run. The .so then needs the sanitizer runtime loaded
    # first (LD_PRELOAD), which .ci/sanitize does.
    wanted = os.environ.get("LSTM_FUSED_SANITIZE", "")
    if not wanted:
        return [], []
    compile_flags = [f"-fsanitize={wanted}", "-fno-omit-frame-pointer", "-fno-sanitize-recover=all", "-g1"]
    return compile_flags, [f"-fsanitize={wanted}"]


def extension():
    with_cuda = want_cuda()
    write_build_info(with_cuda)
    sources = [
        "csrc/ops.cpp",
        "csrc/autograd.cpp",
        "csrc/sequence.cpp",
        "csrc/matmul.cpp",
        "csrc/cpu/lstm_cell.cpp",
        "csrc/cpu/cell_units_avx2.cpp",
        "csrc/cpu/small_batch_avx2.cpp",
    ]
    # -fopenmp: without it at::parallel_for compiles to a serial loop. -g0 keeps the .so small.
    cxx_flags = ["-O3", "-g0", "-fopenmp"]
    link_flags = ["-fopenmp"]
    sanitize_compile, sanitize_link = sanitizer_flags()
    if sanitize_compile:
        cxx_flags = ["-O2", "-fopenmp"] + sanitize_compile
        link_flags += sanitize_link
    if not with_cuda:
        return cpp_extension.CppExtension(
            f"{PACKAGE}._C", sources, extra_compile_args={"cxx": cxx_flags}, extra_link_args=link_flags
        )
    if not torch.cuda.is_available() and not os.environ.get("TORCH_CUDA_ARCH_LIST"):
        # With no GPU visible torch cannot pick the architectures itself: Ampere, Ada, Hopper.
        os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;8.6;8.9;9.0"
    sources += sorted(glob.glob("csrc/cuda/*.cu"))
    return cpp_extension.CUDAExtension(
        f"{PACKAGE}._C",
        sources,
        include_dirs=cuda_include_dirs(),
        extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "-lineinfo"]},
        extra_link_args=link_flags,
    )


setup(
    name="lstm_fused",
    version="0.1.0",
    description="A fused LSTM cell for PyTorch: C++/CUDA kernels, hand-written backward, drop-in for nn.LSTMCell",
    packages=find_packages(include=[PACKAGE, f"{PACKAGE}.*"]),
    ext_modules=[extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
    python_requires=">=3.10",
    install_requires=["torch", "numpy"],
    extras_require={"test": ["pytest", "numpy"], "plot": ["matplotlib"]},
)

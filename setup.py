"""Builds lstm_fused._C: the CPU kernels always, the CUDA kernels when torch and nvcc allow.

LSTM_FUSED_CUDA=1 forces the CUDA build (and fails if it is impossible), LSTM_FUSED_CUDA=0 forces
a CPU-only build; unset, CUDA is built when torch is a CUDA build and a CUDA toolkit is found.

The sources of csrc/cpu/kernels are compiled once per instruction set of the target (default,
avx2 and avx512 on x86-64; default and neon on aarch64) and chosen at run time.

LSTM_FUSED_OPENMP=0 builds without OpenMP (threads then come from ATen's at::parallel_for), =1
requires it; unset, OpenMP is used where the compiler accepts -fopenmp (Apple's clang does not).
LSTM_FUSED_SANITIZE=address,undefined: a CPU build for the sanitizer step (.ci/sanitize).
"""
import glob
import os
import platform
import re
import shlex
import subprocess
import sys
import tempfile

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


def cuda_absence():
    if os.environ.get("LSTM_FUSED_CUDA") == "0":
        return "LSTM_FUSED_CUDA=0"
    if torch.version.cuda is None:
        return "torch is a CPU build"
    return "no CUDA toolkit (nvcc) found; set CUDA_HOME"


class KernelsBuild(cpp_extension.BuildExtension):
    """Compiles csrc/cpu/kernels once per instruction set, each into its own namespace
    (CPU_CAPABILITY) with its own flags, and links the objects into the extension."""

    flags = []
    capabilities = []

    def build_extension(self, ext):
        for name, flags in self.capabilities:
            ext.extra_objects += self.compiler.compile(
                KERNEL_SOURCES,
                output_dir=os.path.join(self.build_temp, f"kernels-{name.lower()}"),
                macros=[("CPU_CAPABILITY", name), (f"CPU_CAPABILITY_{name}", None)],
                extra_postargs=self.flags + flags,
            )
        super().build_extension(ext)


def cuda_include_dirs():
    # ATen/cuda/CUDAContext.h includes cuBLAS headers, which the pip CUDA wheels ship beside torch
    # rather than in the toolkit.
    dirs = []
    for site in sys.path:
        dirs += glob.glob(os.path.join(site, "nvidia", "cu*", "include"))
        dirs += glob.glob(os.path.join(site, "nvidia", "cublas", "include"))
    return sorted(set(d for d in dirs if os.path.isdir(d)))


def write_build_info(with_cuda, summary):
    # Read at import time, before the extension is loaded, so a torch other than the one this was
    # built against gets a clear message instead of an undefined-symbol crash. SUMMARY is the build's
    # one line, which pip shows only with -v; the benchmark prints it.
    with open(os.path.join(ROOT, PACKAGE, "_build_info.py"), "w") as f:
        f.write(
            '"""Written by setup.py at build time."""\n'
            f"TORCH_VERSION = {torch.__version__!r}\n"
            f"WITH_CUDA = {with_cuda!r}\n"
            f"SUMMARY = {summary!r}\n"
        )


def cxx_compiler():
    return shlex.split(os.environ.get("CXX", "c++"))


def target_machine():
    # The compiler's target, not this machine's: a cross-compiler (aarch64-linux-gnu-g++) builds the
    # aarch64 kernels on an x86 host.
    try:
        out = subprocess.run(cxx_compiler() + ["-dumpmachine"], capture_output=True, text=True, check=True)
        return out.stdout.strip().split("-")[0]
    except (OSError, subprocess.CalledProcessError):
        return platform.machine()


# Per instruction set: the namespace the kernels are compiled into and the compiler flags.
# (-Wno-uninitialized: GCC 12's own AVX-512 intrinsics pass an undefined operand and warn at every
# use; the same sources compiled for the other instruction sets still get the warning.)
X86_AVX512 = ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx2", "-mfma", "-mf16c", "-Wno-uninitialized"]
CPU_CAPABILITIES = {
    "x86_64": [("DEFAULT", []), ("AVX2", ["-mavx2", "-mfma", "-mf16c"]), ("AVX512", X86_AVX512)],
    "aarch64": [("DEFAULT", []), ("NEON", [])],
}
KERNEL_SOURCES = sorted(glob.glob("csrc/cpu/kernels/*.cpp"))


def cpu_capabilities():
    return CPU_CAPABILITIES.get(target_machine(), [("DEFAULT", [])])


def compiler_accepts(flags):
    with tempfile.TemporaryDirectory() as tmp:
        source = os.path.join(tmp, "probe.cpp")
        with open(source, "w") as f:
            f.write("#include <omp.h>\nint main() { return omp_get_max_threads() > 0 ? 0 : 1; }\n")
        result = subprocess.run(
            cxx_compiler() + flags + [source, "-o", os.path.join(tmp, "probe")], capture_output=True, text=True
        )
        return result.returncode == 0


def want_openmp():
    forced = os.environ.get("LSTM_FUSED_OPENMP")
    if forced == "0":
        return False
    possible = compiler_accepts(["-fopenmp"])
    if forced == "1" and not possible:
        sys.exit(f"LSTM_FUSED_OPENMP=1 but {' '.join(cxx_compiler())} does not accept -fopenmp")
    return possible


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
    with_openmp = want_openmp()
    capabilities = cpu_capabilities()
    sources = [
        "csrc/ops.cpp",
        "csrc/autograd.cpp",
        "csrc/composite.cpp",
        "csrc/sequence.cpp",
        "csrc/regularised.cpp",
        "csrc/matmul.cpp",
        "csrc/cpu/lstm_cell.cpp",
        "csrc/cpu/regularised_cell.cpp",
        "csrc/cpu/capability.cpp",
        "csrc/cpu/threads.cpp",
    ]
    # -g0 keeps the .so small.
    cxx_flags = ["-O3", "-g0"]
    link_flags = []
    sanitize_compile, sanitize_link = sanitizer_flags()
    if sanitize_compile:
        cxx_flags = ["-O2"] + sanitize_compile
        link_flags += sanitize_link
    # The kernels compiled per instruction set take the same flags (the sanitizer's too), not OpenMP.
    KernelsBuild.flags = cxx_flags + ["-std=c++20", "-Icsrc/cpu/kernels"]
    KernelsBuild.capabilities = capabilities
    macros = [(f"LSTM_FUSED_KERNELS_{name}", None) for name, _ in capabilities]
    if with_openmp:
        # Without -fopenmp at::parallel_for, inline in ATen's headers, compiles to a serial loop.
        cxx_flags.append("-fopenmp")
        link_flags.append("-fopenmp")
        macros.append(("LSTM_FUSED_OPENMP", None))
    summary = (
        f"CPU kernels for {', '.join(n.lower() for n, _ in capabilities)} ({target_machine()}); threading: "
        + ("OpenMP" if with_openmp else "ATen's at::parallel_for, no OpenMP (threads that meet every step run as one)")
        + ("; CUDA kernels built" if with_cuda else "; CUDA kernels not built (" + cuda_absence() + ")")
    )
    write_build_info(with_cuda, summary)
    print(f"lstm_fused: {summary}", file=sys.stderr)
    if not with_cuda:
        return cpp_extension.CppExtension(
            f"{PACKAGE}._C",
            sources,
            define_macros=macros,
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=link_flags,
        )
    if not torch.cuda.is_available() and not os.environ.get("TORCH_CUDA_ARCH_LIST"):
        # With no GPU visible torch cannot pick the architectures itself: Ampere, Ada, Hopper.
        os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;8.6;8.9;9.0"
    sources += sorted(glob.glob("csrc/cuda/*.cu"))
    return cpp_extension.CUDAExtension(
        f"{PACKAGE}._C",
        sources,
        define_macros=macros,
        include_dirs=cuda_include_dirs(),
        extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "-lineinfo"]},
        extra_link_args=link_flags,
    )


setup(
    name="lstm_fused",
    version=re.search(r'__version__ = "([^"]+)"', open(os.path.join(ROOT, PACKAGE, "_version.py")).read()).group(1),
    description="A fused LSTM cell for PyTorch: C++/CUDA kernels, hand-written backward, drop-in for nn.LSTMCell",
    packages=find_packages(include=[PACKAGE, f"{PACKAGE}.*"]),
    package_data={PACKAGE: ["py.typed"]},
    ext_modules=[extension()],
    cmdclass={"build_ext": KernelsBuild.with_options(use_ninja=True)},
    python_requires=">=3.10",
    install_requires=["torch", "numpy"],
    extras_require={"test": ["pytest", "numpy"], "plot": ["matplotlib"]},
)

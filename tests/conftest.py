"""Shared fixtures: NaN-poisoned kernel outputs, a per-test seed, builders for cells with
identical weights and for random (never zero) inputs, and the settings a test runs under: torch's
thread count (threads), the CPU kernels' instruction set (capability) and whether bfloat16 products
use AVX512-BF16 (native).

pytest runs with --import-mode=importlib, so test files cannot import each other or a helper
module; the helpers are handed out as fixtures instead."""
import contextlib
import os
import pathlib
import time
import zlib

import pytest
import torch
from torch import nn

import lstm_fused as lf

# float64 differs from nn.LSTMCell only by the order of roundings; float32 also by the vector
# loops' exp (1.05 ulp) and tanh (2.5 ulp) against ATen's.
TOLERANCES = {
    torch.float64: dict(rtol=1e-12, atol=1e-12),
    torch.float32: dict(rtol=1e-5, atol=1e-5),
}


@contextlib.contextmanager
def _setting(set_returning_previous, value):
    """value set for the block by a setter that returns the previous value, which is set again
    on exit."""
    previous = set_returning_previous(value)
    try:
        yield value
    finally:
        set_returning_previous(previous)


def _set_torch_threads(count):
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    return previous


def torch_threads(count):
    """torch's intra-op thread count, for a with block."""
    return _setting(_set_torch_threads, count)


def cpu_capability(name):
    """The CPU kernels of instruction set `name` (lf.supported_cpu_capabilities()), for a with
    block."""
    return _setting(torch.ops.lstm_fused._set_cpu_capability, name)


def native_bfloat16_products(allowed):
    """Whether bfloat16 products may use AVX512-BF16 (where the CPU has it), for a with block."""
    return _setting(torch.ops.lstm_fused._set_native_bfloat16_products, allowed)


# Widest first, "default" (the portable path) last.
CPU_CAPABILITIES = lf.supported_cpu_capabilities()


def bfloat16_tiles(allowed):
    """Whether AVX512-BF16's bfloat16 products may run on AMX's tiles (where the CPU has AMX), for
    a with block."""
    return _setting(torch.ops.lstm_fused._set_bfloat16_tiles, allowed)


def _bfloat16_products_settings():
    """"widened" always (the products every CPU runs); "vdpbf16ps" as well where some path of this
    CPU has AVX512-BF16's dot products, and "amx" where it also has AMX's tiles."""
    settings = ["widened"]
    with native_bfloat16_products(True), bfloat16_tiles(True):
        for name in CPU_CAPABILITIES:
            with cpu_capability(name):
                if torch.ops.lstm_fused._native_bfloat16_products():
                    settings.append("vdpbf16ps")
                    if torch.ops.lstm_fused._bfloat16_tiles():
                        settings.append("amx")
                    break
    return settings


BFLOAT16_PRODUCTS_SETTINGS = _bfloat16_products_settings()


# The ids are the bare counts: the seed fixture draws each test's inputs from its id.
@pytest.fixture(params=[1, 2])
def threads(request):
    """One and two threads (the kernels split rows or units between them); a test may ask for
    other counts with @pytest.mark.parametrize("threads", [...], indirect=True)."""
    with torch_threads(request.param):
        yield request.param


@pytest.fixture(params=CPU_CAPABILITIES)
def capability(request):
    """Each instruction set's kernels this CPU can run, made current for the test."""
    with cpu_capability(request.param):
        assert lf.cpu_capability() == request.param
        yield request.param


@pytest.fixture(params=BFLOAT16_PRODUCTS_SETTINGS)
def bfloat16_products(request):
    """bfloat16 products widened to float, and where this CPU has them AVX512-BF16's and AMX's."""
    with native_bfloat16_products(request.param != "widened"), bfloat16_tiles(request.param == "amx"):
        yield request.param


@pytest.fixture(autouse=True)
def poison_outputs():
    """Every kernel output starts NaN-filled, so an element a kernel forgets to write fails."""
    previous = torch.ops.lstm_fused._set_poison_outputs(True)
    yield
    torch.ops.lstm_fused._set_poison_outputs(previous)


@pytest.fixture(autouse=True)
def seed(request):
    """A fresh seed per test, stable across runs (derived from the test's id)."""
    value = zlib.crc32(request.node.nodeid.encode())
    torch.manual_seed(value)
    return value


class Helpers:
    """Builders shared by the test files."""

    tolerances = TOLERANCES
    cpu_capabilities = CPU_CAPABILITIES
    torch_threads = staticmethod(torch_threads)
    cpu_capability = staticmethod(cpu_capability)

    @staticmethod
    def randn(*shape, dtype=torch.float32, requires_grad=False, scale=1.0):
        """Random normal values, redrawn until none is exactly zero."""
        t = torch.randn(*shape, dtype=dtype) * scale
        while t.numel() and (t == 0).any():
            t = torch.where(t == 0, torch.randn_like(t) * scale, t)
        return t.requires_grad_(requires_grad)

    @staticmethod
    def cells(input_size, hidden_size, bias=True, dtype=torch.float32):
        """(nn.LSTMCell, lf.LSTMCell, lf.reference.LSTMCell) holding identical weights."""
        torch_cell = nn.LSTMCell(input_size, hidden_size, bias=bias, dtype=dtype)
        fused_cell = lf.LSTMCell(input_size, hidden_size, bias=bias, dtype=dtype)
        reference_cell = lf.reference.LSTMCell(input_size, hidden_size, bias=bias, dtype=dtype)
        fused_cell.load_state_dict(torch_cell.state_dict())
        reference_cell.load_state_dict(torch_cell.state_dict())
        return torch_cell, fused_cell, reference_cell

    @classmethod
    def state(cls, batch, hidden_size, dtype=torch.float32):
        """(h_0, c_0); batch=None gives unbatched (1-D) states."""
        shape = (hidden_size,) if batch is None else (batch, hidden_size)
        return cls.randn(*shape, dtype=dtype), cls.randn(*shape, dtype=dtype)

    @staticmethod
    def leaves(tensors):
        """Detached copies that require grad (None stays None), one set per cell under test."""
        return [None if t is None else t.detach().clone().requires_grad_(True) for t in tensors]

    @staticmethod
    def assert_close(actual, expected, dtype=None, **overrides):
        dtype = dtype or expected.dtype
        tolerances = {**TOLERANCES[dtype], **overrides}
        torch.testing.assert_close(actual, expected, **tolerances)

    @staticmethod
    def relative_error(actual, expected):
        """||actual - expected|| / ||expected||, computed in float64; 0 when both are exactly zero
        (a weight_hh gradient from a zero state), inf when only expected is."""
        expected = expected.double()
        difference = (actual.double() - expected).norm().item()
        scale = expected.norm().item()
        if scale == 0:
            return 0.0 if difference == 0 else float("inf")
        return difference / scale


@pytest.fixture
def helpers():
    return Helpers


@pytest.fixture(scope="session")
def emu():
    """torch.ops.lstm_fused_emulated: csrc/cuda's device code compiled for the host against
    tests/emulated_cuda/cuda_emulation.h, built on first use (about a minute on 2 cores) and shared
    by the emulated-CUDA test files."""
    from torch.utils import cpp_extension

    root = pathlib.Path(__file__).resolve().parent.parent
    emulation = root / "tests" / "emulated_cuda"
    # Under .ci/sanitize (LSTM_FUSED_SANITIZE), the emulated kernels are built with the sanitizers
    # too, into a build folder of their own.
    sanitize = os.environ.get("LSTM_FUSED_SANITIZE", "")
    sanitize_flags = [f"-fsanitize={sanitize}", "-fno-sanitize-recover=all", "-fno-omit-frame-pointer"] if sanitize else []
    build_dir = root / "build" / ("emulated_cuda_sanitized" if sanitize else "emulated_cuda")
    build_dir.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    cpp_extension.load(
        name="lstm_fused_emulated",
        sources=[str(emulation / "emulated_ops.cpp")],
        extra_include_paths=[str(root / "csrc"), str(emulation)],
        # -O1: the kernels' unrolled loops at -O2/-O3 take minutes to compile on 2 cores, and the
        # emulated run is bound by the fibers' switches, not by the arithmetic.
        extra_cflags=["-O1", "-std=c++20", "-fno-strict-aliasing"] + sanitize_flags,
        extra_ldflags=sanitize_flags,
        build_directory=str(build_dir),
        is_python_module=False,
        verbose=os.environ.get("LSTM_FUSED_EMULATION_VERBOSE") == "1",
    )
    print(f"emulated CUDA extension ready in {time.monotonic() - started:.1f} s")
    return torch.ops.lstm_fused_emulated

"""Shared fixtures: NaN-poisoned kernel outputs, a per-test seed, and builders for cells with
identical weights and for random (never zero) inputs.

pytest runs with --import-mode=importlib, so test files cannot import each other or a helper
module; the helpers are handed out as fixtures instead."""
import zlib

import pytest
import torch
from torch import nn

import lstm_fused as lf

# float64 differs from nn.LSTMCell only by the order of roundings; float32 also by Sleef's
# exp (1 ulp) and tanh (3.5 ulp) against ATen's.
TOLERANCES = {
    torch.float64: dict(rtol=1e-12, atol=1e-12),
    torch.float32: dict(rtol=1e-5, atol=1e-5),
}


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

"""lstm_fused on a device it has no kernels for (MPS, XPU, a PrivateUse1 backend): every op then
runs its composite of ATen ops (csrc/composite.cpp, registered under CompositeExplicitAutograd),
and the modules give nn's results and gradients.

This machine has none of those devices. The tests run the real dispatch for one: a dispatch mode
sends every lstm_fused op, including those the composites call, to the kernel registered for that
device's dispatch key (the composite), while the ATen ops inside run on the CPU. The sequence's
composite (csrc/sequence.cpp) chooses its CPU-only small-batch path by the tensors' device, which
here is the CPU, so the sequence tests use a batch past that path (260): the code a real device
runs at any batch. The meta device, which has fake kernels, is covered in test_module.py and
test_lstm.py."""
from contextlib import nullcontext

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import lstm_fused as lf

DEVICE_KEYS = {
    "mps": torch._C.DispatchKey.MPS,
    "xpu": torch._C.DispatchKey.XPU,
    "privateuseone": torch._C.DispatchKey.PrivateUse1,
}


class DeviceWithoutKernels(TorchDispatchMode):
    """Runs each lstm_fused op with the kernel its dispatch table has for `key`."""

    def __init__(self, key):
        super().__init__()
        self.keys = torch._C.DispatchKeySet(key)
        self.ops = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace == "lstm_fused":
            self.ops.add(func.name())
            with self:  # the ops the composite calls come back here
                return func.redispatch(self.keys, *args, **kwargs)
        return func(*args, **kwargs)


@pytest.mark.parametrize("op", ["cell_forward", "cell_pointwise_", "cell_gate_grads", "cell_backward",
                                "sequence_forward", "sequence_backward"])
@pytest.mark.parametrize("device", DEVICE_KEYS)
def test_every_op_has_a_kernel_for_devices_without_lstm_fused_kernels(op, device):
    key = DEVICE_KEYS[device]
    table = torch._C._dispatch_dump_table(f"lstm_fused::{op}")
    entry = next(line for line in table.splitlines() if line.startswith(f"{key.name}:"))
    assert "registered at" in entry and ("composite" in entry or "sequence.cpp" in entry or "ops.cpp" in entry), entry
    assert "lstm_cell.cpp" not in entry and ".cu" not in entry, entry


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("device", DEVICE_KEYS)
def test_cell_matches_nn(helpers, device, dtype):
    torch_cell, fused_cell, _ = helpers.cells(6, 9, True, dtype)
    input = helpers.randn(4, 6, dtype=dtype)
    h_0, c_0 = helpers.state(4, 9, dtype)
    weight_h, weight_c = helpers.state(4, 9, dtype)
    results = []
    for cell in (torch_cell, fused_cell):
        x, h, c = helpers.leaves([input, h_0, c_0])
        mode = DeviceWithoutKernels(DEVICE_KEYS[device])
        with mode if cell is fused_cell else nullcontext():
            hy, cy = cell(x, (h, c))
            grads = torch.autograd.grad((hy * weight_h).sum() + (cy * weight_c).sum(), [x, h, c, *cell.parameters()])
        if cell is fused_cell:
            assert {"lstm_fused::cell_forward", "lstm_fused::cell_backward", "lstm_fused::cell_gate_grads"} <= mode.ops
        results.append([hy, cy, *grads])
    for actual, expected in zip(results[1], results[0], strict=True):
        helpers.assert_close(actual, expected)


@pytest.mark.parametrize("device", DEVICE_KEYS)
def test_cell_gates_and_inference_mode(helpers, device):
    _, fused_cell, reference_cell = helpers.cells(5, 8, True, torch.float64)
    input = helpers.randn(3, 5, dtype=torch.float64)
    state = helpers.state(3, 8, torch.float64)
    expected_h, expected_c, expected_gates = reference_cell(input, state, return_gates=True)
    with torch.inference_mode(), DeviceWithoutKernels(DEVICE_KEYS[device]) as mode:
        h, c, gates = fused_cell(input, state, return_gates=True)
    assert "lstm_fused::cell_forward" in mode.ops
    helpers.assert_close(h, expected_h)
    helpers.assert_close(c, expected_c)
    for actual, expected in zip(gates, expected_gates, strict=True):
        helpers.assert_close(actual, expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("device", DEVICE_KEYS)
def test_lstm_matches_nn(helpers, device, dtype):
    torch_lstm = nn.LSTM(4, 6, num_layers=2, bidirectional=True, dtype=dtype)
    fused_lstm = lf.LSTM(4, 6, num_layers=2, bidirectional=True, dtype=dtype)
    fused_lstm.load_state_dict(torch_lstm.state_dict())
    lengths = [5, 3, 4, 1, 2] * 52
    sequences = [helpers.randn(n, 4, dtype=dtype) for n in lengths]
    packed = nn.utils.rnn.pack_sequence(sequences, enforce_sorted=False)
    results = []
    for lstm in (torch_lstm, fused_lstm):
        (data,) = helpers.leaves([packed.data])
        x = nn.utils.rnn.PackedSequence(data, packed.batch_sizes, packed.sorted_indices, packed.unsorted_indices)
        mode = DeviceWithoutKernels(DEVICE_KEYS[device])
        with mode if lstm is fused_lstm else nullcontext():
            output, (h_n, c_n) = lstm(x)
            weights = torch.linspace(-1, 1, output.data.numel(), dtype=dtype).view_as(output.data)
            loss = (output.data * weights).sum() + h_n.sum() + (c_n * 0.5).sum()
            grads = torch.autograd.grad(loss, [data, *lstm.parameters()])
        if lstm is fused_lstm:
            assert {"lstm_fused::sequence_forward", "lstm_fused::cell_pointwise_", "lstm_fused::sequence_backward",
                    "lstm_fused::cell_gate_grads"} <= mode.ops
        results.append([output.data, h_n, c_n, *grads])
    for actual, expected in zip(results[1], results[0], strict=True):
        helpers.assert_close(actual, expected)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_reduced_precision_cell_against_float64(helpers, dtype):
    _, fused_cell, reference_cell = helpers.cells(16, 24, True, torch.float64)
    input = helpers.randn(5, 16, dtype=torch.float64)
    state = helpers.state(5, 24, torch.float64)
    expected = reference_cell(input, state)
    low_cell = fused_cell.to(dtype)
    with DeviceWithoutKernels(DEVICE_KEYS["xpu"]):
        actual = low_cell(input.to(dtype), tuple(s.to(dtype) for s in state))
    for a, e in zip(actual, expected, strict=True):
        assert a.dtype == dtype
        assert helpers.relative_error(a, e) < (1e-2 if dtype == torch.bfloat16 else 2e-3)

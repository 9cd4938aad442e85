"""The CPU kernels under every instruction set this machine can run (csrc/cpu/kernels, compiled once
per set): the cell and the sequence against nn.LSTMCell and nn.LSTM in float32, at widths that
leave tails for every vector width (16 floats for AVX-512, 8 for AVX2, 4 for NEON and the portable
path), on one and two threads (the split by units, which meets at a barrier every step, and the
split by rows). The rest of the suite runs under the widest path; .ci/sanitize runs it under
each."""
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

import lstm_fused as lf

CAPABILITIES = lf.supported_cpu_capabilities()
pytestmark = pytest.mark.filterwarnings("ignore:LSTM with projections is not supported with oneDNN")
ALL_NAMES = ["avx512", "avx2", "neon", "default"]


def test_default_is_the_widest_supported():
    assert CAPABILITIES, "no CPU path at all"
    assert CAPABILITIES[-1] == "default"
    assert set(CAPABILITIES) <= set(ALL_NAMES)
    assert lf.cpu_capability() == CAPABILITIES[0] or os.environ.get("LSTM_FUSED_CPU_CAPABILITY")


# Batch 1-16 takes the fused small-batch path of the cell (on the vector paths; the portable one
# sends the products to BLAS and runs its own pointwise loops); the sizes leave tails of every width,
# batch 2 and 3 the last row blocks, (8, 64, 64) and (16, 40, 130) enough work for two threads.
@pytest.mark.parametrize("batch, input_size, hidden_size", [
    (1, 1, 1), (1, 17, 3), (2, 5, 31), (3, 33, 17), (8, 64, 64), (16, 40, 130), (20, 9, 37),
])
def test_cell_matches_nn(helpers, capability, threads, batch, input_size, hidden_size):
    torch_cell, fused_cell, _ = helpers.cells(input_size, hidden_size, True, torch.float32)
    input = helpers.randn(batch, input_size)
    h_0, c_0 = helpers.state(batch, hidden_size)
    weight_h, weight_c = helpers.state(batch, hidden_size)
    results = []
    for cell in (torch_cell, fused_cell):
        x, h, c = helpers.leaves([input, h_0, c_0])
        hy, cy = cell(x, (h, c))
        loss = (hy * weight_h).sum() + (cy * weight_c).sum()
        results.append([hy, cy, *torch.autograd.grad(loss, [x, h, c, *cell.parameters()])])
    for actual, expected in zip(results[1], results[0], strict=True):
        helpers.assert_close(actual, expected)


def _packed(helpers, lengths, input_size):
    sequences = [helpers.randn(length, input_size) for length in lengths]
    return nn.utils.rnn.pack_sequence(sequences, enforce_sorted=False)


# The sequence's recurrence: batch <= 64 takes the small-batch path, <= 256 on avx512. Batch 4 at
# hidden 130 splits two threads by units (a barrier per step, a share that ends in a tail); batch 9
# at hidden 40 by rows; batch 9 at hidden 300 by units where each thread's share of the weight
# (720 KB) fits the CPU's L2, by rows elsewhere; batch 1 runs on one thread whatever is asked; 70
# (varying lengths) is past the path but on avx512, 257 past it everywhere.
@pytest.mark.parametrize("lengths, input_size, hidden_size", [
    ([3], 2, 1), ([5, 2, 4, 1], 7, 130), ([6, 6, 3, 5, 2, 6, 1, 4, 6], 5, 40), ([3, 2, 3, 1, 3, 3, 2, 3, 3], 4, 300),
    ([4, 1, 3] * 23 + [2], 3, 19), ([2] * 257, 3, 5),
])
def test_sequence_matches_nn(helpers, capability, threads, lengths, input_size, hidden_size):
    torch_lstm = nn.LSTM(input_size, hidden_size, bidirectional=True)
    fused_lstm = lf.LSTM(input_size, hidden_size, bidirectional=True)
    fused_lstm.load_state_dict(torch_lstm.state_dict())
    packed = _packed(helpers, lengths, input_size)
    h_0, c_0 = (helpers.randn(2, len(lengths), hidden_size) for _ in range(2))
    results = []
    for lstm in (torch_lstm, fused_lstm):
        data, h, c = helpers.leaves([packed.data, h_0, c_0])
        x = nn.utils.rnn.PackedSequence(data, packed.batch_sizes, packed.sorted_indices, packed.unsorted_indices)
        output, (h_n, c_n) = lstm(x, (h, c))
        weights = torch.linspace(-1, 1, output.data.numel()).view_as(output.data)
        loss = (output.data * weights).sum() + (h_n * 0.5).sum() + (c_n ** 2).sum()
        results.append([output.data, h_n, c_n, *torch.autograd.grad(loss, [data, h, c, *lstm.parameters()])])
    for actual, expected in zip(results[1], results[0], strict=True):
        helpers.assert_close(actual, expected)


# With projections (proj_size > 0) the same recurrence also multiplies every step by weight_hr and
# its backward by weight_hr's transpose, through the same panel products: batch 4 at hidden 200
# splits two threads by units (two barriers a step), batch 9 at hidden 130 by rows; proj_size 99
# and 67 leave tails of every vector width; 70 is past the path but on avx512.
@pytest.mark.parametrize("lengths, input_size, hidden_size, proj_size", [
    ([3], 2, 3, 1), ([5, 2, 4, 1], 7, 200, 99), ([6, 6, 3, 5, 2, 6, 1, 4, 6], 5, 130, 67), ([4] * 70, 3, 19, 5),
])
def test_projected_sequence_matches_nn(helpers, capability, threads, lengths, input_size, hidden_size, proj_size):
    torch_lstm = nn.LSTM(input_size, hidden_size, bidirectional=True, proj_size=proj_size)
    fused_lstm = lf.LSTM(input_size, hidden_size, bidirectional=True, proj_size=proj_size)
    fused_lstm.load_state_dict(torch_lstm.state_dict())
    packed = _packed(helpers, lengths, input_size)
    h_0, c_0 = helpers.randn(2, len(lengths), proj_size), helpers.randn(2, len(lengths), hidden_size)
    results = []
    for lstm in (torch_lstm, fused_lstm):
        data, h, c = helpers.leaves([packed.data, h_0, c_0])
        x = nn.utils.rnn.PackedSequence(data, packed.batch_sizes, packed.sorted_indices, packed.unsorted_indices)
        output, (h_n, c_n) = lstm(x, (h, c))
        weights = torch.linspace(-1, 1, output.data.numel()).view_as(output.data)
        loss = (output.data * weights).sum() + (h_n * 0.5).sum() + (c_n ** 2).sum()
        results.append([output.data, h_n, c_n, *torch.autograd.grad(loss, [data, h, c, *lstm.parameters()])])
    for actual, expected in zip(results[1], results[0], strict=True):
        # Weight gradients sum hundreds of float32 products in different orders.
        helpers.assert_close(actual, expected, atol=2e-5)


def test_each_path_gives_its_own_results(helpers):
    """The paths are separate code: a wider one's rounding differs from the portable one's, which
    shows that switching really changes the kernel that runs (both still match nn to 1e-5)."""
    if len(CAPABILITIES) < 2:
        pytest.skip("this CPU has one path only")
    _, fused_cell, _ = helpers.cells(67, 129, True, torch.float32)
    input = helpers.randn(3, 67)
    state = helpers.state(3, 129)
    outputs = {}
    for name in CAPABILITIES:
        with helpers.cpu_capability(name):
            outputs[name] = fused_cell(input, state)[0]
    assert not torch.equal(outputs[CAPABILITIES[0]], outputs["default"])
    for name in CAPABILITIES:
        helpers.assert_close(outputs[name], outputs["default"])


def _import_with(value):
    env = {**os.environ, "LSTM_FUSED_CPU_CAPABILITY": value}
    code = "import lstm_fused as lf; print(lf.cpu_capability())"
    # From the tests folder, so the source tree cannot shadow the package under test.
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          cwd=os.path.dirname(__file__), timeout=300)


@pytest.mark.parametrize("name", CAPABILITIES)
def test_environment_forces_a_supported_path(name):
    result = _import_with(name)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == name


@pytest.mark.parametrize("name", [n for n in ALL_NAMES if n not in CAPABILITIES] + ["sse9"])
def test_environment_asking_for_a_missing_path_fails_the_import(name):
    result = _import_with(name)
    assert result.returncode != 0
    message = result.stderr.strip().splitlines()[-1]
    assert message.startswith("ImportError: LSTM_FUSED_CPU_CAPABILITY asks for the CPU path"), message
    assert f"'{name}'" in message and ", ".join(CAPABILITIES) in message


def test_switching_to_a_missing_path_is_an_error():
    with pytest.raises(RuntimeError, match="asks for the CPU path 'sse9'"):
        torch.ops.lstm_fused._set_cpu_capability("sse9")
    assert lf.cpu_capability() in CAPABILITIES


# The vector loops' own exp and tanh (csrc/cpu/kernels/vec.h) against float64: a dense sweep of
# pre-activations over [-40, 40], past every saturation point, and the special values. Each gate
# value within 2 float32 eps of its own size (they measure 1.24; one Taylor term fewer in e^r - 1
# gives about 20); the width leaves a tail for the scalar loop.
def test_float32_activations_match_float64(helpers, capability):
    hidden_size = 4099
    pre = torch.linspace(-40, 40, 4 * hidden_size, dtype=torch.float64)
    pre = pre[torch.randperm(pre.numel(), generator=torch.Generator().manual_seed(0))].reshape(1, -1)
    specials = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0, -0.0, 88.9, -88.9, 104.5, -104.5, 200.0,
                             -200.0, 1e-30, -1e-30, 1e-40, 9.9, -9.9, 10.5, -10.5], dtype=torch.float64)
    for gate in range(4):  # each gate's activation meets every special value, in the vector loop
        pre[0, gate * hidden_size:gate * hidden_size + specials.numel()] = specials
    pre = pre.float()
    gates = pre.clone()
    cell_prev = helpers.randn(1, hidden_size)
    hy, cy = torch.full_like(cell_prev, float("nan")), torch.full_like(cell_prev, float("nan"))
    torch.ops.lstm_fused.cell_pointwise_(gates, cell_prev, None, hy, cy)
    i, f, g, o = pre.double().chunk(4, dim=1)
    expected = torch.cat([i.sigmoid(), f.sigmoid(), g.tanh(), o.sigmoid()], dim=1)
    assert torch.equal(gates.isnan(), expected.isnan())
    finite = ~expected.isnan()
    error = (gates.double() - expected)[finite].abs()
    # Below float32's smallest normal, absolute accuracy: 1 / (1 + e^-x) is 0 once e^-x overflows,
    # where sigmoid is still a denormal (x < -88.7), as in ATen's float32 sigmoid.
    allowed = 2 * torch.finfo(torch.float32).eps * expected[finite].abs() + torch.finfo(torch.float32).tiny
    assert (error <= allowed).all(), f"worst: {(error / allowed).max().item():.3g} of the allowed error"
    saturated = pre.abs() >= 104
    assert torch.equal(gates[saturated], expected[saturated].float()), "saturated gates must be exactly 0 or +-1"


def _rounded_reference(gates, cell_prev, bias):
    """The cell's pointwise step as the kernels define it for bfloat16 and float16: inputs widened to
    float32, float32 math, each output rounded once to the dtype."""
    i, f, g, o = (gates.float() + bias.float()).chunk(4, dim=1)
    i, f, g, o = i.sigmoid(), f.sigmoid(), g.tanh(), o.sigmoid()
    cell = f * cell_prev.float() + i * g
    return torch.cat([i, f, g, o], dim=1), cell, o * cell.tanh()


# Widths 1-35 leave every tail of 16, 8 and 4 lanes; the rounding of one conversion differs from the
# dtype's round-to-nearest-even in about half the elements, so "almost all equal" catches it.
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("hidden_size", [1, 5, 16, 35])
def test_reduced_precision_pointwise_rounds_as_torch(helpers, capability, dtype, hidden_size):
    batch = 6
    gates = (helpers.randn(batch, 4 * hidden_size, dtype=torch.float64) * 2).to(dtype)
    cell_prev = helpers.randn(batch, hidden_size, dtype=torch.float64).to(dtype)
    bias = helpers.randn(4 * hidden_size, dtype=torch.float64).to(dtype)
    gates[0, 0] = float("nan")  # a NaN stays NaN (bfloat16: 0x7FC0, as c10 rounds it)
    try:
        activated, cell_next, hidden_next = _rounded_reference(gates, cell_prev, bias)
    except RuntimeError as error:  # torch's aarch64 wheel under qemu (neoverse-n1), for float16
        pytest.skip(f"torch itself cannot widen {dtype} here, so there is no reference: {error}")

    kernel_gates = gates.clone()
    hy, cy = torch.empty(batch, hidden_size, dtype=dtype), torch.empty(batch, hidden_size, dtype=dtype)
    torch.ops.lstm_fused.cell_pointwise_(kernel_gates, cell_prev, bias, hy, cy)
    for actual, expected in ((kernel_gates, activated), (cy, cell_next), (hy, hidden_next)):
        expected = expected.to(dtype)
        assert torch.isnan(actual).equal(torch.isnan(expected))
        finite = ~torch.isnan(expected)
        # exp and tanh (vec.h's in the vector loops, libm in the scalar one) may differ by an ulp of
        # float32, which moves a rounding to the dtype in rare elements: at most 1 ulp of the dtype.
        ulp = torch.finfo(dtype).eps * expected[finite].float().abs().clamp_min(torch.finfo(dtype).tiny)
        assert ((actual[finite].float() - expected[finite].float()).abs() <= ulp * 1.01).all()
        assert (actual[finite] == expected[finite]).float().mean() >= 0.97

    # Backward: the gate gradients against autograd through the same float32 formulas.
    grad_hidden = helpers.randn(batch, hidden_size, dtype=torch.float64).to(dtype)
    grad_cell = helpers.randn(batch, hidden_size, dtype=torch.float64).to(dtype)
    pre = (gates.float() + bias.float()).nan_to_num(0.5).requires_grad_()
    c_prev = cell_prev.float().requires_grad_()
    i, f, g, o = pre.chunk(4, dim=1)
    c = f.sigmoid() * c_prev + i.sigmoid() * g.tanh()
    h = o.sigmoid() * c.tanh()
    expected_pre, expected_c_prev = torch.autograd.grad(
        [h, c], [pre, c_prev], [grad_hidden.float(), grad_cell.float()])
    activated = _rounded_reference(pre.detach().to(dtype), cell_prev, torch.zeros_like(bias))
    grad_pre, grad_c_prev = torch.ops.lstm_fused.cell_gate_grads(
        grad_hidden, grad_cell, None, cell_prev, activated[1].to(dtype), activated[0].to(dtype))
    # The saved gates and cell state are rounded to the dtype, so the gradients by relative error.
    for actual, expected in ((grad_pre, expected_pre), (grad_c_prev, expected_c_prev)):
        assert actual.dtype == dtype
        scale = expected.abs().max()
        assert ((actual.float() - expected).abs().max() / scale) < 8 * torch.finfo(dtype).eps

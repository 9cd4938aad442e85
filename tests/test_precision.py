"""Reduced precision on the CPU: float16 and bfloat16 cells judged by relative error against a
float64 computation from the same (rounded) inputs, and CPU autocast giving nn.LSTMCell's output
dtypes."""
import pytest
import torch
from torch import nn

import lstm_fused as lf

# Storage rounding alone is 2^-9 (bfloat16) and 2^-12 (float16) relative; the gate buffer is
# stored in the low-precision dtype between the products and the pointwise pass, as in nn.
OUTPUT_LIMITS = {torch.bfloat16: 1e-2, torch.float16: 2e-3}
GRAD_LIMITS = {torch.bfloat16: 1.5e-2, torch.float16: 3e-3}
LOW_DTYPES = [torch.float16, torch.bfloat16]
# Sizes with enough elements for a norm-wise relative error to mean something (a single element
# whose c_1 cancels to nearly zero has an unbounded relative error in any implementation).
SIZES = [(4, 7, 13), (16, 32, 64), (64, 128, 256)]


def step_with_grads(cell, x, hx, loss_weights, dtype):
    x = x.to(dtype).requires_grad_(True)
    state = None if hx is None else [t.to(dtype).requires_grad_(True) for t in hx]
    h_1, c_1 = cell(x, state)
    weight_h, weight_c = (w.to(dtype) for w in loss_weights)
    loss = (h_1 * weight_h).sum() + (c_1 * weight_c).sum()
    wrt = [x, *(state or []), *cell.parameters()]
    return [h_1, c_1], torch.autograd.grad(loss, wrt)


@pytest.mark.parametrize("state", ["given", "omitted"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("batch, input_size, hidden_size", SIZES)
@pytest.mark.parametrize("dtype", LOW_DTYPES, ids=str)
def test_low_precision_against_float64(helpers, dtype, batch, input_size, hidden_size, bias, state):
    torch_cell, fused_cell, _ = helpers.cells(input_size, hidden_size, bias, dtype)
    exact_cell = nn.LSTMCell(input_size, hidden_size, bias=bias, dtype=torch.float64)
    exact_cell.load_state_dict(torch_cell.state_dict())  # the low-precision weights, exactly
    x = helpers.randn(batch, input_size, dtype=dtype)
    hx = helpers.state(batch, hidden_size, dtype) if state == "given" else None
    loss_weights = helpers.state(batch, hidden_size, dtype)

    outputs, grads = step_with_grads(fused_cell, x, hx, loss_weights, dtype)
    torch_outputs, torch_grads = step_with_grads(torch_cell, x, hx, loss_weights, dtype)
    exact_outputs, exact_grads = step_with_grads(exact_cell, x, hx, loss_weights, torch.float64)

    for name, actual, nn_value, exact in zip(("h_1", "c_1"), outputs, torch_outputs, exact_outputs, strict=True):
        assert actual.dtype == nn_value.dtype == dtype, name
        assert actual.shape == nn_value.shape, name
        error = helpers.relative_error(actual, exact)
        assert error < OUTPUT_LIMITS[dtype], f"{name}: relative error {error:.2e} against float64"
    for index, (actual, nn_value, exact) in enumerate(zip(grads, torch_grads, exact_grads, strict=True)):
        assert actual.dtype == nn_value.dtype == dtype, index
        error = helpers.relative_error(actual, exact)
        assert error < GRAD_LIMITS[dtype], f"gradient {index}: relative error {error:.2e} against float64"


@pytest.mark.parametrize("dtype", LOW_DTYPES, ids=str)
def test_low_precision_unbatched_and_gates(helpers, dtype):
    torch_cell, fused_cell, _ = helpers.cells(32, 64, True, dtype)
    exact_cell = lf.reference.LSTMCell(32, 64, dtype=torch.float64)
    exact_cell.load_state_dict(torch_cell.state_dict())
    x = helpers.randn(32, dtype=dtype)
    hx = helpers.state(None, 64, dtype)
    with torch.no_grad():
        h_1, c_1, gates = fused_cell(x, hx, return_gates=True)
        exact = exact_cell(x.double(), tuple(t.double() for t in hx), return_gates=True)
    for actual, expected in zip([h_1, c_1, *gates], [exact[0], exact[1], *exact[2]], strict=True):
        assert actual.dtype == dtype and actual.shape == (64,)
        assert helpers.relative_error(actual, expected) < OUTPUT_LIMITS[dtype]


# --- CPU autocast ---------------------------------------------------------------------------------

AUTOCAST_DTYPES = [torch.bfloat16, torch.float16]


def autocast_step(cell, projection, x, hx, autocast_dtype, feed):
    """Runs cell under CPU autocast. feed says where the cell's input comes from: 'float32' (the
    float32 input itself) or 'linear' (a Linear layer under the same autocast, which hands over
    its output in the autocast dtype, as in any model with a layer before the cell)."""
    with torch.autocast("cpu", dtype=autocast_dtype):
        cell_input = projection(x) if feed == "linear" else x
        h_1, c_1 = cell(cell_input, hx)
    return h_1, c_1


AUTOCAST_CASES = [
    ("float32", "given"),
    ("float32", "omitted"),
    # A Linear under autocast hands the cell its output in the autocast dtype: nn.LSTMCell then
    # returns that dtype (hx omitted) or float32 (float32 states).
    ("linear", "omitted"),
    ("linear", "given"),
]


@pytest.mark.parametrize("feed, state", AUTOCAST_CASES, ids=["-".join(case) for case in AUTOCAST_CASES])
@pytest.mark.parametrize("autocast_dtype", AUTOCAST_DTYPES, ids=str)
def test_cpu_autocast_dtypes_match_nn(helpers, autocast_dtype, feed, state):
    torch_cell, fused_cell, _ = helpers.cells(32, 64, True, torch.float32)
    projection = nn.Linear(8, 32)
    x = helpers.randn(16, 8 if feed == "linear" else 32)
    hx = helpers.state(16, 64) if state == "given" else None

    expected = autocast_step(torch_cell, projection, x, hx, autocast_dtype, feed)
    actual = autocast_step(fused_cell, projection, x, hx, autocast_dtype, feed)
    # nn itself computes the gates in the autocast dtype here; the float64 computation from the
    # same input is the yardstick.
    exact_cell = nn.LSTMCell(32, 64, dtype=torch.float64)
    exact_cell.load_state_dict(torch_cell.state_dict())
    with torch.no_grad(), torch.autocast("cpu", dtype=autocast_dtype):
        cell_input = projection(x) if feed == "linear" else x
    exact = exact_cell(cell_input.double(), None if hx is None else tuple(t.double() for t in hx))
    for name, ours, theirs, reference in zip(("h_1", "c_1"), actual, expected, exact, strict=True):
        assert ours.dtype == theirs.dtype, f"{name}: {ours.dtype} but nn gives {theirs.dtype}"
        error = helpers.relative_error(ours, reference)
        assert error < OUTPUT_LIMITS[autocast_dtype], f"{name}: relative error {error:.2e}"


@pytest.mark.parametrize("autocast_dtype", AUTOCAST_DTYPES, ids=str)
def test_cpu_autocast_float32_cell_matches_float32(helpers, autocast_dtype):
    """lstm_cell is not on the CPU's autocast list: a float32 cell under CPU autocast computes in
    float32, values and gradients, so it matches the plain float32 nn.LSTMCell."""
    torch_cell, fused_cell, _ = helpers.cells(32, 64, True, torch.float32)
    x = helpers.randn(16, 32)
    hx = helpers.state(16, 64)
    loss_weights = helpers.state(16, 64)
    with torch.autocast("cpu", dtype=autocast_dtype):
        outputs, grads = step_with_grads(fused_cell, x, hx, loss_weights, torch.float32)
    expected_outputs, expected_grads = step_with_grads(torch_cell, x, hx, loss_weights, torch.float32)
    for actual, expected in zip([*outputs, *grads], [*expected_outputs, *expected_grads], strict=True):
        assert actual.dtype == torch.float32
        helpers.assert_close(actual, expected)


@pytest.mark.parametrize("autocast_dtype", AUTOCAST_DTYPES, ids=str)
def test_cpu_autocast_float64_cell(helpers, autocast_dtype):
    torch_cell, fused_cell, _ = helpers.cells(7, 5, True, torch.float64)
    x = helpers.randn(3, 7, dtype=torch.float64)
    hx = helpers.state(3, 5, torch.float64)
    with torch.autocast("cpu", dtype=autocast_dtype):
        expected = torch_cell(x, hx)
        actual = fused_cell(x, hx)
    for ours, theirs in zip(actual, expected, strict=True):
        assert ours.dtype == theirs.dtype == torch.float64
        helpers.assert_close(ours, theirs)


@pytest.mark.parametrize("state", ["given", "omitted"])
@pytest.mark.parametrize("autocast_dtype", AUTOCAST_DTYPES, ids=str)
def test_cpu_autocast_linear_fed_gradients_like_nn(helpers, autocast_dtype, state):
    """Training through a Linear and the cell under CPU autocast: every gradient (the Linear's too)
    has nn's dtype and agrees with nn's to the autocast dtype's precision (nn computes the gates in
    it, lstm_fused in float32, so neither is exact)."""
    torch_cell, fused_cell, _ = helpers.cells(32, 64, True, torch.float32)
    projection = nn.Linear(8, 32)
    x = helpers.randn(16, 8)
    hx = helpers.state(16, 64) if state == "given" else None
    loss_weights = helpers.state(16, 64)

    def gradients(cell):
        with torch.autocast("cpu", dtype=autocast_dtype):
            h_1, c_1 = cell(projection(x), hx)
            loss = (h_1.float() * loss_weights[0]).sum() + (c_1.float() * loss_weights[1]).sum()
        return torch.autograd.grad(loss, [*projection.parameters(), *cell.parameters()])

    for index, (ours, theirs) in enumerate(zip(gradients(fused_cell), gradients(torch_cell), strict=True)):
        assert ours.dtype == theirs.dtype, index
        error = helpers.relative_error(ours, theirs)
        assert error < 2 * OUTPUT_LIMITS[autocast_dtype], f"gradient {index}: relative difference {error:.2e}"


# lf.LSTM in bfloat16 and float16: the products in the dtype (oneDNN where the CPU has it), the
# cell's math in float32, the states stored in the dtype. Judged against nn.LSTM in float64 on the
# same rounded weights and inputs, and against nn.LSTM's own error in the dtype: rounding the state
# at every step compounds over T, in nn as here.
@pytest.mark.parametrize("batch, hidden_size", [(3, 13), (9, 64)])
@pytest.mark.parametrize("dtype", LOW_DTYPES, ids=str)
def test_low_precision_sequence_against_float64(helpers, dtype, batch, hidden_size):
    steps, input_size = 16, 11
    torch_lstm = nn.LSTM(input_size, hidden_size, num_layers=2, bidirectional=True, dtype=dtype)
    fused_lstm = lf.LSTM(input_size, hidden_size, num_layers=2, bidirectional=True, dtype=dtype)
    fused_lstm.load_state_dict(torch_lstm.state_dict())
    exact_lstm = nn.LSTM(input_size, hidden_size, num_layers=2, bidirectional=True, dtype=torch.float64)
    exact_lstm.load_state_dict(torch_lstm.state_dict())
    x = helpers.randn(steps, batch, input_size, dtype=dtype)
    h_0, c_0 = (helpers.randn(4, batch, hidden_size, dtype=dtype) for _ in range(2))
    weights = helpers.randn(steps, batch, 2 * hidden_size, dtype=dtype)

    def run(lstm, dtype):
        leaves = [t.to(dtype).requires_grad_() for t in (x, h_0, c_0)]
        output, (h_n, c_n) = lstm(leaves[0], (leaves[1], leaves[2]))
        loss = (output * weights.to(dtype)).sum() + h_n.sum() + (c_n * 0.5).sum()
        return [output, h_n, c_n], torch.autograd.grad(loss, leaves + list(lstm.parameters()))

    outputs, grads = run(fused_lstm, dtype)
    nn_outputs, nn_grads = run(torch_lstm, dtype)
    exact_outputs, exact_grads = run(exact_lstm, torch.float64)
    for index, (actual, nn_value, exact) in enumerate(zip(outputs + list(grads), nn_outputs + list(nn_grads),
                                                          exact_outputs + list(exact_grads), strict=True)):
        assert actual.dtype == nn_value.dtype == dtype, index
        error = helpers.relative_error(actual, exact)
        nn_error = helpers.relative_error(nn_value, exact)
        assert error < max(2 * nn_error, 4 * torch.finfo(dtype).eps), (
            f"result {index}: relative error {error:.2e} against float64, nn.LSTM's {nn_error:.2e}")

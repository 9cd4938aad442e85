"""NaN and Inf propagate exactly as in nn.LSTMCell (same masks in the outputs and in every
gradient), and huge inputs saturate the gates without overflowing where nn's do not."""
import pytest
import torch

NAMES = ["input", "h_0", "c_0", "weight_ih", "weight_hh", "bias_ih", "bias_hh"]
OUTPUT_NAMES = ["h_1", "c_1", *(f"grad {name}" for name in NAMES)]
# Reduced precision: nn rounds after each of its elementwise ops, lstm_fused once at the end.
LOOSE = {torch.float16: dict(rtol=2e-2, atol=2e-2), torch.bfloat16: dict(rtol=5e-2, atol=5e-2)}


def run(cell, input, state, loss_weights):
    x, h_0, c_0 = (t.clone().requires_grad_(True) for t in (input, *state))
    h_1, c_1 = cell(x, (h_0, c_0))
    loss = (h_1 * loss_weights[0]).sum() + (c_1 * loss_weights[1]).sum()
    return [h_1, c_1, *torch.autograd.grad(loss, [x, h_0, c_0, *cell.parameters()])]


def assert_same_special_values(helpers, actual_list, expected_list, dtype):
    for name, actual, expected in zip(OUTPUT_NAMES, actual_list, expected_list, strict=True):
        assert torch.equal(actual.isnan(), expected.isnan()), f"{name}: NaN mask differs from nn"
        assert torch.equal(actual.isposinf(), expected.isposinf()), f"{name}: +Inf mask differs from nn"
        assert torch.equal(actual.isneginf(), expected.isneginf()), f"{name}: -Inf mask differs from nn"
        finite = expected.isfinite()
        # values far from 1 (a 1e30 gradient): judge relative to the largest
        scale = max(1.0, expected[finite].abs().max().item()) if finite.any() else 1.0
        tolerances = LOOSE.get(dtype) or helpers.tolerances[dtype]
        torch.testing.assert_close(
            actual[finite] / scale, expected[finite] / scale, **tolerances,
            msg=lambda m: f"{name}: finite values differ from nn: {m}",
        )


def cells_with_value(helpers, dtype, where, value, whole=False):
    """nn and lf cells and inputs with `value` planted in one element of `where` (or filling all
    of it), the rest random."""
    torch_cell, fused_cell, _ = helpers.cells(5, 6, True, dtype)
    input = helpers.randn(3, 5, dtype=dtype)
    state = list(helpers.state(3, 6, dtype))
    tensors = {"input": input, "h_0": state[0], "c_0": state[1]}
    with torch.no_grad():
        target = tensors[where] if where in tensors else getattr(torch_cell, where)
        if whole:
            target.copy_(target.sign() * abs(value))
        else:
            target.view(-1)[7] = value  # for weights and biases: one gate row of one unit
    fused_cell.load_state_dict(torch_cell.state_dict())
    return torch_cell, fused_cell, input, state


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("where", NAMES)
def test_nan_and_inf_propagate_like_nn(helpers, where, value, dtype):
    torch_cell, fused_cell, input, state = cells_with_value(helpers, dtype, where, value)
    loss_weights = helpers.state(3, 6, dtype)
    expected = run(torch_cell, input, state, loss_weights)
    actual = run(fused_cell, input, state, loss_weights)
    if value != value:  # NaN always reaches the outputs (an Inf may saturate a gate instead)
        assert not all(t.isfinite().all() for t in expected[:2]), "the planted NaN should reach nn's outputs"
    assert_same_special_values(helpers, actual, expected, dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("whole", [False, True], ids=["one_element", "whole_tensor"])
@pytest.mark.parametrize("value", [1e4, -1e4, 1e30, -1e30])
@pytest.mark.parametrize("where", NAMES)
def test_huge_values_like_nn(helpers, where, value, whole, dtype):
    """Saturated gates: sigmoid -> exactly 0 or 1, tanh -> +-1, without inf/inf NaNs."""
    torch_cell, fused_cell, input, state = cells_with_value(helpers, dtype, where, value, whole)
    loss_weights = helpers.state(3, 6, dtype)
    expected = run(torch_cell, input, state, loss_weights)
    actual = run(fused_cell, input, state, loss_weights)
    for name, ours, theirs in zip(OUTPUT_NAMES, actual, expected, strict=True):
        assert ours[theirs.isfinite()].isfinite().all(), f"{name}: non-finite where nn's is finite"
    assert_same_special_values(helpers, actual, expected, dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("where", ["input", "h_0", "c_0"])
def test_huge_values_low_precision(helpers, where, dtype):
    value = torch.finfo(dtype).max / 4
    torch_cell, fused_cell, input, state = cells_with_value(helpers, dtype, where, value, whole=True)
    loss_weights = helpers.state(3, 6, dtype)
    expected = run(torch_cell, input, state, loss_weights)
    actual = run(fused_cell, input, state, loss_weights)
    for name, ours, theirs in zip(OUTPUT_NAMES, actual, expected, strict=True):
        assert ours[theirs.isfinite()].isfinite().all(), f"{name}: non-finite where nn's is finite"
    assert_same_special_values(helpers, actual, expected, dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_saturated_gates_are_exact(helpers, dtype):
    """With pre-activations of +-1e30 the returned gates are exactly 0, 1 or +-1, as the reference's."""
    _, fused_cell, reference_cell = helpers.cells(4, 3, True, dtype)
    input = helpers.randn(2, 4, dtype=dtype) * 1e30
    state = helpers.state(2, 3, dtype)
    with torch.no_grad():
        _, _, gates = fused_cell(input, state, return_gates=True)
        _, _, reference_gates = reference_cell(input, state, return_gates=True)
    for name, gate, reference_gate in zip(gates._fields, gates, reference_gates, strict=True):
        assert torch.equal(gate, reference_gate), name

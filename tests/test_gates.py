"""Gate introspection: return_gates=True hands back the activated i, f, g, o; they equal the
reference cell's, gradients flow through them like through h_1 and c_1, and asking for them
changes nothing else."""
import pytest
import torch

import lstm_fused as lf

DTYPES = [torch.float64, torch.float32]
GATE_NAMES = ["input", "forget", "cell", "output"]
SIZES = [(1, 1, 1), (3, 7, 5), (64, 128, 256), (2, 0, 3)]


def make_input(helpers, batch, input_size, dtype):
    return helpers.randn(*(() if batch is None else (batch,)), input_size, dtype=dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("batch, input_size, hidden_size", SIZES + [(None, 7, 5)])
def test_gates_equal_reference(helpers, batch, input_size, hidden_size, bias, dtype):
    _, fused_cell, reference_cell = helpers.cells(input_size, hidden_size, bias, dtype)
    x = make_input(helpers, batch, input_size, dtype)
    hx = helpers.state(batch, hidden_size, dtype)
    with torch.no_grad():
        h_1, c_1, gates = fused_cell(x, hx, return_gates=True)
        ref_h_1, ref_c_1, ref_gates = reference_cell(x, hx, return_gates=True)
    assert isinstance(gates, lf.LSTMGates)
    assert gates._fields == tuple(GATE_NAMES)
    helpers.assert_close(h_1, ref_h_1)
    helpers.assert_close(c_1, ref_c_1)
    for name in GATE_NAMES:
        gate, ref_gate = getattr(gates, name), getattr(ref_gates, name)
        assert gate.shape == h_1.shape and gate.dtype == dtype, name
        helpers.assert_close(gate, ref_gate, msg=lambda m: f"gate {name}: {m}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("batched", [True, False], ids=["batched", "unbatched"])
def test_gates_with_state_omitted(helpers, batched, dtype):
    _, fused_cell, reference_cell = helpers.cells(7, 5, True, dtype)
    x = make_input(helpers, 4 if batched else None, 7, dtype)
    with torch.no_grad():
        outputs = fused_cell(x, return_gates=True)
        expected = reference_cell(x, return_gates=True)
    for actual, wanted in zip([*outputs[:2], *outputs[2]], [*expected[:2], *expected[2]], strict=True):
        helpers.assert_close(actual, wanted)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("batch, input_size, hidden_size", SIZES + [(None, 7, 5)])
def test_states_unchanged_by_return_gates(helpers, batch, input_size, hidden_size, dtype):
    """Same kernels either way: h_1 and c_1 are bit-identical, and so are their gradients."""
    _, fused_cell, _ = helpers.cells(input_size, hidden_size, True, dtype)
    x = make_input(helpers, batch, input_size, dtype)
    hx = helpers.state(batch, hidden_size, dtype)
    weight_h, weight_c = helpers.state(batch, hidden_size, dtype)

    def step(return_gates):
        outputs = fused_cell(x, hx, return_gates=return_gates)
        if return_gates:
            assert len(outputs) == 3
        else:
            assert len(outputs) == 2
        h_1, c_1 = outputs[:2]
        grads = torch.autograd.grad((h_1 * weight_h).sum() + (c_1 * weight_c).sum(), list(fused_cell.parameters()))
        return [h_1, c_1, *grads]

    for plain, with_gates in zip(step(False), step(True), strict=True):
        assert torch.equal(plain, with_gates)


def gate_losses(dtype, helpers, shape):
    """Losses over (h_1, c_1, gates), each with fresh random weights; the name says what is used."""
    w = {name: helpers.randn(*shape, dtype=dtype) for name in ["h", "c", *GATE_NAMES]}
    return {
        "forget_only": lambda h, c, g: (g.forget * w["forget"]).sum(),
        "output_only": lambda h, c, g: (g.output * w["output"]).sum(),
        "each_gate": lambda h, c, g: sum((getattr(g, n) * w[n]).sum() for n in GATE_NAMES),
        "gates_and_h": lambda h, c, g: (h * w["h"]).sum() + (g.input * w["input"]).sum() + (g.cell * w["cell"]).sum(),
        "everything": lambda h, c, g: (h * w["h"]).sum()
        + (c * w["c"]).sum()
        + sum((getattr(g, n) * w[n]).sum() for n in GATE_NAMES),
        "gate_products": lambda h, c, g: (g.forget * g.input * c).sum() + g.output.pow(2).mean(),
    }


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "loss_name", ["forget_only", "output_only", "each_gate", "gates_and_h", "everything", "gate_products"]
)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("batch, input_size, hidden_size", SIZES + [(None, 7, 5)])
def test_gradients_through_gates_match_reference(helpers, batch, input_size, hidden_size, bias, loss_name, dtype):
    _, fused_cell, reference_cell = helpers.cells(input_size, hidden_size, bias, dtype)
    x = make_input(helpers, batch, input_size, dtype)
    hx = helpers.state(batch, hidden_size, dtype)
    shape = (hidden_size,) if batch is None else (batch, hidden_size)
    loss_fn = gate_losses(dtype, helpers, shape)[loss_name]

    def step(cell):
        x_, h_0, c_0 = helpers.leaves([x, *hx])
        h_1, c_1, gates = cell(x_, (h_0, c_0), return_gates=True)
        # A loss of the gates alone does not reach c_0 in the reference: its gradient is zero.
        return torch.autograd.grad(
            loss_fn(h_1, c_1, gates), [x_, h_0, c_0, *cell.parameters()], allow_unused=True, materialize_grads=True
        )

    names = ["input", "h_0", "c_0", *dict(fused_cell.named_parameters())]
    for name, actual, expected in zip(names, step(fused_cell), step(reference_cell), strict=True):
        helpers.assert_close(actual, expected, msg=lambda m: f"grad of {name}: {m}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_functional_return_gates(helpers, dtype):
    x = helpers.randn(3, 7, dtype=dtype)
    hx = helpers.state(3, 5, dtype)
    weights = [
        helpers.randn(20, 7, dtype=dtype, scale=0.4),
        helpers.randn(20, 5, dtype=dtype, scale=0.4),
        helpers.randn(20, dtype=dtype),
        helpers.randn(20, dtype=dtype),
    ]
    h_1, c_1, gates = lf.lstm_cell(x, hx, *weights, return_gates=True)
    ref_h_1, ref_c_1, ref_gates = lf.reference.lstm_cell(x, hx, *weights, return_gates=True)
    assert isinstance(gates, lf.LSTMGates)
    for actual, expected in zip([h_1, c_1, *gates], [ref_h_1, ref_c_1, *ref_gates], strict=True):
        helpers.assert_close(actual, expected)
    plain = lf.lstm_cell(x, hx, *weights)
    assert len(plain) == 2
    assert torch.equal(plain[0], h_1) and torch.equal(plain[1], c_1)


def test_gates_train_the_cell(helpers):
    """An optimiser step on a loss of the gates alone moves the parameters as the reference's does."""
    torch_cell, fused_cell, reference_cell = helpers.cells(4, 6, True, torch.float64)
    x = helpers.randn(5, 4, dtype=torch.float64)
    hx = helpers.state(5, 6, torch.float64)
    for cell in (fused_cell, reference_cell):
        optimizer = torch.optim.SGD(cell.parameters(), lr=0.5)
        for _ in range(3):
            optimizer.zero_grad()
            _, _, gates = cell(x, hx, return_gates=True)
            (gates.forget - 1).pow(2).mean().backward()
            optimizer.step()
    for (name, fused), reference in zip(fused_cell.named_parameters(), reference_cell.parameters(), strict=True):
        helpers.assert_close(fused, reference, msg=lambda m: f"{name}: {m}")
        assert not torch.equal(fused, torch_cell.state_dict()[name]), f"{name} did not move"

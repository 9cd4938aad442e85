"""The registered operators on their own: torch.library.opcheck (schema, fake/meta
implementations, autograd registration, dispatch), and each op's values against the cell
written with plain torch ops, at sizes that exercise the 8-lane loops, their scalar tails and a
thread split in the middle of a row."""
import itertools

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import lstm_fused as lf

ops = torch.ops.lstm_fused
DTYPES = [torch.float64, torch.float32]
ALL_DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
# hidden sizes: below one vector, one vector, vector + tail, several vectors + tail; (3, 3001):
# 9003 units, more than one task's grain, so the two threads split row 1 mid-way (for
# cell_forward, (5, 1100): 5500 units, split in row 2).
POINTWISE_SIZES = [(1, 1), (2, 7), (3, 8), (2, 13), (4, 67), (3, 3001)]


def forward_args(helpers, batch, input_size, hidden_size, dtype, bias=True, requires_grad=False):
    randn = lambda *shape, scale=1.0: helpers.randn(  # noqa: E731
        *shape, dtype=dtype, requires_grad=requires_grad, scale=scale
    )
    # Weights at nn.LSTMCell's initial scale (1/sqrt(hidden)), so pre-activations are O(1) as in a
    # real cell: with unit weights and K = 1100 they reach ~100, where any two float32 products
    # (MKL's, oneDNN's) differ by more than 1e-5 after the sigmoid.
    weight_scale = max(hidden_size, 1) ** -0.5
    return [
        randn(batch, input_size),
        randn(batch, hidden_size),
        randn(batch, hidden_size),
        randn(4 * hidden_size, input_size, scale=weight_scale),
        randn(4 * hidden_size, hidden_size, scale=weight_scale),
        randn(4 * hidden_size) if bias else None,
        randn(4 * hidden_size) if bias else None,
    ]


def activated(preactivation):
    i, f, g, o = preactivation.chunk(4, dim=-1)
    return torch.cat([i.sigmoid(), f.sigmoid(), g.tanh(), o.sigmoid()], dim=-1)


def plain_cell(preactivation, cx):
    """(hy, cy, activated gates) from pre-activations, with torch ops in float64."""
    gates = activated(preactivation.double())
    i, f, g, o = gates.chunk(4, dim=-1)
    cy = f * cx.double() + i * g
    return o * cy.tanh(), cy, gates


# --- opcheck --------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("requires_grad", [False, True], ids=["no_grad", "requires_grad"])
def test_opcheck_cell_forward(helpers, requires_grad, bias, dtype):
    args = forward_args(helpers, 3, 5, 4, dtype, bias, requires_grad)
    torch.library.opcheck(ops.cell_forward.default, args)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
def test_opcheck_cell_pointwise(helpers, bias, dtype):
    args = [
        helpers.randn(3, 16, dtype=dtype),
        helpers.randn(3, 4, dtype=dtype),
        helpers.randn(16, dtype=dtype) if bias else None,
        torch.empty(3, 4, dtype=dtype),
        torch.empty(3, 4, dtype=dtype),
    ]
    torch.library.opcheck(ops.cell_pointwise_.default, args)


def gate_grads_args(helpers, batch, hidden_size, dtype, present):
    """present: which of (grad_hy, grad_cy, grad_gates) are given, the others None."""
    preactivation = helpers.randn(batch, 4 * hidden_size, dtype=dtype)
    cx = helpers.randn(batch, hidden_size, dtype=dtype)
    _, cy, gates = plain_cell(preactivation, cx)
    grads = [
        helpers.randn(batch, hidden_size, dtype=dtype),
        helpers.randn(batch, hidden_size, dtype=dtype),
        helpers.randn(batch, 4 * hidden_size, dtype=dtype),
    ]
    grads = [g if given else None for g, given in zip(grads, present)]
    return [*grads, cx, cy.to(dtype), gates.to(dtype)]


PRESENCE = list(itertools.product([True, False], repeat=3))
PRESENCE_IDS = ["".join(name for name, given in zip(("h", "c", "g"), p) if given) or "none" for p in PRESENCE]


@pytest.mark.parametrize("present", PRESENCE, ids=PRESENCE_IDS)
def test_opcheck_cell_gate_grads(helpers, present):
    torch.library.opcheck(ops.cell_gate_grads.default, gate_grads_args(helpers, 3, 4, torch.float64, present))


@pytest.mark.parametrize(
    "output_mask", [[True] * 6, [False, True, False, True, False, True], [True, False, True, False, True, False]]
)
@pytest.mark.parametrize(
    "present", [(True, True, False), (True, False, True), (False, True, False)], ids=["hc", "hg", "c"]
)
# float32 at this batch is the CPU's small-batch kernel (csrc/cpu/small_batch.h), float64 the composite one.
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_opcheck_cell_backward(helpers, present, output_mask, dtype):
    input, hx, cx, weight_ih, weight_hh, bias_ih, bias_hh = forward_args(helpers, 3, 5, 4, dtype)
    _, cy, gates = ops.cell_forward(input, hx, cx, weight_ih, weight_hh, bias_ih, bias_hh)
    grads = gate_grads_args(helpers, 3, 4, dtype, present)[:3]
    args = [*grads, input, hx, cx, cy, gates, weight_ih, weight_hh, output_mask]
    torch.library.opcheck(ops.cell_backward.default, args)


# --- values ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("batch, hidden_size", POINTWISE_SIZES)
def test_cell_pointwise_values(helpers, batch, hidden_size, bias, dtype):
    preactivation = helpers.randn(batch, 4 * hidden_size, dtype=dtype, scale=2.0)
    cx = helpers.randn(batch, hidden_size, dtype=dtype)
    bias_tensor = helpers.randn(4 * hidden_size, dtype=dtype) if bias else None
    gates = preactivation.clone()
    hy = torch.full((batch, hidden_size), float("nan"), dtype=dtype)
    cy = torch.full((batch, hidden_size), float("nan"), dtype=dtype)
    assert ops.cell_pointwise_(gates, cx, bias_tensor, hy, cy) is None

    expected_hy, expected_cy, expected_gates = plain_cell(
        preactivation.double() + (bias_tensor.double() if bias else 0), cx
    )
    for name, actual, expected in (("gates", gates, expected_gates), ("hy", hy, expected_hy), ("cy", cy, expected_cy)):
        assert actual.dtype == dtype
        if dtype in (torch.float16, torch.bfloat16):
            # computed in float32 from the rounded inputs, rounded once on the way out
            tolerances = dict(rtol=2 * torch.finfo(dtype).eps, atol=2 * torch.finfo(dtype).eps)
            torch.testing.assert_close(actual.double(), expected, **tolerances, msg=lambda m: f"{name}: {m}")
        else:
            helpers.assert_close(actual, expected.to(dtype), msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("batch, input_size, hidden_size", [(1, 1, 1), (3, 5, 13), (5, 2, 1100)])
def test_cell_forward_values(helpers, batch, input_size, hidden_size, dtype):
    """hy, cy and the activated gates buffer [batch, 4 * hidden] in PyTorch's order i, f, g, o."""
    input, hx, cx, weight_ih, weight_hh, bias_ih, bias_hh = forward_args(helpers, batch, input_size, hidden_size, dtype)
    hy, cy, gates = ops.cell_forward(input, hx, cx, weight_ih, weight_hh, bias_ih, bias_hh)
    preactivation = input @ weight_ih.T + bias_ih + hx @ weight_hh.T + bias_hh
    expected_hy, expected_cy, expected_gates = plain_cell(preactivation, cx)
    assert gates.shape == (batch, 4 * hidden_size) and gates.is_contiguous()
    helpers.assert_close(hy, expected_hy.to(dtype))
    helpers.assert_close(cy, expected_cy.to(dtype))
    helpers.assert_close(gates, expected_gates.to(dtype))
    torch_hy, torch_cy = torch.lstm_cell(input, (hx, cx), weight_ih, weight_hh, bias_ih, bias_hh)
    helpers.assert_close(hy, torch_hy)
    helpers.assert_close(cy, torch_cy)


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("present", PRESENCE, ids=PRESENCE_IDS)
@pytest.mark.parametrize("batch, hidden_size", POINTWISE_SIZES)
def test_cell_gate_grads_values(helpers, batch, hidden_size, present, dtype):
    """Against autograd through the cell written with torch ops, from the same pre-activations."""
    preactivation = helpers.randn(batch, 4 * hidden_size, dtype=torch.float64, requires_grad=True)
    cx = helpers.randn(batch, hidden_size, dtype=torch.float64, requires_grad=True)
    hy, cy, gates = plain_cell(preactivation, cx)
    grad_hy, grad_cy, grad_gates = (
        helpers.randn(*t.shape, dtype=dtype) if given else None for t, given in zip((hy, cy, gates), present)
    )
    grad_preactivation, grad_cx = ops.cell_gate_grads(
        grad_hy, grad_cy, grad_gates, cx.detach().to(dtype), cy.detach().to(dtype), gates.detach().to(dtype)
    )
    assert grad_preactivation.shape == preactivation.shape and grad_cx.shape == cx.shape
    assert grad_preactivation.dtype == grad_cx.dtype == dtype

    outputs_and_grads = zip((hy, cy, gates), (grad_hy, grad_cy, grad_gates))
    used = [(out, grad.double()) for out, grad in outputs_and_grads if grad is not None]
    if used:
        expected = torch.autograd.grad(
            [out for out, _ in used], [preactivation, cx], [g for _, g in used], allow_unused=True,
            materialize_grads=True,
        )
    else:
        expected = (torch.zeros_like(preactivation), torch.zeros_like(cx))
    for name, actual, wanted in zip(("grad_preactivation", "grad_cx"), (grad_preactivation, grad_cx), expected):
        if dtype in (torch.float16, torch.bfloat16):
            # inputs rounded to dtype, then a few float32 operations and one rounding out
            error = helpers.relative_error(actual, wanted)
            assert error < 8 * torch.finfo(dtype).eps, f"{name}: relative error {error:.2e}"
        else:
            helpers.assert_close(actual, wanted.to(dtype), msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("output_mask", [list(m) for m in itertools.product([True, False], repeat=6) if any(m)][::7])
def test_cell_backward_output_mask(helpers, output_mask, dtype):
    """Each output the mask asks for equals the full computation's; the others come back empty."""
    input, hx, cx, weight_ih, weight_hh, bias_ih, bias_hh = forward_args(helpers, 3, 5, 4, dtype)
    _, cy, gates = ops.cell_forward(input, hx, cx, weight_ih, weight_hh, bias_ih, bias_hh)
    grad_hy, grad_cy = helpers.randn(3, 4, dtype=dtype), helpers.randn(3, 4, dtype=dtype)
    args = [grad_hy, grad_cy, None, input, hx, cx, cy, gates, weight_ih, weight_hh]
    full = ops.cell_backward(*args, [True] * 6)
    masked = ops.cell_backward(*args, output_mask)
    for index, (wanted, everything, actual) in enumerate(zip(output_mask, full, masked, strict=True)):
        if wanted:
            assert torch.equal(actual, everything), index
        else:
            assert actual.numel() == 0, index
    # and the full one is the gradient of nn's functional cell
    leaves = [t.clone().requires_grad_(True) for t in (input, hx, cx, weight_ih, weight_hh, bias_ih)]
    torch_hy, torch_cy = torch.lstm_cell(*leaves[:1], tuple(leaves[1:3]), *leaves[3:], bias_hh)
    expected = torch.autograd.grad([torch_hy, torch_cy], leaves, [grad_hy, grad_cy])
    for actual, wanted in zip(full, expected, strict=True):
        helpers.assert_close(actual, wanted)


def test_set_poison_outputs_returns_previous_setting():
    # the autouse fixture turned it on
    assert ops._set_poison_outputs(False) is True
    assert ops._set_poison_outputs(False) is False
    assert ops._set_poison_outputs(True) is False
    assert ops._set_poison_outputs(True) is True


@pytest.mark.parametrize("poison", [True, False])
def test_results_do_not_depend_on_poisoning(helpers, poison):
    """Poisoning only changes what unwritten memory holds; every element is written either way."""
    args = forward_args(helpers, 5, 6, 7, torch.float32)
    with torch.no_grad():
        reference = ops.cell_forward(*args)
    ops._set_poison_outputs(poison)
    for _ in range(3):
        with torch.no_grad():
            for actual, expected in zip(ops.cell_forward(*args), reference, strict=True):
                assert torch.equal(actual, expected)


def flops(fn):
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


@pytest.mark.parametrize(
    "wants_grad", [(True, False, False), (False, True, True), (True, True, True)], ids=["input", "state", "all"]
)
def test_flop_count_like_nn_lstm_cell(helpers, wants_grad):
    """FlopCounterMode counts the fused cell's forward and backward products as nn.LSTMCell's (its
    addmm and mm), for whichever gradients autograd asks for."""
    torch_cell, fused_cell, _ = helpers.cells(7, 5)
    x, h_0, c_0 = helpers.randn(3, 7), *helpers.state(3, 5)
    x, h_0, c_0 = (t.requires_grad_(wants) for t, wants in zip((x, h_0, c_0), wants_grad))

    def step(cell):
        h_1, c_1 = cell(x, (h_0, c_0))
        (h_1.sum() + c_1.sum()).backward()

    expected = flops(lambda: step(torch_cell))
    assert expected > 0
    assert flops(lambda: step(fused_cell)) == expected
    with torch.no_grad():
        assert flops(lambda: fused_cell(x, (h_0, c_0))) == flops(lambda: torch_cell(x, (h_0, c_0)))


def test_flop_count_of_lstm():
    """nn.LSTM on the CPU counts nothing (oneDNN's op has no formula); lf.LSTM counts its products:
    per layer and row, 2 * 4H * (I + H) forward; backward the same for the recurrence and the
    weight gradients, and the input gradient where the layer's input needs one."""
    steps, batch, input_size, hidden_size = 4, 3, 7, 5
    lstm = lf.LSTM(input_size, hidden_size, num_layers=2)
    x = torch.randn(steps, batch, input_size, requires_grad=True)
    rows, gates = steps * batch, 4 * hidden_size
    forward = 2 * rows * gates * ((input_size + hidden_size) + (hidden_size + hidden_size))
    assert flops(lambda: lstm(x)) == forward
    # Each layer's backward: grad input and grad W_ih (its input width), the recurrence and grad W_hh.
    backward = sum(2 * rows * gates * 2 * (width + hidden_size) for width in (input_size, hidden_size))
    assert flops(lambda: lstm(x)[0].sum().backward()) == forward + backward



# --- sequence_forward / sequence_backward with a projection (weight_hr, LSTMP) ---------------------


def sequence_args(helpers, batch_sizes, input_size, hidden_size, proj_size, bias=True, requires_grad=False,
                  reverse=False, dtype=torch.float64):
    """sequence_forward's arguments, weight_hr last ([proj_size, hidden_size]; proj_size 0: none)."""
    randn = lambda *shape: helpers.randn(*shape, dtype=dtype, requires_grad=requires_grad, scale=0.5)  # noqa: E731
    batch_sizes = torch.tensor(batch_sizes, dtype=torch.int64)
    rows, batch = int(batch_sizes.sum()), int(batch_sizes[0])
    state_size = proj_size or hidden_size
    return [
        randn(rows, input_size), batch_sizes, randn(batch, state_size), randn(batch, hidden_size),
        randn(4 * hidden_size, input_size), randn(4 * hidden_size, state_size),
        randn(4 * hidden_size) if bias else None, randn(4 * hidden_size) if bias else None, reverse,
        randn(proj_size, hidden_size) if proj_size else None,
    ]


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("batch_sizes", [(3, 3, 3), (3, 2, 2, 1)])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_opcheck_sequence_forward_with_projection(helpers, reverse, batch_sizes, bias, dtype):
    args = sequence_args(helpers, batch_sizes, 5, 7, 3, bias=bias, requires_grad=True, reverse=reverse, dtype=dtype)
    torch.library.opcheck(ops.sequence_forward.default, args)


@pytest.mark.parametrize("proj_size", [0, 3], ids=["no_projection", "projection"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("present", [(True, True, True, False, False), (True, False, False, True, True)],
                         ids=["output_and_final", "output_and_states"])
def test_opcheck_sequence_backward(helpers, proj_size, dtype, present):
    forward = sequence_args(helpers, (3, 2, 2, 1), 5, 7, proj_size, dtype=dtype)
    input, batch_sizes, hx, cx, weight_ih, weight_hh, _, _, reverse, weight_hr = forward
    with torch.no_grad():
        output, hy, cy, cell_states, gates = ops.sequence_forward(*forward)
    grads = [helpers.randn(*t.shape, dtype=dtype) if wanted else None
             for t, wanted in zip((output, hy, cy, cell_states, gates), present)]
    args = [*grads, input, batch_sizes, hx, cx, weight_ih, weight_hh, output, cell_states, gates, reverse,
            [True] * 6, weight_hr]
    torch.library.opcheck(ops.sequence_backward.default, args)
    result = ops.sequence_backward(*args)
    assert len(result) == 7
    assert result[6].shape == ((proj_size, 7) if proj_size else (0,))


def test_flop_count_of_lstm_with_projection():
    """The projection's products counted like the others: forward 2 * P * H per row and layer,
    backward twice that (the gradient of o * tanh(c) and grad weight_hr); the recurrent product
    has P columns and the second layer's input is P wide."""
    steps, batch, input_size, hidden_size, proj_size = 4, 3, 7, 5, 2
    lstm = lf.LSTM(input_size, hidden_size, num_layers=2, proj_size=proj_size)
    x = torch.randn(steps, batch, input_size, requires_grad=True)
    rows, gates = steps * batch, 4 * hidden_size
    projection = 2 * rows * proj_size * hidden_size
    forward = sum(2 * rows * gates * (width + proj_size) + projection for width in (input_size, proj_size))
    assert flops(lambda: lstm(x)) == forward
    backward = sum(2 * rows * gates * 2 * (width + proj_size) + 2 * projection for width in (input_size, proj_size))
    assert flops(lambda: lstm(x)[0].sum().backward()) == forward + backward

"""Forward values and every gradient of lstm_fused's cell against nn.LSTMCell and against the
gate-by-gate reference cell: the size grid, with and without bias, unbatched input, only one of
h_1 / c_1 used, partial requires_grad, and non-contiguous tensors."""
import pytest
import torch

import lstm_fused as lf

DTYPES = [torch.float64, torch.float32]
GRAD_NAMES = ["input", "h_0", "c_0", "weight_ih", "weight_hh", "bias_ih", "bias_hh"]


def loss_of(h_1, c_1, weights, uses):
    """A loss with random weights on the outputs named in `uses` ('h', 'c' or 'hc')."""
    weight_h, weight_c = weights
    loss = h_1.new_zeros(())
    if "h" in uses:
        loss = loss + (h_1 * weight_h).sum()
    if "c" in uses:
        loss = loss + (c_1 * weight_c).sum()
    return loss


def run_module(cell, helpers, input, state, loss_weights, uses):
    """One step of `cell` from fresh leaves; returns (h_1, c_1) and the gradients of the loss with
    respect to input, h_0, c_0 and every parameter (named)."""
    x, h_0, c_0 = helpers.leaves([input, *(state or (None, None))])
    hx = None if state is None else (h_0, c_0)
    h_1, c_1 = cell(x, hx)
    parameters = dict(cell.named_parameters())
    wrt = {"input": x, "h_0": h_0, "c_0": c_0, **parameters}
    wrt = {name: t for name, t in wrt.items() if t is not None}
    grads = torch.autograd.grad(loss_of(h_1, c_1, loss_weights, uses), list(wrt.values()))
    return (h_1, c_1), dict(zip(wrt, grads))


def assert_step_matches(helpers, fused, expected, baseline):
    (fused_outputs, fused_grads), (expected_outputs, expected_grads) = fused, expected
    for name, actual, wanted in zip(("h_1", "c_1"), fused_outputs, expected_outputs):
        assert actual.dtype == wanted.dtype and actual.shape == wanted.shape, (name, baseline)
        helpers.assert_close(actual, wanted, msg=lambda m: f"{name} differs from {baseline}: {m}")
    assert fused_grads.keys() == expected_grads.keys()
    batch = fused_outputs[0].shape[0] if fused_outputs[0].dim() == 2 else 1
    for name in fused_grads:
        actual, wanted = fused_grads[name], expected_grads[name]
        assert actual.shape == wanted.shape, (name, baseline)
        # A weight or bias gradient sums `batch` rows: in float32 its rounding grows as sqrt(batch)
        # ulps of its terms, in an order that differs between BLAS libraries (at batch 64 aarch64's
        # put single elements 1.6e-5 from nn's, both 4.8e-6 from float64).
        overrides = {}
        if wanted.dtype == torch.float32 and (name.startswith("weight") or name.startswith("bias")):
            overrides["atol"] = helpers.tolerances[torch.float32]["atol"] * max(1.0, batch ** 0.5)
        helpers.assert_close(actual, wanted, msg=lambda m: f"grad of {name} differs from {baseline}: {m}", **overrides)


def check_against_both(helpers, input_size, hidden_size, bias, dtype, input, state, uses="hc"):
    torch_cell, fused_cell, reference_cell = helpers.cells(input_size, hidden_size, bias, dtype)
    out_shape = input.shape[:-1] + (hidden_size,)
    loss_weights = (helpers.randn(*out_shape, dtype=dtype), helpers.randn(*out_shape, dtype=dtype))
    fused = run_module(fused_cell, helpers, input, state, loss_weights, uses)
    assert_step_matches(helpers, fused, run_module(torch_cell, helpers, input, state, loss_weights, uses), "nn")
    assert_step_matches(
        helpers, fused, run_module(reference_cell, helpers, input, state, loss_weights, uses), "reference"
    )


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("hidden_size", [1, 5, 256])
@pytest.mark.parametrize("input_size", [0, 1, 7, 128])
@pytest.mark.parametrize("batch", [0, 1, 3, 64])
def test_grid_forward_and_gradients(helpers, batch, input_size, hidden_size, bias, dtype):
    input = helpers.randn(batch, input_size, dtype=dtype)
    check_against_both(
        helpers, input_size, hidden_size, bias, dtype, input, helpers.state(batch, hidden_size, dtype)
    )


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("uses", ["h", "c"], ids=["only_h1", "only_c1"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("batch, input_size, hidden_size", [(1, 1, 1), (3, 7, 5), (64, 128, 256), (2, 3, 13)])
def test_one_output_used(helpers, batch, input_size, hidden_size, bias, uses, dtype):
    """The backward receives no gradient (None) for the unused output."""
    input = helpers.randn(batch, input_size, dtype=dtype)
    check_against_both(
        helpers, input_size, hidden_size, bias, dtype, input, helpers.state(batch, hidden_size, dtype), uses
    )


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("uses", ["hc", "h", "c"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("input_size, hidden_size", [(1, 1), (7, 5), (128, 256), (0, 3)])
def test_unbatched(helpers, input_size, hidden_size, bias, uses, dtype):
    input = helpers.randn(input_size, dtype=dtype)
    check_against_both(
        helpers, input_size, hidden_size, bias, dtype, input, helpers.state(None, hidden_size, dtype), uses
    )


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("batched", [True, False], ids=["batched", "unbatched"])
@pytest.mark.parametrize("input_size, hidden_size", [(7, 5), (128, 256)])
def test_state_omitted(helpers, input_size, hidden_size, batched, dtype):
    """hx=None: zero states, and gradients still reach input and every parameter."""
    input = helpers.randn(*((3,) if batched else ()), input_size, dtype=dtype)
    check_against_both(helpers, input_size, hidden_size, True, dtype, input, None)


# --- the functional form: partial requires_grad, partial bias, non-contiguous tensors ------------


def run_functional(cell_fn, helpers, tensors, requires_grad, loss_weights, uses="hc"):
    """tensors: input, h_0, c_0, weight_ih, weight_hh, bias_ih, bias_hh (biases may be None).
    Only those flagged in requires_grad are leaves that require grad; gradients come back as a
    dict over those names."""
    leaves = [
        None if t is None else (t.detach().requires_grad_(True) if wants else t.detach())
        for t, wants in zip(tensors, requires_grad)
    ]
    # detach() keeps strides, so a non-contiguous tensor stays non-contiguous.
    for t, original in zip(leaves, tensors):
        assert t is None or t.stride() == original.stride()
    x, h_0, c_0, weight_ih, weight_hh, bias_ih, bias_hh = leaves
    h_1, c_1 = cell_fn(x, (h_0, c_0), weight_ih, weight_hh, bias_ih, bias_hh)
    wrt = {name: t for name, t in zip(GRAD_NAMES, leaves) if t is not None and t.requires_grad}
    grads = torch.autograd.grad(loss_of(h_1, c_1, loss_weights, uses), list(wrt.values())) if wrt else ()
    return (h_1, c_1), dict(zip(wrt, grads))


def torch_lstm_cell(input, hx, weight_ih, weight_hh, bias_ih=None, bias_hh=None):
    """nn.LSTMCell's own functional path (what its forward calls)."""
    return torch.lstm_cell(input, hx, weight_ih, weight_hh, bias_ih, bias_hh)


def check_functional(helpers, tensors, requires_grad=(True,) * 7, uses="hc"):
    dtype = tensors[0].dtype
    out_shape = (tensors[0].shape[0], tensors[4].shape[1])
    loss_weights = (helpers.randn(*out_shape, dtype=dtype), helpers.randn(*out_shape, dtype=dtype))
    fused = run_functional(lf.lstm_cell, helpers, tensors, requires_grad, loss_weights, uses)
    for baseline, cell_fn in (("nn", torch_lstm_cell), ("reference", lf.reference.lstm_cell)):
        expected = run_functional(cell_fn, helpers, tensors, requires_grad, loss_weights, uses)
        assert_step_matches(helpers, fused, expected, baseline)


def contiguous_tensors(helpers, batch, input_size, hidden_size, dtype):
    randn = helpers.randn
    return [
        randn(batch, input_size, dtype=dtype),
        randn(batch, hidden_size, dtype=dtype),
        randn(batch, hidden_size, dtype=dtype),
        randn(4 * hidden_size, input_size, dtype=dtype, scale=input_size**-0.5 if input_size else 1.0),
        randn(4 * hidden_size, hidden_size, dtype=dtype, scale=hidden_size**-0.5),
        randn(4 * hidden_size, dtype=dtype),
        randn(4 * hidden_size, dtype=dtype),
    ]


def non_contiguous(t, how):
    """The values of t, laid out as a view that is not contiguous (t itself is not changed)."""
    if how == "transposed":
        if t.dim() == 1:  # a vector cannot be transposed: take every other element instead
            return non_contiguous(t, "strided")
        return t.t().contiguous().t()
    if how == "strided":  # every other element of the last dimension
        wide = torch.empty(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype)
        wide[..., ::2] = t
        wide[..., 1::2] = float("nan")  # never read
        return wide[..., ::2]
    if how == "offset":  # a column window of a wider matrix: row stride > width, nonzero offset
        wide = torch.full((*t.shape[:-1], t.shape[-1] + 3), float("nan"), dtype=t.dtype)
        wide[..., 2 : 2 + t.shape[-1]] = t
        return wide[..., 2 : 2 + t.shape[-1]]
    raise ValueError(how)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("how", ["transposed", "strided", "offset"])
@pytest.mark.parametrize("which", ["input", "h_0", "c_0", "weight_ih", "weight_hh", "bias", "all"])
@pytest.mark.parametrize("batch, input_size, hidden_size", [(3, 7, 5), (64, 128, 256)])
def test_non_contiguous(helpers, batch, input_size, hidden_size, which, how, dtype):
    tensors = contiguous_tensors(helpers, batch, input_size, hidden_size, dtype)
    indices = {
        "input": [0], "h_0": [1], "c_0": [2], "weight_ih": [3], "weight_hh": [4], "bias": [5, 6],
        "all": list(range(7)),
    }[which]
    for index in indices:
        tensors[index] = non_contiguous(tensors[index], how)
        view = tensors[index]
        # A 1-D window is contiguous; what it tests is the nonzero storage offset.
        assert view.storage_offset() > 0 if how == "offset" and view.dim() == 1 else not view.is_contiguous()
    check_functional(helpers, tensors)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("batch", [1, 4])
def test_expanded_states(helpers, batch, dtype):
    """Zero-stride (broadcast) h_0 and c_0, as when one initial state is shared by a batch."""
    tensors = contiguous_tensors(helpers, batch, 6, 9, dtype)
    tensors[1] = helpers.randn(1, 9, dtype=dtype).expand(batch, 9)
    tensors[2] = helpers.randn(1, 9, dtype=dtype).expand(batch, 9)
    check_functional(helpers, tensors)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "requires_grad",
    [
        (False, False, False, True, True, True, True),  # a training step: only the parameters
        (True, False, False, False, False, False, False),
        (False, True, False, False, False, False, False),
        (False, False, True, False, False, False, False),
        (False, False, False, False, False, True, False),
        (False, False, False, False, False, False, True),
        (True, True, True, False, False, False, False),
    ],
    ids=["params", "input", "h_0", "c_0", "bias_ih", "bias_hh", "input_and_state"],
)
@pytest.mark.parametrize("batch", [1, 3])
def test_partial_requires_grad(helpers, batch, requires_grad, dtype):
    check_functional(helpers, contiguous_tensors(helpers, batch, 7, 5, dtype), requires_grad)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("present", ["bias_ih", "bias_hh"])
@pytest.mark.parametrize("batch", [1, 3])
def test_one_bias_only(helpers, batch, present, dtype):
    """The functional form takes each bias separately; with one missing the gradient edges shift."""
    tensors = contiguous_tensors(helpers, batch, 7, 5, dtype)
    tensors[6 if present == "bias_ih" else 5] = None
    check_functional(helpers, tensors)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_multi_step_sequence(helpers, dtype):
    """Ten steps fed back into the cell, gradients through the whole unrolled sequence."""
    torch_cell, fused_cell, reference_cell = helpers.cells(6, 8, True, dtype)
    inputs = helpers.randn(10, 4, 6, dtype=dtype)
    loss_weights = helpers.randn(10, 4, 8, dtype=dtype)

    def unroll(cell):
        xs = inputs.clone().requires_grad_(True)
        hx, loss = None, 0
        for t in range(xs.shape[0]):
            hx = cell(xs[t], hx)
            loss = loss + (hx[0] * loss_weights[t]).sum() + hx[1].pow(2).mean()
        grads = torch.autograd.grad(loss, [xs, *cell.parameters()])
        return [*hx, *grads]

    fused = unroll(fused_cell)
    for baseline, cell in (("nn", torch_cell), ("reference", reference_cell)):
        for actual, expected in zip(fused, unroll(cell), strict=True):
            helpers.assert_close(actual, expected, msg=lambda m: f"differs from {baseline}: {m}")


# Float32 at batch <= 16 takes the CPU's fused small-batch path (csrc/cpu/small_batch.h): AVX2
# loops whose tails (a width not a multiple of 8, an odd batch, a last row block of 1-3 rows) and
# thread split (units shared in whole vectors; a second thread from 2^16 multiply-adds) are
# separate code. These sizes visit each (on 1 and 2 threads: the threads fixture); batch 17 is
# just past the path.
@pytest.mark.parametrize("batch, input_size, hidden_size", [
    (1, 3, 9), (2, 20, 33), (5, 64, 64), (7, 1, 130), (16, 40, 70), (16, 130, 200), (17, 9, 24),
])
def test_small_batch_path(helpers, batch, input_size, hidden_size, threads):
    input = helpers.randn(batch, input_size)
    check_against_both(helpers, input_size, hidden_size, True, torch.float32, input,
                       helpers.state(batch, hidden_size, torch.float32))


@pytest.mark.parametrize("return_gates", [False, True])
def test_direct_and_adapting_call_paths_agree(helpers, return_gates):
    """lf.lstm_cell sends a 2-D input with a (h_0, c_0) tuple straight to the op and adapts every
    other call in Python first; a list [h_0, c_0] takes the second path with the same numbers.
    Both must give the same outputs, gates and gradients, and match nn.LSTMCell."""
    torch_cell, fused_cell, _ = helpers.cells(7, 5, True, torch.float32)
    input = helpers.randn(3, 7)
    h_0, c_0 = helpers.state(3, 5)
    weights = list(fused_cell.parameters())
    results = []
    for make_hx in (tuple, list):
        x, h, c = helpers.leaves([input, h_0, c_0])
        outputs = lf.lstm_cell(x, make_hx((h, c)), *weights, return_gates=return_gates)
        loss = sum((t * (i + 1)).sum() for i, t in enumerate(outputs[:2]))
        if return_gates:
            loss = loss + sum((g * (i + 3)).sum() for i, g in enumerate(outputs[2]))
        grads = torch.autograd.grad(loss, [x, h, c, *weights])
        results.append((outputs, grads))
    (direct_outputs, direct_grads), (adapted_outputs, adapted_grads) = results
    assert torch.equal(direct_outputs[0], adapted_outputs[0]) and torch.equal(direct_outputs[1], adapted_outputs[1])
    if return_gates:
        assert all(torch.equal(a, b) for a, b in zip(direct_outputs[2], adapted_outputs[2]))
    assert all(torch.equal(a, b) for a, b in zip(direct_grads, adapted_grads))
    expected_h, expected_c = torch_cell(input, (h_0, c_0))
    helpers.assert_close(direct_outputs[0], expected_h)
    helpers.assert_close(direct_outputs[1], expected_c)

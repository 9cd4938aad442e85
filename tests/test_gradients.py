"""gradcheck and gradgradcheck in float64 on every input and parameter (small sizes: the
numerical Jacobians cost one evaluation per element), and second derivatives against nn's."""
import pytest
import torch

import lstm_fused as lf

# Central differences in float64 are good to ~1e-10 here; these leave a margin and still catch
# any formula error (those show up at the 1e-2 level).
GRADCHECK_TOLERANCES = dict(atol=1e-8, rtol=1e-6)


def make_args(helpers, batch, input_size, hidden_size, bias="both", state=True):
    """(input, hx, weight_ih, weight_hh, bias_ih, bias_hh), float64 leaves requiring grad."""
    randn = lambda *shape: helpers.randn(*shape, dtype=torch.float64, requires_grad=True)  # noqa: E731
    lead = () if batch is None else (batch,)
    hx = (randn(*lead, hidden_size), randn(*lead, hidden_size)) if state else None
    return (
        randn(*lead, input_size),
        hx,
        randn(4 * hidden_size, input_size),
        randn(4 * hidden_size, hidden_size),
        randn(4 * hidden_size) if bias in ("both", "ih") else None,
        randn(4 * hidden_size) if bias in ("both", "hh") else None,
    )


def flat_function(args, outputs="hc"):
    """gradcheck wants a function of a flat tuple of tensors; returns that function and the tuple.
    outputs picks what it returns: 'h', 'c', 'hc', 'gates' (the four gates), 'all', 'forget'."""
    input, hx, weight_ih, weight_hh, bias_ih, bias_hh = args
    structure = [input, *(hx if hx is not None else ()), weight_ih, weight_hh, bias_ih, bias_hh]
    tensors = tuple(t for t in structure if t is not None)

    def fn(*flat):
        it = iter(flat)
        x = next(it)
        state = (next(it), next(it)) if hx is not None else None
        w_ih, w_hh = next(it), next(it)
        b_ih = next(it) if bias_ih is not None else None
        b_hh = next(it) if bias_hh is not None else None
        h_1, c_1, gates = lf.lstm_cell(x, state, w_ih, w_hh, b_ih, b_hh, return_gates=True)
        return {
            "h": (h_1,),
            "c": (c_1,),
            "hc": (h_1, c_1),
            "gates": tuple(gates),
            "forget": (gates.forget,),
            "all": (h_1, c_1, *gates),
        }[outputs]

    return fn, tensors


CASES = {
    # name: (make_args kwargs, outputs)
    "batched": (dict(batch=3, input_size=2, hidden_size=3), "hc"),
    "batch_1": (dict(batch=1, input_size=3, hidden_size=2), "hc"),
    "no_bias": (dict(batch=2, input_size=3, hidden_size=2, bias="none"), "hc"),
    "only_bias_ih": (dict(batch=2, input_size=2, hidden_size=2, bias="ih"), "hc"),
    "only_bias_hh": (dict(batch=2, input_size=2, hidden_size=2, bias="hh"), "hc"),
    "unbatched": (dict(batch=None, input_size=3, hidden_size=2), "hc"),
    "hx_none": (dict(batch=2, input_size=3, hidden_size=2, state=False), "hc"),
    "unbatched_hx_none": (dict(batch=None, input_size=2, hidden_size=3, state=False), "all"),
    "only_h": (dict(batch=2, input_size=3, hidden_size=2), "h"),
    "only_c": (dict(batch=2, input_size=3, hidden_size=2), "c"),
    "return_gates": (dict(batch=2, input_size=3, hidden_size=2), "all"),
    "gates_only": (dict(batch=2, input_size=2, hidden_size=3), "gates"),
    "forget_gate_only": (dict(batch=2, input_size=2, hidden_size=2), "forget"),
    "return_gates_no_bias": (dict(batch=2, input_size=2, hidden_size=2, bias="none"), "all"),
    "return_gates_unbatched": (dict(batch=None, input_size=2, hidden_size=2), "all"),
}


@pytest.mark.parametrize("case", CASES)
def test_gradcheck(helpers, case):
    kwargs, outputs = CASES[case]
    fn, tensors = flat_function(make_args(helpers, **kwargs), outputs)
    assert torch.autograd.gradcheck(
        fn, tensors, check_undefined_grad=True, check_batched_grad=True, **GRADCHECK_TOLERANCES
    )


@pytest.mark.parametrize("case", CASES)
def test_gradgradcheck(helpers, case):
    kwargs, outputs = CASES[case]
    fn, tensors = flat_function(make_args(helpers, **kwargs), outputs)
    assert torch.autograd.gradgradcheck(fn, tensors, check_undefined_grad=True, **GRADCHECK_TOLERANCES)


@pytest.mark.parametrize("batch", [1, 3])
def test_gradcheck_module(helpers, batch):
    """Through the module: its parameters are the leaves."""
    cell = lf.LSTMCell(3, 2, dtype=torch.float64)
    x = helpers.randn(batch, 3, dtype=torch.float64, requires_grad=True)
    h_0, c_0 = (t.requires_grad_(True) for t in helpers.state(batch, 2, torch.float64))
    parameters = tuple(cell.parameters())

    def fn(x, h_0, c_0, *params):
        named = dict(zip(["weight_ih", "weight_hh", "bias_ih", "bias_hh"], params))
        return torch.func.functional_call(cell, named, (x, (h_0, c_0)))

    assert torch.autograd.gradcheck(fn, (x, h_0, c_0, *parameters), **GRADCHECK_TOLERANCES)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("batch, input_size, hidden_size", [(1, 2, 3), (4, 5, 6), (16, 32, 64)])
def test_second_derivatives_match_nn(helpers, batch, input_size, hidden_size, bias, dtype):
    """Gradient of (gradient . v) with respect to every input, against nn.LSTMCell's autograd."""
    torch_cell, fused_cell, _ = helpers.cells(input_size, hidden_size, bias, dtype)
    x = helpers.randn(batch, input_size, dtype=dtype)
    hx = helpers.state(batch, hidden_size, dtype)
    weight_h, weight_c = helpers.state(batch, hidden_size, dtype)
    directions = None

    def second(cell):
        nonlocal directions
        x_, h_0, c_0 = helpers.leaves([x, *hx])
        h_1, c_1 = cell(x_, (h_0, c_0))
        wrt = [x_, h_0, c_0, *cell.parameters()]
        loss = (h_1 * weight_h).sum() + (c_1.tanh() * weight_c).sum()
        first = torch.autograd.grad(loss, wrt, create_graph=True)
        if directions is None:
            directions = [helpers.randn(*g.shape, dtype=dtype) for g in first]
        projection = sum((g * v).sum() for g, v in zip(first, directions))
        second = torch.autograd.grad(projection, wrt, allow_unused=True, materialize_grads=True)
        return [*first, *second]

    fused = second(fused_cell)
    for actual, expected in zip(fused, second(torch_cell), strict=True):
        helpers.assert_close(actual.detach(), expected.detach())


# --- torch.func transforms and forward-mode AD: they cannot look into the fused kernels' C++
# autograd, so under them the ops run as differentiable ATen ops; the answers must be nn's. ---

TRANSFORMS = ["grad", "jacrev", "jacfwd", "hessian", "jvp", "per_sample_jacobian", "forward_ad"]


def transformed(transform, cell, x, hx):
    """What `transform` computes for one step of cell: derivatives of h_1 (and c_1) with respect to
    the input, the initial state or the parameters."""
    h_0, c_0 = hx
    params = dict(cell.named_parameters())
    step = lambda p, x, h, c: torch.func.functional_call(cell, p, (x, (h, c)))  # noqa: E731
    if transform == "grad":  # of a scalar loss, with respect to every parameter
        return torch.func.grad(lambda p: step(p, x, h_0, c_0)[0].pow(2).sum())(params)
    if transform == "jacrev":  # dh_1/dh_0 over the batch
        return torch.func.jacrev(lambda h: step(params, x, h, c_0)[0])(h_0)
    if transform == "jacfwd":  # dc_1/dx
        return torch.func.jacfwd(lambda v: step(params, v, h_0, c_0)[1])(x)
    if transform == "hessian":  # of a scalar with respect to c_0
        return torch.func.hessian(lambda c: step(params, x, h_0, c)[0].sum())(c_0)
    if transform == "jvp":
        tangent = torch.linspace(-1, 1, x.numel(), dtype=x.dtype).view_as(x)
        return torch.func.jvp(lambda v: step(params, v, h_0, c_0), (x,), (tangent,))[1]
    if transform == "per_sample_jacobian":  # dh_1/dh_0 of each sequence alone: vmap of jacrev
        one = lambda x1, h1, c1: step(params, x1, h1, c1)[0]  # noqa: E731
        return torch.func.vmap(torch.func.jacrev(one, argnums=1))(x, h_0, c_0)
    if transform == "forward_ad":  # torch.autograd.forward_ad, outside torch.func
        import torch.autograd.forward_ad as fwAD

        tangent = torch.linspace(-1, 1, h_0.numel(), dtype=h_0.dtype).view_as(h_0)
        with fwAD.dual_level():
            outputs = cell(x, (fwAD.make_dual(h_0, tangent), c_0))
            return [fwAD.unpack_dual(t).tangent for t in outputs]
    raise ValueError(transform)


@pytest.mark.parametrize("transform", TRANSFORMS)
def test_transforms_match_nn(helpers, transform):
    torch_cell, fused_cell, _ = helpers.cells(4, 3, dtype=torch.float64)
    x = helpers.randn(2, 4, dtype=torch.float64)
    hx = helpers.state(2, 3, torch.float64)
    expected = transformed(transform, torch_cell, x, hx)
    actual = transformed(transform, fused_cell, x, hx)
    torch.testing.assert_close(actual, expected, atol=1e-10, rtol=1e-10)


def test_transforms_leave_the_fused_path_alone(helpers):
    """After a transform, an ordinary call runs the fused kernels again (its autograd node is the
    fused cell's, not an ATen op's), with nn's values."""
    torch_cell, fused_cell, _ = helpers.cells(4, 3, dtype=torch.float64)
    x, hx = helpers.randn(2, 4, dtype=torch.float64), helpers.state(2, 3, torch.float64)
    transformed("jacrev", fused_cell, x, hx)
    h_1, c_1 = fused_cell(x, hx)
    assert "CellFunction" in h_1.grad_fn.name()
    torch.testing.assert_close((h_1, c_1), torch_cell(x, hx), atol=1e-12, rtol=1e-12)

"""lf.LSTM behaves as nn.LSTM on every call: the same outputs and gradients (input, h_0, c_0 and
every parameter, by name) over memory layouts, packed and unbatched input; nn's exception types for
bad arguments; dropout; parametrizations; tied and replaced weights; serialisation; dtype
conversion; gradient corner cases; autocast. Every case runs with proj_size 0 and 3: the projected
ones skip while lf.LSTM raises NotImplementedError for proj_size > 0, and run once it does not."""
import contextlib
import copy
import io
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrizations, parametrize
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence
from torch.overrides import TorchFunctionMode

import lstm_fused as lf

INPUT_SIZE, HIDDEN_SIZE, NUM_STEPS, BATCH = 5, 7, 6, 4
TOLERANCES = {torch.float64: dict(rtol=0.0, atol=1e-10), torch.float32: dict(rtol=1e-5, atol=1e-5)}
STATE_NAMES = ("input", "h_0", "c_0")
with_proj_sizes = pytest.mark.parametrize("proj_size", [0, 3], ids=["no_proj", "proj3"])


@pytest.fixture
def twins():
    """Builds (nn.LSTM, lf.LSTM) with the same weights; skips where lf.LSTM lacks the projection."""

    def build(dtype=torch.float64, input_size=INPUT_SIZE, hidden_size=HIDDEN_SIZE, **config):
        torch_lstm = nn.LSTM(input_size, hidden_size, dtype=dtype, **config)
        try:
            fused_lstm = lf.LSTM(input_size, hidden_size, dtype=dtype, **config)
        except NotImplementedError as error:
            if not config.get("proj_size"):
                raise
            pytest.skip(f"lf.LSTM has no projections yet: {error}")
        fused_lstm.load_state_dict(torch_lstm.state_dict())
        return torch_lstm, fused_lstm

    return build


def randn(*shape, dtype=torch.float64):
    return torch.randn(*shape, dtype=dtype)


def random_state(lstm, batch, dtype=torch.float64):
    """(h_0, c_0) for lstm; batch None: unbatched. h_0 is proj_size wide under a projection."""
    layers = lstm.num_layers * (2 if lstm.bidirectional else 1)
    batch_dims = () if batch is None else (batch,)
    return (
        randn(layers, *batch_dims, lstm.proj_size or lstm.hidden_size, dtype=dtype),
        randn(layers, *batch_dims, lstm.hidden_size, dtype=dtype),
    )


def flat(result):
    """Every tensor of a (nested) result; a PackedSequence padded, in the user's batch order."""
    if isinstance(result, PackedSequence):
        return [pad_packed_sequence(result)[0]]
    if isinstance(result, Tensor):
        return [result]
    return [tensor for item in result for tensor in flat(item)]


def run(module, call, tensors):
    """call(module, *leaves) on fresh leaf copies of tensors (input, h_0, c_0); returns its outputs
    and the gradients of a fixed random projection of them by name: the leaves', and every
    parameter's that requires grad."""
    leaves = [t.detach().clone().requires_grad_() for t in tensors]
    outputs = flat(call(module, *leaves))
    generator = torch.Generator().manual_seed(0)
    loss = sum((o * torch.randn(o.shape, generator=generator, dtype=torch.float64).to(o.dtype)).sum() for o in outputs)
    parameters = {name: p for name, p in module.named_parameters() if p.requires_grad}
    grads = torch.autograd.grad(loss, leaves + list(parameters.values()))
    return outputs, dict(zip([*STATE_NAMES[: len(leaves)], *parameters], grads))


def assert_same(torch_module, fused_module, call, *tensors, rows=1):
    """Outputs and every gradient of fused_module match torch_module's; rows is how many rows a
    weight gradient sums (its float32 rounding grows as their square root)."""
    (expected, expected_grads), (actual, actual_grads) = (run(m, call, tensors) for m in (torch_module, fused_module))
    assert len(actual) == len(expected)
    for index, (a, e) in enumerate(zip(actual, expected)):
        assert (a.shape, a.dtype) == (e.shape, e.dtype), f"output {index}"
        torch.testing.assert_close(a, e, **TOLERANCES[e.dtype], msg=lambda m: f"output {index}: {m}")
    assert actual_grads.keys() == expected_grads.keys()
    for name, e in expected_grads.items():
        tolerance = dict(TOLERANCES[e.dtype])
        if e.dtype == torch.float32 and name not in STATE_NAMES:
            tolerance["atol"] *= max(1.0, rows**0.5)
        torch.testing.assert_close(actual_grads[name], e, **tolerance, msg=lambda m: f"grad of {name}: {m}")
    return actual, actual_grads


def call_with_state(lstm, x, h_0, c_0):
    return lstm(x, (h_0, c_0))


# --- Layouts: bias x directions x batch_first x projection x memory layout x layers ---------------


MEMORY = {  # name: (shape of the stored tensor from the logical [d0, d1, I], the view passed in)
    "contiguous": (lambda d0, d1: (d0, d1, INPUT_SIZE), lambda x: x),
    "strided": (lambda d0, d1: (d0, d1, 2 * INPUT_SIZE), lambda x: x[..., ::2]),
    "transposed": (lambda d0, d1: (d1, d0, INPUT_SIZE), lambda x: x.transpose(0, 1)),
}


@with_proj_sizes
@pytest.mark.parametrize("num_layers", [1, 2])
@pytest.mark.parametrize("memory", MEMORY)
@pytest.mark.parametrize("batch_first", [False, True], ids=["time_major", "batch_first"])
@pytest.mark.parametrize("bidirectional", [False, True], ids=["forward", "bidirectional"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_layouts(twins, dtype, bias, bidirectional, batch_first, memory, num_layers, proj_size):
    torch_lstm, fused_lstm = twins(
        dtype, bias=bias, bidirectional=bidirectional, batch_first=batch_first, num_layers=num_layers,
        proj_size=proj_size,
    )
    stored_shape, view = MEMORY[memory]
    x = randn(*stored_shape(*((BATCH, NUM_STEPS) if batch_first else (NUM_STEPS, BATCH))), dtype=dtype)
    assert view(x).is_contiguous() == (memory == "contiguous")
    assert_same(
        torch_lstm, fused_lstm, lambda lstm, x, h_0, c_0: lstm(view(x), (h_0, c_0)),
        x, *random_state(torch_lstm, BATCH, dtype), rows=NUM_STEPS * BATCH,
    )


# --- Packed and unbatched input ---------------------------------------------------------------------


@with_proj_sizes
@pytest.mark.parametrize("with_hx", [True, False], ids=["hx", "no_hx"])
@pytest.mark.parametrize("lengths_as", [list, torch.tensor], ids=["list", "tensor"])
@pytest.mark.parametrize("lengths, enforce_sorted", [([6, 4, 4, 1], True), ([4, 1, 6, 4], False), ([4, 1, 6, 4], True)],
                         ids=["sorted", "unsorted", "unsorted_rejected"])
def test_packed(twins, lengths, enforce_sorted, lengths_as, with_hx, proj_size):
    torch_lstm, fused_lstm = twins(num_layers=2, bidirectional=True, proj_size=proj_size)
    x = randn(max(lengths), len(lengths), INPUT_SIZE)
    if enforce_sorted and lengths != sorted(lengths, reverse=True):
        with pytest.raises(RuntimeError, match="sorted in decreasing order"):
            pack_padded_sequence(x, lengths_as(lengths), enforce_sorted=True)
        return

    def call(lstm, x, *hx):
        packed = pack_padded_sequence(x, lengths_as(lengths), enforce_sorted=enforce_sorted)
        output, state = lstm(packed, hx or None)
        for name in ("batch_sizes", "sorted_indices", "unsorted_indices"):
            wanted, got = getattr(packed, name), getattr(output, name)
            assert got is None if wanted is None else torch.equal(got, wanted), name
        return output, state

    # h_n and c_n in the user's order: nn.LSTM's, row for row.
    states = random_state(torch_lstm, len(lengths)) if with_hx else ()
    assert_same(torch_lstm, fused_lstm, call, x, *states)


@with_proj_sizes
@pytest.mark.parametrize("with_hx", [True, False], ids=["hx", "no_hx"])
@pytest.mark.parametrize("batch_first", [False, True], ids=["time_major", "batch_first"])
@pytest.mark.parametrize("bidirectional", [False, True], ids=["forward", "bidirectional"])
def test_unbatched(twins, bidirectional, batch_first, with_hx, proj_size):
    torch_lstm, fused_lstm = twins(num_layers=2, bidirectional=bidirectional, batch_first=batch_first,
                                   proj_size=proj_size)
    states = random_state(torch_lstm, None) if with_hx else ()
    outputs, _ = assert_same(torch_lstm, fused_lstm, lambda lstm, x, *hx: lstm(x, hx or None),
                             randn(NUM_STEPS, INPUT_SIZE), *states)
    assert [o.dim() for o in outputs] == [2, 2, 2]


@with_proj_sizes
def test_empty_batch(twins, proj_size):
    """nn.LSTM returns empty outputs (and zero weight gradients) for a batch of 0; so does lf."""
    torch_lstm, fused_lstm = twins(num_layers=2, bidirectional=True, proj_size=proj_size)
    outputs, _ = assert_same(torch_lstm, fused_lstm, call_with_state, randn(NUM_STEPS, 0, INPUT_SIZE),
                             *random_state(torch_lstm, 0))
    assert outputs[0].shape == (NUM_STEPS, 0, 2 * (proj_size or HIDDEN_SIZE))


# --- Bad arguments: nn's exception type, and a message naming the argument ---------------------------


def padded(input_size=INPUT_SIZE, num_steps=NUM_STEPS):
    return randn(num_steps, BATCH, input_size)


BAD_CALLS = {  # name: (arguments from good (h_0, c_0), a fragment lf's message must contain)
    "input_size": (lambda h, c: (padded(INPUT_SIZE + 1), (h, c)), "input_size"),
    "input_size_without_hx": (lambda h, c: (padded(INPUT_SIZE + 1),), "input_size"),
    "input_4d": (lambda h, c: (randn(NUM_STEPS, BATCH, 1, INPUT_SIZE),), "input to be 2D or 3D"),
    "input_dtype": (lambda h, c: (padded().float(),), "input dtype"),
    "h_0_layers": (lambda h, c: (padded(), (h[:1], c)), r"hidden\[0\]"),
    "h_0_batch": (lambda h, c: (padded(), (h[:, 1:], c)), r"hidden\[0\]"),
    "h_0_width": (lambda h, c: (padded(), (torch.cat([h, h], -1), c)), r"hidden\[0\]"),
    "c_0_width": (lambda h, c: (padded(), (h, c[..., 1:])), r"hidden\[1\]"),
    "hx_2d": (lambda h, c: (padded(), (h[0], c[0])), "hx and cx"),
    "hx_one_tensor": (lambda h, c: (padded(), (h,)), "hx"),
    "hx_three_tensors": (lambda h, c: (padded(), (h, c, c)), "hx"),
    "unbatched_hx_one_tensor": (lambda h, c: (randn(NUM_STEPS, INPUT_SIZE), (h[:, 0],)), "hx"),
    "input_on_meta": (lambda h, c: (padded().to("meta"),), "parameter tensor"),
    "h_0_on_meta": (lambda h, c: (padded(), (h.to("meta"), c)), "hidden tensor"),
    "c_0_on_meta": (lambda h, c: (padded(), (h, c.to("meta"))), "hidden tensor"),
    "no_steps": (lambda h, c: (padded(num_steps=0), (h, c)), "sequence length"),
    "no_steps_unbatched": (lambda h, c: (randn(0, INPUT_SIZE),), "sequence length"),
}


@with_proj_sizes
@pytest.mark.parametrize("case", BAD_CALLS)
def test_bad_call_raises_as_nn(twins, case, proj_size):
    torch_lstm, fused_lstm = twins(num_layers=2, proj_size=proj_size)
    make_args, fragment = BAD_CALLS[case]
    args = make_args(*random_state(torch_lstm, BATCH))
    with pytest.raises(Exception) as expected:
        torch_lstm(*args)
    with pytest.raises(Exception, match=fragment) as actual:
        fused_lstm(*args)
    assert type(actual.value) is type(expected.value), (actual.value, expected.value)


def test_projected_h_0_must_be_proj_size_wide(twins):
    torch_lstm, fused_lstm = twins(proj_size=3)
    _, c_0 = random_state(torch_lstm, BATCH)
    args = (randn(NUM_STEPS, BATCH, INPUT_SIZE), (c_0, c_0))  # h_0 hidden_size wide
    with pytest.raises(RuntimeError, match=r"Expected hidden\[0\] size \(1, 4, 3\)"):
        torch_lstm(*args)
    with pytest.raises(RuntimeError, match=r"Expected hidden\[0\] size \(1, 4, 3\), got \[1, 4, 7\]"):
        fused_lstm(*args)


@pytest.mark.parametrize("layout", ["padded", "unbatched", "packed_sorted", "packed_unsorted"])
def test_a_third_state_is_refused(layout):
    """nn.LSTM drops a third state silently for unbatched and unsorted packed input (it indexes
    hx[0] and hx[1] in Python); lf refuses it on every layout, as nn does for padded input."""
    lstm = lf.LSTM(INPUT_SIZE, HIDDEN_SIZE, dtype=torch.float64)
    x = randn(NUM_STEPS, BATCH, INPUT_SIZE)
    h_0, c_0 = random_state(lstm, BATCH)
    if layout == "unbatched":
        x, h_0, c_0 = x[:, 0], h_0[:, 0], c_0[:, 0]
    elif layout.startswith("packed"):
        lengths = [6, 5, 3, 2] if layout == "packed_sorted" else [3, 6, 2, 5]
        x = pack_padded_sequence(x, lengths, enforce_sorted=layout == "packed_sorted")
    with pytest.raises(RuntimeError, match=r"hx must be a tuple \(h_0, c_0\) of two Tensors, got 3"):
        lstm(x, (h_0, c_0, c_0))


# --- Dropout between layers -------------------------------------------------------------------------


class DropoutCalls(TorchFunctionMode):
    """Records (input, output) of every F.dropout call made under it."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        if func is F.dropout:
            self.calls.append((args[0].detach(), result.detach()))
        return result


@with_proj_sizes
@pytest.mark.parametrize("p", [0.0, 0.276, 0.731, 1.0])
def test_dropout_masks_fraction_and_scale(twins, p, proj_size):
    torch_lstm, fused_lstm = twins(num_layers=2, dropout=p, hidden_size=16, proj_size=proj_size)
    x = randn(20, 8, INPUT_SIZE)
    torch.manual_seed(11)
    expected = torch_lstm(x)[0]
    torch.manual_seed(11)
    with DropoutCalls() as recorder:
        actual, _, states = fused_lstm(x, return_states=True)
    # Same seed, same masks: both draw them with at::dropout, once per layer, in the same order.
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-10)
    if p == 0:
        assert not recorder.calls
        return
    ((dropped_in, dropped_out),) = recorder.calls  # only between layer 1 and layer 2
    first_layer = states[0].gates.output * torch.tanh(states[0].cell_state)  # h_t = o_t tanh(c_t)
    if proj_size:
        first_layer = first_layer @ fused_lstm.weight_hr_l0.detach().T
    torch.testing.assert_close(dropped_in, first_layer.reshape(dropped_in.shape), rtol=0, atol=1e-12)
    zeros = dropped_out == 0
    count = zeros.numel()
    assert abs(zeros.double().mean().item() - p) <= 5 * (p * (1 - p) / count) ** 0.5
    kept = ~zeros
    torch.testing.assert_close(dropped_out[kept], dropped_in[kept] / (1 - p), rtol=1e-12, atol=0)


@with_proj_sizes
def test_no_dropout_in_eval(twins, proj_size):
    torch_lstm, fused_lstm = twins(num_layers=2, dropout=0.731, proj_size=proj_size)
    torch_lstm.eval(), fused_lstm.eval()
    with DropoutCalls() as recorder:
        assert_same(torch_lstm, fused_lstm, call_with_state, randn(NUM_STEPS, BATCH, INPUT_SIZE),
                    *random_state(torch_lstm, BATCH))
    assert not recorder.calls


@with_proj_sizes
@pytest.mark.parametrize("change", ["pickle", "set_dropout"])
def test_dropout_survives_pickle_and_follows_changes(twins, change, proj_size):
    torch_lstm, fused_lstm = twins(num_layers=2, dropout=0.276, proj_size=proj_size)
    if change == "pickle":
        fused_lstm = pickle.loads(pickle.dumps(fused_lstm))
        assert type(fused_lstm) is lf.LSTM and fused_lstm.dropout == 0.276
    else:
        torch_lstm.dropout = fused_lstm.dropout = 0.731
    x = randn(NUM_STEPS, BATCH, INPUT_SIZE)
    outputs = []
    for lstm in (torch_lstm, fused_lstm):
        torch.manual_seed(3)
        outputs.append(lstm(x)[0])
    torch.testing.assert_close(outputs[1], outputs[0], rtol=0, atol=1e-10)
    fused_lstm.dropout = 0.0
    assert (fused_lstm(x)[0] - outputs[1]).abs().max() > 1e-3


# --- Parametrizations -------------------------------------------------------------------------------


class Scale(nn.Module):
    """w * s, one learnt scale per row."""

    def __init__(self, rows):
        super().__init__()
        self.scale = nn.Parameter(torch.rand(rows, 1, dtype=torch.float64) + 0.5)

    def forward(self, weight):
        return weight * self.scale


PARAMETRIZATIONS = {
    "weight_norm": lambda lstm, name: parametrizations.weight_norm(lstm, name),
    "orthogonal": lambda lstm, name: parametrizations.orthogonal(lstm, name),
    "scale": lambda lstm, name: parametrize.register_parametrization(lstm, name, Scale(getattr(lstm, name).shape[0])),
    "deprecated_weight_norm": lambda lstm, name: torch.nn.utils.weight_norm(lstm, name),
}


@with_proj_sizes
@pytest.mark.parametrize("kind", PARAMETRIZATIONS)
@pytest.mark.filterwarnings("ignore:`torch.nn.utils.weight_norm` is deprecated:FutureWarning")
def test_parametrized_weights(twins, kind, proj_size):
    torch_lstm, fused_lstm = twins(num_layers=2, proj_size=proj_size)
    names = ["weight_hh_l0"] + (["weight_hr_l0"] if proj_size else [])
    for lstm in (torch_lstm, fused_lstm):
        for name in names:
            PARAMETRIZATIONS[kind](lstm, name)
    fused_lstm.load_state_dict(torch_lstm.state_dict())  # the same originals, whatever was drawn
    _, grads = assert_same(torch_lstm, fused_lstm, call_with_state, randn(NUM_STEPS, BATCH, INPUT_SIZE),
                           *random_state(torch_lstm, BATCH))
    originals = [name for name in grads if "parametrizations." in name or name.endswith(("_g", "_v"))]
    assert len(originals) >= len(names) and all(grads[name].abs().max() > 0 for name in originals)


# --- Weights: shared, flattened, replaced -----------------------------------------------------------


@with_proj_sizes
def test_shared_weights_accumulate_as_nn(twins, proj_size):
    (torch_a, fused_a), (torch_b, fused_b) = twins(proj_size=proj_size), twins(proj_size=proj_size)
    torch_b.weight_hh_l0, fused_b.weight_hh_l0 = torch_a.weight_hh_l0, fused_a.weight_hh_l0
    x, y = randn(NUM_STEPS, BATCH, INPUT_SIZE), randn(NUM_STEPS, BATCH, INPUT_SIZE)
    for a, b in ((torch_a, torch_b), (fused_a, fused_b)):
        for _ in range(2):  # .grad accumulates over calls too
            (a(x)[0].sin().sum() + b(y)[0].cos().sum()).backward()
    for torch_module, fused_module in ((torch_a, fused_a), (torch_b, fused_b)):
        for (name, torch_parameter), fused_parameter in zip(torch_module.named_parameters(), fused_module.parameters()):
            torch.testing.assert_close(fused_parameter.grad, torch_parameter.grad, rtol=0, atol=1e-10, msg=name)
    assert fused_a.weight_hh_l0.grad is fused_b.weight_hh_l0.grad


@with_proj_sizes
@pytest.mark.parametrize("how", ["new_parameter", "data", "copy_", "flatten_parameters"])
def test_changed_weight_is_used_by_the_next_call(twins, how, proj_size):
    torch_lstm, fused_lstm = twins(proj_size=proj_size)
    x, states = randn(NUM_STEPS, BATCH, INPUT_SIZE), random_state(torch_lstm, BATCH)
    before = fused_lstm(x)[0].detach()
    new_weight = randn(*torch_lstm.weight_hh_l0.shape)
    for lstm in (torch_lstm, fused_lstm):
        if how == "new_parameter":
            lstm.weight_hh_l0 = nn.Parameter(new_weight.clone())
        elif how == "data":
            lstm.weight_hh_l0.data = new_weight.clone()
        elif how == "copy_":
            with torch.no_grad():
                lstm.weight_hh_l0.copy_(new_weight)
        else:
            parameters = list(lstm.parameters())
            assert lstm.flatten_parameters() is None
            assert all(a is b for a, b in zip(parameters, lstm.parameters()))
    assert_same(torch_lstm, fused_lstm, call_with_state, x, *states)
    change = (fused_lstm(x)[0] - before).abs().max()
    assert change == 0 if how == "flatten_parameters" else change > 1e-3


# --- Serialisation ----------------------------------------------------------------------------------


@with_proj_sizes
def test_state_dict_from_lf_to_nn(twins, proj_size):
    torch_lstm, fused_lstm = twins(num_layers=2, bidirectional=True, proj_size=proj_size)
    fresh_torch = nn.LSTM(INPUT_SIZE, HIDDEN_SIZE, num_layers=2, bidirectional=True, proj_size=proj_size,
                          dtype=torch.float64)
    fresh_torch.load_state_dict(fused_lstm.state_dict())
    assert_same(fresh_torch, fused_lstm, call_with_state, randn(NUM_STEPS, BATCH, INPUT_SIZE),
                *random_state(torch_lstm, BATCH))


BAD_STATE_DICTS = {
    "wrong_shape": lambda sd: {**sd, "weight_hh_l0": sd["weight_hh_l0"][:, 1:]},
    "missing_key": lambda sd: {k: v for k, v in sd.items() if k != "bias_hh_l0"},
    "unexpected_key": lambda sd: {**sd, "weight_hh_l2": sd["weight_hh_l0"]},
}


@with_proj_sizes
@pytest.mark.parametrize("case", BAD_STATE_DICTS)
def test_bad_state_dict_rejected_as_nn(twins, case, proj_size):
    torch_lstm, fused_lstm = twins(proj_size=proj_size)
    bad = BAD_STATE_DICTS[case](torch_lstm.state_dict())
    messages = []
    for lstm in (torch_lstm, fused_lstm):
        with pytest.raises(RuntimeError, match="Error") as error:
            lstm.load_state_dict(bad)
        messages.append(str(error.value))
    assert messages[1] == messages[0]


def saved_and_loaded(module, **load_options):
    buffer = io.BytesIO()
    torch.save(module, buffer)
    buffer.seek(0)
    return torch.load(buffer, **load_options)


def through_state_dict(lstm):
    """A fresh lf.LSTM loading lstm's state_dict through torch.save and torch.load (weights_only)."""
    copied = lf.LSTM(INPUT_SIZE, HIDDEN_SIZE, num_layers=lstm.num_layers, proj_size=lstm.proj_size, dtype=torch.float64)
    copied.load_state_dict(saved_and_loaded(lstm.state_dict()))
    return copied


ROUTES = {
    "deepcopy": copy.deepcopy,
    "pickle": lambda lstm: pickle.loads(pickle.dumps(lstm)),
    "torch.save": lambda lstm: saved_and_loaded(lstm, weights_only=False),
    "state_dict_torch.save": through_state_dict,
}


@with_proj_sizes
@pytest.mark.parametrize("route", ROUTES)
def test_copies_give_identical_outputs(twins, route, proj_size):
    _, fused_lstm = twins(num_layers=2, proj_size=proj_size)
    copied = ROUTES[route](fused_lstm)
    assert type(copied) is lf.LSTM
    x, states = randn(NUM_STEPS, BATCH, INPUT_SIZE), random_state(fused_lstm, BATCH)
    for a, b in zip(flat(copied(x, states)), flat(fused_lstm(x, states))):
        assert torch.equal(a, b)


def test_whole_module_torch_load_weights_only_fails_as_nn(twins):
    for lstm in twins():
        with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
            saved_and_loaded(lstm)


# --- dtype conversion -------------------------------------------------------------------------------


CONVERSIONS = {
    "double": (lambda lstm: lstm.double(), torch.float64),
    "to_float64": (lambda lstm: lstm.to(torch.float64), torch.float64),
    "to_float32": (lambda lstm: lstm.to(torch.float32), torch.float32),
    "to_bfloat16": (lambda lstm: lstm.to(torch.bfloat16), torch.bfloat16),
    "half": (lambda lstm: lstm.half(), torch.float16),
}


def relative_error(actual, expected):
    return ((actual.double() - expected).norm() / expected.norm()).item()


@with_proj_sizes
@pytest.mark.parametrize("conversion", CONVERSIONS)
def test_dtype_conversion(twins, conversion, proj_size):
    convert, dtype = CONVERSIONS[conversion]
    torch_lstm, fused_lstm = (convert(lstm) for lstm in twins(torch.float32, num_layers=2, proj_size=proj_size))
    assert all(p.dtype == dtype for p in fused_lstm.parameters()) and type(fused_lstm) is lf.LSTM
    x, states = randn(NUM_STEPS, BATCH, INPUT_SIZE, dtype=dtype), random_state(torch_lstm, BATCH, dtype)
    if dtype in TOLERANCES:
        assert_same(torch_lstm, fused_lstm, call_with_state, x, *states, rows=NUM_STEPS * BATCH)
        return
    # Half precision: against float64 with the same (rounded) weights, as close as nn gets or closer.
    exact = nn.LSTM(INPUT_SIZE, HIDDEN_SIZE, num_layers=2, proj_size=proj_size, dtype=torch.float64)
    exact.load_state_dict(torch_lstm.state_dict())
    exact_outputs, exact_grads = run(exact, call_with_state, [t.double() for t in (x, *states)])
    (torch_outputs, torch_grads), (fused_outputs, fused_grads) = (run(m, call_with_state, (x, *states))
                                                                  for m in (torch_lstm, fused_lstm))
    for name, fused, torch_value, exact_value in [
        *zip(["output", "h_n", "c_n"], fused_outputs, torch_outputs, exact_outputs),
        *((name, fused_grads[name], torch_grads[name], exact_grads[name]) for name in exact_grads),
    ]:
        assert fused.dtype == torch_value.dtype == dtype, name
        error, torch_error = relative_error(fused, exact_value), relative_error(torch_value, exact_value)
        assert error <= max(2 * torch_error, 1e-2), (name, error, torch_error)


# --- Gradients --------------------------------------------------------------------------------------


@with_proj_sizes
@pytest.mark.parametrize("bidirectional", [False, True], ids=["forward", "bidirectional"])
def test_gradcheck_and_gradgradcheck(twins, bidirectional, proj_size):
    _, fused_lstm = twins(input_size=3, hidden_size=4, num_layers=2, bidirectional=bidirectional,
                          proj_size=min(proj_size, 2))
    names = [name for name, _ in fused_lstm.named_parameters()]

    def function(x, h_0, c_0, *weights):
        output, (h_n, c_n) = torch.func.functional_call(fused_lstm, dict(zip(names, weights)), (x, (h_0, c_0)))
        return output, h_n, c_n

    inputs = [t.requires_grad_() for t in (randn(3, 2, 3), *random_state(fused_lstm, 2))]
    inputs += [p.detach().clone().requires_grad_() for p in fused_lstm.parameters()]
    assert torch.autograd.gradcheck(function, inputs, atol=1e-8)
    assert torch.autograd.gradgradcheck(function, inputs, atol=1e-8)


@with_proj_sizes
def test_frozen_parameters_gradient_to_input_only(twins, proj_size):
    torch_lstm, fused_lstm = twins(num_layers=2, proj_size=proj_size)
    for lstm in (torch_lstm, fused_lstm):
        lstm.requires_grad_(False)
    _, grads = assert_same(torch_lstm, fused_lstm, call_with_state, randn(NUM_STEPS, BATCH, INPUT_SIZE),
                           *random_state(torch_lstm, BATCH))
    assert list(grads) == list(STATE_NAMES)
    assert all(p.grad is None for p in fused_lstm.parameters())


@with_proj_sizes
def test_retain_graph_twice_and_grad_of_h_0_only(twins, proj_size):
    torch_lstm, fused_lstm = twins(num_layers=2, bidirectional=True, proj_size=proj_size)
    x = randn(NUM_STEPS, BATCH, INPUT_SIZE)
    h_0, c_0 = random_state(torch_lstm, BATCH)
    grads = []
    for lstm in (torch_lstm, fused_lstm):
        leaf = h_0.clone().requires_grad_()
        output, (h_n, c_n) = lstm(x, (leaf, c_0))
        loss = output.sin().sum() + h_n.square().sum() + c_n.sum()
        (first,) = torch.autograd.grad(loss, leaf, retain_graph=True)
        (second,) = torch.autograd.grad(loss, leaf)
        assert torch.equal(first, second)
        grads.append(first)
    torch.testing.assert_close(grads[1], grads[0], rtol=0, atol=1e-10)


# --- Autocast ---------------------------------------------------------------------------------------


AUTOCAST_CALLS = {  # nn.LSTM casts only where oneDNN runs it: padded, non-empty, oneDNN on
    "padded": (lambda x: x, contextlib.nullcontext),
    "packed": (lambda x: pack_padded_sequence(x, [6, 3, 5, 2], enforce_sorted=False), contextlib.nullcontext),
    "empty_batch": (lambda x: x[:, :0], contextlib.nullcontext),
    "onednn_off": (lambda x: x, lambda: torch.backends.mkldnn.flags(enabled=False)),
}


# nn.LSTM with projections keeps c_n in float32 under CPU autocast (its cell's c = f * c_0 + i * g
# promotes with the float32 c_0): lf.LSTM returns it in the same dtype.
@pytest.mark.parametrize("proj_size", [0, 3], ids=["no_proj", "proj3"])
@pytest.mark.parametrize("layout", AUTOCAST_CALLS)
@pytest.mark.filterwarnings("ignore:TF32 acceleration on top of oneDNN")  # from mkldnn.flags() itself
def test_autocast_bfloat16(twins, layout, proj_size):
    torch_lstm, fused_lstm = twins(torch.float32, num_layers=2, bidirectional=True, proj_size=proj_size)
    x = randn(NUM_STEPS, BATCH, INPUT_SIZE, dtype=torch.float32)
    make_input, backend_flags = AUTOCAST_CALLS[layout]
    with torch.autocast("cpu", dtype=torch.bfloat16), backend_flags():
        try:
            expected = flat(torch_lstm(make_input(x)))
        except RuntimeError as error:  # oneDNN's bf16 LSTM primitive is missing on AVX2-only CPUs
            pytest.skip(f"nn.LSTM itself fails under bfloat16 autocast on this CPU: {error}")
        actual = flat(fused_lstm(make_input(x)))
    exact = nn.LSTM(INPUT_SIZE, HIDDEN_SIZE, num_layers=2, bidirectional=True, proj_size=proj_size,
                    dtype=torch.float64)
    exact.load_state_dict(torch_lstm.state_dict())
    for a, e, truth in zip(actual, expected, flat(exact(make_input(x.double())))):
        assert (a.dtype, a.shape) == (e.dtype, e.shape)
        if truth.numel():
            assert relative_error(a, truth) <= max(2 * relative_error(e, truth), 1e-2)

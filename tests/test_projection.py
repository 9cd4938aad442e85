"""lstm_fused.LSTM with projections (proj_size > 0, LSTMP) against torch.nn.LSTM with the same
weights: outputs and every gradient (input, h_0, c_0, each parameter, weight_hr included) over the
layouts and options nn.LSTM has, on the small-batch path's sizes (float32, batch <= 64) and the loop
of library products' (float64, batch > 64); gradcheck and gradgradcheck; the hidden state before
the projection that return_states gives; convert(); the errors of a wrongly shaped h_0."""
import copy
import warnings

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

import lstm_fused as lf

INPUT_SIZE, HIDDEN_SIZE = 5, 7
LENGTHS = [6, 4, 4, 1]  # unequal, with a tie: packed batches shrink by more than one row and by none
UNSORTED_LENGTHS = [4, 1, 6, 4]
LAYOUTS = ["padded", "batch_first", "packed_unsorted", "unbatched"]
pytestmark = pytest.mark.filterwarnings("ignore:LSTM with projections is not supported with oneDNN")
TOLERANCES = {torch.float64: dict(atol=1e-10, rtol=0.0), torch.float32: dict(atol=2e-5, rtol=1e-5)}


def twin_lstms(dtype, input_size, hidden_size, **config):
    """An nn.LSTM and an lf.LSTM with the same weights: lf's own initialisation loaded into nn's,
    so that both directions of load_state_dict are exercised across the tests."""
    torch_lstm = nn.LSTM(input_size, hidden_size, dtype=dtype, **config)
    fused_lstm = lf.LSTM(input_size, hidden_size, dtype=dtype, **config)
    assert fused_lstm.state_dict().keys() == torch_lstm.state_dict().keys()
    torch_lstm.load_state_dict(fused_lstm.state_dict())
    fused_lstm.load_state_dict(torch_lstm.state_dict())
    return torch_lstm, fused_lstm


def random_case(lstm, batch, num_steps, dtype, generator):
    """Fresh random time-major input [T, B, I] and states (h_0 [L * D, B, proj_size], c_0
    [L * D, B, hidden_size]), as leaves."""
    states = lstm.num_layers * (2 if lstm.bidirectional else 1)

    def leaf(*shape):
        return torch.randn(*shape, generator=generator, dtype=dtype).requires_grad_()

    x = leaf(num_steps, batch, lstm.input_size)
    return x, (leaf(states, batch, lstm.proj_size), leaf(states, batch, lstm.hidden_size))


def run(lstm, x, hx, layout, lengths, **kwargs):
    """lstm on x laid out as `layout`; returns (output as time-major padded, h_n, c_n, extra)."""
    if layout.startswith("packed"):
        packed = pack_padded_sequence(x, torch.tensor(lengths), enforce_sorted=False)
        output, (h_n, c_n), *extra = lstm(packed, hx, **kwargs)
        assert isinstance(output, PackedSequence)
        output = pad_packed_sequence(output, total_length=x.shape[0])[0]
    elif layout == "batch_first":
        output, (h_n, c_n), *extra = lstm(x.transpose(0, 1), hx, **kwargs)
        output = output.transpose(0, 1)
    elif layout == "unbatched":
        output, (h_n, c_n), *extra = lstm(x[:, 0], None if hx is None else (hx[0][:, 0], hx[1][:, 0]), **kwargs)
        output, h_n, c_n = output.unsqueeze(1), h_n.unsqueeze(1), c_n.unsqueeze(1)
    else:
        output, (h_n, c_n), *extra = lstm(x, hx, **kwargs)
    return output, h_n, c_n, extra


def outputs_and_gradients(lstm, x, hx, layout, lengths):
    """Outputs, and the gradients of a random projection of all three outputs with respect to the
    input, h_0, c_0 (when given) and every parameter."""
    output, h_n, c_n, _ = run(lstm, x, hx, layout, lengths)
    generator = torch.Generator().manual_seed(1)
    loss = sum((t * torch.randn(t.shape, generator=generator, dtype=t.dtype)).sum() for t in (output, h_n, c_n))
    leaves = [x] + (list(hx) if hx is not None else []) + list(lstm.parameters())
    return [output, h_n, c_n], list(torch.autograd.grad(loss, leaves))


def assert_matches_nn_lstm(dtype, layout, batch=4, num_steps=6, lengths=None, with_hx=True,
                           input_size=INPUT_SIZE, hidden_size=HIDDEN_SIZE, **config):
    batch_first = layout == "batch_first"
    torch_lstm, fused_lstm = twin_lstms(dtype, input_size, hidden_size, batch_first=batch_first, **config)
    generator = torch.Generator().manual_seed(7)
    x, hx = random_case(torch_lstm, 1 if layout == "unbatched" else batch, num_steps, dtype, generator)
    hx = hx if with_hx else None
    lengths = lengths or (UNSORTED_LENGTHS if batch == 4 else None)
    expected_outputs, expected_grads = outputs_and_gradients(torch_lstm, x, hx, layout, lengths)
    actual_outputs, actual_grads = outputs_and_gradients(fused_lstm, x, hx, layout, lengths)
    names = ["output", "h_n", "c_n", "grad input"] + (["grad h_0", "grad c_0"] if with_hx else []) + [
        f"grad {name}" for name, _ in fused_lstm.named_parameters()]
    assert any("weight_hr" in name for name in names)
    for name, actual, expected in zip(names, actual_outputs + actual_grads, expected_outputs + expected_grads,
                                      strict=True):
        assert actual.shape == expected.shape, name
        torch.testing.assert_close(actual, expected, **TOLERANCES[dtype], msg=lambda m: f"{name}: {m}")


# --- Parity with nn.LSTM: outputs and the gradients of input, h_0, c_0 and every parameter ---


# float64 runs the loop of library products (csrc/sequence.cpp); so does float32 with a projection.
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("num_layers", [1, 2])
@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("proj_size", [1, 3])
def test_matches_nn_lstm(dtype, num_layers, bidirectional, layout, proj_size):
    assert_matches_nn_lstm(dtype, layout, num_layers=num_layers, bidirectional=bidirectional, proj_size=proj_size)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("layout", ["padded", "packed_unsorted", "unbatched"])
def test_matches_nn_lstm_without_bias(dtype, layout):
    assert_matches_nn_lstm(dtype, layout, num_layers=2, bidirectional=True, bias=False, proj_size=3)


def test_matches_nn_lstm_without_initial_state():
    assert_matches_nn_lstm(torch.float64, "packed_unsorted", with_hx=False, num_layers=2, bidirectional=True,
                           proj_size=3)


# Hidden sizes off the vector width (16 floats on AVX-512) and a proj_size of 17: batches of the
# small-batch path's range (float32, batch <= 64, <= 256 on avx512) and past it (batch > 64 or
# > 256, float64).
@pytest.mark.parametrize(
    "dtype, batch", [(torch.float32, 1), (torch.float32, 8), (torch.float32, 64), (torch.float32, 70),
                     (torch.float32, 257), (torch.float64, 3), (torch.float64, 70)],
    ids=["float32-b1", "float32-b8", "float32-b64", "float32-b70", "float32-b257", "float64-b3", "float64-b70"],
)
@pytest.mark.parametrize("hidden_size, proj_size", [(23, 17), (40, 1), (37, 3)])
def test_batch_and_hidden_sizes(dtype, batch, hidden_size, proj_size):
    assert_matches_nn_lstm(dtype, "padded", batch=batch, num_steps=5, input_size=11, hidden_size=hidden_size,
                           num_layers=2, bidirectional=True, proj_size=proj_size)


# The small-batch recurrence's threads: split by rows (37 sequences at hidden 130, each thread
# running its own), and by units (4 sequences at hidden 200: the threads meet before the
# projection and before the recurrent product of every step, forward and backward); on 1 and 2
# threads (the threads fixture).
@pytest.mark.parametrize("lengths, hidden_size, proj_size", [
    ([(5 * i) % 12 + 1 for i in range(37)], 130, 33), ([12, 3, 7, 9], 200, 99),
], ids=["rows", "units"])
def test_packed_float32_threads(threads, lengths, hidden_size, proj_size):
    assert_matches_nn_lstm(torch.float32, "packed_unsorted", batch=len(lengths), num_steps=12, lengths=lengths,
                           input_size=24, hidden_size=hidden_size, num_layers=2, bidirectional=True,
                           proj_size=proj_size)


# --- gradcheck, gradgradcheck (the double backward runs through the composite recomputation) ---


@pytest.mark.parametrize("bidirectional", [False, True])
def test_gradcheck_and_gradgradcheck(bidirectional):
    torch.manual_seed(0)
    lstm = lf.LSTM(3, 4, num_layers=2, bidirectional=bidirectional, proj_size=2, dtype=torch.float64)
    names = [name for name, _ in lstm.named_parameters()]
    parameters = [p.detach().clone().requires_grad_() for p in lstm.parameters()]
    x = torch.randn(3, 2, 3, dtype=torch.float64, requires_grad=True)
    states = 4 if bidirectional else 2
    h_0 = torch.randn(states, 2, 2, dtype=torch.float64, requires_grad=True)
    c_0 = torch.randn(states, 2, 4, dtype=torch.float64, requires_grad=True)

    def fn(x, h_0, c_0, *params):
        output, (h_n, c_n) = torch.func.functional_call(lstm, dict(zip(names, params)), (x, (h_0, c_0)))
        return output, h_n, c_n

    inputs = (x, h_0, c_0, *parameters)
    assert torch.autograd.gradcheck(fn, inputs, atol=1e-8)
    assert torch.autograd.gradgradcheck(fn, inputs, atol=1e-8)


def test_double_backward_matches_nn_lstm():
    torch_lstm, fused_lstm = twin_lstms(torch.float64, INPUT_SIZE, HIDDEN_SIZE, num_layers=2, proj_size=3)
    x = torch.randn(5, 2, INPUT_SIZE, dtype=torch.float64, requires_grad=True)
    penalties = []
    for lstm in (torch_lstm, fused_lstm):
        output, _ = lstm(x)
        (grad_x,) = torch.autograd.grad(output.square().sum(), x, create_graph=True)
        penalty = grad_x.square().sum()
        penalties.append((penalty, torch.autograd.grad(penalty, lstm.weight_hr_l0)[0]))
    (expected, expected_grad), (actual, actual_grad) = penalties
    assert expected_grad.abs().max() > 0
    torch.testing.assert_close(actual, expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(actual_grad, expected_grad, rtol=1e-8, atol=1e-10)


# --- return_states: the hidden state before the projection ---


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("layout", ["padded", "batch_first", "packed_unsorted", "unbatched"])
def test_hidden_before_projection(dtype, layout):
    torch_lstm, fused_lstm = twin_lstms(dtype, INPUT_SIZE, HIDDEN_SIZE, num_layers=2, bidirectional=True,
                                        proj_size=3, batch_first=layout == "batch_first")
    generator = torch.Generator().manual_seed(3)
    x, hx = random_case(fused_lstm, 1 if layout == "unbatched" else 4, 6, dtype, generator)
    output, h_n, c_n, (states,) = run(fused_lstm, x, hx, layout, UNSORTED_LENGTHS, return_states=True)
    assert len(states) == 4
    for state in states:
        unprojected = state.hidden_before_projection
        if isinstance(unprojected, PackedSequence):
            unprojected, gates_output, cell = (t.data for t in (unprojected, state.gates.output, state.cell_state))
        else:
            gates_output, cell = state.gates.output, state.cell_state
        assert unprojected.shape[-1] == HIDDEN_SIZE
        torch.testing.assert_close(unprojected, gates_output * cell.tanh(), **TOLERANCES[dtype])

    # Against a plain loop of nn.LSTMCell steps and the projection, layer 0's forward direction
    # (padded layout: every sequence runs all steps).
    if layout == "padded":
        cell = nn.LSTMCell(INPUT_SIZE, HIDDEN_SIZE, dtype=dtype)
        cell.weight_ih.data, cell.bias_ih.data, cell.bias_hh.data = (
            torch_lstm.weight_ih_l0.data, torch_lstm.bias_ih_l0.data, torch_lstm.bias_hh_l0.data)
        h, c = hx[0][0], hx[1][0]
        expected = []
        for step in x:
            gates = step @ torch_lstm.weight_ih_l0.T + h @ torch_lstm.weight_hh_l0.T
            gates = gates + torch_lstm.bias_ih_l0 + torch_lstm.bias_hh_l0
            i, f, g, o = gates.chunk(4, dim=1)
            c = f.sigmoid() * c + i.sigmoid() * g.tanh()
            unprojected = o.sigmoid() * c.tanh()
            expected.append(unprojected)
            h = unprojected @ torch_lstm.weight_hr_l0.T
        torch.testing.assert_close(states[0].hidden_before_projection, torch.stack(expected), **TOLERANCES[dtype])
        torch.testing.assert_close(output[..., :3], torch_lstm(x, hx)[0][..., :3], **TOLERANCES[dtype])

    # Gradients flow through it.
    unprojected = states[1].hidden_before_projection
    unprojected = unprojected.data if isinstance(unprojected, PackedSequence) else unprojected
    (grad_x,) = torch.autograd.grad(unprojected.sum(), x)
    assert grad_x.abs().max() > 0


def test_states_without_projection_keep_their_fields():
    lstm = lf.LSTM(INPUT_SIZE, HIDDEN_SIZE)
    _, _, (state,) = lstm(torch.randn(4, 2, INPUT_SIZE), return_states=True)
    gates, cell_state, unprojected = state[:3]
    assert unprojected is None and state.hidden_before_projection is None
    # No regularisation: no masks either.
    assert all(mask is None for mask in state[3:])
    assert cell_state.shape == (4, 2, HIDDEN_SIZE) and gates.forget.shape == (4, 2, HIDDEN_SIZE)


# --- convert(), shapes, errors ---


class Encoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(INPUT_SIZE, HIDDEN_SIZE, num_layers=2, bidirectional=True, proj_size=3)
        self.head = nn.Linear(6, 2)

    def forward(self, x):
        output, (h_n, c_n) = self.lstm(x)
        return self.head(output), h_n, c_n


def test_convert_takes_an_lstm_with_projections():
    model = Encoder().double()
    converted = copy.deepcopy(model)
    parameters = list(converted.parameters())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "left as it is"
        assert lf.convert(converted) is converted
    assert type(converted.lstm) is lf.LSTM and converted.lstm.proj_size == 3
    assert all(a is b for a, b in zip(converted.parameters(), parameters))
    x = torch.randn(6, 4, INPUT_SIZE, dtype=torch.float64)
    expected, actual = model(x), converted(x)
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e, atol=1e-10, rtol=0)
    expected_grads = torch.autograd.grad(sum(t.sum() for t in expected), list(model.parameters()))
    actual_grads = torch.autograd.grad(sum(t.sum() for t in actual), list(converted.parameters()))
    for a, e in zip(actual_grads, expected_grads):
        torch.testing.assert_close(a, e, atol=1e-10, rtol=0)


def test_parameters_and_shapes_are_nn_lstms():
    torch_lstm, fused_lstm = twin_lstms(torch.float32, INPUT_SIZE, HIDDEN_SIZE, num_layers=2, bidirectional=True,
                                        proj_size=3)
    assert [(n, p.shape) for n, p in fused_lstm.named_parameters()] == [
        (n, p.shape) for n, p in torch_lstm.named_parameters()]
    assert fused_lstm.weight_hr_l1_reverse.shape == (3, HIDDEN_SIZE)
    assert fused_lstm.weight_hh_l0.shape == (4 * HIDDEN_SIZE, 3) and fused_lstm.weight_ih_l1.shape == (4 * HIDDEN_SIZE, 6)
    assert all(len(weights) == 5 for weights in fused_lstm.all_weights)
    output, (h_n, c_n) = fused_lstm(torch.randn(6, 2, INPUT_SIZE))
    assert output.shape == (6, 2, 6) and h_n.shape == (4, 2, 3) and c_n.shape == (4, 2, HIDDEN_SIZE)


def test_meta_device_like_nn_lstm():
    lstms = [cls(4, 6, num_layers=2, bidirectional=True, proj_size=2, device="meta") for cls in (nn.LSTM, lf.LSTM)]
    x = torch.empty(6, 5, 4, device="meta")
    (expected, (expected_h, expected_c)), (actual, (actual_h, actual_c)) = (lstm(x) for lstm in lstms)
    for a, e in zip((actual, actual_h, actual_c), (expected, expected_h, expected_c)):
        assert (a.shape, a.device) == (e.shape, e.device)


@pytest.mark.parametrize("which", ["h_0 with hidden_size", "c_0 with proj_size"])
def test_wrong_state_shape_gives_nn_lstms_error(which):
    torch_lstm, fused_lstm = twin_lstms(torch.float32, INPUT_SIZE, HIDDEN_SIZE, proj_size=3)
    x = torch.randn(6, 2, INPUT_SIZE)
    good_h, good_c = torch.randn(1, 2, 3), torch.randn(1, 2, HIDDEN_SIZE)
    hx = (torch.randn(1, 2, HIDDEN_SIZE), good_c) if which.startswith("h_0") else (good_h, torch.randn(1, 2, 3))
    with pytest.raises(RuntimeError) as expected:
        torch_lstm(x, hx)
    with pytest.raises(RuntimeError) as actual:
        fused_lstm(x, hx)
    assert str(actual.value) == str(expected.value)
    assert "Expected hidden" in str(actual.value)


def test_op_rejects_a_weight_hr_of_the_wrong_shape():
    generator = torch.Generator().manual_seed(5)

    def tensor(*shape):
        return torch.randn(*shape, generator=generator, dtype=torch.float64)

    batch_sizes = torch.tensor([2, 2])
    args = [tensor(4, 3), batch_sizes, tensor(2, 2), tensor(2, 5), tensor(20, 3), tensor(20, 2), None, None, False]
    with pytest.raises(RuntimeError, match=r"weight_hh must have shape \[4 \* hidden_size, proj_size\] = \[20, 3\]"):
        torch.ops.lstm_fused.sequence_forward(*args, tensor(3, 5))
    with pytest.raises(RuntimeError, match=r"hx \(h_0\) has inconsistent proj_size: got 2, expected 3"):
        torch.ops.lstm_fused.sequence_forward(*args[:5], tensor(20, 3), *args[6:], tensor(3, 5))
    with pytest.raises(RuntimeError, match=r"weight_hr must have shape \[proj_size > 0, hidden_size\]"):
        torch.ops.lstm_fused.sequence_forward(*args, tensor(2, 5, 1))


# --- torch.func, forward-mode AD, reduced precision ---


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")  # from torch.func itself
def test_forward_mode_and_torch_func_match_nn_lstm():
    # Under forward AD and torch.func the op runs its differentiable composite, projection included.
    torch_lstm, fused_lstm = twin_lstms(torch.float64, INPUT_SIZE, HIDDEN_SIZE, num_layers=2, bidirectional=True,
                                        proj_size=3)
    x = torch.randn(5, 2, INPUT_SIZE, dtype=torch.float64)
    tangent = torch.randn_like(x)
    (expected, expected_tangent), (actual, actual_tangent) = (
        torch.func.jvp(lambda x: lstm(x)[0], (x,), (tangent,)) for lstm in (torch_lstm, fused_lstm))
    torch.testing.assert_close(actual, expected, atol=1e-10, rtol=0)
    torch.testing.assert_close(actual_tangent, expected_tangent, atol=1e-10, rtol=0)
    expected_grad, actual_grad = (torch.func.grad(lambda x: lstm(x)[0].square().sum())(x)
                                  for lstm in (torch_lstm, fused_lstm))
    torch.testing.assert_close(actual_grad, expected_grad, atol=1e-10, rtol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bfloat16", "float16"])
def test_reduced_precision_against_float64(dtype):
    # Computed in float32 and stored in dtype: the error against float64 is of dtype's rounding.
    _, reference = twin_lstms(torch.float64, INPUT_SIZE, HIDDEN_SIZE, num_layers=2, proj_size=3)
    fused_lstm = copy.deepcopy(reference).to(dtype)
    x = torch.randn(6, 4, INPUT_SIZE, dtype=torch.float64, requires_grad=True)
    x_low = x.detach().to(dtype).requires_grad_()
    expected, (expected_h, expected_c) = reference(x)
    actual, (actual_h, actual_c) = fused_lstm(x_low)
    assert actual.dtype == dtype and actual.shape == expected.shape == (6, 4, 3)
    bound = 2e-2 if dtype == torch.bfloat16 else 4e-3
    for a, e in ((actual, expected), (actual_h, expected_h), (actual_c, expected_c)):
        assert ((a.double() - e).norm() / e.norm()).item() < bound
    (grad_x,) = torch.autograd.grad(expected.sum(), x)
    (grad_x_low,) = torch.autograd.grad(actual.sum(), x_low)
    assert ((grad_x_low.double() - grad_x).norm() / grad_x.norm()).item() < 4 * bound


@pytest.mark.parametrize("threads", [16], indirect=True)
def test_threads_owning_features_but_no_units(threads):
    # Split by units in whole vectors, 16 threads at hidden 600 give threads 13-15 no units, while
    # proj_size 500 rounds to smaller shares and gives thread 13 features [416, 448) (16 lanes;
    # 8 lanes: likewise): that thread still projects, starts and ends its rows' gradients.
    assert_matches_nn_lstm(torch.float32, "packed_unsorted", batch=4, num_steps=3, lengths=[3, 1, 2, 3],
                           input_size=8, hidden_size=600, proj_size=500)

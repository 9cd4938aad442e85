"""lstm_fused.LSTM against torch.nn.LSTM and against a Python loop of lstm_fused.reference's cell:
outputs and every gradient over padded, batch_first, packed and unbatched input; gradcheck; gate
and state introspection; state_dict; convert(); bad input; opcheck; torch.compile."""
import copy
import os
import shutil

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

import lstm_fused as lf
from lstm_fused import reference

INPUT_SIZE, HIDDEN_SIZE = 5, 7
# Unequal lengths with a tie, so packed batches shrink by more than one row and by none.
LENGTHS = [6, 4, 4, 1]
UNSORTED_LENGTHS = [4, 1, 6, 4]
LAYOUTS = ["padded", "batch_first", "packed_sorted", "packed_unsorted", "unbatched"]


@pytest.fixture(autouse=True)
def poison_outputs():
    # Every kernel output starts NaN, so a row the sequence loop forgets to write fails the test.
    previous = torch.ops.lstm_fused._set_poison_outputs(True)
    yield
    torch.ops.lstm_fused._set_poison_outputs(previous)


def twin_lstms(dtype=torch.float64, input_size=INPUT_SIZE, hidden_size=HIDDEN_SIZE, device="cpu", **config):
    """An nn.LSTM and an lf.LSTM with the same weights."""
    torch_lstm = nn.LSTM(input_size, hidden_size, dtype=dtype, device=device, **config)
    fused_lstm = lf.LSTM(input_size, hidden_size, dtype=dtype, device=device, **config)
    fused_lstm.load_state_dict(torch_lstm.state_dict())
    return torch_lstm, fused_lstm


def random_case(lstm, layout, with_hx, num_steps=None, dtype=torch.float64, seed=0, device="cpu", lengths=None):
    """Fresh random time-major input [T, B, I] and states [L * D, B, H], as leaves: a batch of one
    sequence a length."""
    generator = torch.Generator().manual_seed(seed)
    num_steps = num_steps or max(LENGTHS)
    batch = 1 if layout == "unbatched" else len(lengths or LENGTHS)
    states = lstm.num_layers * (2 if lstm.bidirectional else 1)

    def leaf(*shape):
        return torch.randn(*shape, generator=generator, dtype=dtype).to(device).requires_grad_()

    x = leaf(num_steps, batch, lstm.input_size)
    hx = (leaf(states, batch, lstm.hidden_size), leaf(states, batch, lstm.hidden_size)) if with_hx else None
    return x, hx


def run(lstm, x, hx, layout, lengths=None, **kwargs):
    """lstm on x laid out as `layout`; returns (output as time-major padded, h_n, c_n, extra)."""
    if layout == "packed_sorted":
        lengths = lengths or LENGTHS
        packed = pack_padded_sequence(x, torch.tensor(lengths), enforce_sorted=True)
    elif layout == "packed_unsorted":
        lengths = lengths or UNSORTED_LENGTHS
        packed = pack_padded_sequence(x, torch.tensor(lengths), enforce_sorted=False)
    if layout.startswith("packed"):
        output, (h_n, c_n), *extra = lstm(packed, hx, **kwargs)
        assert isinstance(output, PackedSequence)
        output = pad_packed_sequence(output, total_length=x.shape[0])[0]
    elif layout == "batch_first":
        assert lstm.batch_first
        output, (h_n, c_n), *extra = lstm(x.transpose(0, 1), hx, **kwargs)
        output = output.transpose(0, 1)
    elif layout == "unbatched":
        unbatched_hx = None if hx is None else (hx[0][:, 0], hx[1][:, 0])
        output, (h_n, c_n), *extra = lstm(x[:, 0], unbatched_hx, **kwargs)
        output, h_n, c_n = output.unsqueeze(1), h_n.unsqueeze(1), c_n.unsqueeze(1)
    else:
        output, (h_n, c_n), *extra = lstm(x, hx, **kwargs)
    return output, h_n, c_n, extra


def outputs_and_gradients(lstm, x, hx, layout, lengths=None, seed=1):
    """Outputs, and the gradients of a random projection of all three outputs with respect to the
    input, h_0, c_0 and every parameter."""
    output, h_n, c_n, _ = run(lstm, x, hx, layout, lengths)
    generator = torch.Generator().manual_seed(seed)
    loss = sum(
        (t * torch.randn(t.shape, generator=generator, dtype=t.dtype).to(t.device)).sum() for t in (output, h_n, c_n)
    )
    leaves = [x] + (list(hx) if hx is not None else []) + list(lstm.parameters())
    gradients = torch.autograd.grad(loss, leaves)
    return [output, h_n, c_n], list(gradients)


def assert_all_close(actual, expected, atol, rtol=0.0):
    assert len(actual) == len(expected)
    for index, (a, e) in enumerate(zip(actual, expected)):
        assert a.shape == e.shape, f"item {index}: shape {tuple(a.shape)} != {tuple(e.shape)}"
        torch.testing.assert_close(a, e, atol=atol, rtol=rtol, msg=lambda m: f"item {index}: {m}")


def assert_matches_nn_lstm(
    config, layout, with_hx, atol=1e-10, rtol=0.0, dtype=torch.float64, lengths=None, sizes=(), device="cpu", **case
):
    batch_first = layout == "batch_first"
    torch_lstm, fused_lstm = twin_lstms(dtype, *sizes, batch_first=batch_first, device=device, **config)
    x, hx = random_case(torch_lstm, layout, with_hx, dtype=dtype, device=device, lengths=lengths, **case)
    expected_outputs, expected_grads = outputs_and_gradients(torch_lstm, x, hx, layout, lengths)
    actual_outputs, actual_grads = outputs_and_gradients(fused_lstm, x, hx, layout, lengths)
    assert_all_close(actual_outputs, expected_outputs, atol, rtol)
    assert_all_close(actual_grads, expected_grads, atol, rtol)


# --- Parity with nn.LSTM: outputs and the gradients of input, h_0, c_0 and every parameter ---


@pytest.mark.parametrize("num_layers", [1, 2, 3])
@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("with_hx", [True, False])
def test_matches_nn_lstm(num_layers, bidirectional, layout, with_hx):
    assert_matches_nn_lstm(dict(num_layers=num_layers, bidirectional=bidirectional), layout, with_hx)


@pytest.mark.parametrize("layout", ["padded", "packed_unsorted", "unbatched"])
def test_matches_nn_lstm_without_bias(layout):
    assert_matches_nn_lstm(dict(num_layers=2, bidirectional=True, bias=False), layout, with_hx=True)


@pytest.mark.parametrize("layout", ["padded", "batch_first", "unbatched"])
def test_single_step(layout):
    assert_matches_nn_lstm(dict(num_layers=2, bidirectional=True), layout, with_hx=True, num_steps=1)


def test_single_step_packed():
    torch_lstm, fused_lstm = twin_lstms(num_layers=2, bidirectional=True)
    x, hx = random_case(torch_lstm, "packed_sorted", with_hx=True, num_steps=1)
    ones = [1] * len(LENGTHS)
    expected = outputs_and_gradients(torch_lstm, x, hx, "packed_sorted", lengths=ones)
    actual = outputs_and_gradients(fused_lstm, x, hx, "packed_sorted", lengths=ones)
    assert_all_close(actual[0] + actual[1], expected[0] + expected[1], atol=1e-10)


# float32 on the CPU sends products of a million multiply-adds or more to oneDNN (csrc/matmul.h),
# smaller ones and float64 to ATen's BLAS. hidden 256 over 4 rows crosses that line at every step;
# 40 steps make the recurrent weight worth reordering once. Both routes are tested.
@pytest.mark.parametrize("layout", ["padded", "packed_unsorted", "unbatched"])
@pytest.mark.parametrize("onednn", [True, False])
@pytest.mark.filterwarnings("ignore:TF32 acceleration on top of oneDNN")  # from mkldnn.flags() itself
def test_float32_matches_nn_lstm(layout, onednn):
    with torch.backends.mkldnn.flags(enabled=onednn):
        assert_matches_nn_lstm(
            dict(num_layers=2, bidirectional=True), layout, with_hx=True, atol=1e-5, rtol=1e-5,
            dtype=torch.float32, num_steps=40, lengths=[33, 40, 2, 33], sizes=(64, 256),
        )


# Float32 batches of at most 64 take the fused small-batch recurrence (csrc/cpu/small_batch.h), the
# case above; a larger batch runs the step loop of library products, as float64 does.
@pytest.mark.parametrize("onednn", [True, False])
@pytest.mark.filterwarnings("ignore:TF32 acceleration on top of oneDNN")
def test_float32_past_the_small_batch_path_matches_nn_lstm(onednn):
    torch_lstm, fused_lstm = twin_lstms(torch.float32, 16, 128, num_layers=1, bidirectional=True)
    generator = torch.Generator().manual_seed(3)

    def leaf(*shape):
        return torch.randn(*shape, generator=generator).requires_grad_()

    x = leaf(40, 70, 16)
    hx = (leaf(2, 70, 128), leaf(2, 70, 128))
    with torch.backends.mkldnn.flags(enabled=onednn):
        expected = outputs_and_gradients(torch_lstm, x, hx, "padded")
        actual = outputs_and_gradients(fused_lstm, x, hx, "padded")
    # A weight gradient sums 40 x 70 products; float32 rounding in the two summation orders
    # reaches 2e-5 of gradients of order 1.
    assert_all_close(actual[0] + actual[1], expected[0] + expected[1], atol=5e-5, rtol=1e-5)


# Threads of the small-batch recurrence share a step's hidden units (meeting at one barrier per
# step) or, from 4 rows a thread, the batch rows (each running its own sequences); one and two
# threads, with sequences ending at different steps in both directions, some rows of the second
# thread's share ending before all of the first's (the threads fixture: 1 and 2).
@pytest.mark.parametrize("hidden_size", [13, 200])
@pytest.mark.parametrize(
    "lengths", [[9, 12, 2, 9], [12, 3, 7, 12, 1, 9, 5, 12, 8, 2, 11], [(5 * i) % 12 + 1 for i in range(37)]]
)
def test_small_batch_recurrence_threads(threads, hidden_size, lengths):
    assert_matches_nn_lstm(
        dict(num_layers=2, bidirectional=True), "packed_unsorted", with_hx=True, atol=1e-5, rtol=1e-5,
        dtype=torch.float32, num_steps=12, lengths=lengths, sizes=(24, hidden_size),
    )


# The sequence loop is device-independent: on a GPU it drives the CUDA cell kernels and cuBLAS.
@pytest.mark.skipif(not (torch.cuda.is_available() and lf.WITH_CUDA), reason="needs a CUDA GPU and a CUDA build")
@pytest.mark.parametrize("layout", ["padded", "batch_first", "packed_unsorted"])
def test_cuda_matches_nn_lstm(layout):
    assert_matches_nn_lstm(dict(num_layers=2, bidirectional=True), layout, with_hx=True, device="cuda")


def test_non_contiguous_states():
    torch_lstm, fused_lstm = twin_lstms(num_layers=2, bidirectional=True)
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(6, 4, INPUT_SIZE, generator=generator, dtype=torch.float64)
    # [B, L * D, H] transposed: every state slice is strided.
    hx = tuple(torch.randn(4, 4, HIDDEN_SIZE, generator=generator, dtype=torch.float64).transpose(0, 1) for _ in "hc")
    expected = torch_lstm(x, hx)
    actual = fused_lstm(x, hx)
    assert_all_close([actual[0], *actual[1]], [expected[0], *expected[1]], atol=1e-10)


@pytest.mark.parametrize("bidirectional", [False, True])
def test_meta_device_like_nn_lstm(bidirectional):
    """Shape inference on the meta device, as nn.LSTM allows."""
    lstms = [cls(4, 3, num_layers=2, bidirectional=bidirectional, device="meta") for cls in (nn.LSTM, lf.LSTM)]
    x = torch.empty(6, 5, 4, device="meta")
    (expected, (expected_h, expected_c)), (actual, (actual_h, actual_c)) = (lstm(x) for lstm in lstms)
    for a, e in zip((actual, actual_h, actual_c), (expected, expected_h, expected_c)):
        assert (a.shape, a.device) == (e.shape, e.device)


def test_empty_batch_like_nn_lstm():
    torch_lstm, fused_lstm = twin_lstms()
    x = torch.randn(3, 0, INPUT_SIZE, dtype=torch.float64)
    expected = torch_lstm(x)
    actual = fused_lstm(x)
    assert_all_close([actual[0], *actual[1]], [expected[0], *expected[1]], atol=0)


def test_dropout_between_layers_as_nn_lstm():
    # Same seed, same masks: nn.LSTM draws its dropout with the same op, after the same layers.
    torch_lstm, fused_lstm = twin_lstms(num_layers=3, bidirectional=True, dropout=0.4)
    x, hx = random_case(torch_lstm, "padded", with_hx=True)
    torch.manual_seed(5)
    expected = outputs_and_gradients(torch_lstm, x, hx, "padded")
    torch.manual_seed(5)
    actual = outputs_and_gradients(fused_lstm, x, hx, "padded")
    assert_all_close(actual[0] + actual[1], expected[0] + expected[1], atol=1e-10)
    # Dropout changed something in training, and nothing in eval.
    torch_lstm.eval()
    fused_lstm.eval()
    eval_output = fused_lstm(x, hx)[0]
    assert (eval_output - actual[0][0]).abs().max() > 1e-3
    torch.testing.assert_close(eval_output, torch_lstm(x, hx)[0], atol=1e-10, rtol=0)


def test_autocast_cpu_bfloat16_like_nn_lstm():
    torch_lstm, fused_lstm = twin_lstms(dtype=torch.float32, num_layers=2)
    x = torch.randn(6, 4, INPUT_SIZE)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        try:
            expected, (expected_h, _) = torch_lstm(x)
        except RuntimeError as error:
            # nn.LSTM's bfloat16 autocast is oneDNN's LSTM primitive, which AVX2-only CPUs lack.
            pytest.skip(f"nn.LSTM itself fails under bfloat16 autocast on this CPU: {error}")
        actual, (actual_h, _) = fused_lstm(x)
    assert actual.dtype == expected.dtype == torch.bfloat16
    assert actual_h.dtype == expected_h.dtype
    exact = twin_lstms(dtype=torch.float64, num_layers=2)[0]
    exact.load_state_dict(torch_lstm.state_dict())
    exact_output = exact(x.double())[0]
    error = (actual.double() - exact_output).norm() / exact_output.norm()
    torch_error = (expected.double() - exact_output).norm() / exact_output.norm()
    assert error < max(2 * torch_error, 1e-2)


# --- Against a Python loop of the reference cell, one sequence at a time ---


def reference_lstm_layer(x, lengths, hx, weights, bidirectional):
    """One layer over padded time-major x [T, B, I], sequence b running over its first lengths[b]
    steps (backwards for the reverse direction), with lstm_fused.reference's cell. Returns the
    padded output [T, B, D * H], h_n, c_n [D, B, H] and per direction the activated gates and cell
    states [T, B, H] (zero past each length)."""
    num_steps, batch = x.shape[0], x.shape[1]
    zero = x.new_zeros(HIDDEN_SIZE)
    outputs, h_n, c_n, states = [], [], [], []
    for direction in range(2 if bidirectional else 1):
        w_ih, w_hh, b_ih, b_hh = weights[direction]
        hidden = [[zero] * batch for _ in range(num_steps)]
        cells = [[zero] * batch for _ in range(num_steps)]
        gates = [[[zero] * batch for _ in range(num_steps)] for _ in range(4)]
        last_h, last_c = [], []
        for b in range(batch):
            h, c = hx[0][direction, b], hx[1][direction, b]
            steps = range(lengths[b])
            for t in reversed(steps) if direction == 1 else steps:
                h, c, step_gates = reference.lstm_cell(x[t, b], (h, c), w_ih, w_hh, b_ih, b_hh, return_gates=True)
                hidden[t][b], cells[t][b] = h, c
                for gate in range(4):
                    gates[gate][t][b] = step_gates[gate]
            last_h.append(h)
            last_c.append(c)

        def stack(rows):
            return torch.stack([torch.stack(row) for row in rows])

        outputs.append(stack(hidden))
        h_n.append(torch.stack(last_h))
        c_n.append(torch.stack(last_c))
        states.append((lf.LSTMGates(*(stack(g) for g in gates)), stack(cells)))
    return torch.cat(outputs, dim=2), torch.stack(h_n), torch.stack(c_n), states


@pytest.mark.parametrize("layout", ["padded", "packed_sorted", "packed_unsorted"])
@pytest.mark.parametrize("bidirectional", [False, True])
def test_matches_reference_cell_loop(layout, bidirectional):
    fused_lstm = lf.LSTM(INPUT_SIZE, HIDDEN_SIZE, bidirectional=bidirectional, dtype=torch.float64)
    x, hx = random_case(fused_lstm, layout, with_hx=True, seed=7)
    lengths = {"padded": [max(LENGTHS)] * len(LENGTHS), "packed_sorted": LENGTHS, "packed_unsorted": UNSORTED_LENGTHS}[layout]
    output, h_n, c_n, (states,) = run(fused_lstm, x, hx, layout, return_states=True)
    expected_output, expected_h, expected_c, expected_states = reference_lstm_layer(
        x, lengths, hx, fused_lstm.all_weights, bidirectional
    )
    assert_all_close([output, h_n, c_n], [expected_output, expected_h, expected_c], atol=1e-10)

    # Introspection: every step's activated gates and cell state, laid out like the output.
    assert len(states) == (2 if bidirectional else 1)
    for layer_states, (expected_gates, expected_cells) in zip(states, expected_states):
        if layout.startswith("packed"):
            assert isinstance(layer_states.cell_state, PackedSequence)
            padded = [pad_packed_sequence(s, total_length=x.shape[0])[0] for s in (*layer_states.gates, layer_states.cell_state)]
        else:
            padded = [*layer_states.gates, layer_states.cell_state]
        assert_all_close(padded, [*expected_gates, expected_cells], atol=1e-10)

    # Gradients through output, h_n and c_n, and through the introspected gates and cell states.
    generator = torch.Generator().manual_seed(8)

    def projection(tensors):
        return sum((t * torch.randn(t.shape, generator=generator, dtype=t.dtype)).sum() for t in tensors)

    state_tensors = [t for s in states for t in (*s.gates, s.cell_state)]
    if layout.startswith("packed"):
        state_tensors = [pad_packed_sequence(t, total_length=x.shape[0])[0] for t in state_tensors]
    expected_state_tensors = [t for gates, cells in expected_states for t in (*gates, cells)]
    leaves = [x, *hx, *fused_lstm.parameters()]
    seed_state = generator.get_state()
    actual_grads = torch.autograd.grad(projection([output, h_n, c_n, *state_tensors]), leaves)
    generator.set_state(seed_state)
    expected_grads = torch.autograd.grad(
        projection([expected_output, expected_h, expected_c, *expected_state_tensors]), leaves
    )
    assert_all_close(list(actual_grads), list(expected_grads), atol=1e-10)


def test_states_layout_batch_first_and_unbatched():
    lstm = lf.LSTM(INPUT_SIZE, HIDDEN_SIZE, num_layers=2, bidirectional=True, batch_first=True)
    x = torch.randn(4, 6, INPUT_SIZE)
    output, _, states = lstm(x, return_states=True)
    assert len(states) == 4
    for index, layer_states in enumerate(states):
        for tensor in (*layer_states.gates, layer_states.cell_state):
            assert tensor.shape == (4, 6, HIDDEN_SIZE)
    # The last layer's states are those that produced its output: h = o * tanh(c).
    forward_states, backward_states = states[2], states[3]
    torch.testing.assert_close(output[..., :HIDDEN_SIZE], forward_states.gates.output * forward_states.cell_state.tanh())
    torch.testing.assert_close(output[..., HIDDEN_SIZE:], backward_states.gates.output * backward_states.cell_state.tanh())
    output, _, states = lstm(x[0], return_states=True)
    assert output.shape == (6, 2 * HIDDEN_SIZE)
    assert states[0].cell_state.shape == (6, HIDDEN_SIZE)


# --- Gradient checks in float64 ---


# Small sizes: gradcheck perturbs every input and parameter element one at a time.
GRADCHECK_INPUT_SIZE, GRADCHECK_HIDDEN_SIZE = 3, 4


def gradcheck_lstm(layout, lengths=None, return_states=False, seed=0, check=torch.autograd.gradcheck, **config):
    lstm = lf.LSTM(GRADCHECK_INPUT_SIZE, GRADCHECK_HIDDEN_SIZE, dtype=torch.float64, **config)
    names = [name for name, _ in lstm.named_parameters()]
    generator = torch.Generator().manual_seed(seed)
    states = lstm.num_layers * (2 if lstm.bidirectional else 1)

    def leaf(*shape):
        return torch.randn(*shape, generator=generator, dtype=torch.float64, requires_grad=True)

    def function(x, h_0, c_0, *params):
        def call(input, hx, **kwargs):
            return torch.func.functional_call(lstm, dict(zip(names, params)), (input, hx), kwargs)

        output, h_n, c_n, extra = run(call, x, (h_0, c_0), layout, lengths, return_states=return_states)
        tensors = [output, h_n, c_n]
        for layer_states in extra[0] if extra else ():
            for t in (*layer_states.gates, layer_states.cell_state):
                tensors.append(t.data if isinstance(t, PackedSequence) else t)
        return tuple(tensors)

    batch = len(lengths) if lengths else 2
    inputs = (
        leaf(3 if lengths is None else max(lengths), batch, GRADCHECK_INPUT_SIZE),
        leaf(states, batch, GRADCHECK_HIDDEN_SIZE),
        leaf(states, batch, GRADCHECK_HIDDEN_SIZE),
        *(p.detach().requires_grad_() for p in lstm.parameters()),
    )
    assert check(function, inputs, eps=1e-6, atol=1e-8)


def test_gradcheck_one_layer():
    gradcheck_lstm("padded", seed=11)


def test_gradcheck_two_layers_bidirectional_packed():
    gradcheck_lstm("packed_unsorted", lengths=[2, 3, 1], seed=12, num_layers=2, bidirectional=True)


def test_gradcheck_through_states():
    gradcheck_lstm("packed_sorted", lengths=[3, 2, 2], return_states=True, seed=13, bidirectional=True)


def test_gradgradcheck_bidirectional_packed():
    """Double backward recomputes the sequence from differentiable ATen ops (the fused backward's
    own gradients are not differentiable); gradgradcheck checks it against finite differences."""
    gradcheck_lstm("packed_unsorted", lengths=[2, 3, 1], seed=14, bidirectional=True, check=torch.autograd.gradgradcheck)


@pytest.mark.parametrize("layout", ["padded", "packed_unsorted"])
def test_gradient_penalty_like_nn_lstm(layout):
    """A loss on the input gradient (create_graph=True), as in gradient-penalty training: the
    first-order gradients (from the recomputed sequence) and the parameters' second-order ones are
    nn.LSTM's, over sequences of different lengths in both directions."""
    torch_lstm, fused_lstm = twin_lstms(num_layers=2, bidirectional=True)
    x, hx = random_case(torch_lstm, layout, with_hx=True, seed=15)
    results = []
    for lstm in (torch_lstm, fused_lstm):
        output, h_n, c_n, _ = run(lstm, x, hx, layout)
        loss = output.pow(2).sum() + h_n.sum() + 2 * c_n.sum()
        (grad_x,) = torch.autograd.grad(loss, x, create_graph=True)
        results.append([grad_x, *torch.autograd.grad(grad_x.pow(2).sum(), [*hx, *lstm.parameters()])])
    assert_all_close(results[1], results[0], atol=1e-10)


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed_unsorted"])
def test_forward_ad_like_nn_lstm(packed):
    """Forward-mode AD (torch.autograd.forward_ad) runs the sequence as differentiable ATen ops:
    outputs and tangents are nn.LSTM's, over sequences of different lengths in both directions.
    (pack_padded_sequence has no forward AD: the packed data is made dual after packing.)"""
    import torch.autograd.forward_ad as fwAD

    torch_lstm, fused_lstm = twin_lstms(num_layers=2, bidirectional=True)
    x, hx = random_case(torch_lstm, "padded", with_hx=True, seed=17)
    x, hx = x.detach(), tuple(t.detach() for t in hx)
    if packed:
        x = pack_padded_sequence(x, torch.tensor(UNSORTED_LENGTHS), enforce_sorted=False)
    data = x.data if packed else x
    tangent = torch.linspace(-1, 1, data.numel(), dtype=data.dtype).view_as(data)
    results = []
    for lstm in (torch_lstm, fused_lstm):
        with fwAD.dual_level():
            dual = fwAD.make_dual(data, tangent)
            output, (h_n, c_n) = lstm(x._replace(data=dual) if packed else dual, hx)
            output = output.data if packed else output
            results.append([part for t in (output, h_n, c_n) for part in fwAD.unpack_dual(t)[:2]])
    assert_all_close(results[1], results[0], atol=1e-10)


def lstm_transform(transform, lstm, x, hx):
    if transform == "jacrev":  # d output / d x, padded batch
        return torch.func.jacrev(lambda v: lstm(v, hx)[0])(x)
    if transform == "jvp":  # through h_n and c_n, from a tangent of c_0
        tangent = torch.linspace(-1, 1, hx[1].numel(), dtype=hx[1].dtype).view_as(hx[1])
        return torch.func.jvp(lambda c: lstm(x, (hx[0], c))[1], (hx[1],), (tangent,))[1]
    if transform == "per_sequence_jacobian":  # d h_n / d h_0 of each sequence alone: vmap of jacrev
        def one(x1, h1, c1):
            return lstm(x1, (h1, c1))[1][0]

        return torch.func.vmap(torch.func.jacrev(one, argnums=1), in_dims=(1, 1, 1))(x, *hx)
    raise ValueError(transform)


@pytest.mark.parametrize("transform", ["jacrev", "jvp", "per_sequence_jacobian"])
@pytest.mark.parametrize("bidirectional", [False, True])
def test_transforms_like_nn_lstm(transform, bidirectional):
    """torch.func's transforms, which cannot look into the fused kernels' C++ autograd: under them
    the sequence runs as differentiable ATen ops, with nn.LSTM's answers."""
    torch_lstm, fused_lstm = twin_lstms(bidirectional=bidirectional)
    x, hx = random_case(torch_lstm, "padded", with_hx=True, seed=16)
    x, hx = x.detach(), tuple(t.detach() for t in hx)
    expected = lstm_transform(transform, torch_lstm, x, hx)
    actual = lstm_transform(transform, fused_lstm, x, hx)
    assert_all_close(list(actual) if isinstance(actual, tuple) else [actual],
                     list(expected) if isinstance(expected, tuple) else [expected], atol=1e-10)


# --- The module: constructor, parameters, state_dict ---


def test_parameters_initialisation_and_repr_as_nn_lstm():
    config = dict(num_layers=2, bias=True, batch_first=True, dropout=0.25, bidirectional=True)
    torch.manual_seed(21)
    torch_lstm = nn.LSTM(INPUT_SIZE, HIDDEN_SIZE, **config)
    torch.manual_seed(21)
    fused_lstm = lf.LSTM(INPUT_SIZE, HIDDEN_SIZE, **config)
    assert isinstance(fused_lstm, nn.LSTM)
    assert repr(fused_lstm) == repr(torch_lstm)
    assert [n for n, _ in fused_lstm.named_parameters()] == [n for n, _ in torch_lstm.named_parameters()]
    assert "weight_hh_l1_reverse" in dict(fused_lstm.named_parameters())
    for (name, a), (_, b) in zip(fused_lstm.named_parameters(), torch_lstm.named_parameters()):
        assert torch.equal(a, b), name


def test_state_dict_both_ways():
    config = dict(num_layers=2, bidirectional=True)
    torch_lstm, fused_lstm = twin_lstms(**config)
    x = torch.randn(6, 4, INPUT_SIZE, dtype=torch.float64)
    torch.testing.assert_close(fused_lstm(x)[0], torch_lstm(x)[0], atol=1e-10, rtol=0)
    # The other way: a trained-looking lf.LSTM's state_dict loads into nn.LSTM.
    fused_other = lf.LSTM(INPUT_SIZE, HIDDEN_SIZE, dtype=torch.float64, **config)
    torch_other = nn.LSTM(INPUT_SIZE, HIDDEN_SIZE, dtype=torch.float64, **config)
    assert fused_other.state_dict().keys() == torch_other.state_dict().keys()
    torch_other.load_state_dict(fused_other.state_dict())
    torch.testing.assert_close(torch_other(x)[0], fused_other(x)[0], atol=1e-10, rtol=0)


# --- convert() ---


class Tagger(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(INPUT_SIZE, INPUT_SIZE), nn.Tanh())
        self.lstm = nn.LSTM(INPUT_SIZE, HIDDEN_SIZE, num_layers=2, bidirectional=True, dropout=0.3)
        self.decoder = nn.LSTMCell(2 * HIDDEN_SIZE, HIDDEN_SIZE)

    def forward(self, x):
        output, (h_n, c_n) = self.lstm(self.encoder(x))
        state = (h_n[-1], c_n[-1])
        for step in output:
            state = self.decoder(step, state)
        return output, state


def test_convert_gives_identical_outputs_and_gradients():
    model = Tagger().double().eval()
    converted = lf.convert(copy.deepcopy(model))
    assert type(converted.lstm) is lf.LSTM and type(converted.decoder) is lf.LSTMCell
    assert not converted.training and converted.lstm.dropout == 0.3
    x = torch.randn(6, 4, INPUT_SIZE, dtype=torch.float64)
    expected, actual = model(x), converted(x)
    assert_all_close([actual[0], *actual[1]], [expected[0], *expected[1]], atol=1e-10)
    expected_grads = torch.autograd.grad(expected[0].sum() + expected[1][0].sum(), list(model.parameters()))
    actual_grads = torch.autograd.grad(actual[0].sum() + actual[1][0].sum(), list(converted.parameters()))
    assert_all_close(list(actual_grads), list(expected_grads), atol=1e-10)


def test_convert_keeps_parameters_device_dtype_and_mode_in_place():
    model = Tagger().to(torch.float64).train()
    parameters = list(model.parameters())
    assert lf.convert(model) is model
    assert all(a is b for a, b in zip(model.parameters(), parameters))
    assert model.training and model.lstm.training
    assert all(p.dtype == torch.float64 for p in model.parameters())
    # A bare nn.LSTM is converted too.
    lstm = nn.LSTM(INPUT_SIZE, HIDDEN_SIZE)
    assert type(lf.convert(lstm)) is lf.LSTM


def test_convert_leaves_what_it_cannot_take_with_a_warning():
    class CustomLSTM(nn.LSTM):
        def forward(self, input, hx=None):
            return super().forward(input, hx)

    # An nn.LSTM with projections is taken (tests/test_projection.py checks its answers).
    model = nn.Sequential(nn.LSTM(INPUT_SIZE, HIDDEN_SIZE, proj_size=3), CustomLSTM(INPUT_SIZE, HIDDEN_SIZE))
    with pytest.warns(UserWarning) as record:
        lf.convert(model)
    messages = " ".join(str(w.message) for w in record)
    assert "CustomLSTM" in messages and "proj_size" not in messages
    assert type(model[0]) is lf.LSTM and type(model[1]) is CustomLSTM


# --- Bad input: clear errors ---


def test_wrong_input_width():
    lstm = lf.LSTM(INPUT_SIZE, HIDDEN_SIZE)
    with pytest.raises(RuntimeError, match=f"input.size\\(-1\\) must be equal to input_size. Expected {INPUT_SIZE}, got 3"):
        lstm(torch.randn(6, 4, 3))
    with pytest.raises(ValueError, match="Expected input to be 2D or 3D, got 4D"):
        lstm(torch.randn(6, 4, 2, INPUT_SIZE))


def test_wrong_state_shape():
    lstm = lf.LSTM(INPUT_SIZE, HIDDEN_SIZE, num_layers=2)
    x = torch.randn(6, 4, INPUT_SIZE)
    good = torch.randn(2, 4, HIDDEN_SIZE)
    with pytest.raises(RuntimeError, match=r"Expected hidden\[0\] size \(2, 4, 7\), got \[1, 4, 7\]"):
        lstm(x, (torch.randn(1, 4, HIDDEN_SIZE), good))
    with pytest.raises(RuntimeError, match=r"Expected hidden\[1\] size \(2, 4, 7\), got \[2, 3, 7\]"):
        lstm(x, (good, torch.randn(2, 3, HIDDEN_SIZE)))
    with pytest.raises(RuntimeError, match="hx and cx should also be 3-D"):
        lstm(x, (good[0], good[0]))
    packed = pack_padded_sequence(x, torch.tensor(LENGTHS))
    with pytest.raises(RuntimeError, match=r"Expected hidden\[0\] size \(2, 4, 7\), got \[2, 2, 7\]"):
        lstm(packed, (good[:, :2], good))


def test_dtype_mismatch():
    lstm = lf.LSTM(INPUT_SIZE, HIDDEN_SIZE)
    with pytest.raises(ValueError, match=r"input dtype \(torch.float64\) does not match weight dtype \(torch.float32\)"):
        lstm(torch.randn(6, 4, INPUT_SIZE, dtype=torch.float64))
    states = torch.randn(1, 4, HIDDEN_SIZE, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="hx \\(h_0\\) has dtype Double but input has dtype Float"):
        lstm(torch.randn(6, 4, INPUT_SIZE), (states, states.float()))


def op_args(reverse=False, batch_sizes=(3, 2, 2, 1), bias=True, requires_grad=False):
    generator = torch.Generator().manual_seed(31)
    batch_sizes = torch.tensor(batch_sizes, dtype=torch.int64)
    rows, batch = int(batch_sizes.sum()), int(batch_sizes[0])

    def tensor(*shape):
        return torch.randn(*shape, generator=generator, dtype=torch.float64).requires_grad_(requires_grad)

    biases = (tensor(4 * HIDDEN_SIZE), tensor(4 * HIDDEN_SIZE)) if bias else (None, None)
    return (
        tensor(rows, INPUT_SIZE), batch_sizes, tensor(batch, HIDDEN_SIZE), tensor(batch, HIDDEN_SIZE),
        tensor(4 * HIDDEN_SIZE, INPUT_SIZE), tensor(4 * HIDDEN_SIZE, HIDDEN_SIZE), *biases, reverse,
    )


def test_op_rejects_bad_batch_sizes():
    sequence_forward = torch.ops.lstm_fused.sequence_forward
    args = list(op_args())
    with pytest.raises(RuntimeError, match="batch_sizes must be non-negative and non-increasing"):
        sequence_forward(*args[:1], torch.tensor([2, 3, 2, 1]), *args[2:])
    with pytest.raises(RuntimeError, match="input has 8 rows but batch_sizes sum to 7"):
        sequence_forward(*args[:1], torch.tensor([3, 2, 1, 1]), *args[2:])
    with pytest.raises(RuntimeError, match="batch_sizes must be a 1-D int64 CPU tensor"):
        sequence_forward(*args[:1], torch.tensor([3.0, 2, 2, 1]), *args[2:])
    with pytest.raises(RuntimeError, match=r"batch size \(batch_sizes\[0\]\) 3 doesn't match hx \(h_0\) batch size 2"):
        sequence_forward(*args[:2], args[2][:2], *args[3:])
    with pytest.raises(RuntimeError, match="batch_sizes is empty"):
        sequence_forward(args[0][:0], torch.tensor([], dtype=torch.int64), *args[2:])


# --- Operator registration and torch.compile ---


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("batch_sizes", [(3, 3, 3), (3, 2, 2, 1)])
@pytest.mark.parametrize("bias", [True, False])
def test_opcheck_sequence_forward(reverse, batch_sizes, bias):
    args = op_args(reverse=reverse, batch_sizes=batch_sizes, bias=bias, requires_grad=True)
    torch.library.opcheck(torch.ops.lstm_fused.sequence_forward, args)


class SequenceModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.lstm = lf.LSTM(INPUT_SIZE, HIDDEN_SIZE, num_layers=2, bidirectional=True, batch_first=True)
        self.head = nn.Linear(2 * HIDDEN_SIZE, 3)

    def forward(self, x):
        output, (h_n, c_n) = self.lstm(x)
        return self.head(output), h_n, c_n


@pytest.mark.skipif(shutil.which(os.environ.get("CXX", "g++")) is None and shutil.which("c++") is None,
                    reason="torch.compile's inductor needs a C++ compiler")
def test_torch_compile_fullgraph_matches_eager():
    torch._dynamo.reset()
    model = SequenceModel()
    x = torch.randn(4, 6, INPUT_SIZE)
    # Dynamo refuses every nn.LSTM subclass unless allow_rnn is set; lf.LSTM then compiles whole.
    with torch._dynamo.config.patch(allow_rnn=True):
        compiled = torch.compile(model, fullgraph=True)
        actual = compiled(x)
        actual_grads = torch.autograd.grad(sum(t.sum() for t in actual), list(model.parameters()))
    expected = model(x)
    expected_grads = torch.autograd.grad(sum(t.sum() for t in expected), list(model.parameters()))
    assert_all_close(list(actual), list(expected), atol=1e-5, rtol=1e-5)
    assert_all_close(list(actual_grads), list(expected_grads), atol=1e-5, rtol=1e-5)

"""sequence_inference: lf.LSTM's forward where nothing asks for a gradient or the states.

On the CPU's fused recurrence (batch <= 64) it projects the input and runs the recurrence a run of
steps at a time (kInferenceChunkRows = 512 rows), carrying h and c across runs; elsewhere it is
sequence_forward without the states. Checked against nn.LSTM and sequence_forward on sequences
long enough for many runs, packed variable lengths both ways round (sequences that start inside a
run and at its first step), projections, every dtype, and its autograd fallback."""
import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_sequence

import lstm_fused as lf

ops = torch.ops.lstm_fused
RUN_ROWS = 512  # csrc/sequence.cpp's kInferenceChunkRows


def op_args(helpers, lengths, input_size, hidden_size, *, reverse, proj_size=0, dtype=torch.float32, bias=True):
    """sequence_forward's arguments for sequences of these lengths (longest first), random."""
    steps = max(lengths)
    batch_sizes = torch.tensor([sum(length > t for length in lengths) for t in range(steps)])
    rows, batch = int(batch_sizes.sum()), len(lengths)
    output_size = proj_size or hidden_size

    def tensor(*shape):
        return helpers.randn(*shape, dtype=dtype, scale=0.5)

    biases = (tensor(4 * hidden_size), tensor(4 * hidden_size)) if bias else (None, None)
    weight_hr = tensor(proj_size, hidden_size) if proj_size else None
    return (tensor(rows, input_size), batch_sizes, tensor(batch, output_size), tensor(batch, hidden_size),
            tensor(4 * hidden_size, input_size), tensor(4 * hidden_size, output_size), *biases, reverse, weight_hr)


# Lengths chosen so runs split inside a step range where sequences start (reversed) or end
# (forward): batch 3 at hidden 8 gives runs of 170 steps; batch 64 runs of 8 steps.
LENGTHS = {
    "padded_long": [400, 400, 400],
    "packed_long": [700, 523, 341, 170, 169, 2],
    "batch64": [40] * 64,
    "packed64": sorted(range(1, 65), reverse=True),
    "one_step": [1, 1],
}


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("lengths", LENGTHS.values(), ids=LENGTHS.keys())
@pytest.mark.parametrize("proj_size", [0, 3])
def test_matches_sequence_forward_float64(helpers, reverse, lengths, proj_size):
    # float64 takes the library loop, which sequence_inference shares: identical results.
    args = op_args(helpers, lengths, 5, 8, reverse=reverse, proj_size=proj_size, dtype=torch.float64)
    expected = ops.sequence_forward(*args)[:3]
    actual = ops.sequence_inference(*args)
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e, rtol=0, atol=0)


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("lengths", LENGTHS.values(), ids=LENGTHS.keys())
@pytest.mark.parametrize("proj_size", [0, 3])
@pytest.mark.parametrize("bias", [True, False])
def test_float32_runs_match_float64(helpers, reverse, lengths, proj_size, bias):
    """The fused recurrence in runs against the float64 sequence: every output row and each
    sequence's last state, so a row carried wrongly across a run boundary shows."""
    args = op_args(helpers, lengths, 5, 8, reverse=reverse, proj_size=proj_size, bias=bias, dtype=torch.float64)
    expected = ops.sequence_forward(*args)[:3]
    float_args = [a.float() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args]
    actual = ops.sequence_inference(*float_args)
    for a, e in zip(actual, expected):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a.double(), e, rtol=1e-5, atol=2e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("reverse", [False, True])
def test_reduced_precision_runs_match_sequence_forward(helpers, dtype, reverse):
    """bfloat16/float16 take the 16-bit fused recurrence: the runs round as the whole sequence does
    (each product accumulates in float32 over the same reduction), so both ops agree closely and
    stay within the dtype's error of float64."""
    args = op_args(helpers, LENGTHS["packed_long"], 6, 16, reverse=reverse, dtype=torch.float64)
    reference = ops.sequence_forward(*args)[:3]
    low_args = [a.to(dtype) if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args]
    whole = ops.sequence_forward(*low_args)[:3]
    runs = ops.sequence_inference(*low_args)
    for r, w, e in zip(runs, whole, reference):
        assert r.dtype == dtype
        assert helpers.relative_error(r, e) <= 2 * helpers.relative_error(w, e) + 1e-3


@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("batch,steps,hidden", [(2, 300, 16), (64, 20, 24), (70, 9, 8)])
def test_module_under_no_grad_matches_nn(helpers, batch_first, bidirectional, batch, steps, hidden):
    torch_lstm = nn.LSTM(7, hidden, num_layers=2, bidirectional=bidirectional, batch_first=batch_first)
    fused_lstm = lf.LSTM(7, hidden, num_layers=2, bidirectional=bidirectional, batch_first=batch_first)
    fused_lstm.load_state_dict(torch_lstm.state_dict())
    shape = (batch, steps, 7) if batch_first else (steps, batch, 7)
    x = helpers.randn(*shape)
    with torch.no_grad():
        expected_output, (expected_h, expected_c) = torch_lstm(x)
        output, (h_n, c_n) = fused_lstm(x)
    for actual, expected in ((output, expected_output), (h_n, expected_h), (c_n, expected_c)):
        helpers.assert_close(actual, expected)


@pytest.mark.parametrize("bidirectional", [False, True])
def test_module_packed_under_no_grad_matches_nn(helpers, bidirectional):
    torch_lstm = nn.LSTM(5, 12, bidirectional=bidirectional)
    fused_lstm = lf.LSTM(5, 12, bidirectional=bidirectional)
    fused_lstm.load_state_dict(torch_lstm.state_dict())
    sequences = [helpers.randn(length, 5) for length in (150, 900, 3, 411)]
    packed = pack_sequence(sequences, enforce_sorted=False)
    with torch.no_grad():
        expected_output, (expected_h, expected_c) = torch_lstm(packed)
        output, (h_n, c_n) = fused_lstm(packed)
    for actual, expected in ((output.data, expected_output.data), (h_n, expected_h), (c_n, expected_c)):
        helpers.assert_close(actual, expected)


def called_ops(fn):
    with torch.profiler.profile() as profile:
        fn()
    return {event.name for event in profile.events()}


def test_module_calls_inference_only_where_nothing_needs_the_states(helpers):
    lstm = lf.LSTM(4, 6)
    x = helpers.randn(5, 3, 4)
    with torch.no_grad():
        assert "lstm_fused::sequence_inference" in called_ops(lambda: lstm(x))
        assert "lstm_fused::sequence_inference" not in called_ops(lambda: lstm(x, return_states=True))
    # Parameters that require grad, grad mode on: sequence_forward, whose states backward reads.
    assert "lstm_fused::sequence_inference" not in called_ops(lambda: lstm(x))
    for parameter in lstm.parameters():
        parameter.requires_grad_(False)
    assert "lstm_fused::sequence_inference" in called_ops(lambda: lstm(x))


@pytest.mark.parametrize("proj_size", [0, 2])
def test_direct_call_with_grad_falls_back_to_sequence_forward(helpers, proj_size):
    """Asked directly for a gradient, the op backpropagates as sequence_forward does."""
    args = op_args(helpers, [30, 20, 20], 4, 5, reverse=True, proj_size=proj_size)
    leaves = [a.detach().clone().requires_grad_(a.is_floating_point()) if isinstance(a, torch.Tensor) else a
              for a in args]
    leaves[1] = args[1]
    outputs = ops.sequence_inference(*leaves)
    tensors = [t for t in leaves if isinstance(t, torch.Tensor) and t.requires_grad]
    grads = torch.autograd.grad(sum((o * (i + 1)).sum() for i, o in enumerate(outputs)), tensors)
    expected_leaves = [a.detach().clone().requires_grad_(a.is_floating_point()) if isinstance(a, torch.Tensor) else a
                       for a in args]
    expected_leaves[1] = args[1]
    expected_outputs = ops.sequence_forward(*expected_leaves)[:3]
    expected_tensors = [t for t in expected_leaves if isinstance(t, torch.Tensor) and t.requires_grad]
    expected_grads = torch.autograd.grad(
        sum((o * (i + 1)).sum() for i, o in enumerate(expected_outputs)), expected_tensors)
    for a, e in zip(list(outputs) + list(grads), list(expected_outputs) + list(expected_grads)):
        helpers.assert_close(a, e)


def test_forward_mode_ad_under_no_grad_matches_grad_mode(helpers):
    lstm = lf.LSTM(4, 6, num_layers=2)
    x, tangent = helpers.randn(40, 2, 4), helpers.randn(40, 2, 4)
    expected = torch.func.jvp(lambda t: lstm(t)[0], (x,), (tangent,))
    with torch.no_grad():
        actual = torch.func.jvp(lambda t: lstm(t)[0], (x,), (tangent,))
    for a, e in zip(actual, expected):
        helpers.assert_close(a, e)


def test_vmap_under_no_grad_matches_a_loop(helpers):
    lstm = lf.LSTM(3, 5)
    xs = helpers.randn(4, 30, 2, 3)
    with torch.no_grad():
        actual = torch.func.vmap(lambda x: lstm(x)[0])(xs)
        expected = torch.stack([lstm(x)[0] for x in xs])
    helpers.assert_close(actual, expected)


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("lengths", [[3, 3, 3], [3, 2, 2, 1]])
def test_opcheck(helpers, reverse, lengths):
    args = op_args(helpers, lengths, 4, 5, reverse=reverse)
    torch.library.opcheck(ops.sequence_inference, args)


def test_compiled_inference_matches_eager(helpers):
    torch._dynamo.reset()
    lstm = lf.LSTM(4, 6, num_layers=2, bidirectional=True)
    x = helpers.randn(600, 2, 4)
    with torch.no_grad(), torch._dynamo.config.patch(allow_rnn=True):
        compiled = torch.compile(lstm, fullgraph=True)
        actual = compiled(x)
        expected = lstm(x)
    helpers.assert_close(actual[0], expected[0])
    helpers.assert_close(actual[1][0], expected[1][0])
    helpers.assert_close(actual[1][1], expected[1][1])


def test_flop_count_matches_sequence_forward(helpers):
    from torch.utils.flop_counter import FlopCounterMode

    args = op_args(helpers, [10, 7], 4, 5, reverse=False, proj_size=2)
    counts = []
    for op in (ops.sequence_forward, ops.sequence_inference):
        with FlopCounterMode(display=False) as counter:
            op(*args)
        counts.append(counter.get_total_flops())
    assert counts[0] == counts[1] > 0

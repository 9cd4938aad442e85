"""lf.LSTM in bfloat16 and float16 through the fused small-batch recurrence (batch <= 64 on the
vector CPU paths): 16-bit pair panels, products accumulated in float32 (AVX512-BF16's vdpbf16ps where
the CPU has it, widened FMAs elsewhere), cell math in float32, results rounded to the dtype.

Judged against nn.LSTM in float64 on the same (rounded) weights and inputs, by relative error, and
held to at most twice nn.LSTM's own error in the dtype; under every CPU path this machine has, with
and without AVX512-BF16's products, on one and two threads, both directions, packed input, and sizes
that leave tails of every vector width and odd reductions (the last pair half empty)."""
import pytest
import torch
from torch import nn

import lstm_fused as lf

CAPABILITIES = lf.supported_cpu_capabilities()


def _torch_widens(dtype):
    """Whether torch itself converts dtype to float here: its aarch64 wheel under qemu (neoverse-n1)
    cannot widen float16, which leaves no reference to judge against."""
    try:
        torch.ones(1024, dtype=dtype).to(torch.float32).to(torch.float64)
        return True
    except RuntimeError:
        return False


DTYPES = [
    pytest.param(dtype, marks=pytest.mark.skipif(not _torch_widens(dtype), reason=f"torch cannot widen {dtype} here"))
    for dtype in (torch.bfloat16, torch.float16)
]
pytestmark = pytest.mark.filterwarnings("ignore:LSTM with projections is not supported with oneDNN")


def _lstms(input_size, hidden_size, dtype, proj_size=0):
    """(lf.LSTM, nn.LSTM) in dtype and nn.LSTM in float64, all holding the same dtype-rounded weights."""
    exact = nn.LSTM(input_size, hidden_size, bidirectional=True, proj_size=proj_size, dtype=torch.float64)
    rounded = {k: v.to(dtype) for k, v in exact.state_dict().items()}
    exact.load_state_dict({k: v.double() for k, v in rounded.items()})
    fused = lf.LSTM(input_size, hidden_size, bidirectional=True, proj_size=proj_size, dtype=dtype)
    torch_lstm = nn.LSTM(input_size, hidden_size, bidirectional=True, proj_size=proj_size, dtype=dtype)
    fused.load_state_dict(rounded)
    torch_lstm.load_state_dict(rounded)
    return fused, torch_lstm, exact


def _inputs(helpers, lengths, input_size, state_sizes, dtype):
    sequences = [helpers.randn(length, input_size, dtype=torch.float64).to(dtype) for length in lengths]
    packed = nn.utils.rnn.pack_sequence(sequences, enforce_sorted=False)
    h_0, c_0 = (helpers.randn(2, len(lengths), size, dtype=torch.float64).to(dtype) for size in state_sizes)
    return packed, h_0, c_0


def _run(lstm, packed, h_0, c_0, dtype):
    x = nn.utils.rnn.PackedSequence(packed.data.to(dtype), packed.batch_sizes, packed.sorted_indices,
                                    packed.unsorted_indices)
    with torch.no_grad():
        output, (h_n, c_n) = lstm(x, (h_0.to(dtype), c_0.to(dtype)))
    return [output.data, h_n, c_n]


def _limit(nn_error, numel, dtype):
    """Twice nn's error, never held below a quarter ulp; a tensor of a few elements (hidden 1's
    h_n) is one rounding or two, which either implementation may lose by an ulp: there one ulp."""
    eps = torch.finfo(dtype).eps
    return max(2 * nn_error, eps / 2) if numel >= 64 else max(2 * nn_error, eps)


def _check_against_float64(helpers, fused, torch_lstm, exact, packed, h_0, c_0, dtype):
    results = _run(fused, packed, h_0, c_0, dtype)
    expected = _run(exact, packed, h_0, c_0, torch.float64)
    theirs = _run(torch_lstm, packed, h_0, c_0, dtype)
    for name, ours, nn_value, reference in zip(("output", "h_n", "c_n"), results, theirs, expected, strict=True):
        assert ours.dtype == dtype and ours.shape == reference.shape, name
        assert not torch.isnan(ours).any(), f"{name}: an element was left unwritten (NaN-poisoned)"
        error = helpers.relative_error(ours, reference)
        nn_error = helpers.relative_error(nn_value, reference)
        limit = _limit(nn_error, ours.numel(), dtype)
        assert error <= limit, f"{name}: relative error {error:.2e} against float64, nn.LSTM's {nn_error:.2e}"


# Hidden 1, 5, 17, 33, 130: tails of every vector width and odd reductions; batch 1-64, equal and
# unequal lengths (packed, unsorted); batch 3 at hidden 130 splits two threads by units (a barrier a
# step), batch 16 at hidden 64 by rows, batch 9 at hidden 300 by units where each thread's share
# of the weight fits the CPU's L2; 65 is past the path (the library loop) but for bfloat16 on AMX,
# which takes up to 256 (130: three blocks of tile rows a thread).
CASES = [
    ([7], 3, 1),
    ([5, 2, 4, 1], 7, 5),
    ([6, 6, 3, 5, 2, 6, 1, 4, 6, 2, 3, 5, 6, 1, 2, 4, 6], 9, 17),
    ([5] * 33, 33, 33),
    ([4, 4, 3], 20, 130),
    ([3] * 16, 64, 64),
    ([4, 3, 2, 1] * 16, 11, 130),
    ([3] * 65, 5, 19),
    ([3, 2, 3, 1, 3, 3, 2, 3, 3], 6, 300),
    ([3, 2] * 65, 4, 19),
]


@pytest.mark.parametrize("lengths, input_size, hidden_size", CASES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_sequence_against_float64(helpers, capability, threads, dtype, lengths, input_size, hidden_size):
    fused, torch_lstm, exact = _lstms(input_size, hidden_size, dtype)
    packed, h_0, c_0 = _inputs(helpers, lengths, input_size, (hidden_size, hidden_size), dtype)
    _check_against_float64(helpers, fused, torch_lstm, exact, packed, h_0, c_0, dtype)


@pytest.mark.parametrize("lengths, input_size, hidden_size", CASES[:8] + CASES[9:])
def test_bfloat16_products_widened_avx512_bf16_and_amx(helpers, bfloat16_products, threads, lengths, input_size,
                                                        hidden_size):
    dtype = torch.bfloat16
    fused, torch_lstm, exact = _lstms(input_size, hidden_size, dtype)
    packed, h_0, c_0 = _inputs(helpers, lengths, input_size, (hidden_size, hidden_size), dtype)
    assert torch.ops.lstm_fused._native_bfloat16_products() == (bfloat16_products != "widened")
    assert torch.ops.lstm_fused._bfloat16_tiles() == (bfloat16_products == "amx")
    _check_against_float64(helpers, fused, torch_lstm, exact, packed, h_0, c_0, dtype)


# A projection: its product per step through the same 16-bit panels (proj_size odd: 3, 33).
@pytest.mark.parametrize("lengths, input_size, hidden_size, proj_size", [
    ([5, 2, 4, 1], 7, 17, 3), ([4] * 9, 6, 130, 33),
])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_projected_sequence_against_float64(helpers, capability, threads, dtype, lengths, input_size, hidden_size,
                                            proj_size):
    fused, torch_lstm, exact = _lstms(input_size, hidden_size, dtype, proj_size)
    packed, h_0, c_0 = _inputs(helpers, lengths, input_size, (proj_size, hidden_size), dtype)
    _check_against_float64(helpers, fused, torch_lstm, exact, packed, h_0, c_0, dtype)


def _gradients(lstm, packed, h_0, c_0, run_dtype, with_states=False):
    """Gradients of a loss over the output, h_n, c_n (and, with_states, every step's cell state and
    gates) with respect to the input, h_0, c_0 and every parameter."""
    data, h, c = (t.detach().to(run_dtype).requires_grad_(True) for t in (packed.data, h_0, c_0))
    x = nn.utils.rnn.PackedSequence(data, packed.batch_sizes, packed.sorted_indices, packed.unsorted_indices)
    if with_states:
        output, (h_n, c_n), states = lstm(x, (h, c), return_states=True)
    else:
        output, (h_n, c_n) = lstm(x, (h, c))
    weights = torch.linspace(-1, 1, output.data.numel(), dtype=run_dtype).view_as(output.data)
    loss = (output.data * weights).sum() + (h_n * 0.5).sum() + (c_n * 0.25).sum()
    if with_states:
        for layer in states:
            step_values = [layer.cell_state.data, *(gate.data for gate in layer.gates)]
            for scale, value in zip((0.3, -0.2, 0.1, 0.4, -0.3), step_values):
                loss = loss + scale * (value * value.detach().flip(0)).sum()
    return torch.autograd.grad(loss, [data, h, c, *lstm.parameters()])


def _check_gradients(helpers, fused, torch_lstm, exact, packed, h_0, c_0, dtype):
    ours_all = _gradients(fused, packed, h_0, c_0, dtype)
    theirs_all = _gradients(torch_lstm, packed, h_0, c_0, dtype)
    reference_all = _gradients(exact, packed, h_0, c_0, torch.float64)
    for index, (ours, theirs, reference) in enumerate(zip(ours_all, theirs_all, reference_all, strict=True)):
        assert ours.dtype == dtype
        assert not torch.isnan(ours).any(), f"gradient {index}: an element was left unwritten (NaN-poisoned)"
        error = helpers.relative_error(ours, reference)
        nn_error = helpers.relative_error(theirs, reference)
        assert error <= _gradient_limit(nn_error, ours.numel(), dtype), f"gradient {index}: {error:.2e} vs nn {nn_error:.2e}"


def _gradient_limit(nn_error, numel, dtype):
    """Twice nn's error, never held below an ulp: a gradient sums roundings over every step, in an
    order of its own (the library loop on the portable path measured up to 1.3 ulp on its own
    where nn had 0.6), and a gradient of a few elements (hidden 1's c_0) may lose two ulps."""
    eps = torch.finfo(dtype).eps
    return max(2 * nn_error, 1.5 * eps) if numel >= 64 else max(2 * nn_error, 2 * eps)


# The fused backward (batch <= 64, 256 for bfloat16 on AMX; past it the library loop), on both
# splits of two threads.
@pytest.mark.parametrize("lengths, input_size, hidden_size", [CASES[i] for i in (0, 1, 2, 4, 5, 6, 7, 8, 9)])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gradients_against_float64(helpers, capability, threads, dtype, lengths, input_size, hidden_size):
    fused, torch_lstm, exact = _lstms(input_size, hidden_size, dtype)
    packed, h_0, c_0 = _inputs(helpers, lengths, input_size, (hidden_size, hidden_size), dtype)
    _check_gradients(helpers, fused, torch_lstm, exact, packed, h_0, c_0, dtype)


@pytest.mark.parametrize("lengths, input_size, hidden_size", [CASES[i] for i in (2, 4, 6, 7, 8, 9)])
def test_bfloat16_gradients_widened_avx512_bf16_and_amx(helpers, bfloat16_products, threads, lengths, input_size,
                                                         hidden_size):
    dtype = torch.bfloat16
    fused, torch_lstm, exact = _lstms(input_size, hidden_size, dtype)
    packed, h_0, c_0 = _inputs(helpers, lengths, input_size, (hidden_size, hidden_size), dtype)
    _check_gradients(helpers, fused, torch_lstm, exact, packed, h_0, c_0, dtype)


@pytest.mark.parametrize("lengths, input_size, hidden_size, proj_size", [
    ([5, 2, 4, 1], 7, 17, 3), ([4] * 9, 6, 130, 33),
])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_projected_gradients_against_float64(helpers, capability, threads, dtype, lengths, input_size, hidden_size,
                                             proj_size):
    fused, torch_lstm, exact = _lstms(input_size, hidden_size, dtype, proj_size)
    packed, h_0, c_0 = _inputs(helpers, lengths, input_size, (proj_size, hidden_size), dtype)
    _check_gradients(helpers, fused, torch_lstm, exact, packed, h_0, c_0, dtype)


def _products_per_call(lstm, x, backward=False):
    """How many matrix products (ATen mm/addmm/matmul/linear) one forward (or one backward) makes."""
    from torch.profiler import ProfilerActivity, profile

    if backward:
        output, _ = lstm(x.requires_grad_(True))
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            output.sum().backward()
    else:
        with torch.no_grad(), profile(activities=[ProfilerActivity.CPU]) as prof:
            lstm(x)
    names = ("aten::mm", "aten::addmm", "aten::addmm_", "aten::matmul", "aten::bmm")
    return sum(event.count for event in prof.key_averages() if event.key in names)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_the_fused_path_makes_no_product_per_step(helpers, dtype):
    """The input projection is one product per direction, the backward's gradients of the input and
    weights a few; the library loop adds one per step."""
    steps = 12
    fused = lf.LSTM(8, 16, bidirectional=True, dtype=dtype)
    x = helpers.randn(steps, 4, 8).to(dtype)
    expected_fused = 2 if CAPABILITIES[0] != "default" else None
    products = _products_per_call(fused, x)
    if expected_fused is None:
        pytest.skip("the portable path has no fused recurrence")
    assert products <= expected_fused, f"{products} products for {steps} steps: the library loop ran"
    # bfloat16 on AMX takes batches up to 256, the rest up to 64.
    ops = torch.ops.lstm_fused
    amx = dtype == torch.bfloat16 and ops._native_bfloat16_products() and ops._bfloat16_tiles()
    if amx:
        # Inference projects the input in chunks of 512 rows (two steps at batch 256): one product
        # per two steps and direction, where the library loop would make two per step.
        assert _products_per_call(fused, helpers.randn(steps, 256, 8).to(dtype)) <= steps
        assert _products_per_call(fused, helpers.randn(steps, 256, 8).to(dtype), backward=True) <= 6
    past = 257 if amx else 65
    # Past the path's largest batch the library loop runs, which the count must see.
    assert _products_per_call(fused, helpers.randn(steps, past, 8).to(dtype)) >= 2 * steps
    # The backward: the input and weight gradients, a few products per direction over all steps.
    assert _products_per_call(fused, x, backward=True) <= 6, "the backward's library loop ran"
    assert _products_per_call(fused, helpers.randn(steps, past, 8).to(dtype), backward=True) >= 2 * steps


# return_states' cell states and gates carry gradients into the fused backward (grad_cell_states,
# grad_gates), float32's too. nn has no such outputs: judged against lf.LSTM in float64 on the
# same rounded weights (the library loop, exact to float64), within two of the dtype's eps for
# 16 bits (Zen 5, every path: at most 0.95) and 1e-5 for float32.
@pytest.mark.parametrize("lengths, input_size, hidden_size", [CASES[i] for i in (1, 4, 5)])
@pytest.mark.parametrize("dtype", [*DTYPES, torch.float32], ids=str)
def test_state_gradients_against_float64(helpers, capability, threads, dtype, lengths, input_size, hidden_size):
    fused, _, _ = _lstms(input_size, hidden_size, dtype)
    exact = lf.LSTM(input_size, hidden_size, bidirectional=True, dtype=torch.float64)
    exact.load_state_dict({k: v.double() for k, v in fused.state_dict().items()})
    packed, h_0, c_0 = _inputs(helpers, lengths, input_size, (hidden_size, hidden_size), dtype)
    ours_all = _gradients(fused, packed, h_0, c_0, dtype, with_states=True)
    reference_all = _gradients(exact, packed, h_0, c_0, torch.float64, with_states=True)
    without_states = _gradients(exact, packed, h_0, c_0, torch.float64)
    eps = torch.finfo(dtype).eps
    limit = 1e-5 if dtype == torch.float32 else 2 * eps
    for index, (ours, reference, plain) in enumerate(zip(ours_all, reference_all, without_states, strict=True)):
        assert not torch.isnan(ours).any(), f"gradient {index}: an element was left unwritten (NaN-poisoned)"
        # The states' terms must matter, or the check says nothing about them.
        assert helpers.relative_error(plain, reference) > 10 * eps, f"gradient {index}: the states' terms vanish"
        error = helpers.relative_error(ours, reference)
        assert error <= limit, f"gradient {index}: relative error {error:.2e} against float64"

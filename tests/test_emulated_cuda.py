"""The CUDA kernels of csrc/cuda, run on the CPU through the emulation of CUDA's execution model in
tests/emulated_cuda/ (no GPU needed: these run in CI).

The real device code of csrc/cuda/cell_kernels.cuh is compiled for the host against
tests/emulated_cuda/cuda_emulation.h (blocks of fibers, __syncthreads, shared memory, warp
shuffles, atomics, grid barriers) into a small extension built once and cached in
build/emulated_cuda. Each test launches the kernels exactly as csrc/cuda/lstm_cell.cu does (the
header's launch_* functions) on small shapes: the tails of every batch tile (1, 4, 8, 16 rows),
input size 0, hidden 1, batch 1-70, each dtype, several shared-memory chunks per segment, the
split of a unit's K range over warps, misaligned data; the persistent sequence kernels with and
without a projection (LSTMP, proj_size 1..hidden); against nn.LSTMCell / nn.LSTM in float64, and
half/bfloat16 by relative error against float64. Outputs start NaN-filled.

The emulation proves indexing, synchronisation and arithmetic, not speed or the GPU's memory
model: benchmarks/gpu_proof.sh is the GPU's part.
"""

import pytest
import torch
from torch import nn

pytestmark = pytest.mark.emulated_cuda


# An H100 has 132 SMs: the launch plan (the K split over warps) then matches the GPU's.
H100_SMS = 132


def relative_error(actual, expected):
    """max |actual - expected| / max |expected|, in float64; NaN (an unwritten element) fails."""
    actual, expected = actual.double(), expected.double()
    assert actual.shape == expected.shape, f"shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    if expected.numel() == 0:
        return 0.0
    assert torch.isfinite(actual).all(), "non-finite values: an element the kernel did not write?"
    return ((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-30)).item()


# Against float64 from the same (rounded) inputs. The products accumulate in float32 for half and
# bfloat16, so only the rounding of the outputs and of the float32 sums remains.
TOLERANCE = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def nonzero_randn(*shape, dtype=torch.float64, scale=1.0):
    t = torch.randn(*shape, dtype=torch.float64) * scale
    t = torch.where(t == 0, torch.full_like(t, 0.5), t)
    return t.to(dtype)


def case(batch, input_size, hidden_size, dtype, bias=True):
    """Random step arguments in `dtype`, and nn.LSTMCell in float64 holding the same weights."""
    cell = nn.LSTMCell(input_size, hidden_size, bias=bias, dtype=torch.float64)
    with torch.no_grad():
        for p in cell.parameters():
            p.copy_(nonzero_randn(*p.shape, scale=max(1, input_size + hidden_size) ** -0.5 * 2))
    params = [p.detach().to(dtype).contiguous() for p in cell.parameters()]
    if not bias:
        params += [None, None]
    with torch.no_grad():
        for p, rounded in zip(cell.parameters(), params):
            p.copy_(rounded.double())  # the reference sees the rounded weights
    x = nonzero_randn(batch, input_size, dtype=dtype)
    h0 = nonzero_randn(batch, hidden_size, dtype=dtype)
    c0 = nonzero_randn(batch, hidden_size, dtype=dtype)
    return cell, x, h0, c0, params


def expected_step(cell, x, h0, c0):
    x, h0, c0 = x.double(), h0.double(), c0.double()
    with torch.no_grad():
        hy, cy = cell(x, (h0, c0))
        z = x @ cell.weight_ih.T + h0 @ cell.weight_hh.T
        if cell.bias:
            z = z + cell.bias_ih + cell.bias_hh
    i, f, g, o = z.chunk(4, dim=1)
    gates = torch.cat((i.sigmoid(), f.sigmoid(), g.tanh(), o.sigmoid()), dim=1)
    return hy, cy, gates


def check_forward(emu, batch, input_size, hidden_size, dtype, bias=True, multiprocessors=H100_SMS, write_gates=True):
    cell, x, h0, c0, (w_ih, w_hh, b_ih, b_hh) = case(batch, input_size, hidden_size, dtype, bias)
    hy, cy, gates, tile, warps_per_unit, blocks = emu.cell_forward(
        x, h0, c0, w_ih, w_hh, b_ih, b_hh, multiprocessors, write_gates
    )
    expected_hy, expected_cy, expected_gates = expected_step(cell, x, h0, c0)
    tolerance = TOLERANCE[dtype]
    label = f"{dtype} batch={batch} input={input_size} hidden={hidden_size} tile={tile} warps/unit={warps_per_unit}"
    for name, actual, expected in [("h_1", hy, expected_hy), ("c_1", cy, expected_cy)] + (
        [("gates", gates, expected_gates)] if write_gates else []
    ):
        assert actual.dtype == dtype
        error = relative_error(actual, expected)
        assert error <= tolerance, f"{label}: {name} relative error {error:.2e} > {tolerance:.1e}"
    return tile, warps_per_unit, blocks, gates


# Every tile's tails: 1 (tile 1); 2-4 (tile 4); 5-8 (tile 8); 9-16 (tile 16) and several tiles of
# the largest (17, 33, 64, 70). Double stops at tile 4, half and bfloat16 at 8.
BATCHES = [1, 2, 3, 4, 5, 7, 8, 9, 15, 16, 17, 33, 64, 70]
# (input, hidden): input 0 (no W_ih segment), hidden 1, sizes that are not multiples of any vector
# width (5, 7, 33: scalar path), and multiples of every width (16, 64: 16-byte path).
SHAPES = [(0, 1), (7, 5), (16, 33), (64, 16)]


@pytest.mark.parametrize("input_size,hidden_size", SHAPES, ids=lambda v: str(v))
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
def test_fused_forward_against_lstmcell(emu, dtype, batch, input_size, hidden_size):
    tile, _, _, _ = check_forward(emu, batch, input_size, hidden_size, dtype)
    expected_tile = 1 if batch == 1 else 4 if batch <= 4 or dtype == torch.float64 else 8 if batch <= 8 else 16
    assert tile == expected_tile


@pytest.mark.parametrize("input_size,hidden_size", SHAPES, ids=lambda v: str(v))
@pytest.mark.parametrize("batch", [1, 3, 4, 5, 8, 9, 17, 70])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_fused_forward_reduced_precision(emu, dtype, batch, input_size, hidden_size):
    tile, _, _, _ = check_forward(emu, batch, input_size, hidden_size, dtype)
    assert tile == (1 if batch == 1 else 4 if batch <= 4 else 8)


@pytest.mark.parametrize("bias", [False, True], ids=["no_bias", "bias"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
def test_fused_forward_without_bias(emu, dtype, bias):
    check_forward(emu, 6, 9, 12, dtype, bias=bias)


@pytest.mark.parametrize(
    "dtype,batch,input_size,hidden_size",
    [
        # Chunks of 512 floats at tile 16, 1024 doubles at tile 4, 1024 floats (from halves) at tile 8:
        # these inputs need 3 chunks, the last one partial.
        (torch.float32, 12, 1100, 3),
        (torch.float64, 3, 2100, 2),
        (torch.float16, 8, 2072, 16),
        (torch.bfloat16, 6, 2056, 8),
        # A long hidden segment too: several chunks of hx against W_hh.
        (torch.float32, 16, 4, 600),
    ],
)
def test_several_shared_memory_chunks(emu, dtype, batch, input_size, hidden_size):
    _, _, _, _ = check_forward(emu, batch, input_size, hidden_size, dtype)
    _, _, _, chunk, _ = emu.plan_fused_forward(batch, input_size, hidden_size, dtype, H100_SMS)
    assert max(input_size, hidden_size) > chunk, "the shape must need more than one chunk"


@pytest.mark.parametrize(
    "dtype,batch,input_size,hidden_size,warps",
    [
        (torch.float32, 1, 4096, 3, 8),
        (torch.float32, 2, 1000, 8, 2),
        (torch.float64, 4, 1000, 3, 4),
        (torch.float16, 1, 1024, 5, 2),
    ],
)
def test_k_range_split_over_warps(emu, dtype, batch, input_size, hidden_size, warps):
    # Few hidden units, long K and many SMs: the warps of a block split a unit's K range and the
    # epilogue adds their partial sums.
    _, warps_per_unit, _, _ = check_forward(emu, batch, input_size, hidden_size, dtype)
    assert warps_per_unit == warps


def test_misaligned_data_takes_the_scalar_path(emu):
    # Sizes that allow 16-byte loads, on storage offset by one element: the planner must see the
    # misaligned pointers and take scalar loads (a 16-byte load there would fault on the GPU; here
    # it would read the wrong elements).
    batch, input_size, hidden_size = 3, 128, 64
    cell, x, h0, c0, params = case(batch, input_size, hidden_size, torch.float32)

    def misaligned(t):
        storage = torch.empty(t.numel() + 1, dtype=t.dtype)
        view = storage[1:].view(t.shape)
        view.copy_(t)
        return view

    args = [misaligned(t) for t in (x, h0, c0, *params)]
    assert args[0].data_ptr() % 16 != 0 and args[4].data_ptr() % 16 != 0
    hy, cy, gates, *_ = emu.cell_forward(*args, H100_SMS, True)
    expected_hy, expected_cy, expected_gates = expected_step(cell, x, h0, c0)
    assert relative_error(hy, expected_hy) <= 1e-5
    assert relative_error(cy, expected_cy) <= 1e-5
    assert relative_error(gates, expected_gates) <= 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_no_gates_written_when_not_wanted(emu, dtype):
    # Inference: the kernel writes h_1 and c_1 only; the gates buffer keeps its NaN poison.
    *_, gates = check_forward(emu, 5, 7, 9, dtype, write_gates=False)
    assert torch.isnan(gates).all()


@pytest.mark.parametrize("multiprocessors", [1, H100_SMS])
def test_sequence_of_steps_against_nn_lstm(emu, multiprocessors):
    # The fused step as a sequence's recurrence, T steps, against cuDNN's counterpart nn.LSTM.
    T, batch, input_size, hidden_size = 6, 5, 7, 9
    lstm = nn.LSTM(input_size, hidden_size, dtype=torch.float64)
    x = nonzero_randn(T, batch, input_size)
    h, c = nonzero_randn(batch, hidden_size), nonzero_randn(batch, hidden_size)
    with torch.no_grad():
        expected, (expected_h, expected_c) = lstm(x, (h[None], c[None]))
    weights = [p.detach().contiguous() for p in (lstm.weight_ih_l0, lstm.weight_hh_l0, lstm.bias_ih_l0, lstm.bias_hh_l0)]
    outputs = []
    for t in range(T):
        h, c, *_ = emu.cell_forward(x[t].contiguous(), h, c, *weights, multiprocessors, True)
        outputs.append(h)
    assert relative_error(torch.stack(outputs), expected) <= 1e-12
    assert relative_error(h, expected_h[0]) <= 1e-12
    assert relative_error(c, expected_c[0]) <= 1e-12


POINTWISE_TOLERANCE = {torch.float64: 1e-14, torch.float32: 1e-6, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("batch,hidden_size,multiprocessors", [(1, 1, H100_SMS), (3, 5, H100_SMS), (70, 33, 1), (300, 40, 1)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
def test_cell_pointwise(emu, dtype, batch, hidden_size, multiprocessors, bias):
    # multiprocessors=1 caps the grid at 32 blocks: the grid-stride loops then take several turns.
    preactivation = nonzero_randn(batch, 4 * hidden_size, dtype=dtype)
    cx = nonzero_randn(batch, hidden_size, dtype=dtype)
    bias_tensor = nonzero_randn(4 * hidden_size, dtype=dtype) if bias else None
    gates = preactivation.clone()
    hy = torch.full((batch, hidden_size), float("nan"), dtype=dtype)
    cy = torch.full_like(hy, float("nan"))
    emu.cell_pointwise_(gates, cx, bias_tensor, hy, cy, multiprocessors)
    z = preactivation.double() + (bias_tensor.double() if bias else 0)
    i, f, g, o = z.chunk(4, dim=1)
    i, f, g, o = i.sigmoid(), f.sigmoid(), g.tanh(), o.sigmoid()
    expected_cy = f * cx.double() + i * g
    tolerance = POINTWISE_TOLERANCE[dtype]
    assert relative_error(gates, torch.cat((i, f, g, o), dim=1)) <= tolerance
    assert relative_error(cy, expected_cy) <= tolerance
    assert relative_error(hy, o * expected_cy.tanh()) <= tolerance


@pytest.mark.parametrize("present", [(h, c, g) for h in (0, 1) for c in (0, 1) for g in (0, 1)],
                         ids=lambda p: "".join("hcg"[k] if on else "-" for k, on in enumerate(p)))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=["fp64", "fp32", "bf16"])
def test_cell_gate_grads_against_autograd(emu, dtype, present):
    # Every presence pattern of (grad_hy, grad_cy, grad_gates) against autograd through the torch
    # formulas of the step, in float64.
    batch, hidden_size = 37, 19
    z = nonzero_randn(batch, 4 * hidden_size).requires_grad_()
    cx = nonzero_randn(batch, hidden_size).requires_grad_()
    i, f, g, o = z.chunk(4, dim=1)
    gates = torch.cat((i.sigmoid(), f.sigmoid(), g.tanh(), o.sigmoid()), dim=1)
    ai, af, ag, ao = gates.chunk(4, dim=1)
    cy = af * cx + ai * ag
    hy = ao * cy.tanh()
    upstream = [nonzero_randn(*t.shape) if on else None for on, t in zip(present, (hy, cy, gates))]
    used = [(out, grad) for out, grad in zip((hy, cy, gates), upstream) if grad is not None]
    if used:
        expected_z, expected_cx = torch.autograd.grad([u for u, _ in used], [z, cx], [g for _, g in used], allow_unused=True)
    else:
        expected_z, expected_cx = None, None
    expected_z = torch.zeros_like(z) if expected_z is None else expected_z
    expected_cx = torch.zeros_like(cx) if expected_cx is None else expected_cx
    # The kernel reads the rounded forward values; the float64 reference is recomputed from them
    # only for float64, so reduced dtypes are judged by relative error.
    lowered = [None if t is None else t.detach().to(dtype) for t in upstream]
    grad_pre, grad_cx = emu.cell_gate_grads(*lowered, cx.detach().to(dtype), cy.detach().to(dtype), gates.detach().to(dtype), 1)
    tolerance = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 5e-2}[dtype]
    if not any(present):
        assert (grad_pre == 0).all() and (grad_cx == 0).all()
        return
    assert relative_error(grad_pre, expected_z) <= tolerance
    assert relative_error(grad_cx, expected_cx) <= tolerance


# ------------------------------------------------------------------------------------------------
# The review's findings on the path choice (use_fused_forward and the launch plan, host code of
# cell_kernels.cuh, as lstm_cell.cu calls it)
# ------------------------------------------------------------------------------------------------


def test_batch_5_to_8_runs_an_8_row_tile(emu):
    # A 16-row tile at batch 5 wasted 11/16 of its FMAs.
    for batch in range(5, 9):
        tile, *_ = emu.plan_fused_forward(batch, 64, 64, torch.float32, H100_SMS)
        assert tile == 8, batch
    assert emu.plan_fused_forward(9, 64, 64, torch.float32, H100_SMS)[0] == 16


def test_tf32_moves_the_float32_boundary(emu):
    # Exact fp32: the fused kernel up to batch 64. TF32 allowed: cuBLAS's tensor cores from batch 9.
    assert emu.use_fused_forward(64, 512, torch.float32, False)
    assert not emu.use_fused_forward(65, 512, torch.float32, False)
    assert emu.use_fused_forward(8, 512, torch.float32, True)
    assert not emu.use_fused_forward(9, 512, torch.float32, True)
    assert not emu.use_fused_forward(64, 512, torch.float32, True)
    # float64 has no tensor-core path to prefer, whatever the TF32 setting.
    assert emu.use_fused_forward(64, 512, torch.float64, True)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_reduced_precision_large_hidden_prefers_tensor_cores(emu, dtype):
    assert emu.use_fused_forward(32, 256, dtype, False)
    assert not emu.use_fused_forward(33, 256, dtype, False)
    assert emu.use_fused_forward(16, 512, dtype, False)
    assert not emu.use_fused_forward(17, 512, dtype, False)
    assert not emu.use_fused_forward(17, 2048, dtype, False)


def test_float8_is_rejected_by_the_argument_checks():
    # check_floating used to accept the float8 types, which then failed deep inside AT_DISPATCH
    # without naming the argument.
    dtype = torch.float8_e4m3fn
    x = torch.zeros(2, 3).to(dtype)
    h = torch.zeros(2, 4).to(dtype)
    w_ih, w_hh = torch.zeros(16, 3).to(dtype), torch.zeros(16, 4).to(dtype)
    import lstm_fused  # noqa: F401  (registers torch.ops.lstm_fused)

    with pytest.raises(RuntimeError, match=r"input must be a floating-point tensor .*Float8_e4m3fn"):
        torch.ops.lstm_fused.cell_forward(x, h, h, w_ih, w_hh, None, None)
    with pytest.raises(RuntimeError, match=r"gates must be a floating-point tensor"):
        g = torch.zeros(2, 16).to(dtype)
        torch.ops.lstm_fused.cell_pointwise_(g, h, None, h.clone(), h.clone())


# ------------------------------------------------------------------------------------------------
# The emulation itself
# ------------------------------------------------------------------------------------------------


def test_emulation_warp_collectives(emu):
    out = emu.selftest("warp_collectives", 2, 64)
    lane = torch.arange(128) % 32
    assert torch.equal(out[:, 0], lane ^ 1)
    assert torch.equal(out[:, 1], torch.where(lane + 3 < 32, lane + 3, lane))
    assert torch.equal(out[:, 2], torch.where(lane >= 5, lane - 5, lane))
    assert torch.equal(out[:, 3], torch.full_like(lane, 7))
    assert torch.equal(out[:, 4], torch.full_like(lane, 0xAAAAAAAA))
    assert torch.equal(out[:, 5], torch.full_like(lane, 496))


def test_emulation_atomics_across_concurrent_blocks(emu):
    blocks, threads = 4, 96
    out = emu.selftest("atomics", blocks, threads)
    n = blocks * threads
    assert out.tolist() == [n, n * (n - 1) / 2, n - 1]


def test_emulation_grid_barrier(emu):
    blocks, threads = 5, 64
    out = emu.selftest("grid_sync", blocks, threads)
    next_block = (torch.arange(blocks * threads) // threads + 1) % blocks
    assert torch.equal(out, next_block + 1)


def test_emulation_shared_memory_is_per_block(emu):
    blocks, threads = 3, 40
    out = emu.selftest("shared_memory", blocks, threads)
    t = torch.arange(blocks * threads)
    block, thread = t // threads, t % threads
    assert torch.equal(out, block * 1000 + (thread + 1) % threads + threads * 1000000)


def test_emulation_reports_a_divergent_barrier(emu):
    with pytest.raises(RuntimeError, match="deadlock .* threads had exited"):
        emu.selftest("divergent_barrier", 1, 64)


def test_emulation_exposes_a_missing_barrier(emu):
    # Without a barrier between the writes and the reads of shared memory, reads see poison: the
    # schedule makes a race visible rather than hiding it.
    out = emu.selftest("race_without_barrier", 2, 64)
    expected = (torch.arange(128) % 64 + 1) % 64
    assert not torch.equal(out, expected)


# ------------------------------------------------------------------------------------------------
# The sequence ops as CUDA runs them (csrc/cuda/op_layer.h, shared with csrc/cuda/sequence.cu): the
# persistent kernels (one cooperative launch for all steps, a grid barrier per step) where the call
# allows them, the device-independent loop of csrc/sequence.cpp elsewhere
# ------------------------------------------------------------------------------------------------

LOOP, PERSISTENT, TENSOR_CORES = 0, 1, 2
# A GPU's limits as the emulation holds them: 227 KiB of shared memory per block, 64 blocks.
MAX_SHARED, MAX_BLOCKS = 227 * 1024, 64
ALL_GRADS = [True] * 6


def lstm_case(steps, batch, input_size, hidden_size, dtype, bias=True):
    lstm = nn.LSTM(input_size, hidden_size, bias=bias, dtype=torch.float64)
    with torch.no_grad():
        for p in lstm.parameters():
            p.copy_(nonzero_randn(*p.shape, scale=max(1, input_size + hidden_size) ** -0.5 * 2).to(dtype).double())
    x = nonzero_randn(steps, batch, input_size, dtype=dtype)
    h0 = nonzero_randn(batch, hidden_size, dtype=dtype)
    c0 = nonzero_randn(batch, hidden_size, dtype=dtype)
    weights = [lstm.weight_ih_l0, lstm.weight_hh_l0] + ([lstm.bias_ih_l0, lstm.bias_hh_l0] if bias else [None, None])
    weights = [None if w is None else w.detach().to(dtype).contiguous() for w in weights]
    return lstm, x, h0, c0, weights


def full_batch_sizes(steps, batch):
    return torch.full((steps,), batch, dtype=torch.int64)


def expected_path(dtype, hidden_size):
    """The persistent kernel a shape that fits takes: tensor cores for half/bfloat16 at hidden
    sizes that are multiples of 16, FFMA otherwise (float32 too, with TF32 not allowed)."""
    return TENSOR_CORES if dtype in (torch.float16, torch.bfloat16) and hidden_size % 16 == 0 else PERSISTENT


def reference_sequence(lstm, x, h0, c0, reverse, grad_output=None, grad_hy=None, grad_cy=None):
    """nn.LSTM in float64 over [T, B, I] (reversed in time for the reverse direction); with upstream
    gradients also every gradient: input, h_0, c_0, weight_ih, weight_hh, bias."""
    leaves = [t.double().requires_grad_() for t in (x, h0, c0)]
    xr = leaves[0].flip(0) if reverse else leaves[0]
    out, (hn, cn) = lstm(xr, (leaves[1][None], leaves[2][None]))
    if reverse:
        out = out.flip(0)
    values = (out.detach(), hn[0].detach(), cn[0].detach())
    if grad_output is None and grad_hy is None:
        return values, None
    terms = []
    if grad_output is not None:
        terms.append((out * grad_output.double()).sum())
    if grad_hy is not None:
        terms.append((hn[0] * grad_hy.double()).sum())
    if grad_cy is not None:
        terms.append((cn[0] * grad_cy.double()).sum())
    grads = torch.autograd.grad(sum(terms), leaves + [lstm.weight_ih_l0, lstm.weight_hh_l0, lstm.bias_ih_l0])
    return values, grads


def run_sequence(emu, x, h0, c0, weights, reverse, batch_sizes=None, allow_tf32=False, max_shared=MAX_SHARED,
                 max_blocks=MAX_BLOCKS):
    steps, batch, input_size = x.shape
    batch_sizes = full_batch_sizes(steps, batch) if batch_sizes is None else batch_sizes
    *outputs, path = emu.sequence_forward(
        x.reshape(steps * batch, input_size), batch_sizes, h0, c0, *weights, reverse, allow_tf32, max_shared, max_blocks
    )
    return outputs, path


# Forward values, tolerance against float64; gradients, tolerance of the relative error of each.
VALUE_TOLERANCE = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 3e-2}
GRAD_TOLERANCE = {torch.float64: 1e-11, torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 1e-1}

# (steps, batch, input, hidden): batch 1-70 (row tiles of 4 and their tails; 16-row tensor-core
# tiles, partial and several), hidden sizes with a partial last block of 8 units (1, 5, 9, 33, 70)
# and multiples of 16 (16, 32, 48: the tensor-core kernel for half/bfloat16), input size 1
# (nn.LSTM refuses 0).
SEQUENCE_SHAPES = [
    (1, 1, 7, 1),
    (4, 3, 7, 5),
    (3, 6, 1, 9),
    (3, 17, 16, 33),
    (2, 2, 5, 70),
    (3, 5, 2, 16),
    (2, 33, 6, 32),
    (2, 70, 3, 12),
    (2, 16, 4, 48),
]


@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize("steps,batch,input_size,hidden_size", SEQUENCE_SHAPES, ids=lambda v: str(v))
@pytest.mark.parametrize(
    "dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16], ids=["fp64", "fp32", "fp16", "bf16"]
)
def test_sequence_ops_on_the_persistent_kernels_against_nn_lstm(emu, dtype, steps, batch, input_size, hidden_size,
                                                              reverse):
    # The forward and its backward through time as lf.LSTM's sequence ops run them on CUDA, against
    # nn.LSTM and autograd through it in float64: output, h_n, c_n, and every gradient (input, h_0,
    # c_0, both weights, the bias), with upstream gradients on the outputs and on both final states.
    lstm, x, h0, c0, weights = lstm_case(steps, batch, input_size, hidden_size, dtype)
    (output, hy, cy, cell_states, gates), path = run_sequence(emu, x, h0, c0, weights, reverse)
    assert path == expected_path(dtype, hidden_size), "the persistent kernel must take this shape"
    grad_output = nonzero_randn(steps, batch, hidden_size, dtype=dtype)
    grad_hy = nonzero_randn(batch, hidden_size, dtype=dtype)
    grad_cy = nonzero_randn(batch, hidden_size, dtype=dtype)
    (expected_output, expected_h, expected_c), expected_grads = reference_sequence(
        lstm, x, h0, c0, reverse, grad_output, grad_hy, grad_cy
    )
    label = f"{dtype} T={steps} B={batch} I={input_size} H={hidden_size} reverse={reverse}"
    tolerance = VALUE_TOLERANCE[dtype]
    for name, actual, expected in [
        ("output", output.view(steps, batch, hidden_size), expected_output), ("h_n", hy, expected_h),
        ("c_n", cy, expected_c),
    ]:
        error = relative_error(actual, expected)
        assert error <= tolerance, f"{label}: {name} relative error {error:.2e} > {tolerance:.0e}"
    assert torch.isfinite(cell_states).all() and torch.isfinite(gates).all()
    if dtype == torch.float64:
        # The saved cell states and activated gates of each step, which sequence_backward reads:
        # the step formulas on the kernel's own h_{t-1}, c_{t-1}.
        w_ih, w_hh, b_ih, b_hh = weights
        h, c = h0, c0
        for t in (range(steps - 1, -1, -1) if reverse else range(steps)):
            rows = slice(t * batch, (t + 1) * batch)
            z = x[t] @ w_ih.T + h @ w_hh.T + b_ih + b_hh
            i, f, g, o = z.chunk(4, dim=1)
            assert relative_error(gates[rows], torch.cat((i.sigmoid(), f.sigmoid(), g.tanh(), o.sigmoid()), 1)) <= 1e-12
            c = f.sigmoid() * c + i.sigmoid() * g.tanh()
            assert relative_error(cell_states[rows], c) <= 1e-12
            h = output[rows]

    *grads, backward_path = emu.sequence_backward(
        grad_output.view(steps * batch, hidden_size), grad_hy, grad_cy, None, None, x.view(steps * batch, input_size),
        full_batch_sizes(steps, batch), h0, c0, weights[0], weights[1], output, cell_states, gates, reverse, ALL_GRADS,
        MAX_SHARED, MAX_BLOCKS,
    )
    assert backward_path == PERSISTENT
    grads[0] = grads[0].view(steps, batch, input_size)
    tolerance = GRAD_TOLERANCE[dtype]
    for name, actual, wanted in zip(["input", "h_0", "c_0", "weight_ih", "weight_hh", "bias"], grads, expected_grads):
        error = relative_error(actual, wanted)
        assert error <= tolerance, f"{label}: grad of {name} relative error {error:.2e} > {tolerance:.0e}"


@pytest.mark.parametrize("upstream", ["output_only", "final_only", "hidden_only"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
def test_persistent_backward_with_some_upstream_gradients_and_outputs(emu, dtype, upstream):
    # Absent upstream gradients read as zero, and only the gradients output_mask asks for come back.
    steps, batch, input_size, hidden_size, reverse = 4, 3, 5, 11, upstream == "final_only"
    lstm, x, h0, c0, weights = lstm_case(steps, batch, input_size, hidden_size, dtype)
    (output, hy, cy, cell_states, gates), path = run_sequence(emu, x, h0, c0, weights, reverse)
    assert path == PERSISTENT
    grad_output = nonzero_randn(steps, batch, hidden_size, dtype=dtype) if upstream == "output_only" else None
    grad_hy = nonzero_randn(batch, hidden_size, dtype=dtype) if upstream != "output_only" else None
    grad_cy = nonzero_randn(batch, hidden_size, dtype=dtype) if upstream == "final_only" else None
    _, expected = reference_sequence(lstm, x, h0, c0, reverse, grad_output, grad_hy, grad_cy)
    mask = [True, False, True, False, True, True] if upstream == "output_only" else [False, True, False, True, False, False]
    *grads, backward_path = emu.sequence_backward(
        None if grad_output is None else grad_output.view(-1, hidden_size), grad_hy, grad_cy, None, None,
        x.view(steps * batch, input_size), full_batch_sizes(steps, batch), h0, c0, weights[0], weights[1], output,
        cell_states, gates, reverse, mask, MAX_SHARED, MAX_BLOCKS,
    )
    assert backward_path == PERSISTENT
    for name, wanted_here, actual, wanted in zip(["input", "h_0", "c_0", "weight_ih", "weight_hh", "bias"], mask, grads,
                                                 expected):
        if not wanted_here:
            assert actual.numel() == 0, f"grad of {name} was not asked for"
            continue
        actual = actual.view(wanted.shape)
        error = relative_error(actual, wanted)
        assert error <= GRAD_TOLERANCE[dtype], f"grad of {name}: relative error {error:.2e}"


def loop_and_persistent(emu, x, h0, c0, weights, reverse, **refusal):
    """The same call on the persistent path and on the loop (refused by `refusal`)."""
    persistent, path = run_sequence(emu, x, h0, c0, weights, reverse)
    assert path != LOOP
    loop, path = run_sequence(emu, x, h0, c0, weights, reverse, **refusal)
    assert path == LOOP
    return persistent, loop


@pytest.mark.parametrize(
    "refusal",
    [
        # One block's weights and h_{t-1} (forward), its columns of W_hh (backward, 4H x 8 units:
        # 1 KiB of bfloat16 at H=16) do not fit in its shared memory.
        {"max_shared": 512},
        # The grid cannot be co-resident (a cooperative launch would deadlock at the first barrier).
        {"max_blocks": 1},
    ],
    ids=["shared_memory", "occupancy"],
)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=["fp64", "fp32", "bf16"])
def test_shapes_the_persistent_kernel_refuses_take_the_loop(emu, dtype, refusal):
    # Same outputs either way (to each path's rounding), so sequence_backward reads either alike.
    steps, batch, input_size, hidden_size = 3, 5, 4, 16
    lstm, x, h0, c0, weights = lstm_case(steps, batch, input_size, hidden_size, dtype)
    persistent, loop = loop_and_persistent(emu, x, h0, c0, weights, False, **refusal)
    (expected_output, expected_h, expected_c), _ = reference_sequence(lstm, x, h0, c0, False)
    tolerance = VALUE_TOLERANCE[dtype]
    for outputs in (persistent, loop):
        output, hy, cy, cell_states, gates = outputs
        assert relative_error(output.view(steps, batch, hidden_size), expected_output) <= tolerance
        assert relative_error(hy, expected_h) <= tolerance
        assert relative_error(cy, expected_c) <= tolerance
    for name, a, b in zip(["output", "h_n", "c_n", "cell_states", "gates"], persistent, loop):
        error = relative_error(a, b)
        assert error <= tolerance, f"{name}: persistent and loop differ by {error:.2e}"
    # The loop's backward (refused the same way) against the persistent one's.
    output, _, _, cell_states, gates = persistent
    grad_output = nonzero_randn(steps * batch, hidden_size, dtype=dtype)
    args = (grad_output, None, None, None, None, x.view(steps * batch, input_size), full_batch_sizes(steps, batch), h0,
            c0, weights[0], weights[1], output, cell_states, gates, False, ALL_GRADS)
    *persistent_grads, path = emu.sequence_backward(*args, MAX_SHARED, MAX_BLOCKS)
    assert path == PERSISTENT
    *loop_grads, path = emu.sequence_backward(
        *args, refusal.get("max_shared", MAX_SHARED), refusal.get("max_blocks", MAX_BLOCKS)
    )
    assert path == LOOP
    for name, a, b in zip(["input", "h_0", "c_0", "weight_ih", "weight_hh", "bias"], persistent_grads, loop_grads):
        error = relative_error(a, b)
        assert error <= GRAD_TOLERANCE[dtype], f"grad of {name}: persistent and loop differ by {error:.2e}"


@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
def test_packed_sequences_of_different_lengths_take_the_loop(emu, reverse):
    # The persistent kernels index a padded batch; a PackedSequence whose steps shrink takes the loop.
    lengths = [5, 3, 3, 1]
    input_size, hidden_size = 4, 9
    lstm = nn.LSTM(input_size, hidden_size, dtype=torch.float64)
    sequences = [nonzero_randn(n, input_size) for n in lengths]
    packed = nn.utils.rnn.pack_sequence(sequences)
    h0 = nonzero_randn(len(lengths), hidden_size)
    c0 = nonzero_randn(len(lengths), hidden_size)
    weights = [w.detach() for w in (lstm.weight_ih_l0, lstm.weight_hh_l0, lstm.bias_ih_l0, lstm.bias_hh_l0)]
    *outputs, path = emu.sequence_forward(
        packed.data, packed.batch_sizes, h0, c0, *weights, reverse, False, MAX_SHARED, MAX_BLOCKS
    )
    assert path == LOOP
    output, hy, cy, cell_states, gates = outputs
    for b, sequence in enumerate(sequences):
        steps = sequence.flip(0) if reverse else sequence
        with torch.no_grad():
            expected, (expected_h, expected_c) = lstm(steps, (h0[b:b + 1], c0[b:b + 1]))
        if reverse:
            expected = expected.flip(0)
        rows = [sum(packed.batch_sizes[:t].tolist()) + b for t in range(lengths[b])]
        assert relative_error(output[rows], expected) <= 1e-12
        assert relative_error(hy[b], expected_h[0]) <= 1e-12
        assert relative_error(cy[b], expected_c[0]) <= 1e-12
    *_, backward_path = emu.sequence_backward(
        torch.randn_like(output), None, None, None, None, packed.data, packed.batch_sizes, h0, c0, weights[0],
        weights[1], output, cell_states, gates, reverse, ALL_GRADS, MAX_SHARED, MAX_BLOCKS,
    )
    assert backward_path == LOOP


def test_gradients_of_the_saved_states_take_the_loop(emu):
    # return_states' cell_states and gates have gradients the persistent backward does not take.
    steps, batch, input_size, hidden_size = 3, 4, 5, 8
    _, x, h0, c0, weights = lstm_case(steps, batch, input_size, hidden_size, torch.float64)
    (output, _, _, cell_states, gates), path = run_sequence(emu, x, h0, c0, weights, False)
    assert path == PERSISTENT
    common = (x.view(steps * batch, input_size), full_batch_sizes(steps, batch), h0, c0, weights[0], weights[1], output,
              cell_states, gates, False, ALL_GRADS, MAX_SHARED, MAX_BLOCKS)
    grad_output = nonzero_randn(steps * batch, hidden_size)
    grad_cell_states = nonzero_randn(steps * batch, hidden_size)
    *with_states, path = emu.sequence_backward(grad_output, None, None, grad_cell_states, None, *common)
    assert path == LOOP
    *without, path = emu.sequence_backward(grad_output, None, None, None, None, *common)
    assert path == PERSISTENT
    # The cell states' gradient changed the result: the loop did not drop it.
    assert not torch.allclose(with_states[0], without[0])
    assert all(torch.isfinite(g).all() for g in with_states)


@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize("steps,batch,input_size,hidden_size", [(3, 9, 6, 32), (2, 17, 5, 48), (2, 33, 3, 16)])
def test_float32_is_exact_unless_tf32_is_allowed(emu, steps, batch, input_size, hidden_size, reverse):
    # TF32 off (torch's default): the float32 recurrence on FFMA, exact to float32 rounding. TF32
    # allowed: the tensor-core kernel on 16x16x8 TF32 fragments (the emulation rounds the operands
    # as the hardware does), within TF32's rounding (unit roundoff 2^-11) and visibly not exact.
    lstm, x, h0, c0, weights = lstm_case(steps, batch, input_size, hidden_size, torch.float32)
    (expected_output, expected_h, expected_c), _ = reference_sequence(lstm, x, h0, c0, reverse)
    errors = {}
    for allow_tf32, wanted_path in [(False, PERSISTENT), (True, TENSOR_CORES)]:
        (output, hy, cy, _, _), path = run_sequence(emu, x, h0, c0, weights, reverse, allow_tf32=allow_tf32)
        assert path == wanted_path
        errors[allow_tf32] = max(
            relative_error(output.view(steps, batch, hidden_size), expected_output),
            relative_error(hy, expected_h), relative_error(cy, expected_c),
        )
    assert errors[False] <= 1e-5, f"float32 without TF32: relative error {errors[False]:.2e}"
    assert 1e-6 < errors[True] <= 5e-3, f"float32 with TF32: relative error {errors[True]:.2e}"
    # Half and bfloat16 take the tensor cores whatever the setting.
    *_, reduced = run_sequence(emu, x.half(), h0.half(), c0.half(), [w.half() for w in weights], reverse)
    assert reduced == TENSOR_CORES


def test_persistent_sequence_refuses_a_grid_that_cannot_be_resident(emu):
    # 65 blocks of 8 units: more than the emulation keeps alive together (64), as a GPU has a
    # co-residency limit; the op must take the loop rather than deadlock at the first grid barrier.
    lstm, x, h0, c0, weights = lstm_case(2, 1, 3, 8 * 65, torch.float32)
    (output, *_), path = run_sequence(emu, x, h0, c0, weights, False, max_blocks=10**6)
    assert path == LOOP
    (expected_output, _, _), _ = reference_sequence(lstm, x, h0, c0, False)
    assert relative_error(output.view(2, 1, -1), expected_output) <= 1e-5


# ------------------------------------------------------------------------------------------------
# Projections (nn.LSTM's proj_size P > 0, LSTMP: h_t = W_hr (o * tanh(c_t))) in the persistent
# kernels: one more grid barrier per step between the cell update and the projection (and in the
# backward between grad_h W_hr and the cell's backward), W_hr's slices resident in shared memory,
# grad_W_hr one product after the kernel
# ------------------------------------------------------------------------------------------------


def projected_case(steps, batch, input_size, hidden_size, proj_size, dtype):
    """Weights (rounded to dtype) for an LSTMP layer: weight_ih, weight_hh [4H, P], bias_ih, bias_hh,
    weight_hr [P, H]; the inputs x [T, B, I], h0 [B, P], c0 [B, H]."""
    scale = max(1, input_size + proj_size) ** -0.5 * 2
    shapes = [(4 * hidden_size, input_size), (4 * hidden_size, proj_size), (4 * hidden_size,), (4 * hidden_size,),
              (proj_size, hidden_size)]
    weights = [nonzero_randn(*shape, scale=scale if i < 4 else hidden_size ** -0.5 * 2).to(dtype).contiguous()
               for i, shape in enumerate(shapes)]
    x = nonzero_randn(steps, batch, input_size, dtype=dtype)
    h0 = nonzero_randn(batch, proj_size, dtype=dtype)
    c0 = nonzero_randn(batch, hidden_size, dtype=dtype)
    return weights, x, h0, c0


def reference_projected_sequence(weights, x, h0, c0, reverse, grad_output, grad_hy, grad_cy):
    """Values (output, h_n, c_n) and every gradient (input, h_0, c_0, weight_ih, weight_hh, bias,
    weight_hr) in float64: nn.LSTM(proj_size=P) with the same weights where nn allows the shape
    (P < H), else (P = H, which nn refuses and the kernels take) the same step formulas in plain torch."""
    steps, batch, input_size = x.shape
    hidden_size, proj_size = weights[4].shape[1], weights[4].shape[0]
    leaves = [t.double().requires_grad_() for t in (x, h0, c0)]
    xr = leaves[0].flip(0) if reverse else leaves[0]
    if proj_size < hidden_size:
        lstm = nn.LSTM(input_size, hidden_size, proj_size=proj_size, dtype=torch.float64)
        names = ["weight_ih_l0", "weight_hh_l0", "bias_ih_l0", "bias_hh_l0", "weight_hr_l0"]
        with torch.no_grad():
            for name, w in zip(names, weights):
                getattr(lstm, name).copy_(w.double())
        w_ih, w_hh, b_ih, b_hh, w_hr = (getattr(lstm, name) for name in names)
        out, (hn, cn) = lstm(xr, (leaves[1][None], leaves[2][None]))
        hn, cn = hn[0], cn[0]
    else:
        w_ih, w_hh, b_ih, b_hh, w_hr = (w.double().requires_grad_() for w in weights)
        h, c, outs = leaves[1], leaves[2], []
        for t in range(steps):
            i, f, g, o = (xr[t] @ w_ih.T + b_ih + h @ w_hh.T + b_hh).chunk(4, dim=1)
            c = f.sigmoid() * c + i.sigmoid() * g.tanh()
            h = (o.sigmoid() * c.tanh()) @ w_hr.T
            outs.append(h)
        out, hn, cn = torch.stack(outs), h, c
    if reverse:
        out = out.flip(0)
    total = (out * grad_output.double()).sum() + (hn * grad_hy.double()).sum() + (cn * grad_cy.double()).sum()
    grads = torch.autograd.grad(total, leaves + [w_ih, w_hh, b_ih, w_hr])
    return (out.detach(), hn.detach(), cn.detach()), grads


def expected_projected_path(dtype, proj_size):
    """The recurrent product reads h of width P: tensor cores for half/bfloat16 at P a multiple of 16."""
    return TENSOR_CORES if dtype in (torch.float16, torch.bfloat16) and proj_size % 16 == 0 else PERSISTENT


def run_projected(emu, weights, x, h0, c0, reverse, max_shared=MAX_SHARED, max_blocks=MAX_BLOCKS):
    steps, batch, input_size = x.shape
    w_ih, w_hh, b_ih, b_hh, w_hr = weights
    *outputs, path = emu.sequence_forward(
        x.reshape(steps * batch, input_size), full_batch_sizes(steps, batch), h0, c0, w_ih, w_hh, b_ih, b_hh, reverse,
        False, max_shared, max_blocks, w_hr,
    )
    return outputs, path


def run_projected_backward(emu, weights, x, h0, c0, forward_outputs, reverse, grad_output, grad_hy, grad_cy,
                           mask=ALL_GRADS, max_shared=MAX_SHARED, max_blocks=MAX_BLOCKS):
    steps, batch, input_size = x.shape
    output, _, _, cell_states, gates = forward_outputs
    w_ih, w_hh, _, _, w_hr = weights
    *grads, path = emu.sequence_backward(
        None if grad_output is None else grad_output.reshape(steps * batch, -1), grad_hy, grad_cy, None, None,
        x.reshape(steps * batch, input_size), full_batch_sizes(steps, batch), h0, c0, w_ih, w_hh, output, cell_states,
        gates, reverse, mask, max_shared, max_blocks, w_hr,
    )
    return grads, path


PROJECTED_VALUE_TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 3e-2}
PROJECTED_GRAD_TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 2e-2, torch.bfloat16: 1e-1}
PROJECTED_GRAD_NAMES = ["input", "h_0", "c_0", "weight_ih", "weight_hh", "bias", "weight_hr"]

# (steps, batch, input, hidden, proj): hidden 1, 5, 33 (a partial last block of 8 units; 33: five
# blocks, the last with one unit), proj from 1 to hidden (P = H included: nn refuses it, the kernels
# take it), projection rows spread over one block (P <= 8) or several (16, 32, 33); batch 1-70: the
# tails of the 4-row tiles (1, 3, 5, 6, 9) and of the tensor cores' 16-row tiles (17, 33, 70), full
# tiles (4, 16); P = 16 and 32 take the tensor-core kernel in half/bfloat16.
PROJECTED_SHAPES = [
    (3, 1, 3, 1, 1),
    (4, 3, 7, 5, 1),
    (3, 6, 2, 5, 4),
    (3, 4, 1, 5, 5),
    (2, 17, 6, 33, 16),
    (3, 9, 4, 33, 1),
    (2, 33, 5, 33, 7),
    (2, 70, 3, 33, 32),
    (2, 5, 4, 33, 33),
    (2, 16, 3, 33, 16),
]


@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize("steps,batch,input_size,hidden_size,proj_size", PROJECTED_SHAPES, ids=lambda v: str(v))
@pytest.mark.parametrize(
    "dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16], ids=["fp64", "fp32", "fp16", "bf16"]
)
def test_projected_sequence_on_the_persistent_kernels_against_nn_lstm(emu, dtype, steps, batch, input_size,
                                                                       hidden_size, proj_size, reverse):
    # lf.LSTM(proj_size=P)'s sequence ops as CUDA runs them, on the persistent kernels (asserted),
    # against nn.LSTM(proj_size=P) in float64: output, h_n, c_n and every gradient, weight_hr's
    # included, with upstream gradients on the outputs and both final states. Every output and
    # scratch buffer (o * tanh(c) between the barriers, the per-step gradients of h) starts NaN.
    weights, x, h0, c0 = projected_case(steps, batch, input_size, hidden_size, proj_size, dtype)
    forward_outputs, path = run_projected(emu, weights, x, h0, c0, reverse)
    assert path == expected_projected_path(dtype, proj_size), "the persistent kernel must take this shape"
    output, hy, cy, cell_states, gates = forward_outputs
    grad_output = nonzero_randn(steps, batch, proj_size, dtype=dtype)
    grad_hy = nonzero_randn(batch, proj_size, dtype=dtype)
    grad_cy = nonzero_randn(batch, hidden_size, dtype=dtype)
    (expected_output, expected_h, expected_c), expected_grads = reference_projected_sequence(
        weights, x, h0, c0, reverse, grad_output, grad_hy, grad_cy
    )
    label = f"{dtype} T={steps} B={batch} I={input_size} H={hidden_size} P={proj_size} reverse={reverse}"
    tolerance = PROJECTED_VALUE_TOLERANCE[dtype]
    for name, actual, expected in [
        ("output", output.view(steps, batch, proj_size), expected_output), ("h_n", hy, expected_h),
        ("c_n", cy, expected_c),
    ]:
        error = relative_error(actual, expected)
        assert error <= tolerance, f"{label}: {name} relative error {error:.2e} > {tolerance:.0e}"
    assert torch.isfinite(cell_states).all() and torch.isfinite(gates).all()

    grads, backward_path = run_projected_backward(
        emu, weights, x, h0, c0, forward_outputs, reverse, grad_output, grad_hy, grad_cy
    )
    assert backward_path == PERSISTENT
    grads[0] = grads[0].view(steps, batch, input_size)
    tolerance = PROJECTED_GRAD_TOLERANCE[dtype]
    for name, actual, wanted in zip(PROJECTED_GRAD_NAMES, grads, expected_grads, strict=True):
        error = relative_error(actual, wanted)
        assert error <= tolerance, f"{label}: grad of {name} relative error {error:.2e} > {tolerance:.0e}"


@pytest.mark.parametrize("upstream", ["output_only", "final_only"])
def test_projected_backward_with_some_upstream_gradients(emu, upstream):
    # Absent upstream gradients read as zero through the projection too; the mask's gradients only.
    steps, batch, input_size, hidden_size, proj_size, reverse = 4, 3, 5, 11, 6, upstream == "final_only"
    dtype = torch.float64
    weights, x, h0, c0 = projected_case(steps, batch, input_size, hidden_size, proj_size, dtype)
    forward_outputs, path = run_projected(emu, weights, x, h0, c0, reverse)
    assert path == PERSISTENT
    zero = lambda *shape: torch.zeros(*shape, dtype=dtype)  # noqa: E731
    grad_output = nonzero_randn(steps, batch, proj_size) if upstream == "output_only" else None
    grad_hy = nonzero_randn(batch, proj_size) if upstream == "final_only" else None
    grad_cy = nonzero_randn(batch, hidden_size) if upstream == "final_only" else None
    _, expected = reference_projected_sequence(
        weights, x, h0, c0, reverse, zero(steps, batch, proj_size) if grad_output is None else grad_output,
        zero(batch, proj_size) if grad_hy is None else grad_hy, zero(batch, hidden_size) if grad_cy is None else grad_cy,
    )
    mask = [True, False, True, False, True, True] if upstream == "output_only" else [False, True, False, True, False, False]
    grads, backward_path = run_projected_backward(
        emu, weights, x, h0, c0, forward_outputs, reverse, grad_output, grad_hy, grad_cy, mask=mask
    )
    assert backward_path == PERSISTENT
    for name, wanted_here, actual, wanted in zip(PROJECTED_GRAD_NAMES, mask + [True], grads, expected, strict=True):
        if not wanted_here:
            assert actual.numel() == 0, f"grad of {name} was not asked for"
            continue
        error = relative_error(actual.view(wanted.shape), wanted)
        assert error <= 1e-10, f"grad of {name}: relative error {error:.2e}"


def projected_shared_bytes(batch, hidden_size, proj_size, itemsize):
    """The FFMA kernels' shared memory with a projection, as the plans count it. Forward: h [B, P]
    and W_hh's gate rows [32, P] (rounded up to 16 bytes), then u = o * tanh(c) [B, H] and W_hr's
    rows [8, H]. Backward: W_hh's columns [4H, 8] and W_hr's [P, 8]."""
    recurrent = (batch * proj_size + 32 * proj_size) * itemsize
    forward = (recurrent + 15) // 16 * 16 + (batch * hidden_size + 8 * hidden_size) * itemsize
    backward = (4 * hidden_size * 8 + proj_size * 8) * itemsize
    return forward, backward


def test_projection_shared_memory_is_counted_in_the_plans(emu):
    # The projection's extra shared memory is part of the eligibility: at exactly the bytes the
    # plan counts the kernel runs, 4 bytes fewer the call takes the loop, forward and backward.
    steps, batch, input_size, hidden_size, proj_size, dtype = 3, 5, 4, 16, 8, torch.float32
    weights, x, h0, c0 = projected_case(steps, batch, input_size, hidden_size, proj_size, dtype)
    forward_bytes, backward_bytes = projected_shared_bytes(batch, hidden_size, proj_size, 4)
    outputs, path = run_projected(emu, weights, x, h0, c0, False, max_shared=forward_bytes)
    assert path == PERSISTENT
    _, path = run_projected(emu, weights, x, h0, c0, False, max_shared=forward_bytes - 4)
    assert path == LOOP
    upstream = (nonzero_randn(steps, batch, proj_size), nonzero_randn(batch, proj_size), nonzero_randn(batch, hidden_size))
    upstream = [u.to(dtype) for u in upstream]
    _, path = run_projected_backward(emu, weights, x, h0, c0, outputs, False, *upstream, max_shared=backward_bytes)
    assert path == PERSISTENT
    _, path = run_projected_backward(emu, weights, x, h0, c0, outputs, False, *upstream, max_shared=backward_bytes - 4)
    assert path == LOOP


@pytest.mark.parametrize(
    "limits",
    [{"max_shared": 1024}, {"max_blocks": 1}],
    ids=["shared_memory", "occupancy"],
)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
def test_projected_shapes_the_persistent_kernel_refuses_take_the_loop(emu, dtype, limits):
    # Refused (W_hr's and W_hh's slices do not fit, or the grid cannot be co-resident), a projected
    # call runs the loop, which agrees with the persistent kernels and with nn.LSTM.
    steps, batch, input_size, hidden_size, proj_size = 3, 5, 4, 16, 8
    weights, x, h0, c0 = projected_case(steps, batch, input_size, hidden_size, proj_size, dtype)
    persistent, path = run_projected(emu, weights, x, h0, c0, False)
    assert path == PERSISTENT
    loop, path = run_projected(emu, weights, x, h0, c0, False, **limits)
    assert path == LOOP
    grad_output = nonzero_randn(steps, batch, proj_size, dtype=dtype)
    grad_hy = nonzero_randn(batch, proj_size, dtype=dtype)
    grad_cy = nonzero_randn(batch, hidden_size, dtype=dtype)
    (expected_output, expected_h, expected_c), expected_grads = reference_projected_sequence(
        weights, x, h0, c0, False, grad_output, grad_hy, grad_cy
    )
    tolerance = PROJECTED_VALUE_TOLERANCE[dtype]
    for outputs in (persistent, loop):
        output, hy, cy, _, _ = outputs
        assert relative_error(output.view(steps, batch, proj_size), expected_output) <= tolerance
        assert relative_error(hy, expected_h) <= tolerance
        assert relative_error(cy, expected_c) <= tolerance
    persistent_grads, path = run_projected_backward(
        emu, weights, x, h0, c0, persistent, False, grad_output, grad_hy, grad_cy
    )
    assert path == PERSISTENT
    loop_grads, path = run_projected_backward(
        emu, weights, x, h0, c0, persistent, False, grad_output, grad_hy, grad_cy, **limits
    )
    assert path == LOOP
    for grads in (persistent_grads, loop_grads):
        grads[0] = grads[0].view(steps, batch, input_size)
        for name, actual, wanted in zip(PROJECTED_GRAD_NAMES, grads, expected_grads, strict=True):
            error = relative_error(actual, wanted)
            assert error <= PROJECTED_GRAD_TOLERANCE[dtype], f"grad of {name}: relative error {error:.2e}"


@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
def test_projected_float32_takes_tf32_tensor_cores_only_when_allowed(emu, reverse):
    # The recurrent product reads h of width P = 16: with TF32 allowed, float32 runs the
    # tensor-core kernel (the projection after it is the same FFMA code), within TF32's rounding.
    steps, batch, input_size, hidden_size, proj_size = 3, 9, 5, 20, 16
    weights, x, h0, c0 = projected_case(steps, batch, input_size, hidden_size, proj_size, torch.float32)
    w_ih, w_hh, b_ih, b_hh, w_hr = weights
    upstream = [nonzero_randn(steps, batch, proj_size), nonzero_randn(batch, proj_size), nonzero_randn(batch, hidden_size)]
    (expected_output, expected_h, expected_c), _ = reference_projected_sequence(weights, x, h0, c0, reverse, *upstream)
    errors = {}
    for allow_tf32, wanted_path in [(False, PERSISTENT), (True, TENSOR_CORES)]:
        *outputs, path = emu.sequence_forward(
            x.reshape(steps * batch, input_size), full_batch_sizes(steps, batch), h0, c0, w_ih, w_hh, b_ih, b_hh,
            reverse, allow_tf32, MAX_SHARED, MAX_BLOCKS, w_hr,
        )
        assert path == wanted_path
        output, hy, cy, _, _ = outputs
        errors[allow_tf32] = max(relative_error(output.view(steps, batch, proj_size), expected_output),
                                 relative_error(hy, expected_h), relative_error(cy, expected_c))
    assert errors[False] <= 1e-5, f"float32 without TF32: relative error {errors[False]:.2e}"
    assert 1e-6 < errors[True] <= 5e-3, f"float32 with TF32: relative error {errors[True]:.2e}"


# sequence_inference (lf.LSTM's forward where neither backward nor return_states reads the states):
# the same persistent kernels without the gate writes, c kept in two slots ([2, B, H], step t in
# slot t % 2). Its outputs must be sequence_forward's exactly (the same arithmetic in the same
# order); the loop where the persistent path refuses (packed lengths).
INFERENCE_SHAPES = [(5, 3, 7, 5), (4, 17, 16, 33), (3, 70, 3, 12), (6, 16, 4, 48), (1, 2, 3, 4)]


@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize("steps,batch,input_size,hidden_size", INFERENCE_SHAPES, ids=lambda v: str(v))
@pytest.mark.parametrize(
    "dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16], ids=["fp64", "fp32", "fp16", "bf16"]
)
def test_sequence_inference_on_the_persistent_kernels(emu, dtype, steps, batch, input_size, hidden_size, reverse):
    lstm, x, h0, c0, weights = lstm_case(steps, batch, input_size, hidden_size, dtype)
    args = (x.reshape(steps * batch, input_size), full_batch_sizes(steps, batch), h0, c0, *weights, reverse, False,
            MAX_SHARED, MAX_BLOCKS)
    *inference, path = emu.sequence_inference(*args)
    assert path == expected_path(dtype, hidden_size)
    *forward, forward_path = emu.sequence_forward(*args)
    assert forward_path == path
    for name, actual, expected in zip(("output", "h_n", "c_n"), inference, forward[:3]):
        assert torch.equal(actual, expected), f"{name} differs from sequence_forward's"
    (expected_output, expected_h, expected_c), _ = reference_sequence(lstm, x, h0, c0, reverse)
    for name, actual, expected in [
        ("output", inference[0].view(steps, batch, hidden_size), expected_output), ("h_n", inference[1], expected_h),
        ("c_n", inference[2], expected_c),
    ]:
        error = relative_error(actual, expected)
        assert error <= VALUE_TOLERANCE[dtype], f"{name} relative error {error:.2e}"


@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize("proj_size", [1, 3, 16])
def test_sequence_inference_with_a_projection(emu, reverse, proj_size):
    steps, batch, input_size, hidden_size = 4, 6, 5, 20
    weights, x, h0, c0 = projected_case(steps, batch, input_size, hidden_size, proj_size, torch.float64)
    w_ih, w_hh, b_ih, b_hh, w_hr = weights
    args = (x.reshape(steps * batch, input_size), full_batch_sizes(steps, batch), h0, c0, w_ih, w_hh, b_ih, b_hh,
            reverse, False, MAX_SHARED, MAX_BLOCKS, w_hr)
    *inference, path = emu.sequence_inference(*args)
    assert path == PERSISTENT
    *forward, _ = emu.sequence_forward(*args)
    for actual, expected in zip(inference, forward[:3]):
        assert torch.equal(actual, expected)


def test_sequence_inference_of_packed_lengths_takes_the_loop(emu):
    lstm, x, h0, c0, weights = lstm_case(4, 3, 5, 6, torch.float64)
    batch_sizes = torch.tensor([3, 3, 2, 1])
    rows = int(batch_sizes.sum())
    args = (x.reshape(12, 5)[:rows].contiguous(), batch_sizes, h0, c0, *weights, True, False, MAX_SHARED, MAX_BLOCKS)
    *inference, path = emu.sequence_inference(*args)
    assert path == LOOP
    *forward, _ = emu.sequence_forward(*args)
    for actual, expected in zip(inference, forward[:3]):
        assert torch.equal(actual, expected)

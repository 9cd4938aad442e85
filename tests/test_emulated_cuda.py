"""The CUDA kernels of csrc/cuda, run on the CPU through the emulation of CUDA's execution model in
tests/emulated_cuda/ (no GPU needed: these run in CI).

The real device code of csrc/cuda/cell_kernels.cuh is compiled for the host against
tests/emulated_cuda/cuda_emulation.h (blocks of fibers, __syncthreads, shared memory, warp
shuffles, atomics, grid barriers) into a small extension built once and cached in
build/emulated_cuda. Each test launches the kernels exactly as csrc/cuda/lstm_cell.cu does (the
header's launch_* functions) on small shapes: the tails of every batch tile (1, 4, 8, 16 rows),
input size 0, hidden 1, batch 1-70, each dtype, several shared-memory chunks per segment, the
split of a unit's K range over warps, misaligned data; against nn.LSTMCell / nn.LSTM in float64,
and half/bfloat16 by relative error against float64. Outputs start NaN-filled.

The emulation proves indexing, synchronisation and arithmetic, not speed or the GPU's memory
model: benchmarks/gpu_proof.sh is the GPU's part.
"""
import os
import pathlib
import time

import pytest
import torch
from torch import nn

pytestmark = pytest.mark.emulated_cuda

ROOT = pathlib.Path(__file__).resolve().parent.parent
EMULATION = ROOT / "tests" / "emulated_cuda"

# An H100 has 132 SMs: the launch plan (the K split over warps) then matches the GPU's.
H100_SMS = 132


@pytest.fixture(scope="module")
def emu():
    """torch.ops.lstm_fused_emulated, compiled on first use (about a minute on 2 cores)."""
    from torch.utils import cpp_extension

    # Under .ci/sanitize (LSTM_FUSED_SANITIZE), the emulated kernels are built with the sanitizers
    # too, into a build folder of their own.
    sanitize = os.environ.get("LSTM_FUSED_SANITIZE", "")
    sanitize_flags = [f"-fsanitize={sanitize}", "-fno-sanitize-recover=all", "-fno-omit-frame-pointer"] if sanitize else []
    build_dir = ROOT / "build" / ("emulated_cuda_sanitized" if sanitize else "emulated_cuda")
    build_dir.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    cpp_extension.load(
        name="lstm_fused_emulated",
        sources=[str(EMULATION / "emulated_ops.cpp")],
        extra_include_paths=[str(ROOT / "csrc"), str(EMULATION)],
        # -O1: the kernels' unrolled loops at -O2/-O3 take minutes to compile on 2 cores, and the
        # emulated run is bound by the fibers' switches, not by the arithmetic.
        extra_cflags=["-O1", "-std=c++20", "-fno-strict-aliasing"] + sanitize_flags,
        extra_ldflags=sanitize_flags,
        build_directory=str(build_dir),
        is_python_module=False,
        verbose=os.environ.get("LSTM_FUSED_EMULATION_VERBOSE") == "1",
    )
    print(f"emulated CUDA extension ready in {time.monotonic() - started:.1f} s")
    return torch.ops.lstm_fused_emulated


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
# The persistent sequence kernel: one cooperative launch for all steps, a grid barrier per step
# ------------------------------------------------------------------------------------------------


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


@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize(
    "steps,batch,input_size,hidden_size",
    [(1, 1, 7, 1), (5, 3, 7, 5), (4, 6, 1, 9), (3, 17, 16, 33), (2, 2, 5, 70)],
)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=["fp64", "fp32", "bf16"])
def test_persistent_sequence_against_nn_lstm(emu, dtype, steps, batch, input_size, hidden_size, reverse):
    lstm, x, h0, c0, weights = lstm_case(steps, batch, input_size, hidden_size, dtype)
    output, hy, cy, cell_states, gates, ran = emu.sequence_forward_persistent(x, h0, c0, *weights, reverse, True)
    assert ran, "the shape must fit the persistent kernel"
    xr = x.double().flip(0) if reverse else x.double()
    with torch.no_grad():
        expected, (expected_h, expected_c) = lstm(xr, (h0.double()[None], c0.double()[None]))
    if reverse:
        expected = expected.flip(0)
    tolerance = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 3e-2}[dtype]
    assert relative_error(output, expected) <= tolerance
    assert relative_error(hy, expected_h[0]) <= tolerance
    assert relative_error(cy, expected_c[0]) <= tolerance
    # The cell states and gates of each step, from the step formulas on the kernel's own h_{t-1}
    # and c_{t-1} in float64 (the whole recurrence, step by step, for float64 only).
    if dtype == torch.float64:
        order = range(steps - 1, -1, -1) if reverse else range(steps)
        h, c = h0, c0
        w_ih, w_hh, b_ih, b_hh = weights
        for t in order:
            z = x[t] @ w_ih.T + h @ w_hh.T + b_ih + b_hh
            i, f, g, o = z.chunk(4, dim=1)
            expected_gates = torch.cat((i.sigmoid(), f.sigmoid(), g.tanh(), o.sigmoid()), dim=1)
            c = f.sigmoid() * c + i.sigmoid() * g.tanh()
            h = o.sigmoid() * c.tanh()
            assert relative_error(gates[t], expected_gates) <= 1e-12
            assert relative_error(cell_states[t], c) <= 1e-12


def test_persistent_sequence_without_bias_or_gates(emu):
    lstm, x, h0, c0, weights = lstm_case(4, 5, 6, 12, torch.float32, bias=False)
    output, hy, cy, _, gates, ran = emu.sequence_forward_persistent(x, h0, c0, *weights, False, False)
    assert ran
    with torch.no_grad():
        expected, _ = lstm(x.double(), (h0.double()[None], c0.double()[None]))
    assert relative_error(output, expected) <= 1e-5
    assert torch.isnan(gates).all()


def test_persistent_sequence_refuses_a_grid_that_cannot_be_resident(emu):
    # 65 blocks of 8 units: more than the emulation keeps alive together (64), as a GPU has a
    # co-residency limit; the op must refuse rather than deadlock at the first grid barrier.
    _, x, h0, c0, weights = lstm_case(2, 1, 3, 8 * 65, torch.float32)
    *_, ran = emu.sequence_forward_persistent(x, h0, c0, *weights, False, True)
    assert not ran


@pytest.mark.parametrize("upstream", ["all", "output_only", "final_only"])
@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize("steps,batch,input_size,hidden_size", [(1, 1, 3, 1), (4, 3, 7, 5), (3, 6, 5, 20), (2, 5, 4, 70)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
def test_persistent_backward_through_time_against_nn_lstm(emu, dtype, steps, batch, input_size, hidden_size, reverse, upstream):
    # The forward and backward persistent kernels against autograd through nn.LSTM: every gradient
    # (input, h_0, c_0, both weights, the bias), with the upstream gradients on the outputs, on the
    # final states, or on both.
    lstm, x, h0, c0, weights = lstm_case(steps, batch, input_size, hidden_size, dtype)
    output, hy, cy, cell_states, gates, ran = emu.sequence_forward_persistent(x, h0, c0, *weights, reverse, True)
    assert ran
    grad_output = nonzero_randn(steps, batch, hidden_size, dtype=dtype) if upstream != "final_only" else None
    grad_hy = nonzero_randn(batch, hidden_size, dtype=dtype) if upstream != "output_only" else None
    grad_cy = nonzero_randn(batch, hidden_size, dtype=dtype) if upstream != "output_only" else None
    *grads, ran = emu.sequence_backward_persistent(
        grad_output, grad_hy, grad_cy, x, h0, c0, weights[0], weights[1], output, cell_states, gates, reverse
    )
    assert ran
    leaves = [t.double().requires_grad_() for t in (x, h0, c0)]
    xr = leaves[0].flip(0) if reverse else leaves[0]
    out, (hn, cn) = lstm(xr, (leaves[1][None], leaves[2][None]))
    if reverse:
        out = out.flip(0)
    terms = []
    if grad_output is not None:
        terms.append((out * grad_output.double()).sum())
    if grad_hy is not None:
        terms.append((hn[0] * grad_hy.double()).sum() + (cn[0] * grad_cy.double()).sum())
    expected = torch.autograd.grad(
        sum(terms), leaves + [lstm.weight_ih_l0, lstm.weight_hh_l0, lstm.bias_ih_l0], allow_unused=True
    )
    tolerance = {torch.float64: 1e-11, torch.float32: 1e-4}[dtype]
    for name, actual, wanted in zip(["input", "h_0", "c_0", "weight_ih", "weight_hh", "bias"], grads, expected):
        error = relative_error(actual, wanted)
        assert error <= tolerance, f"grad of {name}: relative error {error:.2e} > {tolerance:.0e}"


@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize(
    "steps,batch,input_size,hidden_size",
    # Hidden sizes that are multiples of 16 take the tensor-core kernel: one and several blocks,
    # batches that leave a partial 16-row tile, one tile with its K range split over 4 warps (batch
    # <= 16), 2 row tiles split over 2 warps (17-32), and 3 row tiles, 6 output tiles, no split (33).
    [(1, 1, 5, 16), (3, 5, 7, 32), (4, 16, 9, 48), (2, 17, 6, 64), (2, 33, 4, 16)],
)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_persistent_sequence_on_tensor_cores(emu, dtype, steps, batch, input_size, hidden_size, reverse):
    lstm, x, h0, c0, weights = lstm_case(steps, batch, input_size, hidden_size, dtype)
    output, hy, cy, cell_states, gates, kernel = emu.sequence_forward_persistent(x, h0, c0, *weights, reverse, True)
    assert kernel == 2, "the tensor-core kernel must take this shape"
    xr = x.double().flip(0) if reverse else x.double()
    with torch.no_grad():
        expected, (expected_h, expected_c) = lstm(xr, (h0.double()[None], c0.double()[None]))
    if reverse:
        expected = expected.flip(0)
    tolerance = {torch.float16: 5e-3, torch.bfloat16: 3e-2}[dtype]
    assert relative_error(output, expected) <= tolerance
    assert relative_error(hy, expected_h[0]) <= tolerance
    assert relative_error(cy, expected_c[0]) <= tolerance
    assert torch.isfinite(gates).all()

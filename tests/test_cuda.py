"""The CUDA kernels against nn.LSTMCell and the pure-Python cell, on the GPU.

Every test is skipped without a CUDA device. The shapes cover both forward paths of
csrc/cuda/lstm_cell.cu: batches up to 64 (float, double) or 32 (half, bfloat16) run the one-launch
fused kernel, batch 257 exceeds every limit of use_fused_forward and takes the cuBLAS + pointwise
fallback. Hidden and input sizes that are not multiples of the 16-byte vector width (1, 5, 7, 300
for half) take the kernel's scalar path; 1024 needs several shared-memory chunks per segment at the
larger batch tiles; input size 0 skips the W_ih segment.
"""
import itertools
import re

import pytest
import torch
from torch import nn

import lstm_fused
from lstm_fused import reference

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

ops = torch.ops.lstm_fused
DEVICE = "cuda"

BATCHES = [1, 3, 64, 257]
HIDDEN_SIZES = [1, 5, 64, 300, 1024]
INPUT_SIZES = [0, 7, 128]

# Norm-wise relative error: max |actual - expected| / max |expected|.
TOLERANCE = {
    torch.float32: 1e-5,
    torch.float64: 1e-12,
    # Against a float64 reference computed from the same rounded inputs: storage rounding (unit
    # roundoff 4.9e-4 for half, 3.9e-3 for bfloat16) plus the backward's products in that dtype.
    torch.float16: 1e-2,
    torch.bfloat16: 5e-2,
}


@pytest.fixture(autouse=True)
def exact_float32_products():
    """nn.LSTMCell's cuBLAS products would use TF32 when allowed; parity at 1e-5 needs full fp32."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.fixture(autouse=True)
def poison_outputs():
    """Kernel outputs start NaN-filled, so an element a kernel does not write fails the comparison."""
    previous = ops._set_poison_outputs(True)
    yield
    ops._set_poison_outputs(previous)


def relative_error(actual, expected):
    actual, expected = actual.detach().double(), expected.detach().double()
    assert actual.shape == expected.shape, f"shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    if expected.numel() == 0:
        return 0.0
    assert torch.isfinite(actual).all(), "non-finite values (an unwritten, NaN-poisoned element?)"
    scale = expected.abs().max().clamp_min(1e-30)
    return ((actual - expected).abs().max() / scale).item()


def assert_close(actual, expected, tolerance, what):
    error = relative_error(actual, expected)
    assert error <= tolerance, f"{what}: relative error {error:.3e} > {tolerance:.1e}"


def make_cells(input_size, hidden_size, bias, dtype):
    torch_cell = nn.LSTMCell(input_size, hidden_size, bias=bias, device=DEVICE, dtype=dtype)
    fused_cell = lstm_fused.LSTMCell(input_size, hidden_size, bias=bias, device=DEVICE, dtype=dtype)
    fused_cell.load_state_dict(torch_cell.state_dict())
    return torch_cell, fused_cell


def random_inputs(batch, input_size, hidden_size, dtype, non_contiguous=False):
    if non_contiguous:
        # Every other column of a wider tensor, and transposed states: strided, not dense.
        x = torch.randn(batch, 2 * input_size, device=DEVICE, dtype=dtype)[:, ::2]
        h0 = torch.randn(hidden_size, batch, device=DEVICE, dtype=dtype).t()
        c0 = torch.randn(hidden_size, batch, device=DEVICE, dtype=dtype).t()
        if batch > 1 and hidden_size > 1:
            assert not h0.is_contiguous()
        return x, h0, c0
    return (
        torch.randn(batch, input_size, device=DEVICE, dtype=dtype),
        torch.randn(batch, hidden_size, device=DEVICE, dtype=dtype),
        torch.randn(batch, hidden_size, device=DEVICE, dtype=dtype),
    )


def run_step(cell, params, x, h0, c0, upstream, return_gates=False):
    """One step through `cell` with `params` as leaves; returns outputs and the gradients of
    sum(output * upstream) with respect to (x, h0, c0, *params.values())."""
    leaves = [t.detach().clone().requires_grad_(True) for t in (x, h0, c0)]
    param_leaves = {name: p.detach().clone().requires_grad_(True) for name, p in params.items()}
    kwargs = {"return_gates": True} if return_gates else {}
    outputs = torch.func.functional_call(cell, param_leaves, (leaves[0], (leaves[1], leaves[2])), kwargs)
    if return_gates:
        h1, c1, gates = outputs
        outputs = (h1, c1, *gates)
    used = [(out, grad) for out, grad in zip(outputs, upstream) if grad is not None]
    wrt = leaves + list(param_leaves.values())
    grads = torch.autograd.grad(
        [out for out, _ in used], wrt, [grad for _, grad in used], allow_unused=True
    )
    grads = [torch.zeros_like(w) if g is None else g for w, g in zip(wrt, grads)]
    return [out.detach() for out in outputs], grads


def upstream_grads(batch, hidden_size, dtype, which):
    def r():
        return torch.randn(batch, hidden_size, device=DEVICE, dtype=dtype)

    if which == "h_and_c":
        return [r(), r()]
    if which == "h_only":
        return [r(), None]
    if which == "c_only":
        return [None, r()]
    if which == "gates":
        return [r(), r(), r(), None, r(), r()]
    raise ValueError(which)


GRAD_NAMES = ["input", "hx", "cx", "weight_ih", "weight_hh", "bias_ih", "bias_hh"]


def check_parity(batch, input_size, hidden_size, bias, dtype, which="h_and_c", non_contiguous=False):
    torch_cell, fused_cell = make_cells(input_size, hidden_size, bias, dtype)
    ref_cell = reference.LSTMCell(input_size, hidden_size, bias=bias, device=DEVICE, dtype=dtype)
    params = dict(torch_cell.named_parameters())
    x, h0, c0 = random_inputs(batch, input_size, hidden_size, dtype, non_contiguous)
    upstream = upstream_grads(batch, hidden_size, dtype, which)
    with_gates = which == "gates"
    tolerance = TOLERANCE[dtype]

    fused_out, fused_grads = run_step(fused_cell, params, x, h0, c0, upstream, with_gates)
    ref_out, ref_grads = run_step(ref_cell, params, x, h0, c0, upstream, with_gates)
    baselines = [("reference", ref_out, ref_grads)]
    if not with_gates:
        torch_out, torch_grads = run_step(torch_cell, params, x, h0, c0, upstream)
        baselines.append(("nn.LSTMCell", torch_out, torch_grads))
    output_names = ["h_1", "c_1", "gate i", "gate f", "gate g", "gate o"]
    for baseline, outs, grads in baselines:
        for name, actual, expected in zip(output_names, fused_out, outs):
            assert actual.dtype == expected.dtype
            assert_close(actual, expected, tolerance, f"{name} vs {baseline}")
        for name, actual, expected in zip(GRAD_NAMES, fused_grads, grads):
            assert_close(actual, expected, tolerance, f"grad of {name} vs {baseline}")


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("input_size", INPUT_SIZES)
@pytest.mark.parametrize("hidden_size", HIDDEN_SIZES)
@pytest.mark.parametrize("batch", BATCHES)
def test_float32_parity(batch, hidden_size, input_size, bias):
    check_parity(batch, input_size, hidden_size, bias, torch.float32)


@pytest.mark.parametrize("which", ["h_only", "c_only", "gates"])
@pytest.mark.parametrize("batch,input_size,hidden_size", [(1, 128, 300), (3, 7, 64), (257, 7, 5)])
def test_float32_partial_and_gate_gradients(batch, input_size, hidden_size, which):
    # Each presence pattern of grad_hy / grad_cy / grad_gates is a separate kernel instantiation.
    check_parity(batch, input_size, hidden_size, True, torch.float32, which)


@pytest.mark.parametrize("batch,input_size,hidden_size", [(1, 7, 5), (3, 128, 300), (64, 128, 64), (257, 7, 1024)])
def test_float32_non_contiguous(batch, input_size, hidden_size):
    check_parity(batch, input_size, hidden_size, True, torch.float32, non_contiguous=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("batch,input_size,hidden_size", [(1, 4096, 5), (2, 2048, 8), (4, 1000, 3), (16, 3000, 2)])
def test_long_input_small_hidden(batch, input_size, hidden_size, dtype):
    # Few hidden units and a long K: the fused kernel splits each unit's K range over up to 8 warps
    # of its block and adds their partial sums (the other shapes reach at most 4 warps per unit).
    check_parity(batch, input_size, hidden_size, True, dtype)


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize(
    "batch,input_size,hidden_size",
    [(1, 128, 1024), (1, 0, 1), (3, 7, 5), (3, 128, 300), (5, 7, 64), (64, 128, 300), (257, 7, 64)],
)
def test_float64_parity(batch, input_size, hidden_size, bias):
    check_parity(batch, input_size, hidden_size, bias, torch.float64)


def test_misaligned_tensors_take_the_scalar_path():
    # Sizes that allow 16-byte loads, on storage offset by one element: the kernel must notice the
    # misaligned pointers and fall back to scalar loads rather than fault or read wrong data.
    batch, input_size, hidden_size = 3, 128, 64

    def misaligned(*shape):
        return torch.randn(torch.Size(shape).numel() + 1, device=DEVICE)[1:].view(*shape)

    x, h0, c0 = misaligned(batch, input_size), misaligned(batch, hidden_size), misaligned(batch, hidden_size)
    w_ih, w_hh = misaligned(4 * hidden_size, input_size), misaligned(4 * hidden_size, hidden_size)
    b_ih, b_hh = misaligned(4 * hidden_size), misaligned(4 * hidden_size)
    assert x.data_ptr() % 16 != 0 and w_hh.data_ptr() % 16 != 0
    h1, c1 = lstm_fused.lstm_cell(x, (h0, c0), w_ih, w_hh, b_ih, b_hh)
    expected_h1, expected_c1 = torch.lstm_cell(x, (h0, c0), w_ih, w_hh, b_ih, b_hh)
    assert_close(h1, expected_h1, 1e-5, "h_1")
    assert_close(c1, expected_c1, 1e-5, "c_1")


REDUCED_SHAPES = [(1, 128, 1024), (3, 7, 300), (16, 0, 5), (32, 128, 64), (64, 128, 64), (257, 7, 300)]


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("batch,input_size,hidden_size", REDUCED_SHAPES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_reduced_precision_against_float64(dtype, batch, input_size, hidden_size, bias):
    _, fused_cell = make_cells(input_size, hidden_size, bias, dtype)
    ref_cell = reference.LSTMCell(input_size, hidden_size, bias=bias, device=DEVICE, dtype=torch.float64)
    params = dict(fused_cell.named_parameters())
    params64 = {name: p.detach().double() for name, p in params.items()}
    x, h0, c0 = random_inputs(batch, input_size, hidden_size, dtype)
    upstream = upstream_grads(batch, hidden_size, dtype, "gates")
    fused_out, fused_grads = run_step(fused_cell, params, x, h0, c0, upstream, return_gates=True)
    ref_out, ref_grads = run_step(
        ref_cell, params64, x.double(), h0.double(), c0.double(),
        [None if g is None else g.double() for g in upstream], return_gates=True,
    )
    tolerance = TOLERANCE[dtype]
    for name, actual, expected in zip(["h_1", "c_1", "gate i", "gate f", "gate g", "gate o"], fused_out, ref_out):
        assert actual.dtype == dtype
        assert_close(actual, expected, tolerance, name)
    for name, actual, expected in zip(GRAD_NAMES, fused_grads, ref_grads):
        assert actual.dtype == dtype
        assert_close(actual, expected, tolerance, f"grad of {name}")


@pytest.mark.parametrize("batch,input_size,hidden_size", [(0, 7, 5), (3, 7, 0), (3, 0, 5), (0, 0, 0)])
def test_zero_sizes(batch, input_size, hidden_size):
    torch_cell, fused_cell = make_cells(input_size, hidden_size, True, torch.float32)
    x, h0, c0 = random_inputs(batch, input_size, hidden_size, torch.float32)
    params = dict(torch_cell.named_parameters())
    upstream = upstream_grads(batch, hidden_size, torch.float32, "h_and_c")
    fused_out, fused_grads = run_step(fused_cell, params, x, h0, c0, upstream)
    torch_out, torch_grads = run_step(torch_cell, params, x, h0, c0, upstream)
    for actual, expected in zip(fused_out + fused_grads, torch_out + torch_grads):
        assert_close(actual, expected, 1e-5, "zero-size step")


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("batch,hidden_size", [(1, 1), (3, 5), (64, 300), (257, 1024)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_cell_pointwise_op(dtype, batch, hidden_size, bias):
    preactivation = torch.randn(batch, 4 * hidden_size, device=DEVICE, dtype=dtype)
    cx = torch.randn(batch, hidden_size, device=DEVICE, dtype=dtype)
    bias_tensor = torch.randn(4 * hidden_size, device=DEVICE, dtype=dtype) if bias else None
    gates = preactivation.clone()
    hy = torch.full((batch, hidden_size), float("nan"), device=DEVICE, dtype=dtype)
    cy = torch.full_like(hy, float("nan"))
    ops.cell_pointwise_(gates, cx, bias_tensor, hy, cy)

    z = preactivation.double() + (bias_tensor.double() if bias else 0)
    i, f, g, o = z.chunk(4, dim=1)
    i, f, g, o = i.sigmoid(), f.sigmoid(), g.tanh(), o.sigmoid()
    expected_cy = f * cx.double() + i * g
    expected_hy = o * expected_cy.tanh()
    # Reduced precision: rounding of the inputs and outputs only (the math runs in fp32).
    tolerance = {torch.float32: 1e-6, torch.float64: 1e-14, torch.float16: 2e-3, torch.bfloat16: 2e-2}[dtype]
    assert_close(gates, torch.cat((i, f, g, o), dim=1), tolerance, "activated gates")
    assert_close(cy, expected_cy, tolerance, "cy")
    assert_close(hy, expected_hy, tolerance, "hy")


@pytest.mark.parametrize("present", list(itertools.product([False, True], repeat=3)),
                         ids=lambda p: "".join("hcg"[k] if on else "-" for k, on in enumerate(p)))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_cell_gate_grads_op_matches_cpu(dtype, present):
    # All 8 presence patterns of (grad_hy, grad_cy, grad_gates), against the CPU kernel of the same
    # op (itself checked against autograd by the CPU tests): the same math, so float64 agrees to
    # rounding.
    batch, hidden_size = 33, 300
    gates = torch.rand(batch, 4 * hidden_size, device=DEVICE, dtype=dtype)
    gates[:, 2 * hidden_size : 3 * hidden_size] = gates[:, 2 * hidden_size : 3 * hidden_size] * 2 - 1
    cx = torch.randn(batch, hidden_size, device=DEVICE, dtype=dtype)
    cy = torch.randn(batch, hidden_size, device=DEVICE, dtype=dtype)
    grad_hy, grad_cy, grad_gates = (
        torch.randn(*shape, device=DEVICE, dtype=dtype) if on else None
        for on, shape in zip(present, [(batch, hidden_size), (batch, hidden_size), (batch, 4 * hidden_size)])
    )
    on_cpu = [None if t is None else t.cpu() for t in (grad_hy, grad_cy, grad_gates, cx, cy, gates)]
    grad_pre, grad_cx = ops.cell_gate_grads(grad_hy, grad_cy, grad_gates, cx, cy, gates)
    expected_pre, expected_cx = ops.cell_gate_grads(*on_cpu)
    assert grad_pre.device.type == grad_cx.device.type == DEVICE
    tolerance = 1e-14 if dtype == torch.float64 else 1e-6
    assert_close(grad_pre.cpu(), expected_pre, tolerance, "grad_preactivation")
    assert_close(grad_cx.cpu(), expected_cx, tolerance, "grad_cx")


GRADCHECK_SHAPES = [(3, 4, 5), (1, 0, 3), (2, 3, 8), (5, 6, 1)]


def float64_step_args(batch, input_size, hidden_size):
    x, h0, c0 = random_inputs(batch, input_size, hidden_size, torch.float64)
    w_ih = torch.randn(4 * hidden_size, input_size, device=DEVICE, dtype=torch.float64) * 0.5
    w_hh = torch.randn(4 * hidden_size, hidden_size, device=DEVICE, dtype=torch.float64) * 0.5
    b_ih = torch.randn(4 * hidden_size, device=DEVICE, dtype=torch.float64)
    b_hh = torch.randn(4 * hidden_size, device=DEVICE, dtype=torch.float64)
    return x, h0, c0, w_ih, w_hh, b_ih, b_hh


def step_function(cell_fn, return_gates):
    def step(x, h0, c0, w_ih, w_hh, b_ih, b_hh):
        out = cell_fn(x, (h0, c0), w_ih, w_hh, b_ih, b_hh, return_gates=return_gates)
        return (out[0], out[1], *out[2]) if return_gates else out

    return step


@pytest.mark.parametrize("return_gates", [False, True], ids=["states", "with_gates"])
@pytest.mark.parametrize("batch,input_size,hidden_size", GRADCHECK_SHAPES)
def test_gradcheck_float64(batch, input_size, hidden_size, return_gates):
    inputs = [t.requires_grad_(True) for t in float64_step_args(batch, input_size, hidden_size)]
    # Central differences with eps 1e-6 are themselves only good to ~1e-9 here (measured with the
    # CPU kernel, same float64 math); the exact 1e-10 comparison is the Jacobian test below.
    assert torch.autograd.gradcheck(
        step_function(lstm_fused.lstm_cell, return_gates), inputs, eps=1e-6, atol=1e-8, rtol=1e-6
    )


@pytest.mark.parametrize("return_gates", [False, True], ids=["states", "with_gates"])
@pytest.mark.parametrize("batch,input_size,hidden_size", GRADCHECK_SHAPES)
def test_jacobian_matches_reference_float64(batch, input_size, hidden_size, return_gates):
    # The hand-written backward's full Jacobian against autograd through the pure-Python cell:
    # no finite differences, so the agreement is to rounding (~1e-15 measured on the CPU).
    args = float64_step_args(batch, input_size, hidden_size)
    fused = torch.autograd.functional.jacobian(step_function(lstm_fused.lstm_cell, return_gates), args)
    expected = torch.autograd.functional.jacobian(step_function(reference.lstm_cell, return_gates), args)
    for output_index, (fused_row, expected_row) in enumerate(zip(fused, expected)):
        for input_index, (actual, wanted) in enumerate(zip(fused_row, expected_row)):
            assert actual.shape == wanted.shape
            assert torch.allclose(actual, wanted, rtol=0, atol=1e-10), (
                f"d output {output_index} / d input {input_index}: max difference "
                f"{(actual - wanted).abs().max().item():.2e}"
            )


@pytest.mark.parametrize("batch,input_size,hidden_size", [(2, 3, 4), (3, 0, 2)])
def test_gradgradcheck_float64(batch, input_size, hidden_size):
    x, h0, c0 = random_inputs(batch, input_size, hidden_size, torch.float64)
    w_ih = torch.randn(4 * hidden_size, input_size, device=DEVICE, dtype=torch.float64) * 0.5
    w_hh = torch.randn(4 * hidden_size, hidden_size, device=DEVICE, dtype=torch.float64) * 0.5
    b_ih = torch.randn(4 * hidden_size, device=DEVICE, dtype=torch.float64)
    inputs = [t.requires_grad_(True) for t in (x, h0, c0, w_ih, w_hh, b_ih)]

    def step(x, h0, c0, w_ih, w_hh, b_ih):
        return lstm_fused.lstm_cell(x, (h0, c0), w_ih, w_hh, b_ih, None)

    # Finite differences of the backward: good to ~1e-9 (measured on the CPU), hence 1e-8.
    assert torch.autograd.gradgradcheck(step, inputs, eps=1e-6, atol=1e-8, rtol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("batch", [3, 257])
def test_autocast_matches_nn_lstmcell(dtype, batch):
    torch_cell, fused_cell = make_cells(128, 64, True, torch.float32)
    x, h0, c0 = random_inputs(batch, 128, 64, torch.float32)
    with torch.autocast("cuda", dtype=dtype):
        h1, c1 = fused_cell(x, (h0, c0))
        expected_h1, expected_c1 = torch_cell(x, (h0, c0))
    assert (h1.dtype, c1.dtype) == (expected_h1.dtype, expected_c1.dtype)
    assert h1.dtype == dtype
    assert_close(h1, expected_h1, TOLERANCE[dtype], "h_1 under autocast")
    assert_close(c1, expected_c1, TOLERANCE[dtype], "c_1 under autocast")
    (h1.float().sum() + c1.float().sum()).backward()
    (expected_h1.float().sum() + expected_c1.float().sum()).backward()
    for (name, p), q in zip(fused_cell.named_parameters(), torch_cell.parameters()):
        assert p.grad.dtype == q.grad.dtype == torch.float32, name
        assert_close(p.grad, q.grad, TOLERANCE[dtype], f"grad of {name} under autocast")


# (argument index in cell_forward, the name the error must give when that argument is on the CPU)
FORWARD_ARGS = [
    (0, r"input is on cpu"),
    (1, r"hx \(h_0\) is on device cpu"),
    (2, r"cx \(c_0\) is on device cpu"),
    (3, r"weight_ih is on device cpu"),
    (4, r"weight_hh is on device cpu"),
    (5, r"bias_ih is on device cpu"),
    (6, r"bias_hh is on device cpu"),
]


@pytest.mark.parametrize("index,message", FORWARD_ARGS, ids=[m.split(" ")[0] for _, m in FORWARD_ARGS])
def test_device_mismatch_names_the_argument(index, message):
    _, fused_cell = make_cells(7, 5, True, torch.float32)
    x, h0, c0 = random_inputs(3, 7, 5, torch.float32)
    args = [x, h0, c0, fused_cell.weight_ih, fused_cell.weight_hh, fused_cell.bias_ih, fused_cell.bias_hh]
    args[index] = args[index].detach().cpu()
    with pytest.raises(RuntimeError, match=message):
        ops.cell_forward(*args)
    with pytest.raises(RuntimeError, match="device"):
        lstm_fused.lstm_cell(args[0], (args[1], args[2]), *args[3:])


def test_module_on_gpu_with_cpu_input_raises():
    _, fused_cell = make_cells(7, 5, True, torch.float32)
    with pytest.raises(RuntimeError, match=r"weight_ih is on device cuda:\d+ but input is on cpu"):
        fused_cell(torch.randn(3, 7))


def test_pointwise_and_gate_grads_device_mismatch():
    gates = torch.randn(3, 20, device=DEVICE)
    cx = torch.randn(3, 5)
    hy, cy = torch.empty(3, 5, device=DEVICE), torch.empty(3, 5, device=DEVICE)
    with pytest.raises(RuntimeError, match=re.escape("cx is on device cpu but gates is on cuda")):
        ops.cell_pointwise_(gates, cx, None, hy, cy)
    with pytest.raises(RuntimeError, match=re.escape("gates is on device cuda")):
        ops.cell_gate_grads(None, None, None, cx, cx, gates)


def test_dtype_and_shape_errors_on_cuda():
    _, fused_cell = make_cells(7, 5, True, torch.float32)
    x, h0, c0 = random_inputs(3, 7, 5, torch.float32)
    with pytest.raises(RuntimeError, match=r"hx \(h_0\) has dtype Double but input has dtype Float"):
        fused_cell(x, (h0.double(), c0))
    with pytest.raises(RuntimeError, match=r"hx \(h_0\) has inconsistent hidden_size"):
        fused_cell(x, (torch.randn(3, 6, device=DEVICE), c0))
    with pytest.raises(RuntimeError, match=r"input has inconsistent input_size"):
        fused_cell(torch.randn(3, 8, device=DEVICE), (h0, c0))


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
@pytest.mark.parametrize("batch", [3, 257])
def test_second_gpu(batch):
    # The current device stays cuda:0: without the kernels' device guard they would launch on
    # cuda:0's stream with cuda:1's pointers.
    assert torch.cuda.current_device() == 0
    torch_cell = nn.LSTMCell(128, 300, device="cuda:1")
    fused_cell = lstm_fused.LSTMCell(128, 300, device="cuda:1")
    fused_cell.load_state_dict(torch_cell.state_dict())
    x = torch.randn(batch, 128, device="cuda:1")
    h0, c0 = torch.randn(batch, 300, device="cuda:1"), torch.randn(batch, 300, device="cuda:1")
    h1, c1 = fused_cell(x, (h0, c0))
    expected_h1, expected_c1 = torch_cell(x, (h0, c0))
    assert h1.device == torch.device("cuda:1")
    assert_close(h1, expected_h1, 1e-5, "h_1 on cuda:1")
    assert_close(c1, expected_c1, 1e-5, "c_1 on cuda:1")
    (h1.sum() + c1.sum()).backward()
    (expected_h1.sum() + expected_c1.sum()).backward()
    for p, q in zip(fused_cell.parameters(), torch_cell.parameters()):
        assert_close(p.grad, q.grad, 1e-5, "parameter gradient on cuda:1")
    torch.cuda.synchronize("cuda:1")
    assert torch.cuda.current_device() == 0


def test_runs_on_a_side_stream():
    # Kernels must use the current stream: results computed on a side stream and read after
    # synchronising with it are correct.
    torch_cell, fused_cell = make_cells(128, 300, True, torch.float32)
    x, h0, c0 = random_inputs(3, 128, 300, torch.float32)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        h1, c1 = fused_cell(x, (h0, c0))
    torch.cuda.current_stream().wait_stream(stream)
    expected_h1, expected_c1 = torch_cell(x, (h0, c0))
    assert_close(h1, expected_h1, 1e-5, "h_1 from a side stream")
    assert_close(c1, expected_c1, 1e-5, "c_1 from a side stream")


@pytest.mark.parametrize("batch", [3, 257])
def test_opcheck_cell_forward(batch):
    _, fused_cell = make_cells(7, 5, True, torch.float32)
    x, h0, c0 = random_inputs(batch, 7, 5, torch.float32)
    args = (x.requires_grad_(), h0, c0, fused_cell.weight_ih, fused_cell.weight_hh, fused_cell.bias_ih, None)
    torch.library.opcheck(ops.cell_forward, args)


def test_opcheck_cell_pointwise():
    gates = torch.randn(3, 20, device=DEVICE)
    cx = torch.randn(3, 5, device=DEVICE)
    args = (gates, cx, torch.randn(20, device=DEVICE), torch.empty(3, 5, device=DEVICE), torch.empty(3, 5, device=DEVICE))
    torch.library.opcheck(ops.cell_pointwise_, args)


def test_opcheck_cell_gate_grads():
    cx, cy = torch.randn(3, 5, device=DEVICE), torch.randn(3, 5, device=DEVICE)
    gates = torch.rand(3, 20, device=DEVICE)
    torch.library.opcheck(ops.cell_gate_grads, (torch.randn(3, 5, device=DEVICE), None, None, cx, cy, gates))
    torch.library.opcheck(ops.cell_gate_grads, (None, cy.clone(), torch.randn(3, 20, device=DEVICE), cx, cy, gates))


def free_gpu_bytes():
    free, _ = torch.cuda.mem_get_info()
    return free


@pytest.mark.skipif(not torch.cuda.is_available() or free_gpu_bytes() < 30 * 2**30, reason="needs a CUDA GPU with 30 GiB free")
def test_pointwise_kernels_beyond_32_bit_indices():
    # [batch, 4 * hidden] with more than 2^31 elements: an int32 offset would wrap in the last rows.
    dtype, hidden_size = torch.float16, 2048
    batch = 2**31 // (4 * hidden_size) + 3
    gates = torch.randn(batch, 4 * hidden_size, device=DEVICE, dtype=dtype)
    tail = slice(batch - 4, batch)
    preactivation_tail = gates[tail].clone()
    cx = torch.randn(batch, hidden_size, device=DEVICE, dtype=dtype)
    hy, cy = torch.empty_like(cx), torch.empty_like(cx)
    ops.cell_pointwise_(gates, cx, None, hy, cy)
    i, f, g, o = preactivation_tail.double().chunk(4, dim=1)
    expected_cy = f.sigmoid() * cx[tail].double() + i.sigmoid() * g.tanh()
    assert_close(cy[tail], expected_cy, 2e-3, "cy in rows past 2^31 gate elements")
    assert_close(hy[tail], o.sigmoid() * expected_cy.tanh(), 2e-3, "hy in rows past 2^31 gate elements")
    grad_hy = torch.randn_like(cx)
    grad_pre, grad_cx = ops.cell_gate_grads(grad_hy, None, None, cx, cy, gates)
    expected_pre, expected_cx = ops.cell_gate_grads(
        grad_hy[tail].cpu().float(), None, None, cx[tail].cpu().float(), cy[tail].cpu().float(), gates[tail].cpu().float()
    )
    assert_close(grad_pre[tail].cpu(), expected_pre, 2e-3, "grad_preactivation past 2^31")
    assert_close(grad_cx[tail].cpu(), expected_cx, 2e-3, "grad_cx past 2^31")


@pytest.mark.skipif(not torch.cuda.is_available() or free_gpu_bytes() < 20 * 2**30, reason="needs a CUDA GPU with 20 GiB free")
def test_fused_forward_weight_beyond_32_bit_offsets():
    # weight_ih [4H, I] with more than 2^31 elements, batch 1 (the fused path): row offsets of the
    # last gate rows exceed int32.
    dtype, hidden_size = torch.float16, 2048
    input_size = 2**31 // (4 * hidden_size) + 64
    weight_ih = torch.randn(4 * hidden_size, input_size, device=DEVICE, dtype=dtype) * input_size**-0.5
    weight_hh = torch.randn(4 * hidden_size, hidden_size, device=DEVICE, dtype=dtype) * hidden_size**-0.5
    x = torch.randn(1, input_size, device=DEVICE, dtype=dtype)
    h0, c0 = torch.randn(1, hidden_size, device=DEVICE, dtype=dtype), torch.randn(1, hidden_size, device=DEVICE, dtype=dtype)
    h1, c1, gates = ops.cell_forward(x, h0, c0, weight_ih, weight_hh, None, None)
    # float32 products, a quarter of the rows at a time to bound the memory.
    preactivation = torch.cat(
        [x.float() @ rows.float().T for rows in weight_ih.chunk(4)], dim=1
    ) + h0.float() @ weight_hh.float().T
    i, f, g, o = preactivation.double().chunk(4, dim=1)
    expected_c1 = f.sigmoid() * c0.double() + i.sigmoid() * g.tanh()
    assert_close(c1, expected_c1, 1e-2, "c_1 with a >2^31-element weight")
    assert_close(h1, o.sigmoid() * expected_c1.tanh(), 1e-2, "h_1 with a >2^31-element weight")
    assert_close(gates[:, 3 * hidden_size :], o.sigmoid(), 1e-2, "output gate with a >2^31-element weight")


@pytest.mark.parametrize("batch", [8, 9, 64, 65])
def test_tf32_allowed_on_both_sides_of_the_path_boundary(batch):
    # With TF32 allowed the float32 path switches to cuBLAS (tensor cores) above batch 8
    # (cell_kernels.cuh, use_fused_forward): both sides must agree with nn.LSTMCell under the same
    # setting, to TF32's rounding (10-bit mantissa products).
    torch_cell, fused_cell = make_cells(256, 512, True, torch.float32)
    x, h0, c0 = random_inputs(batch, 256, 512, torch.float32)
    torch.backends.cuda.matmul.allow_tf32 = True
    h1, c1 = fused_cell(x, (h0, c0))
    expected_h1, expected_c1 = torch_cell(x, (h0, c0))
    assert_close(h1, expected_h1, 5e-3, "h_1 with TF32 allowed")
    assert_close(c1, expected_c1, 5e-3, "c_1 with TF32 allowed")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("batch", [5, 8, 16, 17, 33])
def test_batch_tiles_on_the_gpu(dtype, batch):
    # The tiles of 8 and 16 rows and their tails (the emulated tests run the same on the CPU).
    if dtype == torch.float32:
        check_parity(batch, 128, 300, True, dtype)
    else:
        _, fused_cell = make_cells(128, 512, True, dtype)
        x, h0, c0 = random_inputs(batch, 128, 512, dtype)
        params64 = [p.detach().double() for p in fused_cell.parameters()]
        h1, c1 = fused_cell(x, (h0, c0))
        expected_h1, expected_c1 = reference.lstm_cell(x.double(), (h0.double(), c0.double()), *params64)
        assert_close(h1, expected_h1, TOLERANCE[dtype], "h_1")
        assert_close(c1, expected_c1, TOLERANCE[dtype], "c_1")


# lf.LSTM on CUDA: its sequence ops (csrc/cuda/sequence.cu) run the persistent kernels on padded
# batches whose weights fit in shared memory, the device-independent loop otherwise. The emulated
# tests cover the choice and both paths on the CPU; these confirm them on the GPU.
# (steps, batch, input, hidden, bidirectional): persistent shapes (hidden 33: a partial block of
# units; 768: FlashRNN's condition, tensor cores for bfloat16), and hidden 4096, whose slices of W_hh
# do not fit in shared memory (the loop).
LSTM_SHAPES = [(5, 3, 7, 33, True), (4, 16, 768, 768, False), (3, 2, 16, 4096, False), (6, 64, 32, 128, True)]


def persistent_kernel_ran(run):
    """Whether `run` launched a persistent sequence kernel, from the profiler's kernel names; None
    where the profiler records no CUDA kernels (no CUPTI)."""
    from torch.profiler import ProfilerActivity, profile

    try:
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            run()
            torch.cuda.synchronize()
    except (AssertionError, RuntimeError):  # no CUDA activity to profile
        return None
    names = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    if not names:
        return None
    return any("persistent" in name for name in names)


@pytest.mark.parametrize("steps,batch,input_size,hidden_size,bidirectional", LSTM_SHAPES, ids=lambda v: str(v))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=["fp64", "fp32", "bf16"])
def test_lstm_on_cuda_against_nn_lstm(dtype, steps, batch, input_size, hidden_size, bidirectional):
    # Values and every gradient of lf.LSTM against nn.LSTM in float64 holding the same (rounded) weights.
    fused = lstm_fused.LSTM(input_size, hidden_size, bidirectional=bidirectional, device=DEVICE, dtype=dtype)
    reference_lstm = nn.LSTM(input_size, hidden_size, bidirectional=bidirectional, device=DEVICE, dtype=torch.float64)
    with torch.no_grad():
        for p, q in zip(reference_lstm.parameters(), fused.parameters()):
            p.copy_(q.double())
    directions = 2 if bidirectional else 1
    x = torch.randn(steps, batch, input_size, device=DEVICE, dtype=dtype, requires_grad=True)
    h0 = torch.randn(directions, batch, hidden_size, device=DEVICE, dtype=dtype, requires_grad=True)
    c0 = torch.randn(directions, batch, hidden_size, device=DEVICE, dtype=dtype, requires_grad=True)
    output, (hn, cn) = fused(x, (h0, c0))
    leaves = [t.detach().double().requires_grad_() for t in (x, h0, c0)]
    expected, (expected_h, expected_c) = reference_lstm(leaves[0], (leaves[1], leaves[2]))
    tolerance = {torch.float64: 1e-10, torch.float32: 1e-4, torch.bfloat16: 5e-2}[dtype]
    assert_close(output, expected, tolerance, "output")
    assert_close(hn, expected_h, tolerance, "h_n")
    assert_close(cn, expected_c, tolerance, "c_n")
    upstream = [torch.randn_like(t) for t in (output, hn, cn)]
    grads = torch.autograd.grad((output, hn, cn), [x, h0, c0, *fused.parameters()], upstream)
    expected_grads = torch.autograd.grad(
        (expected, expected_h, expected_c), leaves + list(reference_lstm.parameters()), [u.double() for u in upstream]
    )
    names = ["input", "h_0", "c_0"] + [name for name, _ in fused.named_parameters()]
    grad_tolerance = {torch.float64: 1e-10, torch.float32: 1e-3, torch.bfloat16: 1e-1}[dtype]
    for name, actual, wanted in zip(names, grads, expected_grads):
        assert_close(actual, wanted, grad_tolerance, f"grad of {name}")


@pytest.mark.parametrize("steps,batch,input_size,hidden_size,bidirectional", LSTM_SHAPES, ids=lambda v: str(v))
def test_lstm_on_cuda_runs_the_persistent_kernel_where_it_fits(steps, batch, input_size, hidden_size, bidirectional):
    fused = lstm_fused.LSTM(input_size, hidden_size, bidirectional=bidirectional, device=DEVICE)
    x = torch.randn(steps, batch, input_size, device=DEVICE)
    ran = persistent_kernel_ran(lambda: fused(x))
    if ran is None:
        pytest.skip("the profiler records no CUDA kernels here")
    assert ran == (hidden_size != 4096)


def test_packed_sequences_on_cuda_take_the_loop_and_match_nn_lstm():
    lengths = [7, 4, 4, 1]
    fused = lstm_fused.LSTM(5, 24, device=DEVICE, dtype=torch.float64)
    reference_lstm = nn.LSTM(5, 24, device=DEVICE, dtype=torch.float64)
    reference_lstm.load_state_dict(fused.state_dict())
    packed = nn.utils.rnn.pack_sequence([torch.randn(n, 5, device=DEVICE, dtype=torch.float64) for n in lengths])
    output, (hn, cn) = fused(packed)
    expected, (expected_h, expected_c) = reference_lstm(packed)
    assert_close(output.data, expected.data, 1e-12, "output")
    assert_close(hn, expected_h, 1e-12, "h_n")
    assert_close(cn, expected_c, 1e-12, "c_n")
    assert persistent_kernel_ran(lambda: fused(packed)) in (None, False)


def test_lstm_on_cuda_with_tf32_allowed_takes_the_tensor_cores():
    # float32 with torch.backends.cuda.matmul.allow_tf32: the persistent kernel's recurrent product
    # on TF32 fragments (exact FFMA otherwise, as every other test here runs), within TF32 rounding.
    fused = lstm_fused.LSTM(64, 256, device=DEVICE)
    reference_lstm = nn.LSTM(64, 256, device=DEVICE, dtype=torch.float64)
    with torch.no_grad():
        for p, q in zip(reference_lstm.parameters(), fused.parameters()):
            p.copy_(q.double())
    x = torch.randn(16, 8, 64, device=DEVICE)
    torch.backends.cuda.matmul.allow_tf32 = True  # the autouse fixture restores it
    output, (hn, cn) = fused(x)
    with torch.no_grad():
        expected, (expected_h, expected_c) = reference_lstm(x.double())
    assert_close(output, expected, 5e-3, "output")
    assert_close(hn, expected_h, 5e-3, "h_n")
    assert persistent_kernel_ran(lambda: fused(x)) in (None, True)

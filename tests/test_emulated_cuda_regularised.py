"""The regularised LSTM step's CUDA kernels (csrc/cuda/regularised_kernels.cuh: layer norm and
zoneout, forward and backward; issue 16) run on the CPU under the CUDA emulation of
tests/emulated_cuda/, against the CPU kernels of the same ops (torch.ops.lstm_fused.
regularised_pointwise_ / regularised_gate_grads_ on CPU tensors) and a float64 reference.

Every option alone and combined (layer norm; zoneout in training with masks and in evaluation with
probabilities; a bias or none; incoming gradients of the activated gates or none), batch 1..70 and
hidden 1..257 (one warp a row with up to 8 rows a block and inactive rows; several warps a row; more
units than threads), every dtype the kernels take. Outputs are NaN-poisoned before the kernels run.
Recurrent dropout acts before the step's products, so the step kernels never see it: the sequence
test below runs the library loop's step order with the emulated kernels and a recurrent dropout
mask against lf's CPU sequence op. The real-GPU tests at the end skip without a GPU.
"""

import pytest
import torch

import lstm_fused as lf

pytestmark = pytest.mark.emulated_cuda


# Relative error (max |error| / max |expected|) against float64 from the same rounded inputs.
# float64 against the CPU's float64 kernel differs only by the order of the row sums.
TOLERANCE = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}


def relative_error(actual, expected):
    actual, expected = actual.double(), expected.double()
    assert actual.shape == expected.shape, f"shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    if expected.numel() == 0:
        return 0.0
    assert torch.isfinite(actual).all(), "non-finite values: an element the kernel did not write?"
    return ((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-30)).item()


def nonzero_randn(*shape, scale=1.0, shift=0.0):
    t = torch.randn(*shape, dtype=torch.float64) * scale + shift
    return torch.where(t == 0, torch.full_like(t, 0.5), t)


def poisoned(*shape, dtype):
    return torch.full(shape, float("nan"), dtype=dtype)


OPTIONS = {
    "plain": dict(layer_norm=False, zoneout=None),
    "layer_norm": dict(layer_norm=True, zoneout=None),
    "zoneout_train": dict(layer_norm=False, zoneout="train"),
    "zoneout_eval": dict(layer_norm=False, zoneout="eval"),
    "layer_norm+zoneout_train": dict(layer_norm=True, zoneout="train"),
    "layer_norm+zoneout_eval": dict(layer_norm=True, zoneout="eval"),
}

# (batch, hidden): hidden 1 (one unit, 31 idle lanes), 20 with 3 and 9 rows (several rows a block,
# 9: a second block of one live row and seven idle), 32/33 (a warp's tail), 100 (4 warps a row, 2
# rows a block), 130 (5 warps), 257 (8 warps a row, the 257th unit a thread's second), batch 70.
SIZES = [(1, 1), (3, 20), (9, 20), (2, 32), (70, 33), (5, 100), (4, 130), (70, 130), (3, 257)]


def step_args(batch, hidden, layer_norm, zoneout, bias=True):
    """float64 arguments of one step, as regularised_sequence_forward's loop passes them."""
    width = 4 * hidden
    args = dict(
        input_part=nonzero_randn(batch, width, scale=1.5, shift=0.3),
        hidden_part=nonzero_randn(batch, width, scale=0.7, shift=-0.2),
        bias=nonzero_randn(width, scale=0.3) if bias else None,
        hx=nonzero_randn(batch, hidden),
        cx=nonzero_randn(batch, hidden),
        layer_norm_ih=None, layer_norm_hh=None, layer_norm_cell_weight=None, layer_norm_cell_bias=None,
        zoneout_cell_mask=None, zoneout_hidden_mask=None, zoneout_cell=0.0, zoneout_hidden=0.0,
    )
    if layer_norm:
        args.update(
            layer_norm_ih=nonzero_randn(width, scale=0.2, shift=1.0),
            layer_norm_hh=nonzero_randn(width, scale=0.2, shift=1.0),
            layer_norm_cell_weight=nonzero_randn(hidden, scale=0.2, shift=1.0),
            layer_norm_cell_bias=nonzero_randn(hidden, scale=0.2),
        )
    if zoneout == "train":
        args.update(
            zoneout_cell_mask=torch.bernoulli(torch.full((batch, hidden), 0.3, dtype=torch.float64)),
            zoneout_hidden_mask=torch.bernoulli(torch.full((batch, hidden), 0.4, dtype=torch.float64)),
            zoneout_cell=0.3, zoneout_hidden=0.4,
        )
    elif zoneout == "eval":
        args.update(zoneout_cell=0.3, zoneout_hidden=0.15)
    return args


def cast(args, dtype):
    return {k: (v.to(dtype).contiguous() if isinstance(v, torch.Tensor) else v) for k, v in args.items()}


def run_forward(op, args, layer_norm):
    """One call of regularised_pointwise_ (the CPU op or the emulated kernels): its outputs."""
    a = dict(args)
    batch, width = a["input_part"].shape
    hidden, dtype = width // 4, a["input_part"].dtype
    input_part, hidden_part = a["input_part"].clone(), a["hidden_part"].clone()
    out = dict(
        gates=poisoned(batch, width, dtype=dtype),
        hy=poisoned(batch, hidden, dtype=dtype),
        cy=poisoned(batch, hidden, dtype=dtype),
        normalized_cell=poisoned(batch if layer_norm else 0, hidden, dtype=dtype),
        layer_norm_rstd=poisoned(batch if layer_norm else 0, 3, dtype=dtype),
    )
    op(
        input_part, hidden_part, a["bias"], a["layer_norm_ih"], a["layer_norm_hh"], a["layer_norm_cell_weight"],
        a["layer_norm_cell_bias"], a["hx"], a["cx"], a["zoneout_cell_mask"], a["zoneout_hidden_mask"],
        a["zoneout_cell"], a["zoneout_hidden"], out["gates"], out["hy"], out["cy"], out["normalized_cell"],
        out["layer_norm_rstd"],
    )
    if layer_norm:
        out.update(input_part=input_part, hidden_part=hidden_part)
    return out


def backward_args(args, forward, grad_gates):
    """The backward's inputs: the forward's saved tensors and random incoming gradients."""
    batch, hidden = args["hx"].shape
    dtype = args["hx"].dtype
    layer_norm = args["layer_norm_ih"] is not None
    empty = torch.empty(0, dtype=dtype)
    return dict(
        grad_hy=nonzero_randn(batch, hidden).to(dtype),
        grad_cy=nonzero_randn(batch, hidden).to(dtype),
        grad_gates=nonzero_randn(batch, 4 * hidden, scale=0.5).to(dtype) if grad_gates else None,
        gates=forward["gates"],
        input_part=forward["input_part"] if layer_norm else empty,
        hidden_part=forward["hidden_part"] if layer_norm else empty,
        normalized_cell=forward["normalized_cell"],
        layer_norm_rstd=forward["layer_norm_rstd"],
    )


def run_backward(op, args, grads):
    batch, hidden = args["hx"].shape
    dtype = args["hx"].dtype
    layer_norm = args["layer_norm_ih"] is not None
    rows = batch if layer_norm else 0
    grad_hy, grad_cy = grads["grad_hy"].clone(), grads["grad_cy"].clone()
    out = dict(
        grad_preactivation=poisoned(batch, 4 * hidden, dtype=dtype),
        grad_input_part=poisoned(rows, 4 * hidden, dtype=dtype),
        grad_hidden_part=poisoned(rows, 4 * hidden, dtype=dtype),
        grad_normalized_cell=poisoned(rows, hidden, dtype=dtype),
    )
    op(
        grad_hy, grad_cy, grads["grad_gates"], grads["gates"], args["cx"], args["layer_norm_ih"],
        args["layer_norm_hh"], args["layer_norm_cell_weight"], args["layer_norm_cell_bias"], grads["input_part"],
        grads["hidden_part"], grads["normalized_cell"], grads["layer_norm_rstd"], args["zoneout_cell_mask"],
        args["zoneout_hidden_mask"], args["zoneout_cell"], args["zoneout_hidden"], out["grad_preactivation"],
        out["grad_input_part"], out["grad_hidden_part"], out["grad_normalized_cell"],
    )
    out.update(grad_hy=grad_hy, grad_cy=grad_cy)
    return out


def assert_outputs_close(actual, expected, dtype, label):
    assert actual.keys() == expected.keys()
    tolerance = TOLERANCE[dtype]
    for name in expected:
        assert actual[name].dtype == dtype, f"{label}: {name} is {actual[name].dtype}"
        error = relative_error(actual[name], expected[name])
        assert error <= tolerance, f"{label}: {name} relative error {error:.2e} > {tolerance:.1e}"


def cpu_forward(args, layer_norm):
    return run_forward(torch.ops.lstm_fused.regularised_pointwise_, args, layer_norm)


@pytest.mark.parametrize("batch,hidden", SIZES, ids=lambda v: str(v))
@pytest.mark.parametrize("option", list(OPTIONS))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
def test_forward_matches_cpu_kernel(emu, dtype, option, batch, hidden):
    """float64: the emulated kernels against the CPU's float64 kernel; float32: against it too
    (from the same float32-rounded inputs)."""
    layer_norm = OPTIONS[option]["layer_norm"]
    args = step_args(batch, hidden, **OPTIONS[option], bias=(hidden % 2 == 0))
    actual = run_forward(emu.regularised_pointwise_, cast(args, dtype), layer_norm)
    expected = cpu_forward(cast(cast(args, dtype), torch.float64), layer_norm)
    assert_outputs_close(actual, expected, dtype, f"{dtype} {option} batch={batch} hidden={hidden}")


@pytest.mark.parametrize("grad_gates", [False, True], ids=["no_grad_gates", "grad_gates"])
@pytest.mark.parametrize("batch,hidden", SIZES, ids=lambda v: str(v))
@pytest.mark.parametrize("option", list(OPTIONS))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
def test_backward_matches_cpu_kernel(emu, dtype, option, batch, hidden, grad_gates):
    layer_norm = OPTIONS[option]["layer_norm"]
    args = cast(step_args(batch, hidden, **OPTIONS[option]), dtype)
    grads = backward_args(args, cpu_forward(args, layer_norm), grad_gates)
    actual = run_backward(emu.regularised_gate_grads_, args, grads)
    expected = run_backward(torch.ops.lstm_fused.regularised_gate_grads_, cast(args, torch.float64),
                            cast(grads, torch.float64))
    assert_outputs_close(actual, expected, dtype, f"{dtype} {option} batch={batch} hidden={hidden}")


# Fewer sizes for the 16-bit types: their arithmetic is float's, checked above.
REDUCED_SIZES = [(3, 20), (70, 33), (4, 130)]


@pytest.mark.parametrize("batch,hidden", REDUCED_SIZES, ids=lambda v: str(v))
@pytest.mark.parametrize("option", ["plain", "layer_norm+zoneout_train", "layer_norm+zoneout_eval"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_reduced_precision_against_float64(emu, dtype, option, batch, hidden):
    """float16/bfloat16 storage, float math: forward and backward by relative error against the CPU
    float64 kernels fed the same rounded inputs (the backward's saved tensors: the kernel's own
    rounded forward outputs, for both)."""
    layer_norm = OPTIONS[option]["layer_norm"]
    args = cast(step_args(batch, hidden, **OPTIONS[option]), dtype)
    forward = run_forward(emu.regularised_pointwise_, args, layer_norm)
    args64 = cast(args, torch.float64)
    expected_forward = cpu_forward(args64, layer_norm)
    assert_outputs_close(forward, expected_forward, dtype, f"{dtype} {option} forward")
    grads = backward_args(args, forward, grad_gates=True)
    actual = run_backward(emu.regularised_gate_grads_, args, grads)
    expected = run_backward(torch.ops.lstm_fused.regularised_gate_grads_, args64, cast(grads, torch.float64))
    assert_outputs_close(actual, expected, dtype, f"{dtype} {option} backward")


def test_empty_batch_writes_nothing(emu):
    args = cast(step_args(0, 5, layer_norm=True, zoneout="train"), torch.float32)
    out = run_forward(emu.regularised_pointwise_, args, layer_norm=True)
    assert all(t.numel() == 0 for t in out.values())


# ------------------------------------------------------------------------------------------------
# A sequence: the library loop's steps (csrc/regularised.cpp) with the emulated kernels
# ------------------------------------------------------------------------------------------------


def emulated_sequence(emu, x, h0, c0, w_ih, w_hh, bias, norms, dropout_mask, zoneout_masks, zoneout):
    """The forward of regularised_sequence_forward's loop over a padded batch [T, B, I], each step's
    pointwise pass by the emulated kernels. Returns output [T, B, H], h_T, c_T."""
    steps, batch, _ = x.shape
    hidden = h0.shape[1]
    layer_norm = norms[0] is not None
    h, c, outputs = h0, c0, []
    for t in range(steps):
        h_bar = h * dropout_mask if dropout_mask is not None else h
        input_part = (x[t] @ w_ih.T).contiguous()
        hidden_part = (h_bar @ w_hh.T).contiguous()
        out = dict(
            gates=poisoned(batch, 4 * hidden, dtype=x.dtype), hy=poisoned(batch, hidden, dtype=x.dtype),
            cy=poisoned(batch, hidden, dtype=x.dtype),
            normalized_cell=poisoned(batch if layer_norm else 0, hidden, dtype=x.dtype),
            layer_norm_rstd=poisoned(batch if layer_norm else 0, 3, dtype=x.dtype),
        )
        zc, zh = (zoneout_masks[0][t].contiguous(), zoneout_masks[1][t].contiguous()) if zoneout_masks else (None, None)
        emu.regularised_pointwise_(
            input_part, hidden_part, bias, *norms, h.contiguous(), c.contiguous(), zc, zh, zoneout[0], zoneout[1],
            out["gates"], out["hy"], out["cy"], out["normalized_cell"], out["layer_norm_rstd"],
        )
        h, c = out["hy"], out["cy"]
        outputs.append(h)
    return torch.stack(outputs), h, c


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_sequence_with_recurrent_dropout_matches_cpu_op(emu, train):
    """Layer norm, zoneout (masks or probabilities) and a recurrent dropout mask over 5 steps: the
    emulated kernels in the loop's order against lf's CPU sequence op in float64."""
    steps, batch, input_size, hidden = 5, 3, 6, 20
    x = nonzero_randn(steps, batch, input_size)
    h0, c0 = nonzero_randn(batch, hidden), nonzero_randn(batch, hidden)
    w_ih = nonzero_randn(4 * hidden, input_size, scale=0.4)
    w_hh = nonzero_randn(4 * hidden, hidden, scale=0.3)
    b_ih, b_hh = nonzero_randn(4 * hidden, scale=0.2), nonzero_randn(4 * hidden, scale=0.2)
    norms = [nonzero_randn(4 * hidden, scale=0.2, shift=1.0), nonzero_randn(4 * hidden, scale=0.2, shift=1.0),
             nonzero_randn(hidden, scale=0.2, shift=1.0), nonzero_randn(hidden, scale=0.2)]
    dropout_mask = torch.bernoulli(torch.full((batch, hidden), 0.7, dtype=torch.float64)) / 0.7
    zoneout = (0.25, 0.1)
    masks = None
    if train:
        masks = [torch.bernoulli(torch.full((steps, batch, hidden), p, dtype=torch.float64)) for p in zoneout]
    output, hy, cy = emulated_sequence(emu, x, h0, c0, w_ih, w_hh, b_ih + b_hh, norms, dropout_mask, masks, zoneout)
    batch_sizes = torch.full((steps,), batch, dtype=torch.int64)
    flat = lambda t: t.reshape(steps * batch, -1).contiguous() if t is not None else None  # noqa: E731
    expected = torch.ops.lstm_fused.regularised_sequence_forward(
        flat(x), batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh, *norms, dropout_mask,
        flat(masks[0]) if masks else None, flat(masks[1]) if masks else None, zoneout[0], zoneout[1], False,
    )
    for name, actual, wanted in [("output", flat(output), expected[0]), ("h_T", hy, expected[1]),
                                 ("c_T", cy, expected[2])]:
        error = relative_error(actual, wanted)
        assert error <= 1e-12, f"{name} relative error {error:.2e}"


# ------------------------------------------------------------------------------------------------
# On a real GPU (skipped without one): lf.LSTM's regularised options on CUDA run the library loop
# with these kernels; compared with the same module on the CPU.
# ------------------------------------------------------------------------------------------------

requires_gpu = pytest.mark.skipif(
    not torch.cuda.is_available() or not lf._build_info.WITH_CUDA, reason="needs a CUDA GPU and the CUDA build"
)

# Evaluation for every option (zoneout by its probabilities, no dropout: nothing random), and
# training with layer norm alone (deterministic too); the random masks of training are the
# emulated tests' business, where both sides get the same ones.
GPU_CASES = [
    (dict(layer_norm=True), False),
    (dict(layer_norm=True), True),
    (dict(zoneout=(0.2, 0.1)), False),
    (dict(recurrent_dropout=0.3), False),
    (dict(layer_norm=True, zoneout=(0.2, 0.1), recurrent_dropout=0.3, weight_drop=0.2), False),
]


def gpu_and_cpu_modules(dtype, gpu_dtype, options, training):
    """lf.LSTM on the CPU in dtype and on the GPU in gpu_dtype holding the same weights, the layer
    norms' scales and shifts moved off the identity."""
    cpu = lf.LSTM(7, 33, num_layers=2, dtype=dtype, **options).train(training)
    with torch.no_grad():
        for name, p in cpu.named_parameters():
            if "layer_norm" in name:
                p.add_(torch.randn_like(p) * 0.2)
    gpu = lf.LSTM(7, 33, num_layers=2, dtype=gpu_dtype, device="cuda", **options).train(training)
    gpu.load_state_dict({k: v.to(gpu_dtype) for k, v in cpu.state_dict().items()})
    cpu.load_state_dict({k: v.to(gpu_dtype).to(dtype) for k, v in cpu.state_dict().items()})
    return cpu, gpu


@requires_gpu
@pytest.mark.parametrize("options,training", GPU_CASES, ids=lambda v: "+".join(sorted(v)) if isinstance(v, dict) else ("train" if v else "eval"))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
def test_gpu_lstm_matches_cpu(dtype, options, training):
    cpu, gpu = gpu_and_cpu_modules(dtype, dtype, options, training)
    x = torch.randn(6, 5, 7, dtype=dtype)
    x_cpu, x_gpu = x.clone().requires_grad_(), x.cuda().requires_grad_()
    out_cpu, (h_cpu, c_cpu) = cpu(x_cpu)
    out_gpu, (h_gpu, c_gpu) = gpu(x_gpu)
    tolerance = 1e-10 if dtype == torch.float64 else 1e-5
    for name, actual, expected in [("output", out_gpu, out_cpu), ("h_n", h_gpu, h_cpu), ("c_n", c_gpu, c_cpu)]:
        error = relative_error(actual.detach().cpu(), expected.detach())
        assert error <= tolerance, f"{name}: {error:.2e}"
    (out_cpu.square().sum() + h_cpu.sum() + c_cpu.sum()).backward()
    (out_gpu.square().sum() + h_gpu.sum() + c_gpu.sum()).backward()
    assert relative_error(x_gpu.grad.cpu(), x_cpu.grad) <= tolerance * 10
    for (name, p_cpu), p_gpu in zip(cpu.named_parameters(), gpu.parameters()):
        error = relative_error(p_gpu.grad.cpu(), p_cpu.grad)
        assert error <= tolerance * 10, f"{name}.grad: {error:.2e}"


@requires_gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_gpu_reduced_precision_lstm_against_float64(dtype):
    options = dict(layer_norm=True, zoneout=(0.2, 0.1))
    reference, gpu = gpu_and_cpu_modules(torch.float64, dtype, options, training=False)
    x = torch.randn(6, 5, 7).to(dtype)
    out, _ = gpu(x.cuda())
    expected, _ = reference(x.double())
    # Two layers of six steps, each state rounded to the dtype: a few times one step's tolerance.
    assert relative_error(out.cpu(), expected.detach()) <= TOLERANCE[dtype] * 4

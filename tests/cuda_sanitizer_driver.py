"""Runs every CUDA kernel of lstm_fused at a few shapes and dtypes, checks the results, exits
non-zero on a mismatch. Not a pytest module: it is the workload for compute-sanitizer, e.g.

    cd /tmp && compute-sanitizer --tool memcheck  --error-exitcode 2 python /path/to/tests/cuda_sanitizer_driver.py
    cd /tmp && compute-sanitizer --tool racecheck --error-exitcode 2 python /path/to/tests/cuda_sanitizer_driver.py
    cd /tmp && compute-sanitizer --tool synccheck --error-exitcode 2 python /path/to/tests/cuda_sanitizer_driver.py
    cd /tmp && compute-sanitizer --tool initcheck --error-exitcode 2 python /path/to/tests/cuda_sanitizer_driver.py

(benchmarks/gpu_proof.sh runs memcheck, racecheck and synccheck this way.)

The shapes are small (the sanitizers slow kernels down 10-100x) but cover every tile of the fused
kernel (csrc/cuda/cell_kernels.cuh) and its tails: batch 1 -> tile 1, 3 -> tile 4, 5 and 8 -> tile 8
(double: two tiles of 4), 9 and 16 -> tile 16 (half/bfloat16: tiles of 8), 33 -> three tiles of 16;
the scalar and vectorised paths
(sizes 5, 7 against 64, 128), more than one shared-memory chunk per segment (hidden 1024 at the
larger tiles), the in-block split of K over warps (small hidden, long input), the fallback
(batch 257), every presence pattern of the backward's incoming gradients, and lf.LSTM's sequence
ops (the persistent kernels, forward and backward through time, and the loop they fall back to).
"""
import itertools
import sys

import torch

import lstm_fused
from lstm_fused import reference

ops = torch.ops.lstm_fused
# `python cuda_sanitizer_driver.py cpu` runs the same checks on the CPU kernels: a check of this
# script itself on a machine without a GPU.
DEVICE = sys.argv[1] if len(sys.argv) > 1 else "cuda"

TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-10, torch.float16: 1e-2, torch.bfloat16: 5e-2}

SHAPES = [  # (batch, input_size, hidden_size)
    (1, 128, 64),
    (1, 7, 5),
    (3, 0, 300),
    (5, 16, 33),
    (8, 64, 3),
    (9, 128, 1024),
    (16, 7, 64),
    (33, 64, 40),
    (2, 2048, 8),
    (257, 7, 64),
]

failures = []


def relative_error(actual, expected):
    if expected.numel() == 0:
        return 0.0
    actual, expected = actual.detach().double().cpu(), expected.detach().double().cpu()
    if not torch.isfinite(actual).all():
        return float("inf")
    return ((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-30)).item()


def check(what, actual, expected, dtype):
    error = relative_error(actual, expected)
    if error > TOLERANCE[dtype]:
        failures.append(f"{what}: relative error {error:.3e} > {TOLERANCE[dtype]:.0e}")


def step_case(batch, input_size, hidden_size, dtype, bias):
    device = DEVICE
    cell = lstm_fused.LSTMCell(input_size, hidden_size, bias=bias, device=device, dtype=dtype)
    x = torch.randn(batch, input_size, device=device, dtype=dtype, requires_grad=True)
    h0 = torch.randn(batch, hidden_size, device=device, dtype=dtype, requires_grad=True)
    c0 = torch.randn(batch, hidden_size, device=device, dtype=dtype, requires_grad=True)
    h1, c1, gates = cell(x, (h0, c0), return_gates=True)
    grad_h, grad_c, grad_g = (torch.randn_like(h1) for _ in range(3))
    (h1 * grad_h + c1 * grad_c + gates.cell * grad_g).sum().backward()

    # float64 reference from the same (rounded) values.
    params64 = [p.detach().double().requires_grad_() for p in cell.parameters()]
    x64, h064, c064 = (t.detach().double().requires_grad_() for t in (x, h0, c0))
    weights = params64 + [None] * (4 - len(params64))
    rh1, rc1, rgates = reference.lstm_cell(x64, (h064, c064), *weights, return_gates=True)
    (rh1 * grad_h.double() + rc1 * grad_c.double() + rgates.cell * grad_g.double()).sum().backward()

    name = f"{dtype} batch={batch} input={input_size} hidden={hidden_size} bias={bias}"
    check(f"{name} h_1", h1, rh1, dtype)
    check(f"{name} c_1", c1, rc1, dtype)
    for gate, expected in zip(gates, rgates):
        check(f"{name} gates", gate, expected, dtype)
    for label, leaf, expected in zip(["input", "hx", "cx"], (x, h0, c0), (x64, h064, c064)):
        check(f"{name} grad {label}", leaf.grad, expected.grad, dtype)
    for (label, p), expected in zip(cell.named_parameters(), params64):
        check(f"{name} grad {label}", p.grad, expected.grad, dtype)


def gate_grads_case(dtype):
    batch, hidden_size = 5, 70
    gates = torch.rand(batch, 4 * hidden_size, device=DEVICE, dtype=dtype)
    cx, cy = torch.randn(batch, hidden_size, device=DEVICE, dtype=dtype), torch.randn(batch, hidden_size, device=DEVICE, dtype=dtype)
    for present in itertools.product([False, True], repeat=3):
        grads = [
            torch.randn(*shape, device=DEVICE, dtype=dtype) if on else None
            for on, shape in zip(present, [(batch, hidden_size), (batch, hidden_size), (batch, 4 * hidden_size)])
        ]
        grad_pre, grad_cx = ops.cell_gate_grads(*grads, cx, cy, gates)
        on_cpu = [None if t is None else t.cpu().double() for t in (*grads, cx, cy, gates)]
        expected_pre, expected_cx = ops.cell_gate_grads(*on_cpu)
        check(f"cell_gate_grads {dtype} present={present} grad_pre", grad_pre, expected_pre, dtype)
        check(f"cell_gate_grads {dtype} present={present} grad_cx", grad_cx, expected_cx, dtype)


def sequence_case(steps, batch, input_size, hidden_size, dtype, bidirectional, lengths=None, proj_size=0):
    """lf.LSTM forward and backward (its sequence ops: on CUDA the persistent kernels where they
    fit, the loop elsewhere) against nn.LSTM in float64; `lengths` makes a PackedSequence;
    proj_size > 0 an LSTMP (the persistent kernels' projection)."""
    fused = lstm_fused.LSTM(input_size, hidden_size, bidirectional=bidirectional, proj_size=proj_size, device=DEVICE,
                            dtype=dtype)
    reference_lstm = torch.nn.LSTM(input_size, hidden_size, bidirectional=bidirectional, proj_size=proj_size,
                                   device=DEVICE, dtype=torch.float64)
    with torch.no_grad():
        for p, q in zip(reference_lstm.parameters(), fused.parameters()):
            p.copy_(q.double())
    x = torch.randn(steps, batch, input_size, device=DEVICE, dtype=dtype)
    x64 = x.double()
    if lengths is not None:
        x = torch.nn.utils.rnn.pack_padded_sequence(x, lengths)
        x64 = torch.nn.utils.rnn.pack_padded_sequence(x64, lengths)
    output, (hn, cn) = fused(x)
    expected, (expected_h, expected_c) = reference_lstm(x64)
    if lengths is not None:
        output, expected = output.data, expected.data
    name = (f"lf.LSTM {dtype} T={steps} batch={batch} hidden={hidden_size} bidirectional={bidirectional}"
            f"{' packed' if lengths else ''}{f' proj={proj_size}' if proj_size else ''}")
    check(f"{name} output", output, expected, dtype)
    check(f"{name} h_n", hn, expected_h, dtype)
    check(f"{name} c_n", cn, expected_c, dtype)
    upstream = [torch.randn_like(t) for t in (output, hn, cn)]
    grads = torch.autograd.grad((output, hn, cn), list(fused.parameters()), upstream)
    expected_grads = torch.autograd.grad(
        (expected, expected_h, expected_c), list(reference_lstm.parameters()), [u.double() for u in upstream]
    )
    for (label, _), actual, wanted in zip(fused.named_parameters(), grads, expected_grads):
        check(f"{name} grad {label}", actual, wanted, dtype)


def main():
    if DEVICE.startswith("cuda") and not torch.cuda.is_available():
        print("cuda_sanitizer_driver: no CUDA device", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    torch.backends.cuda.matmul.allow_tf32 = False
    # initcheck then also sees any output element the kernels leave unwritten as NaN in the checks.
    ops._set_poison_outputs(True)
    cases = 0
    for dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
        for (batch, input_size, hidden_size), bias in itertools.product(SHAPES, (True, False)):
            step_case(batch, input_size, hidden_size, dtype, bias)
            cases += 1
        gate_grads_case(dtype)
    for batch in (0, 3):  # empty batch, and an empty hidden state: no launch may be attempted
        step_case(batch, 7, 5, torch.float32, True)
    step_case(3, 7, 0, torch.float32, True)
    # With TF32 allowed, float32 switches to cuBLAS above batch 8: both sides of that boundary.
    torch.backends.cuda.matmul.allow_tf32 = True
    TOLERANCE[torch.float32] = 5e-3
    for batch in (8, 9):
        step_case(batch, 128, 64, torch.float32, True)
    # ...and the float32 persistent forward takes its TF32 tensor-core kernel.
    sequence_case(3, 17, 7, 32, torch.float32, True)
    cases += 1
    torch.backends.cuda.matmul.allow_tf32 = False
    TOLERANCE[torch.float32] = 1e-4
    # lf.LSTM's sequence ops: on CUDA the persistent kernels, forward and backward (one block of
    # units, several with a partial last one, both directions in one layer; bfloat16 at hidden 32 on
    # tensor cores), and the loop (hidden 4096, whose W_hh slices do not fit in shared memory; a
    # PackedSequence whose batch shrinks).
    for steps, batch, hidden_size, bidirectional in [(3, 2, 5, False), (4, 5, 40, True), (3, 17, 32, True),
                                                      (2, 2, 4096, False)]:
        for dtype in (torch.float32, torch.bfloat16):
            sequence_case(steps, batch, 7, hidden_size, dtype, bidirectional)
            cases += 1
    sequence_case(4, 3, 7, 24, torch.float32, False, lengths=[4, 2, 1])
    cases += 1
    # LSTMP through the persistent kernels' projection (one more grid barrier per step, W_hr's
    # slices resident): projection rows in one block (proj 3) and over several with a partial last
    # one (proj 20 of hidden 40), both directions; bfloat16 at proj 16 on tensor cores.
    for steps, batch, hidden_size, proj_size, bidirectional in [(3, 2, 5, 3, False), (4, 5, 40, 20, True),
                                                                 (3, 17, 33, 16, True)]:
        for dtype in (torch.float32, torch.bfloat16):
            sequence_case(steps, batch, 7, hidden_size, dtype, bidirectional, proj_size=proj_size)
            cases += 1
    if DEVICE.startswith("cuda"):
        torch.cuda.synchronize()
    if failures:
        print(f"cuda_sanitizer_driver: {len(failures)} mismatches", file=sys.stderr)
        for line in failures:
            print("  " + line, file=sys.stderr)
        return 1
    print(f"cuda_sanitizer_driver: {cases} step cases and the gate-gradient variants passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())

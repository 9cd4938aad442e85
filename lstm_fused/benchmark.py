"""Benchmark: lstm_fused.LSTMCell against nn.LSTMCell, the pure-Python reference cell and
torch.compile of the reference cell.

    python benchmarks/benchmark.py --quick          # under a minute on 2 CPU cores
    python benchmarks/benchmark.py                  # the full size grid
    python -m lstm_fused.benchmark --help           # the same script, from outside the checkout

Every case (device, dtype, threads, batch, input, hidden, steps T, mode) is first checked: each
implementation's outputs and gradients against nn.LSTMCell run in float64 with the same weights and
inputs. A wrong answer is reported as FAILED, never timed, and makes the script exit with status 1.
Then each implementation is timed with torch.utils.benchmark (medians), beside the floor: the
cell's matrix products alone, which no implementation built on the same GEMMs can beat.

The table goes to stdout, one progress line per case to stderr; --json and --plot save the figures.
This module is not imported by lstm_fused itself.
"""
import argparse
import copy
import json
import math
import os
import platform
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn
from torch.utils import benchmark as torch_benchmark

import lstm_fused
from lstm_fused import reference

FORWARD = "fwd"  # forward under torch.no_grad: inference
TRAINING = "fwd+bwd"  # forward, then gradients of the inputs, the initial state and the weights
MODES = (FORWARD, TRAINING)

BASELINE = "nn"  # speedups are measured against it, in the same run
HEADLINE = "fused"  # the implementation the speedup and fused/floor columns are about

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}
DTYPE_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp64": "float64"}

# Largest accepted error, relative to the largest element of the float64 result. The float32 figure
# is ~15x what nn.LSTMCell itself shows (~7e-7 for B=256, H=1024); fp16/bf16 are also allowed a few
# times nn.LSTMCell's own error in that dtype (see check_case), which grows with T.
TOLERANCES = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 3e-2}
TIMES_BASELINE_ERROR = 4

WARMUP_CALLS = 3  # the first calls allocate, pick GEMM algorithms and, for torch.compile, compile
TIMING_ROUNDS = 5  # at most: a case's implementations are timed in turn, this many times over
FLOOR_PREFIX = "floor:"  # the floor's products, timed among the implementations

FULL_GRID = dict(batch=[1, 8, 64, 256], hidden=[64, 256, 1024], steps=[1, 32], min_run_time=0.5)
QUICK_GRID = dict(batch=[1, 64], hidden=[64, 256], steps=[1, 32], min_run_time=0.05)


# ----------------------------------------------------------------------------------------------
# The implementations: a registry. Each entry builds, from the baseline nn.LSTMCell, something that
# runs T steps with the baseline's weights. A sequence implementation (nn.LSTM, lstm_fused.LSTM) is
# one more entry whose `run` stacks the step inputs and makes one call over the whole sequence.


@dataclass
class Prepared:
    """An implementation ready to run one case."""

    # run(step_inputs, h_0, c_0) -> (the hidden output of every step, the final cell state)
    run: Callable[[List[Tensor], Tensor, Tensor], Tuple[List[Tensor], Tensor]]
    # weight_ih, weight_hh, bias_ih, bias_hh: their gradients are compared across implementations
    parameters: List[Tensor]


@dataclass(frozen=True)
class Implementation:
    name: str  # used by --impl, in column headers and as the JSON key
    description: str
    build: Callable[[nn.LSTMCell], Prepared]
    # None if it can run on this device, else why not (reported as n/a, not as a failure)
    why_unavailable: Callable[[torch.device], Optional[str]] = lambda device: None
    slow_to_build: bool = False  # left out of --quick unless asked for


def copy_cell(baseline: nn.LSTMCell, cell_class) -> nn.LSTMCell:
    weight = baseline.weight_ih
    cell = cell_class(baseline.input_size, baseline.hidden_size, device=weight.device, dtype=weight.dtype)
    cell.load_state_dict(baseline.state_dict())
    return cell


def cell_parameters(cell: nn.LSTMCell) -> List[Tensor]:
    return [cell.weight_ih, cell.weight_hh, cell.bias_ih, cell.bias_hh]


def step_by_step(cell: Callable, parameters: List[Tensor]) -> Prepared:
    """The way a cell is used: called once per step, the state carried from one call to the next."""

    def run(step_inputs, h, c):
        outputs = []
        for x in step_inputs:
            h, c = cell(x, (h, c))
            outputs.append(h)
        return outputs, c

    return Prepared(run, parameters)


def build_nn(baseline):
    return step_by_step(baseline, cell_parameters(baseline))


def build_fused(baseline):
    cell = copy_cell(baseline, lstm_fused.LSTMCell)
    return step_by_step(cell, cell_parameters(cell))


def build_reference(baseline):
    cell = copy_cell(baseline, reference.LSTMCell)
    return step_by_step(cell, cell_parameters(cell))


def build_compiled_reference(baseline):
    cell = copy_cell(baseline, reference.LSTMCell)
    # Each shape gets its own static graph: without the reset, dynamo would mark the sizes dynamic
    # after the second shape (slower code) and fall back to eager after its recompile limit.
    torch._dynamo.reset()
    return step_by_step(torch.compile(cell, dynamic=False), cell_parameters(cell))


def whole_sequence(lstm: nn.LSTM) -> Prepared:
    """A sequence module over all T steps in one call, with the cell's weights as layer 0."""

    def run(step_inputs, h, c):
        output, (_, c_n) = lstm(torch.stack(step_inputs), (h.unsqueeze(0), c.unsqueeze(0)))
        return list(output.unbind(0)), c_n.squeeze(0)

    return Prepared(run, [lstm.weight_ih_l0, lstm.weight_hh_l0, lstm.bias_ih_l0, lstm.bias_hh_l0])


def copy_to_sequence_module(baseline: nn.LSTMCell, lstm_class) -> nn.LSTM:
    weight = baseline.weight_ih
    lstm = lstm_class(baseline.input_size, baseline.hidden_size, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
            getattr(lstm, f"{name}_l0").copy_(getattr(baseline, name))
    return lstm


def build_nn_lstm(baseline):
    return whole_sequence(copy_to_sequence_module(baseline, nn.LSTM))


def build_fused_lstm(baseline):
    return whole_sequence(copy_to_sequence_module(baseline, lstm_fused.LSTM))


def fused_unavailable(device: torch.device) -> Optional[str]:
    if device.type == "cuda" and not lstm_fused.WITH_CUDA:
        return "lstm_fused was built without its CUDA kernels"
    return None


IMPLEMENTATIONS: Dict[str, Implementation] = {
    impl.name: impl
    for impl in [
        Implementation(BASELINE, "torch.nn.LSTMCell", build_nn),
        Implementation(HEADLINE, "lstm_fused.LSTMCell", build_fused, fused_unavailable),
        Implementation("reference", "lstm_fused.reference.LSTMCell (gate by gate in Python)", build_reference),
        Implementation(
            "compiled", "torch.compile of the reference cell", build_compiled_reference, slow_to_build=True
        ),
        Implementation("nn.LSTM", "torch.nn.LSTM over the T steps in one call (oneDNN / cuDNN)", build_nn_lstm),
        Implementation(
            "fused.LSTM", "lstm_fused.LSTM over the T steps in one call", build_fused_lstm, fused_unavailable
        ),
    ]
}


# ----------------------------------------------------------------------------------------------
# Cases and their data


@dataclass(frozen=True)
class Shape:
    device: str
    dtype: str
    threads: int
    batch: int
    input_size: int
    hidden_size: int
    steps: int


@dataclass(frozen=True)
class Case:
    shape: Shape
    mode: str

    def describe(self) -> str:
        s = self.shape
        return (
            f"{s.device} {s.dtype} threads={s.threads} B={s.batch} I={s.input_size} H={s.hidden_size} "
            f"T={s.steps} {self.mode}"
        )


@dataclass
class Problem:
    """One shape's weights (held by the baseline cell), inputs, initial state and the gradients
    that flow back into every step's output and into the final cell state."""

    baseline: nn.LSTMCell
    step_inputs: List[Tensor]
    h_0: Tensor
    c_0: Tensor
    grad_outputs: List[Tensor]
    grad_final_cell: Tensor

    @staticmethod
    def random(shape: Shape, seed: int) -> "Problem":
        torch.manual_seed(seed)
        device, dtype = torch.device(shape.device), DTYPES[shape.dtype]
        batch, hidden = shape.batch, shape.hidden_size

        def randn(*size):
            return torch.randn(*size, device=device, dtype=dtype)

        return Problem(
            baseline=nn.LSTMCell(shape.input_size, hidden, device=device, dtype=dtype),
            step_inputs=[randn(batch, shape.input_size) for _ in range(shape.steps)],
            h_0=randn(batch, hidden),
            c_0=randn(batch, hidden),
            grad_outputs=[randn(batch, hidden) for _ in range(shape.steps)],
            grad_final_cell=randn(batch, hidden),
        )

    def to(self, dtype: torch.dtype) -> "Problem":
        """The same problem, every number converted (exactly, when widening) to dtype."""

        def convert(tensors):
            return [t.to(dtype) for t in tensors]

        return Problem(
            copy.deepcopy(self.baseline).to(dtype),
            convert(self.step_inputs),
            self.h_0.to(dtype),
            self.c_0.to(dtype),
            convert(self.grad_outputs),
            self.grad_final_cell.to(dtype),
        )


def make_call(prepared: Prepared, problem: Problem, mode: str) -> Callable[[], object]:
    """The work timed for one case: a function of no arguments."""
    if mode == FORWARD:

        def forward():
            with torch.no_grad():
                return prepared.run(problem.step_inputs, problem.h_0, problem.c_0)

        return forward

    # Fresh leaves, so that the problem's own tensors never carry requires_grad into other modes.
    step_inputs = [x.detach().requires_grad_() for x in problem.step_inputs]
    h_0, c_0 = problem.h_0.detach().requires_grad_(), problem.c_0.detach().requires_grad_()
    differentiated = step_inputs + [h_0, c_0] + prepared.parameters
    grad_roots = problem.grad_outputs + [problem.grad_final_cell]

    def forward_backward():
        outputs, final_cell = prepared.run(step_inputs, h_0, c_0)
        # autograd.grad rather than backward(): returns the gradients instead of accumulating
        # them into .grad, so every call does the same work.
        return torch.autograd.grad(outputs + [final_cell], differentiated, grad_roots)

    return forward_backward


# ----------------------------------------------------------------------------------------------
# Correctness

GRADIENT_NAMES = ["grad x_1..x_T", "grad h_0", "grad c_0", "grad weight_ih", "grad weight_hh", "grad bias_ih", "grad bias_hh"]


def results_to_check(prepared: Prepared, problem: Problem, mode: str) -> Dict[str, Tensor]:
    """What an implementation computes for a case, by name: the outputs, and in TRAINING mode
    every gradient."""
    if mode == FORWARD:
        outputs, final_cell = make_call(prepared, problem, FORWARD)()
        return {"h_1..h_T": torch.stack(outputs), "c_T": final_cell}
    # Run the forward once with the same leaves as the backward so outputs and gradients agree.
    step_inputs = [x.detach().requires_grad_() for x in problem.step_inputs]
    h_0, c_0 = problem.h_0.detach().requires_grad_(), problem.c_0.detach().requires_grad_()
    outputs, final_cell = prepared.run(step_inputs, h_0, c_0)
    grads = torch.autograd.grad(
        outputs + [final_cell],
        step_inputs + [h_0, c_0] + prepared.parameters,
        problem.grad_outputs + [problem.grad_final_cell],
    )
    steps = len(step_inputs)
    gradients = [torch.stack(grads[:steps])] + list(grads[steps:])
    results = {"h_1..h_T": torch.stack(outputs).detach(), "c_T": final_cell.detach()}
    results.update(zip(GRADIENT_NAMES, gradients))
    return results


def relative_error(actual: Tensor, expected: Tensor) -> float:
    """Largest difference relative to the largest expected element: NaN when actual has a NaN."""
    if actual.shape != expected.shape:
        return math.inf
    scale = expected.abs().max().item() or 1.0
    return (actual.to(expected.dtype) - expected).abs().max().item() / scale


@dataclass
class Check:
    error: float  # the worst relative error over all results
    worst: str  # which result it is in
    problem: Optional[str] = None  # a wrong shape or dtype, which no error figure describes


def check_results(results: Dict[str, Tensor], expected: Dict[str, Tensor], dtype: torch.dtype) -> Check:
    worst = Check(0.0, "")
    for name, actual in results.items():
        if actual.dtype != dtype or actual.shape != expected[name].shape:
            return Check(math.inf, name, f"{name} is {actual.dtype} {tuple(actual.shape)}, expected "
                                         f"{dtype} {tuple(expected[name].shape)}")
        error = relative_error(actual, expected[name])
        if math.isnan(error):  # an unwritten or poisoned element: nothing is worse
            return Check(error, name)
        if error > worst.error:
            worst = Check(error, name)
    return worst


# ----------------------------------------------------------------------------------------------
# Timing


def synchronize(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_interleaved(
    calls: Dict[str, Callable], threads: int, min_run_time: float, device: torch.device
) -> Tuple[Dict[str, "torch_benchmark.Measurement"], Dict[str, Exception]]:
    """torch.utils.benchmark Measurements of every call, after warm-up, taken in up to
    TIMING_ROUNDS rounds that each time every call in turn for min_run_time / rounds; each call's
    blocks of all rounds are merged. A stall of the machine then slows the blocks of every
    implementation of the case alike, instead of the one that happened to be timed during it.
    Calls slower than a round's share get fewer rounds (one, at worst, as without rounds).
    Returns the measurements and, apart, the exception of each call that raised (it is timed no
    further)."""
    errors: Dict[str, Exception] = {}
    seconds_per_call = {}
    for name, call in calls.items():
        try:
            for _ in range(WARMUP_CALLS - 1):
                call()
            synchronize(device)
            start = time.perf_counter()
            call()
            synchronize(device)
            seconds_per_call[name] = time.perf_counter() - start
        except Exception as error:
            errors[name] = error
    slowest = max(seconds_per_call.values(), default=min_run_time)
    rounds = max(1, min(TIMING_ROUNDS, int(min_run_time / max(slowest, 1e-9))))
    # The Timer synchronizes the accelerator around every block of calls and runs with `threads`.
    timers = {
        name: torch_benchmark.Timer(stmt="call()", globals={"call": call}, num_threads=threads)
        for name, call in calls.items()
    }
    blocks: Dict[str, list] = {name: [] for name in seconds_per_call}
    for _ in range(rounds):
        for name in blocks:
            if name in errors:
                continue
            try:
                blocks[name].append(timers[name].blocked_autorange(min_run_time=min_run_time / rounds))
            except Exception as error:
                errors[name] = error
    merged = {
        name: torch_benchmark.Measurement.merge(measurements)[0]
        for name, measurements in blocks.items()
        if name not in errors
    }
    return merged, errors


def peak_memory_mib(call: Callable, device: torch.device) -> Optional[float]:
    """Memory one call allocates on top of what already exists (the weights and inputs)."""
    if device.type != "cuda":
        return None
    synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    call()
    synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - before) / 2**20


def blas_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    return torch.addmm(bias, x, weight.t()) if bias is not None else x @ weight.t()


def onednn_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    return torch.ops.mkldnn._linear_pointwise(x.contiguous(), weight, bias, "none", [], None)


def product_libraries(problem: Problem) -> Dict[str, Callable]:
    """The libraries ATen offers for the cell's products: BLAS everywhere (cuBLAS on CUDA), and
    oneDNN for CPU float32 (on some CPUs, AMD's among them, MKL's float32 GEMM runs AVX2 code at
    about half oneDNN's speed: the floor must not be the slower library's)."""
    libraries = {"blas": blas_linear}
    h = problem.h_0
    if h.device.type == "cpu" and h.dtype == torch.float32 and torch.backends.mkldnn.is_available():
        libraries["onednn"] = onednn_linear
    return libraries


def matrix_product_floor(problem: Problem, mode: str, linear: Callable) -> Callable[[], None]:
    """The cell's matrix products alone, per step, through one library: forward x·W_ihᵀ + b and
    h·W_hhᵀ; backward grad·W_ih, grad·W_hh, gradᵀ·x, gradᵀ·h. A lower bound for any cell that
    needs the same products."""
    cell = problem.baseline
    with torch.no_grad():
        weight_ih, weight_hh = cell.weight_ih.detach(), cell.weight_hh.detach()
        bias = (cell.bias_ih + cell.bias_hh).detach()
    h, step_inputs = problem.h_0, problem.step_inputs
    grad_gates = torch.randn(h.shape[0], 4 * h.shape[1], dtype=h.dtype, device=h.device)

    def forward_products():
        for x in step_inputs:
            linear(x, weight_ih, bias).add_(linear(h, weight_hh))

    def backward_products():
        grad_gates_t = grad_gates.t().contiguous()
        for x in step_inputs:
            linear(grad_gates, weight_ih.t())
            linear(grad_gates, weight_hh.t())
            linear(grad_gates_t, x.t())
            linear(grad_gates_t, h.t())

    def products():
        with torch.no_grad():
            forward_products()
            if mode == TRAINING:
                backward_products()

    return products


# ----------------------------------------------------------------------------------------------
# Running the cases


@dataclass
class Outcome:
    """One implementation in one case."""

    status: str  # "ok", "FAILED" (wrong answer or exception) or "n/a" (cannot run on this device)
    median_ms: Optional[float] = None
    iqr_ms: Optional[float] = None  # interquartile range of the timed blocks: the noise
    speedup_vs_nn: Optional[float] = None
    peak_memory_mib: Optional[float] = None
    relative_error: Optional[float] = None  # against nn.LSTMCell in float64
    tolerance: Optional[float] = None
    message: Optional[str] = None


@dataclass
class CaseResult:
    case: Case
    outcomes: Dict[str, Outcome]
    floor_ms: Optional[float] = None  # the fastest library's
    floor_ms_by_library: Optional[Dict[str, float]] = None

    def ratio_to_floor(self) -> Optional[float]:
        headline = self.outcomes.get(HEADLINE)
        if headline is None or headline.median_ms is None or not self.floor_ms:
            return None
        return headline.median_ms / self.floor_ms


def check_case(
    prepared: Dict[str, Prepared], problem: Problem, expected: Dict[str, Tensor], mode: str
) -> Dict[str, Outcome]:
    """Checks every prepared implementation; the baseline first, since its own error (against float64)
    sets how much error the others are allowed."""
    dtype = problem.h_0.dtype
    outcomes, tolerance = {}, TOLERANCES[dtype]
    for name, implementation in prepared.items():
        try:
            check = check_results(results_to_check(implementation, problem, mode), expected, dtype)
        except Exception as error:  # a crash is a failure like a wrong answer, with its reason
            outcomes[name] = Outcome("FAILED", message=f"raised {type(error).__name__}: {error}")
            continue
        if name == BASELINE:
            # nn.LSTMCell is what we measure against, not what we test; its error is only a scale.
            tolerance = max(tolerance, TIMES_BASELINE_ERROR * check.error)
            outcomes[name] = Outcome("ok", relative_error=check.error)
            continue
        passed = check.problem is None and check.error <= tolerance  # NaN fails
        message = check.problem or f"relative error {check.error:.2e} in {check.worst}, tolerance {tolerance:.1e}"
        outcomes[name] = Outcome(
            "ok" if passed else "FAILED",
            relative_error=check.error,
            tolerance=tolerance,
            message=None if passed else message,
        )
    return outcomes


def time_case(case: Case, prepared: Dict[str, Prepared], problem: Problem, outcomes, min_run_time) -> CaseResult:
    device, threads = torch.device(case.shape.device), case.shape.threads
    # A wrong answer gets no time: a fast wrong answer is no result.
    calls = {
        name: make_call(implementation, problem, case.mode)
        for name, implementation in prepared.items()
        if outcomes[name].status == "ok"
    }
    floor_calls = {
        FLOOR_PREFIX + library: matrix_product_floor(problem, case.mode, linear)
        for library, linear in product_libraries(problem).items()
    }
    measurements, errors = measure_interleaved({**calls, **floor_calls}, threads, min_run_time, device)
    for name, call in calls.items():
        outcome = outcomes[name]
        try:
            outcome.peak_memory_mib = peak_memory_mib(call, device) if name not in errors else None
        except Exception as error:
            errors[name] = error
        if name in errors:
            outcome.status, outcome.message = "FAILED", f"raised {type(errors[name]).__name__}: {errors[name]}"
            continue
        outcome.median_ms, outcome.iqr_ms = measurements[name].median * 1e3, measurements[name].iqr * 1e3
    baseline = outcomes.get(BASELINE)
    for outcome in outcomes.values():
        if outcome.median_ms and baseline is not None and baseline.median_ms:
            outcome.speedup_vs_nn = baseline.median_ms / outcome.median_ms
    for name in floor_calls:
        if name in errors:
            raise errors[name]  # ATen's own products failing: nothing of this case can be trusted
    floors = {name[len(FLOOR_PREFIX):]: measurements[name].median * 1e3 for name in floor_calls}
    return CaseResult(case, outcomes, min(floors.values()), floors)


def prepare_implementations(names: List[str], problem: Problem) -> Tuple[Dict[str, Prepared], Dict[str, Outcome]]:
    """Builds each implementation for this problem; those that cannot run or fail to build get an
    outcome straight away."""
    device = problem.h_0.device
    prepared, settled = {}, {}
    for name in names:
        implementation = IMPLEMENTATIONS[name]
        reason = implementation.why_unavailable(device)
        if reason is not None:
            settled[name] = Outcome("n/a", message=reason)
            continue
        try:
            prepared[name] = implementation.build(problem.baseline)
        except Exception as error:
            settled[name] = Outcome("FAILED", message=f"could not be built: {type(error).__name__}: {error}")
    return prepared, settled


def run_shape(shape: Shape, modes: List[str], names: List[str], min_run_time: float, seed: int) -> List[CaseResult]:
    """All modes of one shape, which share its problem, its float64 answer and its builds."""
    torch.set_num_threads(shape.threads)
    problem = Problem.random(shape, seed)
    # nn.LSTMCell in float64 on the same numbers: the answer every implementation is checked against.
    # (The gradients only when some mode needs them: float64 is slow on the CPU.)
    exact = problem.to(torch.float64)
    expected = results_to_check(build_nn(exact.baseline), exact, TRAINING if TRAINING in modes else FORWARD)
    prepared, settled = prepare_implementations(names, problem)
    results = []
    for mode in modes:
        outcomes = check_case(prepared, problem, expected, mode)
        outcomes.update(copy.deepcopy(settled))
        outcomes = {name: outcomes[name] for name in names}  # registry order, for the table
        results.append(time_case(Case(shape, mode), prepared, problem, outcomes, min_run_time))
    return results


def progress_line(index: int, total: int, result: CaseResult, elapsed: float) -> str:
    parts = []
    for name, outcome in result.outcomes.items():
        if outcome.status != "ok":
            parts.append(f"{name} {outcome.status} ({outcome.message})")
        elif name == BASELINE:
            parts.append(f"{name} {format_ms(outcome.median_ms)} ms")
        else:
            parts.append(f"{name} {format_ms(outcome.median_ms)} ms ({format_ratio(outcome.speedup_vs_nn, 'x')})")
    parts.append(f"floor {format_ms(result.floor_ms)} ms")
    return f"[{index}/{total}] {result.case.describe()}: " + " | ".join(parts) + f"  [{elapsed:.0f} s]"


# ----------------------------------------------------------------------------------------------
# Reporting


def format_ms(ms: Optional[float]) -> str:
    if ms is None:
        return "-"
    return f"{ms:.0f}" if ms >= 100 else f"{ms:#.3g}"


def format_ratio(ratio: Optional[float], suffix: str = "") -> str:
    return "-" if ratio is None else f"{ratio:.2f}{suffix}"


def time_cell(outcome: Optional[Outcome]) -> str:
    if outcome is None:
        return "-"
    return format_ms(outcome.median_ms) if outcome.status == "ok" else outcome.status


def markdown_table(results: List[CaseResult], names: List[str]) -> str:
    any_cuda = any(r.case.shape.device.startswith("cuda") for r in results)
    columns: List[Tuple[str, Callable[[CaseResult], str]]] = [
        ("device", lambda r: r.case.shape.device),
        ("dtype", lambda r: r.case.shape.dtype),
        ("threads", lambda r: str(r.case.shape.threads)),
        ("batch", lambda r: str(r.case.shape.batch)),
        ("input", lambda r: str(r.case.shape.input_size)),
        ("hidden", lambda r: str(r.case.shape.hidden_size)),
        ("T", lambda r: str(r.case.shape.steps)),
        ("mode", lambda r: r.case.mode),
    ]
    for name in names:
        columns.append((f"{name} ms", lambda r, name=name: time_cell(r.outcomes[name])))
        if name == HEADLINE:

            def speedup(r):
                outcome = r.outcomes[HEADLINE]
                return format_ratio(outcome.speedup_vs_nn, "x") if outcome.status == "ok" else outcome.status

            columns.append(("speedup", speedup))
    columns.append(("floor ms", lambda r: format_ms(r.floor_ms)))
    if HEADLINE in names:
        columns.append((f"{HEADLINE}/floor", lambda r: format_ratio(r.ratio_to_floor())))
    if any_cuda:
        for name in (BASELINE, HEADLINE):
            if name in names:
                columns.append((f"{name} MiB", lambda r, name=name: format_mib(r.outcomes[name])))
    numeric = {header for header, _ in columns} - {"device", "dtype", "mode"}
    lines = [
        "| " + " | ".join(header for header, _ in columns) + " |",
        "|" + "|".join("---:" if header in numeric else "---" for header, _ in columns) + "|",
    ]
    lines += ["| " + " | ".join(cell(r) for _, cell in columns) + " |" for r in results]
    return "\n".join(lines)


def format_mib(outcome: Outcome) -> str:
    return "-" if outcome.peak_memory_mib is None else f"{outcome.peak_memory_mib:.1f}"


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_commit() -> Optional[Dict[str, object]]:
    """The commit of the lstm_fused checkout this script runs from (None when it is not in one),
    and whether the checkout has uncommitted changes: figures from a dirty tree are not the
    commit's. A git repository that is not lstm_fused's (site-packages inside a pyenv checkout, say)
    does not count."""
    places = [os.path.dirname(os.path.abspath(__file__)), os.path.dirname(os.path.abspath(sys.argv[0]))]
    for place in dict.fromkeys(places):
        try:
            top = subprocess.run(
                ["git", "rev-parse", "--show-toplevel"], cwd=place, capture_output=True, text=True, timeout=10
            )
            root = top.stdout.strip()
            if top.returncode != 0 or not os.path.isdir(os.path.join(root, "csrc")):
                continue
            commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
            status = subprocess.run(
                ["git", "status", "--porcelain", "--untracked-files=no"],
                cwd=root, capture_output=True, text=True, timeout=10,
            )
            return {"commit": commit.stdout.strip(), "dirty": bool(status.stdout.strip())}
        except (OSError, subprocess.SubprocessError):
            continue
    return None


def machine_description(threads: List[int]) -> Dict[str, object]:
    cuda = torch.cuda.is_available()
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "threads": threads,
        "gpu": torch.cuda.get_device_name() if cuda else None,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "lstm_fused": lstm_fused.__version__,
        "lstm_fused_with_cuda": lstm_fused.WITH_CUDA,
        "lstm_fused_path": os.path.dirname(lstm_fused.__file__),
        "git": git_commit(),
        "load_average_at_start": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }


def warn_if_busy(machine) -> None:
    # Other processes on the cores make every time noisy, and multi-threaded code far slower than it
    # is: a thread waiting at an OpenMP barrier for a descheduled partner (torch.compile's CPU code,
    # which parallelises even small loops, suffers most).
    load, cores = machine["load_average_at_start"], machine["cores_usable"]
    if load is not None and cores and load > 0.5 * cores:
        print(f"warning: the machine is busy (load average {load:.1f} on {cores} cores): "
              "the times will be noisy and too slow, above all with more than one thread", file=sys.stderr)


def write_json(path: str, results: List[CaseResult], machine, settings, wall_time_s: float) -> None:
    cases = []
    for result in results:
        entry = asdict(result.case.shape)
        entry["mode"] = result.case.mode
        entry["floor_ms"] = result.floor_ms
        entry["floor_ms_by_library"] = result.floor_ms_by_library
        entry[f"{HEADLINE}_over_floor"] = result.ratio_to_floor()
        entry["implementations"] = {name: asdict(outcome) for name, outcome in result.outcomes.items()}
        cases.append(entry)
    descriptions = {name: IMPLEMENTATIONS[name].description for name in settings["implementations"]}
    document = {
        "machine": machine,
        "settings": settings,
        "wall_time_s": wall_time_s,
        "implementations": descriptions,
        "floor": "the cell's matrix products alone (forward: 2 per step; forward+backward: 6 per step), "
        "through the fastest library ATen offers for them (BLAS; oneDNN for CPU float32)",
        "cases": cases,
    }
    with open(path, "w") as out:
        json.dump(finite_or_text(document), out, indent=2, allow_nan=False)
        out.write("\n")


def finite_or_text(value):
    """JSON has no NaN or infinity (a failed check's error can be either): write them as text."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {key: finite_or_text(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_text(item) for item in value]
    return value


def plot_speedups(path: str, results: List[CaseResult]) -> None:
    """Speedup of the fused cell over nn.LSTMCell against batch size, one line per hidden size, one
    panel per device, dtype, threads, T and mode."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"--plot: matplotlib is not installed, so {path} was not written "
              "(pip install matplotlib, or lstm_fused[plot]).", file=sys.stderr)
        return
    panels: Dict[tuple, Dict[tuple, List[Tuple[int, float]]]] = {}
    for result in results:
        outcome, s = result.outcomes.get(HEADLINE), result.case.shape
        if outcome is None or outcome.speedup_vs_nn is None:
            continue
        panel = (s.device, s.dtype, s.threads, s.steps, result.case.mode)
        line = (s.input_size, s.hidden_size)
        panels.setdefault(panel, {}).setdefault(line, []).append((s.batch, outcome.speedup_vs_nn))
    if not panels:
        print(f"--plot: no {HEADLINE} speedups to plot, {path} not written.", file=sys.stderr)
        return
    columns = min(2, len(panels))
    rows = math.ceil(len(panels) / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(6 * columns, 4 * rows), squeeze=False)
    for axis, ((device, dtype, threads, steps, mode), lines) in zip(axes.flat, sorted(panels.items())):
        for (input_size, hidden_size), points in sorted(lines.items()):
            points.sort()
            label = f"hidden {hidden_size}" + ("" if input_size == hidden_size else f", input {input_size}")
            axis.plot([b for b, _ in points], [x for _, x in points], marker="o", label=label)
        axis.axhline(1.0, color="grey", linewidth=0.8, linestyle="--")  # parity with nn.LSTMCell
        axis.set_xscale("log", base=2)
        axis.set_xlabel("batch size")
        axis.set_ylabel("speedup over nn.LSTMCell")
        axis.set_title(f"{device} {dtype}, {threads} threads, T={steps}, {mode}")
        axis.legend()
    for axis in list(axes.flat)[len(panels):]:
        axis.set_visible(False)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    print(f"plot written to {path}", file=sys.stderr)


# ----------------------------------------------------------------------------------------------
# Command line


def parse_arguments(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="benchmark.py",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="implementations:\n" + "\n".join(f"  {i.name:10} {i.description}" for i in IMPLEMENTATIONS.values()),
    )
    parser.add_argument("--quick", action="store_true",
                        help=f"fewer sizes (batch {QUICK_GRID['batch']}, hidden {QUICK_GRID['hidden']}), "
                             f"min run time {QUICK_GRID['min_run_time']} s, no torch.compile unless --impl names it")
    parser.add_argument("--device", nargs="+", help="cpu and/or cuda (default: cpu, and cuda when available)")
    parser.add_argument("--dtype", nargs="+", help="float32 bfloat16 float16 float64 (default: float32 on the "
                                                   "CPU; float32, bfloat16, float16 on CUDA)")
    parser.add_argument("--threads", nargs="+", type=int, default=[2], help="torch.set_num_threads (default: 2)")
    parser.add_argument("--batch", nargs="+", type=int, help=f"batch sizes (default: {FULL_GRID['batch']})")
    parser.add_argument("--hidden", nargs="+", type=int, help=f"hidden sizes (default: {FULL_GRID['hidden']})")
    parser.add_argument("--input", nargs="+", type=int, help="input sizes (default: the hidden size)")
    parser.add_argument("-T", "--steps", nargs="+", type=int,
                        help=f"steps per call, the state carried between them (default: {FULL_GRID['steps']})")
    parser.add_argument("--impl", nargs="+", choices=list(IMPLEMENTATIONS),
                        help=f"implementations (default: all; {BASELINE} is always run, as the baseline)")
    parser.add_argument("--mode", nargs="+", choices=MODES, default=list(MODES),
                        help=f"{FORWARD}: forward under no_grad; {TRAINING}: forward and all gradients")
    parser.add_argument("--min-run-time", type=float,
                        help=f"seconds of timing per measurement (default: {FULL_GRID['min_run_time']})")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", metavar="PATH", help="write every figure and the machine description")
    parser.add_argument("--plot", metavar="PATH", help="draw speedup against batch size (PNG; needs matplotlib)")
    args = parser.parse_args(argv)

    grid = QUICK_GRID if args.quick else FULL_GRID
    for name in ("batch", "hidden", "steps", "min_run_time"):
        if getattr(args, name) is None:
            setattr(args, name, grid[name])
    if args.device is None:
        args.device = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for device in args.device:
        if device.startswith("cuda") and not torch.cuda.is_available():
            parser.error(f"--device {device}: CUDA is not available on this machine")
        if not (device == "cpu" or device.startswith("cuda")):
            parser.error(f"--device {device}: expected cpu or cuda")
    if args.dtype is not None:
        args.dtype = [DTYPE_ALIASES.get(d, d) for d in args.dtype]
        unknown = [d for d in args.dtype if d not in DTYPES]
        if unknown:
            parser.error(f"--dtype {' '.join(unknown)}: expected some of {', '.join(DTYPES)}")
    if args.impl is None:
        args.impl = [i.name for i in IMPLEMENTATIONS.values() if not (args.quick and i.slow_to_build)]
    # The baseline first: its time is every speedup's numerator and its error the others' scale.
    args.impl = [BASELINE] + [name for name in IMPLEMENTATIONS if name in args.impl and name != BASELINE]
    if min(args.batch + args.hidden + args.steps + args.threads + (args.input or [1])) < 1:
        parser.error("sizes, steps and threads must be positive")
    return args


def dtypes_for(device: str, chosen: Optional[List[str]]) -> List[str]:
    if chosen is not None:
        return chosen
    return ["float32"] if device == "cpu" else ["float32", "bfloat16", "float16"]


def shapes_from(args) -> List[Shape]:
    shapes = []
    for device in args.device:
        for dtype in dtypes_for(device, args.dtype):
            for threads in args.threads:
                for steps in args.steps:
                    for hidden in args.hidden:
                        for input_size in args.input or [hidden]:
                            for batch in args.batch:
                                shapes.append(Shape(device, dtype, threads, batch, input_size, hidden, steps))
    return shapes


def main(argv=None) -> int:
    args = parse_arguments(argv)
    shapes = shapes_from(args)
    machine = machine_description(args.threads)
    total = len(shapes) * len(args.mode)
    print(
        f"lstm_fused {machine['lstm_fused']} ({machine['lstm_fused_path']}), torch {machine['torch']}, "
        f"{machine['cpu']} ({machine['cores']} cores), GPU: {machine['gpu']}; {total} cases, "
        f"implementations: {', '.join(args.impl)}",
        file=sys.stderr,
    )
    warn_if_busy(machine)
    started, results = time.perf_counter(), []
    try:
        for shape in shapes:
            for result in run_shape(shape, args.mode, args.impl, args.min_run_time, args.seed):
                results.append(result)
                print(progress_line(len(results), total, result, time.perf_counter() - started),
                      file=sys.stderr, flush=True)
    except KeyboardInterrupt:
        # Long runs: keep what was measured.
        print(f"interrupted after {len(results)} of {total} cases", file=sys.stderr)
    print(markdown_table(results, args.impl))
    wall_time_s = time.perf_counter() - started

    settings = {key: value for key, value in vars(args).items() if key not in ("json", "plot")}
    settings["implementations"] = settings.pop("impl")
    if args.json:
        write_json(args.json, results, machine, settings, wall_time_s)
        print(f"figures written to {args.json}", file=sys.stderr)
    if args.plot:
        plot_speedups(args.plot, results)

    failures = [
        f"{result.case.describe()}: {name}: {outcome.message}"
        for result in results
        for name, outcome in result.outcomes.items()
        if outcome.status == "FAILED"
    ]
    if failures:
        print(f"{len(failures)} FAILED:\n  " + "\n  ".join(failures), file=sys.stderr)
        return 1
    if len(results) < total:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Benchmark: lstm_fused.LSTMCell against nn.LSTMCell and lstm_fused.LSTM against nn.LSTM (and,
with --full or --impl, the pure-Python reference cell and torch.compile of it).

    python benchmarks/benchmark.py                  # about a minute on 2 CPU cores: verdict and plot
    python benchmarks/benchmark.py --full           # every implementation, the whole grid (<= 15 min)
    python -m lstm_fused.benchmark --help           # the same script, from outside the checkout

Every case (device, dtype, threads, batch, input, hidden, steps T, mode) is first checked: each
implementation's outputs and gradients against nn.LSTMCell run in float64 with the same weights and
inputs. A wrong answer is reported as FAILED, never timed, and makes the script exit with status 1.
Then each implementation is timed with torch.utils.benchmark (medians), beside the floor: the
cell's matrix products alone, which no implementation built on the same GEMMs can beat.

The tables and then the verdict go to stdout, a progress bar with an ETA to stderr; the plot of both
comparisons against batch size to lstm_fused_benchmark.png (--plot PATH, --no-plot), and --json
saves every figure. This module is not imported by lstm_fused itself.
"""
import argparse
import copy
import gc
import json
import math
import os
import platform
import shutil
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
BLOCKS_PER_ROUND = 4  # the median and interquartile range are over blocks of calls
FLOOR_PREFIX = "floor:"  # the floor's products, timed among the implementations


@dataclass(frozen=True)
class GridPart:
    """Implementations timed against each other over every batch x hidden x steps of the part."""

    implementations: Tuple[str, ...]
    batch: Tuple[int, ...]
    hidden: Tuple[int, ...]
    steps: Tuple[int, ...]


# The main command's grid, about a minute on 2 cores: the two comparisons users ask about, each
# where it applies (the cell for one step, the sequence module over a sequence). The small-batch
# kernels run up to batch 16 (cell) and 64 (sequence); 256 shows the library products beyond them.
DEFAULT_BATCHES = (1, 4, 16, 64, 256)
DEFAULT_GRID = dict(
    parts=[
        GridPart(("nn", "fused"), DEFAULT_BATCHES, (64, 256), (1,)),
        GridPart(("nn", "nn.LSTM", "fused.LSTM"), DEFAULT_BATCHES, (64, 256), (16,)),
    ],
    min_run_time=0.2,
)
# --full: every implementation over the whole grid (up to about 15 minutes on 2 cores): the former default.
FULL_GRID = dict(
    parts=[GridPart(("nn", "fused", "reference", "compiled", "nn.LSTM", "fused.LSTM"), (1, 8, 64, 256),
                    (64, 256, 1024), (1, 32))],
    min_run_time=0.5,
)


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
        Implementation("compiled", "torch.compile of the reference cell", build_compiled_reference),
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


def time_block(call: Callable, number: int, device: torch.device) -> float:
    """Seconds that `number` calls in a row take, the accelerator's queue drained on both sides."""
    synchronize(device)
    start = time.perf_counter()
    for _ in range(number):
        call()
    synchronize(device)
    return time.perf_counter() - start


def measure_interleaved(
    calls: Dict[str, Callable], threads: int, min_run_time: float, device: torch.device
) -> Tuple[Dict[str, "torch_benchmark.Measurement"], Dict[str, Exception]]:
    """torch.utils.benchmark Measurements of every call, after warm-up, taken in up to
    TIMING_ROUNDS rounds that each time every call in turn for min_run_time / rounds, in blocks of
    calls sized from the warm-up to about BLOCKS_PER_ROUND blocks a round. A stall of the machine
    then slows the blocks of every implementation of the case alike, instead of the one that
    happened to be timed during it. Calls slower than a round's share get fewer rounds (one, at
    worst). (Timer.blocked_autorange would re-estimate its block size in every round, which at
    these budgets costs several times the measuring itself.) Returns the measurements and, apart,
    the exception of each call that raised (it is timed no further)."""
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    errors: Dict[str, Exception] = {}
    seconds_per_call = {}
    for name, call in calls.items():
        try:
            for _ in range(WARMUP_CALLS - 1):
                call()
            seconds_per_call[name] = time_block(call, 1, device)
        except Exception as error:
            errors[name] = error
    slowest = max(seconds_per_call.values(), default=min_run_time)
    rounds = max(1, min(TIMING_ROUNDS, int(min_run_time / max(slowest, 1e-9))))
    share = min_run_time / rounds
    block_calls = {
        name: max(1, int(share / BLOCKS_PER_ROUND / max(seconds, 1e-9))) for name, seconds in seconds_per_call.items()
    }
    per_call: Dict[str, List[float]] = {name: [] for name in seconds_per_call}
    collecting = gc.isenabled()
    gc.disable()  # as timeit does: a collection would land in one block of one implementation
    try:
        for _ in range(rounds):
            for name, times in per_call.items():
                if name in errors:
                    continue
                try:
                    spent = 0.0
                    while spent < share:
                        block = time_block(calls[name], block_calls[name], device)
                        times.append(block / block_calls[name])
                        spent += block
                except Exception as error:
                    errors[name] = error
    finally:
        if collecting:
            gc.enable()
        torch.set_num_threads(previous_threads)
    measurements = {
        name: torch_benchmark.Measurement(
            number_per_run=1, raw_times=times,
            task_spec=torch_benchmark.TaskSpec(stmt=name, setup="", num_threads=threads),
        )
        for name, times in per_call.items()
        if name not in errors
    }
    return measurements, errors


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


def case_summary(result: CaseResult) -> str:
    """One case's figures on one line."""
    parts = []
    for name, outcome in result.outcomes.items():
        if outcome.status != "ok":
            parts.append(f"{name} {outcome.status} ({outcome.message})")
        elif name == BASELINE:
            parts.append(f"{name} {format_ms(outcome.median_ms)} ms")
        else:
            parts.append(f"{name} {format_ms(outcome.median_ms)} ms ({format_ratio(outcome.speedup_vs_nn, 'x')})")
    parts.append(f"floor {format_ms(result.floor_ms)} ms")
    return f"{result.case.describe()}: " + " | ".join(parts)


def format_duration(seconds: float) -> str:
    seconds = max(0, round(seconds))
    return f"{seconds // 60}:{seconds % 60:02d}"


class Progress:
    """A progress bar with an ETA on stderr: redrawn in place on a terminal, one line per case
    otherwise, so that a log keeps every case's figures. The ETA weighs each case by what it
    costs: a share of the timing budget per implementation and floor it times."""

    WIDTH = 24

    def __init__(self, weights: List[float], stream=None):
        self.weights, self.stream = weights, stream or sys.stderr
        self.total, self.done, self.count = sum(weights), 0.0, 0
        self.started = time.perf_counter()
        self.in_place = hasattr(self.stream, "isatty") and self.stream.isatty()
        if self.in_place:
            self._draw(self._head(None), "starting")

    def _head(self, remaining: Optional[float]) -> str:
        filled = int(self.WIDTH * self.done / self.total) if self.total else self.WIDTH
        eta = "ETA ?" if remaining is None else f"ETA {format_duration(remaining)}"
        elapsed = format_duration(time.perf_counter() - self.started)
        return f"[{'#' * filled}{'.' * (self.WIDTH - filled)}] {self.count}/{len(self.weights)} {elapsed}, {eta}"

    def _draw(self, head: str, detail: str) -> None:
        columns = shutil.get_terminal_size((100, 20)).columns
        print("\r" + f"{head} {detail}"[: columns - 1].ljust(columns - 1), end="", file=self.stream, flush=True)

    def advance(self, detail: str) -> None:
        self.done += self.weights[self.count]
        self.count += 1
        elapsed = time.perf_counter() - self.started
        remaining = elapsed * (self.total - self.done) / self.done if self.done else None
        if self.in_place:
            self._draw(self._head(remaining), detail)
        else:
            print(f"{self._head(remaining)} | {detail}", file=self.stream, flush=True)

    def finish(self) -> None:
        if self.in_place:
            print(file=self.stream, flush=True)


def case_weight(shape: Shape, names: List[str]) -> float:
    """Roughly what one case of the shape costs, for the ETA: the implementations and floors it
    times (each gets the same timing budget) and the check."""
    floors = 2 if shape.device == "cpu" and shape.dtype == "float32" else 1
    return len(names) + floors + 1


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
        columns.append((f"{name} ms", lambda r, name=name: time_cell(r.outcomes.get(name))))
        if name == HEADLINE:

            def speedup(r):
                outcome = r.outcomes.get(HEADLINE)
                if outcome is None:
                    return "-"
                return format_ratio(outcome.speedup_vs_nn, "x") if outcome.status == "ok" else outcome.status

            columns.append(("speedup", speedup))
    columns.append(("floor ms", lambda r: format_ms(r.floor_ms)))
    if HEADLINE in names:
        columns.append((f"{HEADLINE}/floor", lambda r: format_ratio(r.ratio_to_floor())))
    if any_cuda:
        for name in (BASELINE, HEADLINE):
            if name in names:
                columns.append((f"{name} MiB", lambda r, name=name: format_mib(r.outcomes.get(name))))
    numeric = {header for header, _ in columns} - {"device", "dtype", "mode"}
    lines = [
        "| " + " | ".join(header for header, _ in columns) + " |",
        "|" + "|".join("---:" if header in numeric else "---" for header, _ in columns) + "|",
    ]
    lines += ["| " + " | ".join(cell(r) for _, cell in columns) + " |" for r in results]
    return "\n".join(lines)


def format_mib(outcome: Optional[Outcome]) -> str:
    return "-" if outcome is None or outcome.peak_memory_mib is None else f"{outcome.peak_memory_mib:.1f}"


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# The instruction sets that decide which kernels run (and how fast the libraries' products are).
ISA_FLAGS = ("avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16", "avx2", "fma", "asimd", "sve")


def cpu_flags() -> List[str]:
    """Those of ISA_FLAGS this CPU has, from /proc/cpuinfo (x86 'flags', Arm 'Features')."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith(("flags", "Features")):
                    present = set(line.split(":", 1)[1].split())
                    return [flag for flag in ISA_FLAGS if flag in present]
    except OSError:
        pass
    return []


def describe_cpu(machine) -> str:
    flags = machine.get("cpu_flags") or []
    if "avx512f" in flags:
        isa = "AVX-512" + (" and AMX" if "amx_bf16" in flags else "")
    elif "avx2" in flags:
        isa = "AVX2, no AVX-512"
    elif "asimd" in flags:
        isa = "NEON" + (", SVE" if "sve" in flags else "")
    else:
        isa = "no AVX2"
    return f"{machine['cpu']}, {isa}, {machine['cores_usable']} cores"


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
        "cpu_flags": cpu_flags(),
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


def machine_was_busy(machine) -> bool:
    load, cores = machine.get("load_average_at_start"), machine.get("cores_usable")
    return load is not None and bool(cores) and load > 0.5 * cores


def warn_if_busy(machine) -> None:
    # Other processes on the cores make every time noisy, and multi-threaded code far slower than it
    # is: a thread waiting at an OpenMP barrier for a descheduled partner (torch.compile's CPU code,
    # which parallelises even small loops, suffers most).
    load, cores = machine["load_average_at_start"], machine["cores_usable"]
    if machine_was_busy(machine):
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


# ----------------------------------------------------------------------------------------------
# The verdict and the plot: lstm_fused's two modules against PyTorch's, read from the cases that
# timed both.


@dataclass(frozen=True)
class Comparison:
    ours: str  # implementation names, as in IMPLEMENTATIONS
    theirs: str
    ours_label: str
    theirs_label: str


COMPARISONS = (
    Comparison(HEADLINE, BASELINE, "lstm_fused.LSTMCell", "nn.LSTMCell"),
    Comparison("fused.LSTM", "nn.LSTM", "lstm_fused.LSTM", "nn.LSTM"),
)
# Ratios within this of 1 are reported as "about as fast": on a shared machine the same case moves
# by about this much between runs (benchmarks/results/), so a smaller difference is noise.
SAME_WITHIN = 0.10
MODE_VERBS = {FORWARD: "runs inference", TRAINING: "trains"}


def comparison_ratio(result: CaseResult, comparison: Comparison) -> Optional[float]:
    """Their time over ours, both measured in this case; None unless both ran and passed."""
    ours, theirs = result.outcomes.get(comparison.ours), result.outcomes.get(comparison.theirs)
    if ours is None or theirs is None or ours.status != "ok" or theirs.status != "ok":
        return None
    if not ours.median_ms or not theirs.median_ms:
        return None
    return theirs.median_ms / ours.median_ms


def comparison_points(results: List[CaseResult]) -> Dict[tuple, Dict[tuple, List[Tuple[int, int, float]]]]:
    """{(comparison, device, dtype, threads, steps): {(mode): [(batch, hidden, ratio)]}}"""
    points: Dict[tuple, Dict[tuple, List[Tuple[int, int, float]]]] = {}
    for result in results:
        s = result.case.shape
        for comparison in COMPARISONS:
            ratio = comparison_ratio(result, comparison)
            if ratio is not None:
                group = points.setdefault((comparison, s.device, s.dtype, s.threads, s.steps), {})
                group.setdefault(result.case.mode, []).append((s.batch, s.hidden_size, ratio))
    return points


def classify(ratios: List[float]) -> str:
    if min(ratios) > 1 + SAME_WITHIN:
        return "faster"
    if max(ratios) < 1 - SAME_WITHIN:
        return "slower"
    if min(ratios) >= 1 - SAME_WITHIN and max(ratios) <= 1 + SAME_WITHIN:
        return "same"
    return "mixed"


def format_span(low: float, high: float, digits: int = 1) -> str:
    low_text, high_text = f"{low:.{digits}f}", f"{high:.{digits}f}"
    return f"{low_text}x" if low_text == high_text else f"{low_text}-{high_text}x"


def describe_ratio(ratio: float) -> str:
    if ratio > 1 + SAME_WITHIN:
        return f"{ratio:.1f}x faster"
    if ratio < 1 - SAME_WITHIN:
        return f"{1 / ratio:.1f}x slower"
    return f"about as fast ({ratio:.2f}x)"


def describe_batches(batches: List[int]) -> str:
    return f"batch {batches[0]}" if len(batches) == 1 else f"batch {batches[0]}-{batches[-1]}"


def verdict_sentence(comparison: Comparison, mode: str, steps: int, points: List[Tuple[int, int, float]]) -> str:
    """E.g. "lstm_fused.LSTM (T=16) trains 1.3-2.1x faster than nn.LSTM at batch 1-16; about as
    fast (0.95-1.04x) at batch 64; 1.2x slower at batch 256." Consecutive batch sizes of one kind
    (faster, as fast, slower in every hidden size) are merged; a batch size where the hidden sizes
    disagree is spelled out."""
    by_batch: Dict[int, List[Tuple[int, float]]] = {}
    for batch, hidden, ratio in points:
        by_batch.setdefault(batch, []).append((hidden, ratio))
    runs: List[Tuple[str, List[int], List[Tuple[int, float]]]] = []
    for batch in sorted(by_batch):
        kind = classify([ratio for _, ratio in by_batch[batch]])
        if runs and runs[-1][0] == kind and kind != "mixed":
            runs[-1][1].append(batch)
            runs[-1][2].extend(by_batch[batch])
        else:
            runs.append((kind, [batch], list(by_batch[batch])))
    phrases = []
    for kind, batches, entries in runs:
        ratios = [ratio for _, ratio in entries]
        where = describe_batches(batches)
        if kind == "faster":
            phrases.append(f"{format_span(min(ratios), max(ratios))} faster than {comparison.theirs_label} at {where}")
        elif kind == "slower":
            phrases.append(f"{format_span(1 / max(ratios), 1 / min(ratios))} slower at {where}")
        elif kind == "same":
            phrases.append(f"about as fast ({format_span(min(ratios), max(ratios), 2)}) at {where}")
        else:
            detail = ", ".join(f"{describe_ratio(ratio)} at hidden {hidden}" for hidden, ratio in sorted(entries))
            phrases.append(f"at {where}: {detail}")
    if runs and runs[0][0] != "faster":
        phrases[0] = f"against {comparison.theirs_label}: " + phrases[0]
    subject = comparison.ours_label + ("" if steps == 1 else f" (T={steps} steps)")
    return f"{subject} {MODE_VERBS[mode]} " + "; ".join(phrases) + "."


def verdict(results: List[CaseResult], machine) -> str:
    """What a user reads in five seconds: per comparison and mode, where lstm_fused is faster than
    PyTorch's module, where about as fast, where slower."""
    points = comparison_points(results)
    if not points:
        return "Verdict: no case timed lstm_fused against its nn module (see --impl)."
    lines = []
    settings = sorted({key[1:4] for key in points})
    for device, dtype, threads in settings:
        where = f"this CPU ({describe_cpu(machine)})" if device == "cpu" else f"this GPU ({machine['gpu']})"
        lines.append(
            f"Verdict on {where}, {dtype}, {threads} threads, torch {machine['torch']} (time of PyTorch's "
            f"module / lstm_fused's, same run; within ±{SAME_WITHIN:.0%} counts as about as fast):"
        )
        for comparison in COMPARISONS:
            for key in sorted(k for k in points if k[0] == comparison and k[1:4] == (device, dtype, threads)):
                for mode in MODES:
                    if mode in points[key]:
                        lines.append("  " + verdict_sentence(comparison, mode, key[4], points[key][mode]))
    if machine_was_busy(machine):
        lines.append(f"  (The machine was busy, load average {machine['load_average_at_start']:.1f}: "
                     "these ratios are noisier than usual.)")
    return "\n".join(lines)


def plot_comparisons(path: str, results: List[CaseResult], machine) -> Optional[str]:
    """Both comparisons against batch size, one panel per comparison (and device, dtype, threads,
    T), a line per hidden size and mode. Returns the path written, or None (with one line on
    stderr saying why)."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # no display needed
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        print("matplotlib is not installed, so no plot was written (pip install matplotlib).", file=sys.stderr)
        return None
    points = comparison_points(results)
    if not points:
        print(f"no lstm_fused-vs-nn comparison to plot, {path} not written.", file=sys.stderr)
        return None
    panels = sorted(points, key=lambda key: (COMPARISONS.index(key[0]), key[1:]))
    figure, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.5), squeeze=False)
    hidden_sizes = sorted({hidden for group in points.values() for entries in group.values() for _, hidden, _ in entries})
    colours = {hidden: f"C{index}" for index, hidden in enumerate(hidden_sizes)}
    for axis, key in zip(axes.flat, panels):
        comparison, device, dtype, threads, steps = key
        for mode in MODES:
            entries = points[key].get(mode, [])
            for hidden in sorted({hidden for _, hidden, _ in entries}):
                line = sorted((batch, ratio) for batch, h, ratio in entries if h == hidden)
                axis.plot([b for b, _ in line], [r for _, r in line], marker="o", color=colours[hidden],
                          linestyle="-" if mode == TRAINING else "--",
                          label=f"hidden {hidden}, {'training' if mode == TRAINING else 'inference'}")
        axis.axhline(1.0, color="grey", linewidth=0.8)
        axis.axhspan(1 - SAME_WITHIN, 1 + SAME_WITHIN, color="grey", alpha=0.15, linewidth=0)
        # Logarithmic both ways: 2x faster and 2x slower lie as far from parity.
        axis.set_xscale("log", base=2)
        axis.set_yscale("log", base=2)
        batches = sorted({batch for entries in points[key].values() for batch, _, _ in entries})
        axis.set_xticks(batches, [str(batch) for batch in batches])
        axis.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda value, _: f"{value:g}x"))
        axis.set_xlabel("batch size")
        axis.set_ylabel(f"speedup over {comparison.theirs_label}")
        steps_text = "one step" if steps == 1 else f"T={steps}"
        axis.set_title(f"{comparison.ours_label} vs {comparison.theirs_label} ({steps_text}, {device} {dtype})")
        axis.legend(fontsize="small")
    threads = sorted({key[3] for key in panels})
    title = (f"{describe_cpu(machine)}; {'/'.join(map(str, threads))} threads; torch {machine['torch']} "
             f"(grey band: within ±{SAME_WITHIN:.0%})")
    if machine_was_busy(machine):
        title += f"\nthe machine was busy (load average {machine['load_average_at_start']:.1f}): noisy figures"
    figure.suptitle(title, fontsize="medium")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


# ----------------------------------------------------------------------------------------------
# Command line

DEFAULT_PLOT = "lstm_fused_benchmark.png"


def describe_grid(grid) -> str:
    parts = "; ".join(
        f"{', '.join(part.implementations)} at batch {list(part.batch)}, hidden {list(part.hidden)}, T {list(part.steps)}"
        for part in grid["parts"]
    )
    return f"{parts}; {grid['min_run_time']} s per measurement"


def parse_arguments(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="benchmark.py",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="implementations:\n" + "\n".join(f"  {i.name:10} {i.description}" for i in IMPLEMENTATIONS.values())
        + f"\n\ndefault grid (about a minute on 2 cores): {describe_grid(DEFAULT_GRID)}"
        + f"\n--full grid (up to about 15 minutes on 2 cores): {describe_grid(FULL_GRID)}"
        + "\n--batch, --hidden, --steps and --impl replace that value in every part of the grid.",
    )
    parser.add_argument("--full", action="store_true", help="the full grid, every implementation (see below)")
    parser.add_argument("--quick", action="store_true", help="the default grid (kept for older command lines)")
    parser.add_argument("--device", nargs="+", help="cpu and/or cuda (default: cpu, and cuda when available)")
    parser.add_argument("--dtype", nargs="+", help="float32 bfloat16 float16 float64 (default: float32 on the "
                                                   "CPU; float32, bfloat16, float16 on CUDA)")
    parser.add_argument("--threads", nargs="+", type=int, default=[2], help="torch.set_num_threads (default: 2)")
    parser.add_argument("--batch", nargs="+", type=int, help="batch sizes")
    parser.add_argument("--hidden", nargs="+", type=int, help="hidden sizes")
    parser.add_argument("--input", nargs="+", type=int, help="input sizes (default: the hidden size)")
    parser.add_argument("-T", "--steps", nargs="+", type=int, help="steps per call, the state carried between them")
    parser.add_argument("--impl", nargs="+", choices=list(IMPLEMENTATIONS),
                        help=f"implementations ({BASELINE} is always run, as the baseline)")
    parser.add_argument("--mode", nargs="+", choices=MODES, default=list(MODES),
                        help=f"{FORWARD}: forward under no_grad; {TRAINING}: forward and all gradients")
    parser.add_argument("--min-run-time", type=float, help="seconds of timing per measurement")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", metavar="PATH", help="write every figure and the machine description")
    parser.add_argument("--plot", metavar="PATH", default=DEFAULT_PLOT,
                        help=f"where the PNG of both comparisons goes (default: {DEFAULT_PLOT}; needs matplotlib)")
    parser.add_argument("--no-plot", action="store_true", help="write no PNG")
    args = parser.parse_args(argv)

    if args.full and args.quick:
        parser.error("--full and --quick are two different grids: pick one")
    grid = FULL_GRID if args.full else DEFAULT_GRID
    parts = []
    for part in grid["parts"]:
        implementations = part.implementations if args.impl is None else tuple(args.impl)
        # The baseline first: its time is every speedup's numerator and its error the others' scale.
        implementations = (BASELINE,) + tuple(n for n in IMPLEMENTATIONS if n in implementations and n != BASELINE)
        parts.append(GridPart(
            implementations,
            tuple(args.batch or part.batch),
            tuple(args.hidden or part.hidden),
            tuple(args.steps or part.steps),
        ))
    args.parts = list(dict.fromkeys(parts))  # overrides can make parts identical
    if args.min_run_time is None:
        args.min_run_time = grid["min_run_time"]
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
    sizes = [size for part in args.parts for size in part.batch + part.hidden + part.steps]
    if min(sizes + args.threads + (args.input or [1])) < 1:
        parser.error("sizes, steps and threads must be positive")
    return args


def dtypes_for(device: str, chosen: Optional[List[str]]) -> List[str]:
    if chosen is not None:
        return chosen
    return ["float32"] if device == "cpu" else ["float32", "bfloat16", "float16"]


def shapes_from(args) -> List[Tuple[Shape, List[str]]]:
    """Every shape to run, with the implementations to run on it."""
    jobs: Dict[Shape, List[str]] = {}
    for part in args.parts:
        for device in args.device:
            for dtype in dtypes_for(device, args.dtype):
                for threads in args.threads:
                    for steps in part.steps:
                        for hidden in part.hidden:
                            for input_size in args.input or [hidden]:
                                for batch in part.batch:
                                    shape = Shape(device, dtype, threads, batch, input_size, hidden, steps)
                                    names = jobs.setdefault(shape, [])
                                    names += [n for n in part.implementations if n not in names]
    return list(jobs.items())


def main(argv=None) -> int:
    args = parse_arguments(argv)
    jobs = shapes_from(args)
    machine = machine_description(args.threads)
    total = len(jobs) * len(args.mode)
    print(
        f"lstm_fused {machine['lstm_fused']} ({machine['lstm_fused_path']}), torch {machine['torch']}, "
        f"{describe_cpu(machine)}, GPU: {machine['gpu']}; {total} cases"
        + ("" if args.full else " (--full for the whole grid)"),
        file=sys.stderr,
    )
    print(f"lstm_fused build: {getattr(lstm_fused.BUILD_INFO, 'SUMMARY', 'unknown (rebuild)')}", file=sys.stderr)
    warn_if_busy(machine)
    started, results = time.perf_counter(), []
    progress = Progress([case_weight(shape, names) for shape, names in jobs for _ in args.mode])
    try:
        for shape, names in jobs:
            for result in run_shape(shape, args.mode, names, args.min_run_time, args.seed):
                results.append(result)
                progress.advance(case_summary(result))
    except KeyboardInterrupt:
        # Long runs: keep what was measured.
        progress.finish()
        print(f"interrupted after {len(results)} of {total} cases", file=sys.stderr)
    else:
        progress.finish()
    wall_time_s = time.perf_counter() - started
    # One table per set of implementations, so that no table is mostly empty columns.
    tables: Dict[Tuple[str, ...], List[CaseResult]] = {}
    for result in results:
        tables.setdefault(tuple(result.outcomes), []).append(result)
    for names, group in tables.items():
        print(markdown_table(group, list(names)) + "\n")

    settings = {key: value for key, value in vars(args).items() if key not in ("json", "plot", "no_plot", "parts")}
    settings["grid"] = [asdict(part) for part in args.parts]
    settings["implementations"] = list(dict.fromkeys(name for part in args.parts for name in part.implementations))
    settings.pop("impl")
    if args.json:
        write_json(args.json, results, machine, settings, wall_time_s)
        print(f"figures written to {args.json}", file=sys.stderr)
    if not args.no_plot:
        written = plot_comparisons(args.plot, results, machine)
        if written:
            print(f"plot written to {written}", file=sys.stderr)

    failures = [
        f"{result.case.describe()}: {name}: {outcome.message}"
        for result in results
        for name, outcome in result.outcomes.items()
        if outcome.status == "FAILED"
    ]
    print(verdict(results, machine) + f"\n({len(results)} cases in {format_duration(wall_time_s)})")
    sys.stdout.flush()
    if failures:
        print(f"{len(failures)} FAILED:\n  " + "\n  ".join(failures), file=sys.stderr)
        return 1
    if len(results) < total:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())

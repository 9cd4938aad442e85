"""How much lstm_fused and PyTorch slow down when another process keeps one core busy.

The small-batch kernels split two threads across tiny work that meets at a barrier every step; with
a busy competitor on a core, a barrier can wait for a scheduler time slice. This measures, for each
case, the time idle and the time beside one busy process (a Python loop that never sleeps), for
lstm_fused and for PyTorch's module timed in turn in the same run, and prints each one's slowdown
(busy / idle). What we hold ourselves to: lstm_fused's slowdown no worse than PyTorch's.

    python benchmarks/contention.py [--threads 2] [--min-run-time 0.5] [--json PATH]

Idle and busy phases alternate (idle, busy, idle, busy): the spread between the two runs of a phase
is printed beside each figure, and a difference smaller than it is noise.
"""
import argparse
import json
import multiprocessing
import sys
import time

import torch

from lstm_fused import benchmark as bench

# (module, batch, hidden, steps): the sizes where the small-batch paths split two threads, and one
# beyond them (batch 256 runs on the library products).
CASES = [
    ("cell", 1, 64, 1),
    ("cell", 8, 128, 1),
    ("cell", 16, 256, 1),
    ("sequence", 1, 128, 64),
    ("sequence", 8, 128, 64),
    ("sequence", 8, 512, 64),
    ("sequence", 64, 256, 64),
]
IMPLEMENTATIONS = {"cell": ("nn", "fused"), "sequence": ("nn.LSTM", "fused.LSTM")}
PHASES = ("idle", "busy", "idle", "busy")


def spin():
    """The competitor: one process that never sleeps."""
    while True:
        pass


def measure(calls, threads, min_run_time):
    measurements, errors = bench.measure_interleaved(calls, threads, min_run_time, torch.device("cpu"))
    if errors:
        raise RuntimeError(f"failed: {errors}")
    return {name: m.median for name, m in measurements.items()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default: 2)")
    parser.add_argument("--mode", choices=bench.MODES, default=bench.TRAINING, help="default: fwd+bwd")
    parser.add_argument("--min-run-time", type=float, default=0.5, help="seconds per case and phase")
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args(argv)

    machine = bench.machine_description([args.threads])
    print(f"# {bench.describe_cpu(machine)}; torch {torch.__version__}; {args.threads} threads; {args.mode}; "
          f"busy = one other process spinning")
    bench.warn_if_busy(machine)  # "idle" must be idle for the slowdowns to mean anything
    prepared_cases = []
    for module, batch, hidden, steps in CASES:
        shape = bench.Shape("cpu", "float32", args.threads, batch, hidden, hidden, steps)
        problem = bench.Problem.random(shape, seed=batch * 1000 + hidden)
        prepared, settled = bench.prepare_implementations(list(IMPLEMENTATIONS[module]), problem)
        if settled:
            raise RuntimeError(f"could not build {settled}")
        calls = {name: bench.make_call(p, problem, args.mode) for name, p in prepared.items()}
        prepared_cases.append(((module, batch, hidden, steps), calls))

    times = {case: {phase: [] for phase in ("idle", "busy")} for case, _ in prepared_cases}
    for phase in PHASES:
        competitor = None
        if phase == "busy":
            competitor = multiprocessing.get_context("spawn").Process(target=spin, daemon=True)
            competitor.start()
            time.sleep(0.5)  # let it reach its loop
        try:
            for case, calls in prepared_cases:
                times[case][phase].append(measure(calls, args.threads, args.min_run_time))
        finally:
            if competitor is not None:
                competitor.terminate()
                competitor.join()
        print(f"  {phase} phase done", file=sys.stderr)

    rows, report = [], []
    header = f"{'case':<24} {'impl':<11} {'idle ms':>9} {'busy ms':>9} {'slowdown':>15}"
    print(header)
    for case, calls in prepared_cases:
        module, batch, hidden, steps = case
        label = f"{module} B={batch} H={hidden} T={steps}"
        slowdowns = {}
        for name in calls:
            idle = [run[name] for run in times[case]["idle"]]
            busy = [run[name] for run in times[case]["busy"]]
            ratios = [b / i for b in busy for i in idle]
            slowdown = sum(busy) / sum(idle)
            slowdowns[name] = slowdown
            print(f"{label:<24} {name:<11} {1e3 * min(idle):9.3f} {1e3 * min(busy):9.3f} "
                  f"{slowdown:6.2f}x ({min(ratios):.2f}-{max(ratios):.2f})")
            rows.append(dict(module=module, batch=batch, hidden=hidden, steps=steps, implementation=name,
                             idle_s=idle, busy_s=busy, slowdown=slowdown))
        baseline, ours = IMPLEMENTATIONS[module]
        report.append((label, slowdowns[ours] / slowdowns[baseline]))
    print("\nlstm_fused's slowdown relative to PyTorch's (<= 1: it suffers no more than PyTorch):")
    for label, relative in report:
        print(f"  {label:<24} {relative:.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(machine=machine, threads=args.threads, mode=args.mode, cases=rows), f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The regularised LSTM (issue 16) on the CPU: lf.LSTM with layer_norm, zoneout, recurrent_dropout,
weight_drop and all four, forward + backward in training mode over T steps, against

  * the same formulas as a Python loop of torch ops (lstm_fused.reference.regularised_lstm, what
    people write today; given the fused call's masks, so its time excludes drawing them), target
    at least 5x;
  * plain lf.LSTM (no options) at the same sizes, target at most 1.3x its time.

    python benchmarks/regularised.py [--hidden 128 256 512] [--batch 1 8 16] [-T 64] [--threads 2] [--clock thread]

With --threads 1 the times are the calling thread's CPU time (time.thread_time), the three
implementations interleaved call by call: a loaded machine then shifts them little. With more
threads, wall-time medians (torch.utils.benchmark).
"""
import argparse
import platform
import statistics
import sys
import time

import torch
from torch.utils import benchmark

import lstm_fused as lf
from lstm_fused import reference

OPTIONS = {
    "layer_norm": dict(layer_norm=True),
    "zoneout": dict(zoneout=0.1),
    "recurrent_dropout": dict(recurrent_dropout=0.25),
    "weight_drop": dict(weight_drop=0.5),
    "all": dict(layer_norm=True, zoneout=0.1, recurrent_dropout=0.25, weight_drop=0.5),
}


def seconds(fn, min_run_time):
    fn()  # warm-up: first-call allocations, oneDNN's weight reorders
    return benchmark.Timer("fn()", globals={"fn": fn}).blocked_autorange(min_run_time=min_run_time).median


def interleaved_seconds(fns, min_run_time, clock):
    """Median seconds of each of fns, timed in rounds of one call of each (so that a load on the
    machine falls on all of them alike). clock: time.thread_time (the calling thread's CPU time:
    with one thread, all of a call's work and none of another process's) or time.perf_counter."""
    for fn in fns:
        fn()  # warm-up: first-call allocations, oneDNN's weight reorders
    start = clock()
    for fn in fns:
        fn()
    rounds = int(min(50, max(5, min_run_time * len(fns) / max(clock() - start, 1e-9))))
    times = [[] for _ in fns]
    for _ in range(rounds):
        for fn, samples in zip(fns, times):
            begin = clock()
            fn()
            samples.append(clock() - begin)
    return [statistics.median(samples) for samples in times]


def training_step(lstm, x, forward):
    def run():
        lstm.zero_grad(set_to_none=True)
        output, (h_n, c_n) = forward(x)
        (output.sum() + h_n.sum() + c_n.sum()).backward()
    return run


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", nargs="+", type=int, default=[128, 256, 512])
    parser.add_argument("--batch", nargs="+", type=int, default=[1, 8, 16])
    parser.add_argument("-T", "--steps", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--options", nargs="+", choices=list(OPTIONS), default=list(OPTIONS))
    parser.add_argument("--min-run-time", type=float, default=0.3)
    parser.add_argument("--clock", choices=["auto", "thread", "wall"], default="auto",
                        help="thread: the calling thread's CPU time, the three implementations interleaved "
                             "(auto: with --threads 1); wall: torch.utils.benchmark's medians of wall time")
    args = parser.parse_args(argv)
    clock = args.clock if args.clock != "auto" else ("thread" if args.threads == 1 else "wall")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"lstm_fused regularised LSTM, CPU ({platform.processor() or platform.machine()}, "
          f"capability {lf.cpu_capability()}), {args.threads} threads, float32, T={args.steps}, "
          f"training forward+backward, median ms ({'thread CPU time, interleaved' if clock == 'thread' else 'wall time'})")
    print(f"{'option':>18} {'H':>4} {'B':>3} {'fused':>8} {'loop':>9} {'plain lf':>9} {'vs loop':>8} {'vs plain':>9}")
    rows = []
    for hidden in args.hidden:
        for batch in args.batch:
            x = torch.randn(args.steps, batch, hidden, requires_grad=True)
            plain = lf.LSTM(hidden, hidden)
            plain_step = training_step(plain, x, plain)
            if clock == "wall":
                plain_time = seconds(plain_step, args.min_run_time)
            for name in args.options:
                lstm = lf.LSTM(hidden, hidden, **OPTIONS[name]).train()
                fused_step = training_step(lstm, x, lstm)
                _, _, states = lstm(x, return_states=True)
                states = [s._replace(**{f: getattr(s, f).detach() for f in s._fields[3:] if getattr(s, f) is not None})
                          for s in states]
                loop_step = training_step(lstm, x, lambda x: reference.regularised_lstm(lstm, x, states=states))
                if clock == "wall":
                    fused_time = seconds(fused_step, args.min_run_time)
                    loop_time = seconds(loop_step, args.min_run_time)
                else:
                    fused_time, loop_time, plain_time = interleaved_seconds(
                        [fused_step, loop_step, plain_step], args.min_run_time, time.thread_time)
                rows.append((name, hidden, batch, fused_time, loop_time, plain_time))
                print(f"{name:>18} {hidden:>4} {batch:>3} {fused_time * 1e3:8.2f} {loop_time * 1e3:9.2f} "
                      f"{plain_time * 1e3:9.2f} {loop_time / fused_time:7.1f}x {fused_time / plain_time:8.2f}x",
                      flush=True)
    speedups = [loop / fused for _, _, _, fused, loop, _ in rows]
    overheads = [fused / plain for _, _, _, fused, _, plain in rows]
    print(f"vs the Python loop: {min(speedups):.1f}x to {max(speedups):.1f}x faster (target >= 5x); "
          f"vs plain lf.LSTM: {min(overheads):.2f}x to {max(overheads):.2f}x its time (target <= 1.3x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""lstm_fused.LSTM against torch.nn.LSTM with projections (proj_size > 0, LSTMP) on the CPU: one
layer, float32, T steps, proj_size = hidden / 4, forward (under no_grad) and forward + backward
(every gradient). nn.LSTM has no oneDNN kernel for projections (it warns "LSTM with projections
is not supported with oneDNN" and runs ATen's step loop), so this compares against that loop.
Each figure is the median of timed blocks (torch.utils.benchmark), the two modules interleaved;
the outputs are checked against each other first.

    python benchmarks/lstmp.py [--batch 1 8 64] [--hidden 256 512 1024] [--steps 64] [--threads 2]
"""
import argparse
import warnings

import torch
from torch import nn
from torch.utils import benchmark

import lstm_fused as lf


def timed(fn, min_run_time):
    return benchmark.Timer(stmt="fn()", globals={"fn": fn}).blocked_autorange(min_run_time=min_run_time).median


def case(batch, hidden, steps, min_run_time):
    proj = hidden // 4
    torch.manual_seed(0)
    torch_lstm = nn.LSTM(hidden, hidden, proj_size=proj)
    fused_lstm = lf.LSTM(hidden, hidden, proj_size=proj)
    fused_lstm.load_state_dict(torch_lstm.state_dict())
    x = torch.randn(steps, batch, hidden)
    hx = (torch.randn(1, batch, proj), torch.randn(1, batch, hidden))
    grad_output = torch.randn(steps, batch, proj)

    with torch.no_grad():
        expected, actual = torch_lstm(x, hx)[0], fused_lstm(x, hx)[0]
    error = ((actual - expected).norm() / expected.norm()).item()
    assert error < 1e-4, f"outputs differ: relative error {error:.2e}"

    def forward(lstm):
        def run():
            with torch.no_grad():
                lstm(x, hx)
        return run

    def training(lstm):
        leaves = [x.clone().requires_grad_(), *(t.clone().requires_grad_() for t in hx)]
        wrt = leaves + list(lstm.parameters())

        def run():
            output, _ = lstm(leaves[0], (leaves[1], leaves[2]))
            torch.autograd.grad(output, wrt, grad_output)
        return run

    rows = []
    for mode, make in (("forward", forward), ("forward+backward", training)):
        nn_s = fused_s = None
        for _ in range(2):  # interleaved: each module measured twice, the better median kept
            t = timed(make(torch_lstm), min_run_time)
            nn_s = t if nn_s is None else min(nn_s, t)
            t = timed(make(fused_lstm), min_run_time)
            fused_s = t if fused_s is None else min(fused_s, t)
        rows.append((batch, hidden, proj, mode, nn_s * 1e3, fused_s * 1e3, nn_s / fused_s))
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", nargs="+", type=int, default=[1, 8, 64])
    parser.add_argument("--hidden", nargs="+", type=int, default=[256, 512, 1024])
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--min-run-time", type=float, default=0.5)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message="LSTM with projections is not supported with oneDNN")
    print(f"CPU float32, T={args.steps}, threads={args.threads}, lstm_fused path {lf.cpu_capability()}\n")
    print("| batch | hidden | proj | mode | nn.LSTM ms | lf.LSTM ms | speedup |")
    print("|---:|---:|---:|---|---:|---:|---:|")
    for hidden in args.hidden:
        for batch in args.batch:
            for row in case(batch, hidden, args.steps, args.min_run_time):
                print("| {} | {} | {} | {} | {:.2f} | {:.2f} | {:.2f}x |".format(*row), flush=True)


if __name__ == "__main__":
    main()

"""The benchmark of lstm_fused against nn.LSTMCell, the reference cell and torch.compile:
`python benchmarks/benchmark.py --help`. The code lives in lstm_fused/benchmark.py, so the installed
package carries it (`python -m lstm_fused.benchmark` outside the source tree does the same)."""
import sys

from lstm_fused.benchmark import main

if __name__ == "__main__":
    sys.exit(main())

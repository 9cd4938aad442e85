"""The benchmark of lstm_fused.LSTMCell against nn.LSTMCell and lstm_fused.LSTM against nn.LSTM:
about a minute on 2 cores, ending with a verdict and a plot; `--full` for every implementation over
the whole grid, `--help` for the rest. The code lives in lstm_fused/benchmark.py, so the installed
package carries it (`python -m lstm_fused.benchmark` outside the source tree does the same)."""
import sys

from lstm_fused.benchmark import main

if __name__ == "__main__":
    sys.exit(main())

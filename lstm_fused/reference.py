"""The LSTM cell written gate by gate with plain torch ops: the textbook formulation.

It shares nothing with the kernels (only the argument handling), and is the second baseline,
beside nn.LSTMCell, for the tests and the benchmark."""
from torch import nn

from .functional import LSTMGates, prepare_cell_args


def lstm_cell(input, hx, weight_ih, weight_hh, bias_ih=None, bias_hh=None, *, return_gates=False):
    hidden_size = weight_hh.shape[1]
    x, h_0, c_0, batched = prepare_cell_args(input, hx, hidden_size, name="reference.LSTMCell")

    def preactivation(gate):
        rows = slice(gate * hidden_size, (gate + 1) * hidden_size)
        z = x @ weight_ih[rows].T + h_0 @ weight_hh[rows].T
        if bias_ih is not None:
            z = z + bias_ih[rows]
        if bias_hh is not None:
            z = z + bias_hh[rows]
        return z

    input_gate = preactivation(0).sigmoid()
    forget_gate = preactivation(1).sigmoid()
    cell_gate = preactivation(2).tanh()
    output_gate = preactivation(3).sigmoid()
    c_1 = forget_gate * c_0 + input_gate * cell_gate
    h_1 = output_gate * c_1.tanh()

    gates = (input_gate, forget_gate, cell_gate, output_gate)
    if not batched:
        h_1, c_1 = h_1.squeeze(0), c_1.squeeze(0)
        gates = tuple(g.squeeze(0) for g in gates)
    if return_gates:
        return h_1, c_1, LSTMGates(*gates)
    return h_1, c_1


class LSTMCell(nn.LSTMCell):
    """nn.LSTMCell's parameters and initialisation, computed gate by gate in Python."""

    def forward(self, input, hx=None, *, return_gates: bool = False):
        return lstm_cell(
            input, hx, self.weight_ih, self.weight_hh, self.bias_ih, self.bias_hh, return_gates=return_gates
        )

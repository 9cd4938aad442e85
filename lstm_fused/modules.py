"""Drop-in replacements for torch.nn's recurrent modules."""
from torch import nn

from . import functional


class LSTMCell(nn.LSTMCell):
    """``torch.nn.LSTMCell`` computed by lstm_fused's kernels.

    A subclass of nn.LSTMCell: same constructor, parameters (``weight_ih`` [4H, I], ``weight_hh``
    [4H, H], ``bias_ih``, ``bias_hh``; gate order i, f, g, o), initialisation, state_dict and repr.
    ``cell(input, hx=None)`` returns ``(h_1, c_1)``; ``cell(input, hx, return_gates=True)`` also
    returns the step's activated gates as an :class:`lstm_fused.LSTMGates`.
    """

    def forward(self, input, hx=None, *, return_gates: bool = False):
        return functional.lstm_cell(
            input, hx, self.weight_ih, self.weight_hh, self.bias_ih, self.bias_hh, return_gates=return_gates
        )

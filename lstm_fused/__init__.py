"""lstm_fused: a fused LSTM cell for PyTorch, drop-ins for torch.nn.LSTMCell and torch.nn.LSTM."""
from . import reference
from ._ops import BUILD_INFO, cpu_capability, supported_cpu_capabilities
from .functional import LSTMGates, lstm_cell
from .convert import convert
from .modules import LSTM, LSTMCell, LSTMLayerStates

__version__ = "0.1.0"
WITH_CUDA = BUILD_INFO.WITH_CUDA

__all__ = ["LSTM", "LSTMCell", "LSTMGates", "LSTMLayerStates", "convert", "lstm_cell", "reference", "WITH_CUDA",
           "cpu_capability", "supported_cpu_capabilities"]

"""lstm_fused: a fused LSTM cell for PyTorch, a drop-in for torch.nn.LSTMCell."""
from . import reference
from ._ops import BUILD_INFO
from .functional import LSTMGates, lstm_cell
from .modules import LSTMCell

__version__ = "0.1.0"
WITH_CUDA = BUILD_INFO.WITH_CUDA

__all__ = ["LSTMCell", "LSTMGates", "lstm_cell", "reference", "WITH_CUDA"]

"""convert(model): lstm_fused's modules in place of torch.nn's, in an existing model."""
import warnings

from torch import nn

from .modules import LSTM, LSTMCell

# torch.nn class -> lstm_fused's subclass of it. Each subclass holds no state of its own, so the
# swap is a class change: the same module object keeps its parameters (and so the optimizer's
# references to them), buffers, hooks, device, dtype and training mode.
_REPLACEMENTS = {nn.LSTM: LSTM, nn.LSTMCell: LSTMCell}


def convert(model: nn.Module) -> nn.Module:
    """Makes every ``torch.nn.LSTM`` and ``torch.nn.LSTMCell`` in ``model`` (``model`` itself
    included, recursively) an :class:`lstm_fused.LSTM` / :class:`lstm_fused.LSTMCell`, in place,
    and returns ``model``. Weights, device, dtype and training mode are kept (the parameters are the
    same objects); nn.LSTMs with projections (``proj_size > 0``) included. Modules it cannot take —
    a user's subclass of nn.LSTM / nn.LSTMCell, whose own code would be lost — are left as they
    are, with a warning."""
    for name, module in model.named_modules():
        replacement = _REPLACEMENTS.get(type(module))
        where = f"{name or 'the model'} ({type(module).__name__})"
        if replacement is None:
            if isinstance(module, tuple(_REPLACEMENTS)) and not isinstance(module, tuple(_REPLACEMENTS.values())):
                warnings.warn(
                    f"lstm_fused.convert: left {where} as it is: a subclass of torch.nn's "
                    "module whose own code would be lost",
                    stacklevel=2,
                )
            continue
        module.__class__ = replacement
    return model

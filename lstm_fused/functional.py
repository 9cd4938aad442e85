"""Functional forms: lstm_cell (one fused step, as torch.lstm_cell) and lstm_layers (nn.LSTM's
layer stack over a packed sequence)."""
from typing import NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ._ops import BUILD_INFO, ops


class LSTMGates(NamedTuple):
    """The activated gates of one step, each shaped like h_1. Views of one [batch, 4 * hidden]
    buffer the kernel writes anyway (backward needs it), so asking for them costs nothing;
    gradients flow through them like through h_1 and c_1."""

    input: Tensor  # i = sigmoid(.)
    forget: Tensor  # f = sigmoid(.)
    cell: Tensor  # g = tanh(.), the candidate cell state
    output: Tensor  # o = sigmoid(.)


def prepare_cell_args(input: Tensor, hx, hidden_size: int, name: str = "LSTMCell"):
    """nn.LSTMCell's handling of unbatched input and of a missing state, with its errors.

    Returns (input, h_0, c_0, batched) with 2-D tensors."""
    if not isinstance(input, Tensor):
        raise TypeError(f"{name}: input must be a Tensor, got {type(input).__name__}")
    if input.dim() not in (1, 2):
        raise ValueError(f"{name}: Expected input to be 1D or 2D, got {input.dim()}D instead")
    batched = input.dim() == 2
    if not batched:
        input = input.unsqueeze(0)
    if hx is None:
        zeros = input.new_zeros(input.shape[0], hidden_size)
        return input, zeros, zeros, batched
    if not isinstance(hx, (tuple, list)) or not all(isinstance(t, Tensor) for t in hx):
        raise TypeError(f"{name}: hx must be a tuple (h_0, c_0) of two Tensors, got {type(hx).__name__}")
    if len(hx) != 2:
        # RuntimeError, as nn.LSTMCell raises for a sequence of the wrong length.
        raise RuntimeError(f"{name}: hx must hold two states (h_0, c_0), got {len(hx)}")
    for index, state in enumerate(hx):
        if state.dim() not in (1, 2):
            raise ValueError(f"{name}: Expected hx[{index}] to be 1D or 2D, got {state.dim()}D instead")
        if state.dim() != input.dim() - (0 if batched else 1):
            kind = "batched (2-D)" if batched else "unbatched (1-D)"
            raise RuntimeError(
                f"{name}: {kind} input needs {'2' if batched else '1'}-D hx[{index}], got shape {tuple(state.shape)}"
            )
    h_0, c_0 = hx
    if not batched:
        h_0, c_0 = h_0.unsqueeze(0), c_0.unsqueeze(0)
    return input, h_0, c_0, batched


def _kernel_device_type(input: Tensor) -> str:
    """The input's device type, once we know the kernels for it were built."""
    device_type = input.device.type
    if device_type == "cuda" and not BUILD_INFO.WITH_CUDA:
        raise RuntimeError(
            "lstm_fused was built without its CUDA kernels (no CUDA toolkit or CPU-only torch at build time); "
            "rebuild with `LSTM_FUSED_CUDA=1 pip install --no-build-isolation --force-reinstall --no-deps .`"
        )
    return device_type


def _autocast_enabled(device_type: str) -> bool:
    """torch.is_autocast_enabled, False for device types autocast does not know (meta), where
    asking raises."""
    return torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type)


def _cast_to_autocast_dtype(tensors, device_type):
    """What autocast does to an op on its lower-precision list: every floating tensor but float64
    in the autocast dtype. lstm is on the list on the CPU and on CUDA, lstm_cell only on CUDA."""
    if not _autocast_enabled(device_type):
        return tensors
    dtype = torch.get_autocast_dtype(device_type)
    return [t.to(dtype) if t is not None and t.dtype != torch.float64 else t for t in tensors]


def _autocast_cell(tensors, device_type):
    """The dtype nn.LSTMCell computes in under autocast.

    CUDA: lstm_cell is on autocast's list. CPU: it is not; nn.LSTMCell's products then run in the
    autocast dtype and its pointwise ops promote, so the outputs come out in promote(autocast
    dtype, c_0's dtype). Where the tensors already share a dtype they keep it (nn gives the same
    output dtype); where they are mixed (a cell fed by an autocast Linear) they are cast to that
    promoted dtype."""
    if device_type == "cuda":
        return _cast_to_autocast_dtype(tensors, device_type)
    if not _autocast_enabled(device_type) or len({t.dtype for t in tensors if t is not None}) == 1:
        return tensors
    dtype = torch.promote_types(torch.get_autocast_dtype(device_type), tensors[2].dtype)
    return [t.to(dtype) if t is not None else t for t in tensors]


def _dense(tensor):
    """A sparse tensor as a strided one, its gradient flowing back to the sparse one: nn.LSTMCell's
    products take sparse input and states, the fused kernels only strided tensors."""
    if isinstance(tensor, Tensor) and tensor.layout != torch.strided:
        return tensor.to_dense(masked_grad=False)  # nn's gradient: every element, not the stored ones
    return tensor


def _is_plain_batched_call(input, hx) -> bool:
    """2-D input, a (h_0, c_0) tuple of 2-D tensors, autocast off: nothing for Python to adapt."""
    return (
        type(hx) is tuple
        and len(hx) == 2
        and isinstance(input, Tensor)
        and isinstance(hx[0], Tensor)
        and isinstance(hx[1], Tensor)
        and input.dim() == 2
        and hx[0].dim() == 2
        and hx[1].dim() == 2
        and not torch._C._is_any_autocast_enabled()
    )


def lstm_cell(
    input: Tensor,
    hx: Optional[Tuple[Tensor, Tensor]],
    weight_ih: Tensor,
    weight_hh: Tensor,
    bias_ih: Optional[Tensor] = None,
    bias_hh: Optional[Tensor] = None,
    *,
    return_gates: bool = False,
):
    """One fused LSTM step, as ``torch.lstm_cell``: returns ``(h_1, c_1)``.

    input is (batch, input_size) or unbatched (input_size,); hx is (h_0, c_0) shaped like the
    hidden state, or None for zeros. With ``return_gates=True`` returns ``(h_1, c_1, gates)`` where
    gates is an :class:`LSTMGates` of the activated i, f, g, o."""
    if _is_plain_batched_call(input, hx):
        # The op's own checks cover these arguments. The Python of the other branch was ~10 us of
        # a ~170 us training step at batch 1, which is why the common call skips it.
        try:
            h_1, c_1, gates = ops.cell_forward(input, hx[0], hx[1], weight_ih, weight_hh, bias_ih, bias_hh)
        except NotImplementedError:
            _kernel_device_type(input)  # says how to rebuild where the CUDA kernels are missing
            if all(t.layout == torch.strided for t in (input, *hx)):
                raise
            # A sparse input or state: again, strided.
            hx = (_dense(hx[0]), _dense(hx[1]))
            return lstm_cell(_dense(input), hx, weight_ih, weight_hh, bias_ih, bias_hh, return_gates=return_gates)
    else:
        input = _dense(input)
        if isinstance(hx, (tuple, list)):
            hx = tuple(_dense(state) for state in hx)
        input, h_0, c_0, batched = prepare_cell_args(input, hx, weight_hh.shape[-1])
        device_type = _kernel_device_type(input)
        args = _autocast_cell([input, h_0, c_0, weight_ih, weight_hh, bias_ih, bias_hh], device_type)
        h_1, c_1, gates = ops.cell_forward(*args)
        if not batched:
            h_1, c_1, gates = h_1.squeeze(0), c_1.squeeze(0), gates.squeeze(0)
    if not return_gates:
        return h_1, c_1
    return h_1, c_1, LSTMGates(*gates.chunk(4, dim=-1))


def lstm_layers(
    data: Tensor,
    batch_sizes: Tensor,
    h_0: Tensor,
    c_0: Tensor,
    weights: Sequence[Sequence[Tensor]],
    *,
    bidirectional: bool = False,
    dropout: float = 0.0,
    training: bool = False,
    need_states: bool = True,
):
    """nn.LSTM's stack of layers over a sequence in PackedSequence layout, one op call per layer
    and direction.

    data is [sum(batch_sizes), input_size] (a padded [T, B, I] input is data = input.view(T * B, I)
    with T batch sizes B); batch_sizes the int64 CPU tensor of rows per step, non-increasing;
    h_0, c_0 are [num_layers * num_directions, batch_sizes[0], hidden_size]; weights[layer *
    num_directions + direction] is [weight_ih, weight_hh] or [weight_ih, weight_hh, bias_ih,
    bias_hh], as nn.LSTM.all_weights. With projections (nn.LSTM's proj_size > 0) each also ends
    with weight_hr [proj_size, hidden_size], and h_0 has proj_size features. Dropout, when training,
    applies to every layer's output but the last, as nn.LSTM does.

    Returns ``(output, h_n, c_n, states)``: output [rows, num_directions * hidden_size] (proj_size
    with projections), and for each layer and direction (same index as weights) a pair
    (cell_states [rows, hidden_size], gates [rows, 4 * hidden_size] activated, i f g o). With
    ``need_states=False`` states is empty: where nothing asks for a gradient, the layers then run
    the op that keeps neither (on the CPU it projects the input a few steps at a time)."""
    num_directions = 2 if bidirectional else 1
    num_layers = len(weights) // num_directions
    device_type = _kernel_device_type(data)
    layer_input = data
    h_n, c_n, states = [], [], []
    for layer in range(num_layers):
        direction_outputs = []
        for direction in range(num_directions):
            index = layer * num_directions + direction
            weight_ih, weight_hh, *rest = weights[index]
            # nn.LSTM.all_weights: the biases (when there are) come before weight_hr (when projecting).
            weight_hr = rest.pop() if len(rest) % 2 == 1 else None
            bias_ih, bias_hh = rest if rest else (None, None)
            x, hx, cx, w_ih, w_hh, b_ih, b_hh, w_hr = _cast_to_autocast_dtype(
                [layer_input, h_0[index], c_0[index], weight_ih, weight_hh, bias_ih, bias_hh, weight_hr], device_type
            )
            args = (x, batch_sizes, hx, cx, w_ih, w_hh, b_ih, b_hh, direction == 1, w_hr)
            if need_states or (torch.is_grad_enabled() and any(isinstance(t, Tensor) and t.requires_grad for t in args)):
                output, h_last, c_last, cell_states, gates = ops.sequence_forward(*args)
                states.append((cell_states, gates))
            else:
                output, h_last, c_last = ops.sequence_inference(*args)
            direction_outputs.append(output)
            h_n.append(h_last)
            c_n.append(c_last)
        layer_output = direction_outputs[0] if num_directions == 1 else torch.cat(direction_outputs, dim=1)
        if dropout > 0 and training and layer < num_layers - 1:
            layer_output = F.dropout(layer_output, dropout, training=True)
        layer_input = layer_output
    c_n = torch.stack(c_n)
    if weight_hr is not None and c_n.dtype != c_0.dtype:
        # Only autocast casts c_0. nn.LSTM with projections runs its cell as ATen ops there:
        # c = f * c_0 + i * g promotes with the uncast c_0, so its c_n comes out in c_0's dtype.
        c_n = c_n.to(c_0.dtype)
    return layer_input, torch.stack(h_n), c_n, states

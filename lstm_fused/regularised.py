"""The regularised LSTM's functional form (issue 16): layer normalisation, zoneout, recurrent
(variational) dropout and weight drop, one fused op call per layer and direction
(``torch.ops.lstm_fused.regularised_sequence_forward``), with the random masks drawn here from
torch's generator and returned, so that a run can be inspected and replayed.

One step, in training (in evaluation there is no dropout, and zoneout weighs the old state by its
probability instead of a mask)::

    h_bar = h_{t-1} * m_r                                  recurrent dropout, m_r: [B, H] per call
    W_bar = W_hh * M_w                                     weight drop, M_w: [4H, H] per call
    a = LN(x W_ih^T; g_ih) + LN(h_bar W_bar^T; g_hh) + b_ih + b_hh
    i, f, g, o = sigmoid, sigmoid, tanh, sigmoid of a's chunks
    c~ = f c_{t-1} + i g;   h~ = o tanh(LN(c~; g_c, b_c))
    c_t = d_c c_{t-1} + (1 - d_c) c~;   h_t = d_h h_{t-1} + (1 - d_h) h~

LN(v; g, b) = g (v - mean v) / sqrt(var v + 1e-5) + b over the features, biased variance. Without
layer norm, no LN (h~ = o tanh(c~)).
"""
from typing import List, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ._ops import ops
from .functional import _cast_to_autocast_dtype, _kernel_device_type


class RegularisationMasks(NamedTuple):
    """The random masks one layer and direction used in a training call (None: that option off,
    or evaluation). recurrent_dropout and weight_drop hold 0 or 1 / (1 - p); the zoneout masks 0
    or 1 (1: the unit kept its previous value), one row per row of the layer's output."""

    recurrent_dropout: Optional[Tensor] = None  # [B, H]
    weight_drop: Optional[Tensor] = None  # [4H, H]
    zoneout_cell: Optional[Tensor] = None  # [rows, H]
    zoneout_hidden: Optional[Tensor] = None  # [rows, H]


class LayerNormWeights(NamedTuple):
    """One layer and direction's normalisation parameters (nn's names without the suffix)."""

    ih: Tensor  # [4H], the scale of LN(x W_ih^T)
    hh: Tensor  # [4H], the scale of LN(h W_hh^T)
    cell_weight: Tensor  # [H]
    cell_bias: Tensor  # [H]


def zoneout_pair(zoneout) -> Tuple[float, float]:
    """``zoneout`` as (cell, hidden): a float for both, or a pair; each a probability in [0, 1]."""
    if isinstance(zoneout, (tuple, list)):
        if len(zoneout) != 2:
            raise ValueError(f"zoneout must be a float or a pair (cell, hidden), got {len(zoneout)} values")
        pair = tuple(zoneout)
    else:
        pair = (zoneout, zoneout)
    for name, value in zip(("cell", "hidden"), pair):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
            raise ValueError(f"zoneout ({name}) must be a probability in [0, 1], got {value!r}")
    return float(pair[0]), float(pair[1])


def check_dropout_probability(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be a probability in [0, 1], got {value!r}")
    return float(value)


def _bernoulli(shape, p: float, like: Tensor) -> Tensor:
    """1 with probability p, else 0, in like's dtype and device, from torch's generator: one 31-bit
    integer a value compared with p 2^31 (p exact to 2^-31). bernoulli_ took 2.5-3x as long on the
    CPU (Zen 4, one thread: 3.5 against 1.3 ms for a [1024, 256] mask), as much as the fused
    recurrence itself at batch 1-8. (randint, not random_: dynamo traces no random_.) The path
    under torch.compile; eager calls draw 16-bit lanes instead (_masks_from_lanes)."""
    if p >= 1.0:  # p 2^31 is past int32 (and would wrap)
        return torch.ones(shape, dtype=like.dtype, device=like.device)
    draws = torch.randint(2**31, shape, dtype=torch.int32, device=like.device)
    return (draws < int(p * 2**31)).to(like.dtype)


def _dropout_mask(shape, p: float, like: Tensor) -> Tensor:
    """Inverted dropout's mask: 0 with probability p, else 1 / (1 - p); from torch's generator."""
    keep = _bernoulli(shape, 1.0 - p, like)
    return keep if p == 0.0 else keep.mul_(0.0 if p == 1.0 else 1.0 / (1.0 - p))


def _zoneout_mask(shape, p: float, like: Tensor) -> Tensor:
    return _bernoulli(shape, p, like)


def _random_lanes(count: int, device) -> Tensor:
    """count uniform 16-bit integers (int16, from -2^15) from torch's generator: four to each 64-bit
    draw. A mask from 31-bit draws cost 4x as much (Zen 4, one thread: 9.0 against 2.3 ms for a
    [2048, 512] weight-drop mask): each of randint's draws costs about the same whatever its width,
    and at batch 1 the masks took as long as the recurrence (weight drop at 1.75-2.54x plain lf.LSTM)."""
    words = torch.randint(-(2**63), 2**63 - 1, ((count + 3) // 4,), dtype=torch.int64, device=device)
    return words.view(torch.int16)[:count]


def _mask_from_lanes(lanes: Tensor, shape, p: float, scale: float, like: Tensor) -> Tensor:
    """scale with probability p, else 0, from uniform 16-bit lanes (p exact to 2^-16)."""
    threshold = round(p * 2**16) - 2**15  # lane + 2^15 < p 2^16
    if threshold >= 2**15:  # past int16: every lane
        return torch.full(shape, scale, dtype=like.dtype, device=like.device)
    mask = (lanes < threshold).to(like.dtype).view(shape)
    return mask if scale == 1.0 else mask.mul_(scale)


def _draw_layer_masks(count: int, rows: int, batch: int, hidden_size: int, like: Tensor, *,
                      zoneout: Tuple[float, float], recurrent_dropout: float,
                      weight_drop: float) -> List[RegularisationMasks]:
    """count layers' and directions' masks (as draw_masks) from one draw of torch's generator."""
    shapes = {
        "recurrent_dropout": ((batch, hidden_size), recurrent_dropout),
        "weight_drop": ((4 * hidden_size, hidden_size), weight_drop),
        "zoneout_cell": ((rows, hidden_size), zoneout[0]),
        "zoneout_hidden": ((rows, hidden_size), zoneout[1]),
    }
    wanted = {name: shape_p for name, shape_p in shapes.items() if shape_p[1] > 0}
    if torch.compiler.is_compiling() or not wanted:
        return [draw_masks(rows, batch, hidden_size, like, zoneout=zoneout, recurrent_dropout=recurrent_dropout,
                           weight_drop=weight_drop) for _ in range(count)]
    per_layer = sum(shape[0] * shape[1] for shape, _ in wanted.values())
    lanes = _random_lanes(count * per_layer, like.device)
    layers, offset = [], 0
    for _ in range(count):
        masks = {}
        for name, (shape, p) in wanted.items():
            size = shape[0] * shape[1]
            part = lanes[offset:offset + size]
            offset += size
            if name.startswith("zoneout"):
                masks[name] = _mask_from_lanes(part, shape, p, 1.0, like)
            else:  # inverted dropout: kept with probability 1 - p, as 1 / (1 - p)
                masks[name] = _mask_from_lanes(part, shape, 1.0 - p, 0.0 if p == 1.0 else 1.0 / (1.0 - p), like)
        layers.append(RegularisationMasks(**masks))
    return layers


def draw_masks(
    rows: int,
    batch: int,
    hidden_size: int,
    like: Tensor,
    *,
    zoneout: Tuple[float, float],
    recurrent_dropout: float,
    weight_drop: float,
) -> RegularisationMasks:
    """One layer and direction's masks for a training call: None for each option that is off."""
    return RegularisationMasks(
        _dropout_mask((batch, hidden_size), recurrent_dropout, like) if recurrent_dropout > 0 else None,
        _dropout_mask((4 * hidden_size, hidden_size), weight_drop, like) if weight_drop > 0 else None,
        _zoneout_mask((rows, hidden_size), zoneout[0], like) if zoneout[0] > 0 else None,
        _zoneout_mask((rows, hidden_size), zoneout[1], like) if zoneout[1] > 0 else None,
    )


def regularised_layer(
    input: Tensor,
    batch_sizes: Tensor,
    h_0: Tensor,
    c_0: Tensor,
    weight_ih: Tensor,
    weight_hh: Tensor,
    bias_ih: Optional[Tensor],
    bias_hh: Optional[Tensor],
    layer_norm: Optional[LayerNormWeights],
    masks: RegularisationMasks,
    zoneout: Tuple[float, float],
    reverse: bool = False,
):
    """One layer and direction with the given masks (a mask None: that option off; both zoneout
    masks None with zoneout > 0: evaluation). Returns (output, h_n, c_n, cell_states, gates)."""
    if masks.weight_drop is not None:
        weight_hh = weight_hh * masks.weight_drop
    norms = tuple(layer_norm) if layer_norm is not None else (None, None, None, None)
    outputs = ops.regularised_sequence_forward(
        input, batch_sizes, h_0, c_0, weight_ih, weight_hh, bias_ih, bias_hh, *norms,
        masks.recurrent_dropout, masks.zoneout_cell, masks.zoneout_hidden, zoneout[0], zoneout[1], reverse,
    )
    return outputs[:5]


def lstm_layers(
    data: Tensor,
    batch_sizes: Tensor,
    h_0: Tensor,
    c_0: Tensor,
    weights: Sequence[Sequence[Tensor]],
    layer_norms: Optional[Sequence[LayerNormWeights]] = None,
    *,
    bidirectional: bool = False,
    dropout: float = 0.0,
    training: bool = False,
    zoneout=0.0,
    recurrent_dropout: float = 0.0,
    weight_drop: float = 0.0,
    masks: Optional[Sequence[RegularisationMasks]] = None,
):
    """:func:`lstm_fused.functional.lstm_layers` with the regularisations: same arguments, plus
    layer_norms (one :class:`LayerNormWeights` per layer and direction, weights' order; None: no
    layer norm), zoneout (a float or (cell, hidden)), recurrent_dropout, weight_drop, and masks:
    one :class:`RegularisationMasks` per layer and direction to use instead of drawing them
    (training only; this is what makes a training call a deterministic function, for gradcheck
    and for replaying a run).

    Returns ``(output, h_n, c_n, states)``, states[k] = (cell_states, gates, masks)."""
    zoneout = zoneout_pair(zoneout)
    recurrent_dropout = check_dropout_probability(recurrent_dropout, "recurrent_dropout")
    weight_drop = check_dropout_probability(weight_drop, "weight_drop")
    num_directions = 2 if bidirectional else 1
    num_layers = len(weights) // num_directions
    if masks is not None and len(masks) != len(weights):
        raise ValueError(f"masks must hold one RegularisationMasks per layer and direction ({len(weights)}), got {len(masks)}")
    device_type = _kernel_device_type(data)
    batch, hidden_size = h_0.shape[1], h_0.shape[2]
    layer_input = data
    h_n, c_n, states = [], [], []
    drawn = None
    for layer in range(num_layers):
        direction_outputs = []
        for direction in range(num_directions):
            index = layer * num_directions + direction
            weight_ih, weight_hh, *biases = weights[index]
            bias_ih, bias_hh = biases if biases else (None, None)
            norm = layer_norms[index] if layer_norms is not None else None
            tensors = [layer_input, h_0[index], c_0[index], weight_ih, weight_hh, bias_ih, bias_hh]
            tensors += list(norm) if norm is not None else []
            x, hx, cx, w_ih, w_hh, b_ih, b_hh, *norm_cast = _cast_to_autocast_dtype(tensors, device_type)
            norm = LayerNormWeights(*norm_cast) if norm is not None else None
            if not training:
                layer_masks = RegularisationMasks()
                zoneout_used = zoneout
            else:
                if masks is not None:
                    layer_masks = masks[index]
                else:
                    if drawn is None:  # every layer's and direction's masks at once (rows and dtype are alike)
                        drawn = _draw_layer_masks(
                            len(weights), x.shape[0], batch, hidden_size, x, zoneout=zoneout,
                            recurrent_dropout=recurrent_dropout, weight_drop=weight_drop,
                        )
                    layer_masks = drawn[index]
                # In training a state without a mask is not zoned out.
                zoneout_used = tuple(0.0 if m is None else p for m, p in
                                     zip((layer_masks.zoneout_cell, layer_masks.zoneout_hidden), zoneout))
            output, h_last, c_last, cell_states, gates = regularised_layer(
                x, batch_sizes, hx, cx, w_ih, w_hh, b_ih, b_hh, norm, layer_masks, zoneout_used, direction == 1
            )
            direction_outputs.append(output)
            h_n.append(h_last)
            c_n.append(c_last)
            states.append((cell_states, gates, layer_masks))
        layer_output = direction_outputs[0] if num_directions == 1 else torch.cat(direction_outputs, dim=1)
        if dropout > 0 and training and layer < num_layers - 1:
            layer_output = F.dropout(layer_output, dropout, training=True)
        layer_input = layer_output
    return layer_input, torch.stack(h_n), torch.stack(c_n), states


def lstm_cell(
    input: Tensor,
    h_0: Tensor,
    c_0: Tensor,
    weight_ih: Tensor,
    weight_hh: Tensor,
    bias_ih: Optional[Tensor],
    bias_hh: Optional[Tensor],
    layer_norm: Optional[LayerNormWeights] = None,
    *,
    zoneout=0.0,
    training: bool = False,
    masks: Optional[RegularisationMasks] = None,
):
    """One regularised step of a 2-D batch (the sequence op over one step). Returns (h_1, c_1,
    gates [batch, 4H], masks); masks as given, else drawn in training (zoneout only)."""
    zoneout = zoneout_pair(zoneout)
    _kernel_device_type(input)
    batch, hidden_size = input.shape[0], weight_hh.shape[1]
    if not training:
        masks, zoneout_used = RegularisationMasks(), zoneout
    else:
        if masks is None:
            masks = draw_masks(batch, batch, hidden_size, input, zoneout=zoneout, recurrent_dropout=0.0, weight_drop=0.0)
        zoneout_used = tuple(0.0 if m is None else p for m, p in zip((masks.zoneout_cell, masks.zoneout_hidden), zoneout))
    batch_sizes = torch.tensor([batch], dtype=torch.int64)
    h_1, _, _, c_1, gates = regularised_layer(
        input, batch_sizes, h_0, c_0, weight_ih, weight_hh, bias_ih, bias_hh, layer_norm, masks, zoneout_used
    )
    return h_1, c_1, gates, masks

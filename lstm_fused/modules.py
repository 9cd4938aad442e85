"""Drop-in replacements for torch.nn's recurrent modules."""
import contextlib
from typing import NamedTuple, Optional

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence

from . import functional, regularised
from .functional import LSTMGates


def _register_layer_norm(module: nn.Module, suffix: str, hidden_size: int, factory_kwargs) -> None:
    """layer_norm_ih{suffix}, layer_norm_hh{suffix} [4H] (ones), layer_norm_cell_weight{suffix} [H]
    (ones), layer_norm_cell_bias{suffix} [H] (zeros)."""
    for name, size in (("ih", 4 * hidden_size), ("hh", 4 * hidden_size), ("cell_weight", hidden_size),
                       ("cell_bias", hidden_size)):
        module.register_parameter(f"layer_norm_{name}{suffix}", nn.Parameter(torch.empty(size, **factory_kwargs)))


def _reset_layer_norm(module: nn.Module) -> None:
    with torch.no_grad():
        for name, parameter in module.named_parameters(recurse=False):
            if name.startswith("layer_norm_"):
                parameter.fill_(0.0 if name.startswith("layer_norm_cell_bias") else 1.0)


class LSTMCellMasks(NamedTuple):
    """The zoneout masks of one lf.LSTMCell call in training, each [batch, hidden_size] of 0 or 1
    (1: the unit kept its previous value); None when that state's zoneout is 0 or in eval mode."""

    zoneout_cell: Optional[Tensor] = None
    zoneout_hidden: Optional[Tensor] = None


class LSTMCell(nn.LSTMCell):
    """``torch.nn.LSTMCell`` computed by lstm_fused's kernels.

    A subclass of nn.LSTMCell: same constructor, parameters (``weight_ih`` [4H, I], ``weight_hh``
    [4H, H], ``bias_ih``, ``bias_hh``; gate order i, f, g, o), initialisation, state_dict and repr.

    Args:
        input_size: features of the input x.
        hidden_size: features of the states h and c.
        bias: if ``False``, no ``bias_ih`` and ``bias_hh``. Default: ``True``.
        device, dtype: where and in what the parameters are made, as for nn.LSTMCell.
        layer_norm (keyword-only): if ``True``, layer normalisation of both products and of the
            cell state before its tanh, with parameters ``layer_norm_ih``, ``layer_norm_hh`` [4H]
            (initially 1), ``layer_norm_cell_weight`` [H] (1) and ``layer_norm_cell_bias`` [H] (0).
            Default: ``False`` (no extra parameters: nn.LSTMCell's state_dict).
        zoneout (keyword-only): probability that a unit keeps its previous value, a float for
            both states or a pair ``(cell, hidden)``: in training each unit of each row keeps it
            with that probability; in eval mode the old and new values are blended by it.
            Default: 0. The formulas are lstm_fused.regularised's.

    ``cell(input, hx=None, *, return_gates=False, return_masks=False)``:
        input: (batch, input_size), or unbatched (input_size,).
        hx: ``(h_0, c_0)``, each (batch, hidden_size) (unbatched: (hidden_size,)); ``None``: zeros.
        return_gates: if ``True``, also return the step's activated gates as an
            :class:`lstm_fused.LSTMGates` (input, forget, cell, output; each shaped like h_1).
            They cost nothing extra, and gradients flow through them.

        return_masks: if ``True``, also return (last) the :class:`lstm_fused.LSTMCellMasks` of
            the call: the zoneout masks drawn in training, None where not drawn.

    Returns ``(h_1, c_1)``, or ``(h_1, c_1, gates)``, then the masks if asked for.

    float32 and float64 are computed natively, float16 and bfloat16 in float32 and stored in their
    own dtype. Double backward, ``torch.func`` transforms and forward-mode AD work (the step then
    runs as differentiable ATen ops: correct, not fused), as do torch.compile, torch.export and
    the meta device.
    """

    def __init__(self, input_size, hidden_size, bias=True, device=None, dtype=None, *, layer_norm=False, zoneout=0.0):
        zoneout = regularised.zoneout_pair(zoneout)
        super().__init__(input_size, hidden_size, bias, device, dtype)
        self.zoneout = zoneout
        self.layer_norm = bool(layer_norm)
        if self.layer_norm:
            _register_layer_norm(self, "", hidden_size, {"device": device, "dtype": dtype})
            _reset_layer_norm(self)

    def reset_parameters(self) -> None:
        super().reset_parameters()  # nn's uniform init of every parameter...
        _reset_layer_norm(self)  # ...but the normalisations start as the identity

    def extra_repr(self) -> str:
        text = super().extra_repr()
        if self._regularised():
            text += f", layer_norm={self.layer_norm}, zoneout={self.zoneout}"
        return text

    def _regularised(self) -> bool:
        # getattr: a cell converted in place by lf.convert has neither attribute.
        return getattr(self, "layer_norm", False) or getattr(self, "zoneout", (0.0, 0.0)) != (0.0, 0.0)

    def forward(self, input, hx=None, *, return_gates: bool = False, return_masks: bool = False):
        if not self._regularised():
            result = functional.lstm_cell(
                input, hx, self.weight_ih, self.weight_hh, self.bias_ih, self.bias_hh, return_gates=return_gates
            )
            return result + (LSTMCellMasks(),) if return_masks else result
        input, h_0, c_0, batched = functional.prepare_cell_args(input, hx, self.hidden_size)
        norm = (
            regularised.LayerNormWeights(
                self.layer_norm_ih, self.layer_norm_hh, self.layer_norm_cell_weight, self.layer_norm_cell_bias
            )
            if self.layer_norm
            else None
        )
        h_1, c_1, gates, masks = regularised.lstm_cell(
            input, h_0, c_0, self.weight_ih, self.weight_hh, self.bias_ih, self.bias_hh, norm,
            zoneout=self.zoneout, training=self.training,
        )
        cell_masks = LSTMCellMasks(masks.zoneout_cell, masks.zoneout_hidden)
        if not batched:
            h_1, c_1, gates = h_1.squeeze(0), c_1.squeeze(0), gates.squeeze(0)
            cell_masks = LSTMCellMasks(*(None if m is None else m.squeeze(0) for m in cell_masks))
        result = (h_1, c_1)
        if return_gates:
            result += (LSTMGates(*gates.chunk(4, dim=-1)),)
        if return_masks:
            result += (cell_masks,)
        return result


def check_state_pair(hx) -> None:
    """hx must be (h_0, c_0): nn.LSTM's exception types, with a message saying what was given.
    nn fails with an IndexError when it looks for a missing hx[1], and with a RuntimeError ("lstm
    expects two hidden states") for more than two; a third state is never silently dropped."""
    if not isinstance(hx, (tuple, list)):
        raise TypeError(f"LSTM: hx must be a tuple (h_0, c_0) of two Tensors, got {type(hx).__name__}")
    if len(hx) != 2:
        error = IndexError if len(hx) < 2 else RuntimeError
        raise error(f"LSTM: hx must be a tuple (h_0, c_0) of two Tensors, got {len(hx)} element(s)")
    for name, state in zip(("h_0", "c_0"), hx):
        if not isinstance(state, Tensor):
            raise TypeError(f"LSTM: hx's {name} must be a Tensor, got {type(state).__name__}")


def check_devices(input: Tensor, hx, weights) -> None:
    """nn.LSTM's device checks and messages (its C++ makes them; the sequence op would otherwise
    take, say, a meta input with CPU weights and return meta tensors)."""
    for state in hx:
        if state.device != input.device:
            raise RuntimeError(
                "Input and hidden tensors are not at the same device, found input tensor at "
                f"{input.device} and hidden tensor at {state.device}"
            )
    for weight in weights:
        if weight is not None and weight.device != input.device:
            raise RuntimeError(
                "Input and parameter tensors are not at the same device, found input tensor at "
                f"{input.device} and parameter tensor at {weight.device}"
            )


def autocast_as_nn_lstm(data: Tensor, packed: bool, projected: bool):
    """A context with autocast off where autocast leaves nn.LSTM's call alone. Without projections
    it reaches nn.LSTM on the CPU only through oneDNN's layer (mkldnn_rnn_layer is on autocast's
    list), which nn runs for padded, non-empty input while oneDNN is enabled: packed input, an empty
    batch or oneDNN turned off compute in the input's dtype. (With projections nn never uses oneDNN,
    and autocast casts its products in every layout; on CUDA cuDNN's RNN is on the list.)"""
    if (
        data.device.type == "cpu"
        and not projected
        and torch.is_autocast_enabled("cpu")
        and (packed or data.numel() == 0 or not (torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled))
    ):
        return torch.autocast("cpu", enabled=False)
    return contextlib.nullcontext()


class LSTMLayerStates(NamedTuple):
    """One layer and direction's state at every step, each laid out like the LSTM's output (for
    that direction's hidden_size features): [T, B, hidden_size], [B, T, hidden_size] with
    batch_first, [T, hidden_size] unbatched, or a PackedSequence sharing the input's batch_sizes and
    indices. Views of buffers the backward keeps anyway; gradients flow through them.
    hidden_before_projection is o_t * tanh(c_t), the hidden state before weight_hr projects it,
    for an LSTM with ``proj_size > 0`` (computed from the other two); ``None`` without projection."""

    gates: LSTMGates  # activated i, f, g, o
    cell_state: Tensor  # c_t
    hidden_before_projection: Optional[Tensor] = None  # o_t * tanh(c_t), with proj_size > 0
    # The random masks of a training call with the regularisations (issue 16); None when that
    # option is off or in eval mode. recurrent_dropout_mask [B, H] and weight_drop_mask [4H, H]
    # hold 0 or 1 / (1 - p); the zoneout masks hold every step's 0/1 (1: kept the previous
    # value), laid out like cell_state.
    recurrent_dropout_mask: Optional[Tensor] = None
    weight_drop_mask: Optional[Tensor] = None
    zoneout_cell_mask: Optional[Tensor] = None
    zoneout_hidden_mask: Optional[Tensor] = None


class LSTM(nn.LSTM):
    """``torch.nn.LSTM`` computed by lstm_fused: per layer and direction, one product for every
    step's input, then a C++ loop of the recurrent product and the fused cell, and a hand-written
    backward through time.

    A subclass of nn.LSTM: same constructor, parameters (``weight_ih_l0``, ``weight_hh_l0_reverse``,
    ...), initialisation, state_dict and repr; holds no state of its own (which is what lets
    :func:`lstm_fused.convert` switch an nn.LSTM's class in place).

    Args:
        input_size: features of the input x.
        hidden_size: features of the hidden and cell states.
        num_layers: stacked layers, each taking the previous layer's output. Default: 1.
        bias: if ``False``, no ``bias_ih_l[k]`` and ``bias_hh_l[k]``. Default: ``True``.
        batch_first: if ``True``, input and output are (batch, seq, feature) rather than
            (seq, batch, feature); h_0, c_0, h_n and c_n are not affected. Default: ``False``.
        dropout: probability of dropout on every layer's output but the last, in training mode.
            Default: 0.
        bidirectional: if ``True``, each layer also runs over the reversed sequence, and its
            output is the forward and the backward halves concatenated. Default: ``False``.
        proj_size: if ``> 0``, an LSTM with projections (LSTMP), as nn.LSTM's: each step's hidden
            state is ``weight_hr_l[k] @ (o_t * tanh(c_t))`` with ``weight_hr_l[k]`` [proj_size,
            hidden_size], so h_0, h_n and the output have proj_size features (per direction) and
            ``weight_hh_l[k]`` is [4 * hidden_size, proj_size]. The projection is part of the fused
            recurrence and of its hand-written backward. Default: 0.
        device, dtype: where and in what the parameters are made, as for nn.LSTM.
        layer_norm, zoneout (keyword-only): as for :class:`lstm_fused.LSTMCell`, per layer and
            direction: parameters ``layer_norm_ih_l0``, ``layer_norm_hh_l0``,
            ``layer_norm_cell_weight_l0``, ``layer_norm_cell_bias_l0`` (``..._l0_reverse``, ...).
        recurrent_dropout (keyword-only): in training, each layer and direction multiplies the
            h_{t-1} it feeds its recurrent product by one mask of 0 and 1 / (1 - p) [batch, hidden],
            drawn per call and the same at every step (variational dropout). Default: 0.
        weight_drop (keyword-only): in training, each layer and direction's weight_hh is
            multiplied by a mask of 0 and 1 / (1 - p) drawn per call (DropConnect, AWD-LSTM's
            WeightDrop). Default: 0. With any of these four options, ``return_states`` also returns
            the masks used; the defaults keep nn.LSTM's parameters and state_dict.

    ``lstm(input, hx=None, *, return_states=False)``:
        input: (seq, batch, input_size), (batch, seq, input_size) with batch_first, unbatched
            (seq, input_size), or a ``PackedSequence``.
        hx: ``(h_0, c_0)``, each (num_layers * num_directions, batch, hidden_size) (h_0:
            proj_size when ``proj_size > 0``; unbatched: no batch dimension); ``None``: zeros.
        return_states: if ``True``, also return a tuple of :class:`LSTMLayerStates`, one per layer
            and direction, ordered as h_n's first dimension (``layer * num_directions +
            direction``): every step's activated gates and cell state, and with ``proj_size > 0``
            the hidden state before the projection.

    Returns ``(output, (h_n, c_n))`` with nn.LSTM's shapes, or ``(output, (h_n, c_n), states)``.

    Bad arguments raise nn.LSTM's exception types, with a message naming the argument; hx must be
    exactly two tensors (nn.LSTM drops a third for unbatched or unsorted packed input, this refuses
    it). On the CPU, under the same seed, training-mode dropout draws nn.LSTM's masks. Under
    ``torch.autocast`` the outputs have nn.LSTM's dtypes: on the CPU, without projections, only
    padded, non-empty input is computed in the autocast dtype (where nn.LSTM's oneDNN path runs),
    packed input in its own.
    Parametrized weights (``torch.nn.utils.parametrize``, weight_norm) and weights shared with other
    modules or replaced after construction are read afresh on every call.

    Double backward (``create_graph=True``, gradient penalties), ``torch.func`` transforms and
    forward-mode AD work, with nn.LSTM's answers: under them the recurrence runs as
    differentiable ATen ops, correct but not fused; ordinary training keeps the fused path.
    torch.compile: Dynamo refuses every nn.LSTM subclass unless
    ``torch._dynamo.config.allow_rnn = True``; with it, the forward compiles without graph breaks.
    ``flatten_parameters()`` is a no-op.
    """

    def __init__(self, *args, layer_norm=False, zoneout=0.0, recurrent_dropout=0.0, weight_drop=0.0, **kwargs):
        super().__init__(*args, **kwargs)
        self._init_regularisation(layer_norm, zoneout, recurrent_dropout, weight_drop)

    def _init_regularisation(self, layer_norm, zoneout, recurrent_dropout, weight_drop) -> None:
        self.layer_norm = bool(layer_norm)
        self.zoneout = regularised.zoneout_pair(zoneout)
        self.recurrent_dropout = regularised.check_dropout_probability(recurrent_dropout, "recurrent_dropout")
        self.weight_drop = regularised.check_dropout_probability(weight_drop, "weight_drop")
        if self.proj_size > 0 and self._regularised():
            raise ValueError(
                "lstm_fused.LSTM: layer_norm, zoneout, recurrent_dropout and weight_drop do not support "
                f"proj_size > 0 (got proj_size={self.proj_size})"
            )
        if self.layer_norm:
            factory_kwargs = {"device": self.weight_ih_l0.device, "dtype": self.weight_ih_l0.dtype}
            for suffix in self._layer_suffixes():
                _register_layer_norm(self, suffix, self.hidden_size, factory_kwargs)
            _reset_layer_norm(self)

    def _layer_suffixes(self):
        directions = ("", "_reverse") if self.bidirectional else ("",)
        return [f"_l{layer}{direction}" for layer in range(self.num_layers) for direction in directions]

    def _regularised(self) -> bool:
        # getattr: nn.LSTM's own __init__ calls methods (reset_parameters) before these exist.
        return (
            getattr(self, "layer_norm", False)
            or getattr(self, "zoneout", (0.0, 0.0)) != (0.0, 0.0)
            or getattr(self, "recurrent_dropout", 0.0) > 0
            or getattr(self, "weight_drop", 0.0) > 0
        )

    def reset_parameters(self) -> None:
        super().reset_parameters()  # nn's uniform init of every parameter...
        _reset_layer_norm(self)  # ...but the normalisations start as the identity

    def extra_repr(self) -> str:
        text = super().extra_repr()
        for name, default in (("layer_norm", False), ("zoneout", (0.0, 0.0)), ("recurrent_dropout", 0.0),
                              ("weight_drop", 0.0)):
            value = getattr(self, name, default)
            if value != default:
                text += f", {name}={value}"
        return text

    def flatten_parameters(self) -> None:
        """A no-op: the kernels read each weight where it is. (nn.LSTM's version moves the
        weights into one cuDNN buffer, which nothing here would use.)"""

    def forward(self, input, hx=None, *, return_states: bool = False):
        # nn.LSTM's argument handling, with its error messages; then one call for the whole stack.
        self._update_flat_weights()  # check_input reads the weight dtype from _flat_weights
        num_directions = 2 if self.bidirectional else 1
        packed = isinstance(input, PackedSequence)
        if packed:
            data, batch_sizes, sorted_indices, unsorted_indices = input
            batch = int(batch_sizes[0])
        else:
            if input.dim() not in (2, 3):
                raise ValueError(f"LSTM: Expected input to be 2D or 3D, got {input.dim()}D instead")
            batched = input.dim() == 3
            batch_dim = 0 if self.batch_first else 1
            if not batched:
                input = input.unsqueeze(batch_dim)
            sorted_indices = unsorted_indices = None
            # The kernels take every step's rows stacked: time-major [T * B, I], a view when the
            # input already is time-major and contiguous.
            time_major = input.transpose(0, 1) if self.batch_first else input
            num_steps, batch = time_major.shape[0], time_major.shape[1]
            if num_steps == 0:
                raise RuntimeError(
                    "LSTM: Expected sequence length to be larger than 0 in RNN, got input of shape "
                    f"{tuple(input.shape if batched else input.squeeze(batch_dim).shape)}"
                )
            data = time_major.reshape(num_steps * batch, time_major.shape[2])
            batch_sizes = torch.full((num_steps,), batch, dtype=torch.int64)

        if hx is None:
            self.check_input(data if packed else input, batch_sizes if packed else None)
            num_states = self.num_layers * num_directions
            # With projections h_0 has proj_size features and c_0 hidden_size, as nn.LSTM makes them.
            hx = (
                data.new_zeros(num_states, batch, self.proj_size or self.hidden_size),
                data.new_zeros(num_states, batch, self.hidden_size),
            )
        else:
            check_state_pair(hx)
            if not packed:
                wanted_dim = 3 if batched else 2
                if hx[0].dim() != wanted_dim or hx[1].dim() != wanted_dim:
                    kind = "batched 3-D" if batched else "unbatched 2-D"
                    raise RuntimeError(
                        f"For {kind} input, hx and cx should also be {wanted_dim}-D but got "
                        f"({hx[0].dim()}-D, {hx[1].dim()}-D) tensors"
                    )
                if not batched:
                    hx = (hx[0].unsqueeze(1), hx[1].unsqueeze(1))
            self.check_forward_args(data if packed else input, hx, batch_sizes if packed else None)
            # Packed sequences are sorted longest first; the states follow the user's order.
            hx = self.permute_hidden(hx, sorted_indices)

        check_devices(data, hx, self._flat_weights)
        if self._regularised():
            output, h_n, c_n, states = self._regularised_layers(data, batch_sizes, hx)
        else:
            with autocast_as_nn_lstm(data, packed, self.proj_size > 0):
                output, h_n, c_n, states = functional.lstm_layers(
                    data,
                    batch_sizes,
                    hx[0],
                    hx[1],
                    self.all_weights,
                    bidirectional=self.bidirectional,
                    dropout=self.dropout,
                    training=self.training,
                    need_states=return_states,
                )

        def like_output(rows: Tensor):
            # [rows, features] -> the layout of the output, PackedSequence included.
            if packed:
                return PackedSequence(rows, batch_sizes, sorted_indices, unsorted_indices)
            steps = rows.view(num_steps, batch, rows.shape[-1])
            if self.batch_first:
                steps = steps.transpose(0, 1)
            return steps if batched else steps.squeeze(batch_dim)

        h_n, c_n = self.permute_hidden((h_n, c_n), unsorted_indices)
        if not packed and not batched:
            h_n, c_n = h_n.squeeze(1), c_n.squeeze(1)
        result = (like_output(output), (h_n, c_n))
        if not return_states:
            return result
        def batch_rows(mask):
            # A [B, H] mask in the caller's batch order, as h_n.
            if mask is None:
                return None
            if unsorted_indices is not None:
                mask = mask.index_select(0, unsorted_indices)
            return mask if packed or batched else mask.squeeze(0)

        def mask_fields(masks):
            if masks is None:
                return {}
            return dict(
                recurrent_dropout_mask=batch_rows(masks.recurrent_dropout),
                weight_drop_mask=masks.weight_drop,
                zoneout_cell_mask=None if masks.zoneout_cell is None else like_output(masks.zoneout_cell),
                zoneout_hidden_mask=None if masks.zoneout_hidden is None else like_output(masks.zoneout_hidden),
            )

        def layer_states(cell_states: Tensor, gates: Tensor, masks=None) -> LSTMLayerStates:
            input_gate, forget_gate, cell_gate, output_gate = gates.chunk(4, dim=1)
            # o * tanh(c), what weight_hr multiplies: the same formula as the kernels', from their outputs.
            unprojected = like_output(output_gate * cell_states.tanh()) if self.proj_size > 0 else None
            return LSTMLayerStates(
                LSTMGates(*(like_output(gate) for gate in (input_gate, forget_gate, cell_gate, output_gate))),
                like_output(cell_states),
                unprojected,
                **mask_fields(masks),
            )

        layer_states = tuple(layer_states(*state) for state in states)
        return result + (layer_states,)

    def _regularised_layers(self, data, batch_sizes, hx):
        layer_norms = None
        if self.layer_norm:
            layer_norms = [
                regularised.LayerNormWeights(*(getattr(self, f"layer_norm_{name}{suffix}")
                                               for name in ("ih", "hh", "cell_weight", "cell_bias")))
                for suffix in self._layer_suffixes()
            ]
        return regularised.lstm_layers(
            data,
            batch_sizes,
            hx[0],
            hx[1],
            self.all_weights,
            layer_norms,
            bidirectional=self.bidirectional,
            dropout=self.dropout,
            training=self.training,
            zoneout=self.zoneout,
            recurrent_dropout=self.recurrent_dropout,
            weight_drop=self.weight_drop,
        )

"""The LSTM cell written gate by gate with plain torch ops: the textbook formulation.

It shares nothing with the kernels (only the argument handling), and is the second baseline,
beside nn.LSTMCell, for the tests and the benchmark. Below it, the regularised LSTM (layer norm,
zoneout, recurrent dropout, weight drop) as the Python loop people write by hand."""
import torch
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


# --- the regularised LSTM (issue 16), as people write it today: a Python loop of torch ops -------


def _layer_norm(v, weight, bias=None):
    mean = v.mean(-1, keepdim=True)
    variance = ((v - mean) ** 2).mean(-1, keepdim=True)
    out = weight * (v - mean) / torch.sqrt(variance + 1e-5)
    return out if bias is None else out + bias


def regularised_lstm_cell(
    x, h, c, weight_ih, weight_hh, bias_ih=None, bias_hh=None, *, layer_norm=None, zoneout=(0.0, 0.0),
    zoneout_masks=(None, None), recurrent_dropout_mask=None, weight_drop_mask=None,
):
    """One step of lstm_fused.regularised's formulas on 2-D tensors. layer_norm: (g_ih, g_hh,
    g_c, b_c) or None; zoneout_masks: (d_c, d_h), each None for the probability in zoneout
    (evaluation; 0 is no zoneout). Returns (h_t, c_t, (i, f, g, o))."""
    h_bar = h if recurrent_dropout_mask is None else h * recurrent_dropout_mask
    w_hh = weight_hh if weight_drop_mask is None else weight_hh * weight_drop_mask
    input_part, hidden_part = x @ weight_ih.T, h_bar @ w_hh.T
    if layer_norm is not None:
        a = _layer_norm(input_part, layer_norm[0]) + _layer_norm(hidden_part, layer_norm[1])
    else:
        a = input_part + hidden_part
    if bias_ih is not None:
        a = a + bias_ih
    if bias_hh is not None:
        a = a + bias_hh
    i, f, g, o = a.chunk(4, dim=1)
    i, f, g, o = i.sigmoid(), f.sigmoid(), g.tanh(), o.sigmoid()
    c_new = f * c + i * g
    h_new = o * (c_new if layer_norm is None else _layer_norm(c_new, layer_norm[2], layer_norm[3])).tanh()
    d_c = zoneout[0] if zoneout_masks[0] is None else zoneout_masks[0]
    d_h = zoneout[1] if zoneout_masks[1] is None else zoneout_masks[1]
    return d_h * h + (1 - d_h) * h_new, d_c * c + (1 - d_c) * c_new, (i, f, g, o)


def regularised_lstm(module, input, hx=None, states=None):
    """lf.LSTM's regularised forward for a padded batch, step by step in Python, with the module's
    parameters and options. In training, pass the states (lf.LSTMLayerStates) of the call to
    replay: their masks are used (nn's dropout between layers cannot be replayed: use dropout=0).
    In eval mode states is not needed. Returns (output, (h_n, c_n))."""
    num_directions = 2 if module.bidirectional else 1
    x = input.transpose(0, 1) if module.batch_first else input  # [T, B, I]
    num_steps, batch = x.shape[0], x.shape[1]
    if hx is None:
        zeros = x.new_zeros(module.num_layers * num_directions, batch, module.hidden_size)
        hx = (zeros, zeros)
    time_major = (lambda t: t.transpose(0, 1)) if module.batch_first else (lambda t: t)
    h_n, c_n = [], []
    for layer in range(module.num_layers):
        outputs = []
        for direction in range(num_directions):
            index = layer * num_directions + direction
            suffix = f"_l{layer}" + ("_reverse" if direction else "")
            weight = lambda name: getattr(module, f"{name}{suffix}", None)  # noqa: E731
            layer_norm = None
            if module.layer_norm:
                layer_norm = tuple(weight(f"layer_norm_{n}") for n in ("ih", "hh", "cell_weight", "cell_bias"))
            masks = states[index] if (module.training and states is not None) else None
            zoneout = module.zoneout if not module.training else (0.0, 0.0)
            zc = time_major(masks.zoneout_cell_mask) if masks is not None and masks.zoneout_cell_mask is not None else None
            zh = (time_major(masks.zoneout_hidden_mask)
                  if masks is not None and masks.zoneout_hidden_mask is not None else None)
            h, c = hx[0][index], hx[1][index]
            steps = range(num_steps - 1, -1, -1) if direction else range(num_steps)
            hidden = [None] * num_steps
            for t in steps:
                h, c, _ = regularised_lstm_cell(
                    x[t], h, c, weight("weight_ih"), weight("weight_hh"), weight("bias_ih"), weight("bias_hh"),
                    layer_norm=layer_norm, zoneout=zoneout,
                    zoneout_masks=(None if zc is None else zc[t], None if zh is None else zh[t]),
                    recurrent_dropout_mask=None if masks is None else masks.recurrent_dropout_mask,
                    weight_drop_mask=None if masks is None else masks.weight_drop_mask,
                )
                hidden[t] = h
            outputs.append(torch.stack(hidden))
            h_n.append(h)
            c_n.append(c)
        x = torch.cat(outputs, dim=2)
    return time_major(x), (torch.stack(h_n), torch.stack(c_n))

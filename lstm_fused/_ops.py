"""Loads the compiled operators and gives them what torch.compile needs, fake (meta)
implementations, and what FlopCounterMode needs, FLOP formulas. Their autograd (the hand-written
backward) is registered in C++ (csrc/autograd.cpp)."""
import os

import torch
from torch.utils.flop_counter import register_flop_formula


def _load_extension():
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        from . import _build_info
    except ImportError:
        raise ImportError(
            f"lstm_fused at {here} has not been built (no _build_info.py, no compiled _C). "
            "Install it with `pip install .` and run from outside the source tree, so that "
            "`import lstm_fused` finds the installed copy rather than the sources."
        ) from None
    if _build_info.TORCH_VERSION != torch.__version__:
        raise ImportError(
            f"lstm_fused was built against torch {_build_info.TORCH_VERSION} but torch {torch.__version__} "
            "is imported; its compiled kernels would not load. Rebuild against this torch with "
            "`pip install --no-build-isolation --force-reinstall --no-deps .`"
        )
    try:
        from . import _C  # noqa: F401  (importing it registers torch.ops.lstm_fused.*)
    except ImportError as error:
        raise ImportError(
            f"lstm_fused's compiled extension failed to load from {here}: {error}. Rebuild it with "
            "`pip install --no-build-isolation --force-reinstall --no-deps .`"
        ) from error
    return _build_info


BUILD_INFO = _load_extension()
ops = torch.ops.lstm_fused


def cpu_capability():
    """The instruction set whose CPU kernels run: "avx512", "avx2", "neon" or "default" (portable).
    The widest this CPU has, unless the environment variable LSTM_FUSED_CPU_CAPABILITY names a
    lower one (as ATEN_CPU_CAPABILITY does for PyTorch's own kernels)."""
    return ops.cpu_capability()


def supported_cpu_capabilities():
    """Every CPU path this build has and this CPU can run, widest first."""
    return list(ops._supported_cpu_capabilities())


try:
    # Chosen now, so that a LSTM_FUSED_CPU_CAPABILITY this CPU cannot run fails the import.
    cpu_capability()
except RuntimeError as error:
    raise ImportError(str(error).splitlines()[0]) from None


def _check_one_device(input, **others):
    """Every tensor on input's device. A call mixing the meta device with another reaches these
    fake implementations, which would otherwise hand back uninitialised tensors on input's device."""
    for name, tensor in others.items():
        torch._check(
            tensor is None or tensor.device == input.device,
            lambda: f"lstm_fused: {name} is on device {tensor.device} but input is on {input.device}; "
            "all tensors of an LSTM cell must be on one device",
        )


@torch.library.register_fake("lstm_fused::cell_forward")
def _cell_forward_fake(input, hx, cx, weight_ih, weight_hh, bias_ih, bias_hh):
    _check_one_device(
        input, **{"hx (h_0)": hx, "cx (c_0)": cx}, weight_ih=weight_ih, weight_hh=weight_hh, bias_ih=bias_ih,
        bias_hh=bias_hh,
    )
    batch, hidden_size = input.shape[0], weight_hh.shape[1]
    return (
        input.new_empty(batch, hidden_size),
        input.new_empty(batch, hidden_size),
        input.new_empty(batch, 4 * hidden_size),
    )


@torch.library.register_fake("lstm_fused::cell_pointwise_")
def _cell_pointwise_fake(gates, cx, bias, hy, cy):
    return None


@torch.library.register_fake("lstm_fused::cell_gate_grads")
def _cell_gate_grads_fake(grad_hy, grad_cy, grad_gates, cx, cy, gates):
    return torch.empty_like(gates), torch.empty_like(cx)


@torch.library.register_fake("lstm_fused::sequence_forward")
def _sequence_forward_fake(input, batch_sizes, hx, cx, weight_ih, weight_hh, bias_ih, bias_hh, reverse,
                           weight_hr=None):
    # Shapes follow from input's rows and the states' batch; batch_sizes' values are not needed.
    # The hidden state has weight_hh's columns: proj_size with a projection (weight_hr), else hidden_size.
    rows, batch = input.shape[0], hx.shape[0]
    hidden_size, output_size = weight_hh.shape[0] // 4, weight_hh.shape[1]
    return (
        input.new_empty(rows, output_size),
        input.new_empty(batch, output_size),
        input.new_empty(batch, hidden_size),
        input.new_empty(rows, hidden_size),
        input.new_empty(rows, 4 * hidden_size),
    )


@torch.library.register_fake("lstm_fused::sequence_inference")
def _sequence_inference_fake(input, batch_sizes, hx, cx, weight_ih, weight_hh, bias_ih, bias_hh, reverse,
                             weight_hr=None):
    return _sequence_forward_fake(input, batch_sizes, hx, cx, weight_ih, weight_hh, bias_ih, bias_hh, reverse,
                                  weight_hr)[:3]


def _gradients_like(output_mask, input, hx, cx, weight_ih, weight_hh):
    """The backward ops' outputs: a gradient shaped like each of input, hx, cx, weight_ih,
    weight_hh and the bias where output_mask asks for it, an empty tensor where not."""
    wanted = zip(output_mask, (input, hx, cx, weight_ih, weight_hh, weight_hh[:, 0]))
    return tuple(input.new_empty(like.shape) if want else input.new_empty(0) for want, like in wanted)


@torch.library.register_fake("lstm_fused::sequence_backward")
def _sequence_backward_fake(
    grad_output, grad_hy, grad_cy, grad_cell_states, grad_gates, input, batch_sizes, hx, cx,
    weight_ih, weight_hh, output, cell_states, gates, reverse, output_mask, weight_hr=None,
):
    grad_weight_hr = input.new_empty(0) if weight_hr is None else input.new_empty(weight_hr.shape)
    return _gradients_like(output_mask, input, hx, cx, weight_ih, weight_hh) + (grad_weight_hr,)


@torch.library.register_fake("lstm_fused::cell_backward")
def _cell_backward_fake(grad_hy, grad_cy, grad_gates, input, hx, cx, cy, gates, weight_ih, weight_hh, output_mask):
    return _gradients_like(output_mask, input, hx, cx, weight_ih, weight_hh)


# FLOP counts for torch.utils.flop_counter.FlopCounterMode (and the tools built on it): the
# operators' matrix products, 2 flops a multiply-add, as it counts nn.LSTMCell's addmm and mm; the
# pointwise math is not counted, as it is not for nn.LSTMCell. Shapes arrive in place of tensors.
def _product_flops(rows, gate_width, input_size, hidden_size, input_products, hidden_products):
    return 2 * rows * gate_width * (input_products * input_size + hidden_products * hidden_size)


@register_flop_formula(ops.cell_forward)
def _cell_forward_flops(input, hx, cx, weight_ih, weight_hh, bias_ih, bias_hh, out_shape=None, **kwargs):
    return _product_flops(input[0], weight_ih[0], input[1], weight_hh[1], 1, 1)


def _projection_flops(rows, weight_hr, products):
    """The projection's products (weight_hr [proj_size, hidden_size]; None: no projection)."""
    return 0 if weight_hr is None else 2 * rows * weight_hr[0] * weight_hr[1] * products


@register_flop_formula(ops.sequence_forward)
def _sequence_forward_flops(input, batch_sizes, hx, cx, weight_ih, weight_hh, bias_ih, bias_hh, reverse,
                            weight_hr=None, out_shape=None, **kwargs):
    # Every row of input is one step of one sequence: one product with each weight (weight_hh's
    # columns are proj_size with a projection), and with weight_hr where there is one.
    return _product_flops(input[0], weight_ih[0], input[1], weight_hh[1], 1, 1) + _projection_flops(
        input[0], weight_hr, 1)


@register_flop_formula(ops.sequence_inference)
def _sequence_inference_flops(*args, out_shape=None, **kwargs):
    return _sequence_forward_flops(*args, **kwargs)


@register_flop_formula(ops.cell_backward)
def _cell_backward_flops(grad_hy, grad_cy, grad_gates, input, hx, cx, cy, gates, weight_ih, weight_hh, output_mask,
                         out_shape=None, **kwargs):
    # grad input and grad W_ih are products with input's width, grad hx and grad W_hh with hidden's.
    return _product_flops(input[0], weight_ih[0], input[1], weight_hh[1],
                          output_mask[0] + output_mask[3], output_mask[1] + output_mask[4])


@register_flop_formula(ops.sequence_backward)
def _sequence_backward_flops(grad_output, grad_hy, grad_cy, grad_cell_states, grad_gates, input, batch_sizes, hx, cx,
                             weight_ih, weight_hh, output, cell_states, gates, reverse, output_mask,
                             weight_hr=None, out_shape=None, **kwargs):
    # The gradient of every step's hidden state is a product whether or not grad hx is wanted:
    # backpropagation through time needs it; so is, through a projection, that of o * tanh(c),
    # and grad weight_hr is always computed.
    return _product_flops(input[0], weight_ih[0], input[1], weight_hh[1],
                          output_mask[0] + output_mask[3], 1 + output_mask[4]) + _projection_flops(
        input[0], weight_hr, 2)


# --- the regularised LSTM layer (issue 16, csrc/regularised.cpp) ----------------------------------


@torch.library.register_fake("lstm_fused::regularised_sequence_forward")
def _regularised_sequence_forward_fake(
    input, batch_sizes, hx, cx, weight_ih, weight_hh, bias_ih, bias_hh, layer_norm_ih, layer_norm_hh,
    layer_norm_cell_weight, layer_norm_cell_bias, recurrent_dropout_mask, zoneout_cell_mask, zoneout_hidden_mask,
    zoneout_cell, zoneout_hidden, reverse,
):
    rows, batch, hidden_size = input.shape[0], hx.shape[0], weight_hh.shape[1]
    # What backward keeps of layer norm: [0, ...] without it.
    kept = rows if layer_norm_ih is not None else 0
    return (
        input.new_empty(rows, hidden_size),
        input.new_empty(batch, hidden_size),
        input.new_empty(batch, hidden_size),
        input.new_empty(rows, hidden_size),
        input.new_empty(rows, 4 * hidden_size),
        input.new_empty(kept, 4 * hidden_size),
        input.new_empty(kept, 4 * hidden_size),
        input.new_empty(kept, hidden_size),
        input.new_empty(kept, 3),
    )


@torch.library.register_fake("lstm_fused::regularised_sequence_backward")
def _regularised_sequence_backward_fake(
    grad_output, grad_hy, grad_cy, grad_cell_states, grad_gates, input, batch_sizes, hx, cx, weight_ih, weight_hh,
    layer_norm_ih, layer_norm_hh, layer_norm_cell_weight, layer_norm_cell_bias, recurrent_dropout_mask,
    zoneout_cell_mask, zoneout_hidden_mask, zoneout_cell, zoneout_hidden, output, cell_states, gates, input_part,
    hidden_part, normalized_cell, layer_norm_rstd, reverse, output_mask,
):
    hidden_size = weight_hh.shape[1]

    def like(want, shape):
        return input.new_empty(shape) if want else input.new_empty(0)

    layer_norm = layer_norm_ih is not None
    return (
        like(output_mask[0], input.shape),
        input.new_empty(hx.shape),
        input.new_empty(hx.shape),
        like(output_mask[1], weight_ih.shape),
        like(output_mask[2], weight_hh.shape),
        input.new_empty(4 * hidden_size),
        like(layer_norm, (4 * hidden_size,)),
        like(layer_norm, (4 * hidden_size,)),
        like(layer_norm, (hidden_size,)),
        like(layer_norm, (hidden_size,)),
    )


@torch.library.register_fake("lstm_fused::regularised_pointwise_")
def _regularised_pointwise_fake(*args):
    return None


@torch.library.register_fake("lstm_fused::regularised_gate_grads_")
def _regularised_gate_grads_fake(*args):
    return None


@register_flop_formula(ops.regularised_sequence_forward)
def _regularised_sequence_forward_flops(input, batch_sizes, hx, cx, weight_ih, weight_hh, *args, out_shape=None,
                                        **kwargs):
    return _product_flops(input[0], weight_ih[0], input[1], weight_hh[1], 1, 1)


@register_flop_formula(ops.regularised_sequence_backward)
def _regularised_sequence_backward_flops(grad_output, grad_hy, grad_cy, grad_cell_states, grad_gates, input,
                                         batch_sizes, hx, cx, weight_ih, weight_hh, *args, out_shape=None, **kwargs):
    output_mask = args[-1]
    return _product_flops(input[0], weight_ih[0], input[1], weight_hh[1],
                          output_mask[0] + output_mask[1], 1 + output_mask[2])

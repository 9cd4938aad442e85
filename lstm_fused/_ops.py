"""Loads the compiled operators and gives them what torch needs around them: fake (meta)
implementations for torch.compile, and autograd with the hand-written backward."""
import os

import torch
import torch.nn.functional as F


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


@torch.library.register_fake("lstm_fused::cell_forward")
def _cell_forward_fake(input, hx, cx, weight_ih, weight_hh, bias_ih, bias_hh):
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


def _cell_forward_setup_context(ctx, inputs, output):
    input, hx, cx, weight_ih, weight_hh, bias_ih, bias_hh = inputs
    _, cy, gates = output
    # Outputs nobody used arrive as None rather than as zero tensors the kernel would have to read.
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(input, hx, cx, weight_ih, weight_hh, bias_ih, bias_hh, cy, gates)


def _cell_forward_backward(ctx, grad_hy, grad_cy, grad_gates):
    input, hx, cx, weight_ih, weight_hh, bias_ih, bias_hh, cy, gates = ctx.saved_tensors
    needs = ctx.needs_input_grad
    if torch.is_grad_enabled():
        # create_graph=True (double backward): the fused kernels are not themselves
        # differentiable, so rebuild the step from differentiable torch ops for this rare path.
        return _differentiable_backward(needs, (input, hx, cx, weight_ih, weight_hh, bias_ih, bias_hh),
                                        (grad_hy, grad_cy, grad_gates))
    output_mask = [needs[0], needs[1], needs[2], needs[3], needs[4], needs[5] or needs[6]]
    grad_input, grad_hx, grad_cx, grad_weight_ih, grad_weight_hh, grad_bias = ops.cell_backward(
        grad_hy, grad_cy, grad_gates, input, hx, cx, cy, gates, weight_ih, weight_hh, output_mask
    )
    grads = (grad_input, grad_hx, grad_cx, grad_weight_ih, grad_weight_hh, grad_bias, grad_bias)
    return tuple(grad if need else None for grad, need in zip(grads, needs))


def _composite_cell(input, hx, cx, weight_ih, weight_hh, bias_ih, bias_hh):
    """The step as differentiable torch ops, used only to build a double-backward graph."""
    preactivation = F.linear(input, weight_ih, bias_ih) + F.linear(hx, weight_hh, bias_hh)
    i, f, g, o = preactivation.chunk(4, dim=1)
    i, f, g, o = i.sigmoid(), f.sigmoid(), g.tanh(), o.sigmoid()
    cy = f * cx + i * g
    return o * cy.tanh(), cy, torch.cat((i, f, g, o), dim=1)


def _differentiable_backward(needs, inputs, grad_outputs):
    wanted = [t for t, need in zip(inputs, needs) if need]
    with torch.enable_grad():
        outputs = _composite_cell(*inputs)
        used = [(out, grad) for out, grad in zip(outputs, grad_outputs) if grad is not None]
        grads = iter(torch.autograd.grad(
            [out for out, _ in used], wanted, [grad for _, grad in used], create_graph=True, allow_unused=True
        ))
    return tuple(next(grads) if need else None for need in needs)


torch.library.register_autograd(
    "lstm_fused::cell_forward", _cell_forward_backward, setup_context=_cell_forward_setup_context
)

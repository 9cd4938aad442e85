"""Bad input raises a clear error naming the argument, never a crash or a silent wrong answer;
where nn.LSTMCell raises, lstm_fused raises the same exception type."""
import pytest
import torch
from torch import nn

import lstm_fused as lf

ops = torch.ops.lstm_fused
INPUT_SIZE, HIDDEN_SIZE, BATCH = 3, 4, 2


def randn(*shape, dtype=torch.float32):
    return torch.randn(*shape, dtype=dtype) + 0.1  # values are irrelevant here, only shapes/dtypes


def state(*lead, hidden=HIDDEN_SIZE, dtype=torch.float32):
    return randn(*lead, hidden, dtype=dtype), randn(*lead, hidden, dtype=dtype)


def with_parameter_dtype(name, dtype):
    def build(cell_class):
        cell = cell_class(INPUT_SIZE, HIDDEN_SIZE)
        getattr(cell, name).data = getattr(cell, name).data.to(dtype)
        return cell

    return build


def default_cell(cell_class):
    return cell_class(INPUT_SIZE, HIDDEN_SIZE)


# id: (build cell from its class, call args, exception type, fragment of our message, nn raises too)
MODULE_CASES = {
    "input_width": (default_cell, lambda: (randn(BATCH, 5), state(BATCH)), RuntimeError,
                    r"input has inconsistent input_size: got 5, expected 3", True),
    "input_width_unbatched": (default_cell, lambda: (randn(5), state()), RuntimeError,
                              r"input has inconsistent input_size: got 5, expected 3", True),
    "input_width_no_state": (default_cell, lambda: (randn(BATCH, 5), None), RuntimeError,
                             r"input has inconsistent input_size", True),
    "h0_hidden_width": (default_cell, lambda: (randn(BATCH, 3), (randn(BATCH, 5), randn(BATCH, 4))), RuntimeError,
                        r"hx \(h_0\) has inconsistent hidden_size: got 5, expected 4", True),
    "c0_hidden_width": (default_cell, lambda: (randn(BATCH, 3), (randn(BATCH, 4), randn(BATCH, 5))), RuntimeError,
                        r"cx \(c_0\) has inconsistent hidden_size: got 5, expected 4", True),
    "h0_hidden_width_unbatched": (default_cell, lambda: (randn(3), (randn(5), randn(4))), RuntimeError,
                                  r"hx \(h_0\) has inconsistent hidden_size: got 5, expected 4", True),
    "h0_batch": (default_cell, lambda: (randn(2, 3), (randn(3, 4), randn(2, 4))), RuntimeError,
                 r"input batch size 2 doesn't match hx \(h_0\) batch size 3", True),
    "c0_batch": (default_cell, lambda: (randn(2, 3), (randn(2, 4), randn(3, 4))), RuntimeError,
                 r"input batch size 2 doesn't match cx \(c_0\) batch size 3", True),
    "input_3d": (default_cell, lambda: (randn(2, 2, 3), None), ValueError,
                 r"Expected input to be 1D or 2D, got 3D", True),
    "input_0d": (default_cell, lambda: (torch.tensor(0.5), None), ValueError,
                 r"Expected input to be 1D or 2D, got 0D", True),
    "hx_3d": (default_cell, lambda: (randn(2, 3), (randn(1, 2, 4), randn(1, 2, 4))), ValueError,
              r"Expected hx\[0\] to be 1D or 2D, got 3D", True),
    "hx_tensor": (default_cell, lambda: (randn(2, 3), randn(2, 4)), TypeError,
                  r"hx must be a tuple \(h_0, c_0\) of two Tensors, got Tensor", True),
    "hx_dict": (default_cell, lambda: (randn(2, 3), {}), TypeError, r"hx must be a tuple", True),
    "hx_three_items": (default_cell, lambda: (randn(2, 3), (randn(2, 4),) * 3), RuntimeError,
                       r"hx must hold two states \(h_0, c_0\), got 3", True),
    "hx_one_item": (default_cell, lambda: (randn(2, 3), (randn(2, 4),)), RuntimeError,
                    r"hx must hold two states \(h_0, c_0\), got 1", True),
    # nn fails here with AttributeError ('NoneType' object has no attribute 'dim'): not compared.
    "hx_item_none": (default_cell, lambda: (randn(2, 3), (randn(2, 4), None)), TypeError,
                     r"hx must be a tuple \(h_0, c_0\) of two Tensors", False),
    # nn.LSTMCell segfaults on this one (unbatched input, batched states), so nn is never called.
    "unbatched_input_2d_hx": (default_cell, lambda: (randn(3), state(1)), RuntimeError,
                              r"unbatched \(1-D\) input needs 1-D hx\[0\], got shape \(1, 4\)", False),
    "unbatched_input_2d_c0": (default_cell, lambda: (randn(3), (randn(4), randn(1, 4))), RuntimeError,
                              r"unbatched \(1-D\) input needs 1-D hx\[1\]", False),
    "batched_input_1d_hx": (default_cell, lambda: (randn(2, 3), state()), RuntimeError,
                            r"batched \(2-D\) input needs 2-D hx\[0\], got shape \(4,\)", True),
    "batched_input_1d_c0": (default_cell, lambda: (randn(2, 3), (randn(2, 4), randn(4))), RuntimeError,
                            r"batched \(2-D\) input needs 2-D hx\[1\]", True),
    "input_float64_weights_float32": (default_cell, lambda: (randn(2, 3, dtype=torch.float64), None), RuntimeError,
                                      r"weight_ih has dtype Float but input has dtype Double", True),
    "input_float16_weights_float32": (default_cell, lambda: (randn(2, 3, dtype=torch.float16), None), RuntimeError,
                                      r"weight_ih has dtype Float but input has dtype Half", True),
    "input_integer": (default_cell, lambda: (torch.ones(2, 3, dtype=torch.long), None), RuntimeError,
                      r"input must be a floating-point tensor.*got Long", True),
    "h0_dtype": (default_cell, lambda: (randn(2, 3), (randn(2, 4, dtype=torch.float64), randn(2, 4))), RuntimeError,
                 r"hx \(h_0\) has dtype Double but input has dtype Float", True),
    # nn.LSTMCell silently promotes c_1 to float64 here; lstm_fused requires one dtype throughout.
    "c0_dtype": (default_cell, lambda: (randn(2, 3), (randn(2, 4), randn(2, 4, dtype=torch.float64))), RuntimeError,
                 r"cx \(c_0\) has dtype Double but input has dtype Float", False),
    "weight_hh_dtype": (with_parameter_dtype("weight_hh", torch.float64), lambda: (randn(2, 3), state(2)), RuntimeError,
                        r"weight_hh has dtype Double but input has dtype Float", True),
    "bias_ih_dtype": (with_parameter_dtype("bias_ih", torch.float64), lambda: (randn(2, 3), state(2)), RuntimeError,
                      r"bias_ih has dtype Double but input has dtype Float", True),
    "bias_hh_dtype": (with_parameter_dtype("bias_hh", torch.float64), lambda: (randn(2, 3), state(2)), RuntimeError,
                      r"bias_hh has dtype Double but input has dtype Float", True),
    "bias_hh_dtype_bfloat16": (with_parameter_dtype("bias_hh", torch.bfloat16), lambda: (randn(2, 3), state(2)),
                               RuntimeError, r"bias_hh has dtype BFloat16 but input has dtype Float", True),
}


def call_module(case, cell_class):
    build, make_args, *_ = MODULE_CASES[case]
    torch.manual_seed(0)
    cell = build(cell_class)
    torch.manual_seed(1)
    input, hx = make_args()
    return cell(input, hx)


@pytest.mark.parametrize("case", MODULE_CASES)
def test_module_error_names_the_argument(case):
    _, _, error_type, fragment, _ = MODULE_CASES[case]
    with pytest.raises(error_type, match=fragment):
        call_module(case, lf.LSTMCell)


@pytest.mark.parametrize("case", [case for case, spec in MODULE_CASES.items() if spec[4]])
def test_same_exception_type_as_nn(case):
    with pytest.raises(Exception) as torch_error:
        call_module(case, nn.LSTMCell)
    with pytest.raises(Exception) as fused_error:
        call_module(case, lf.LSTMCell)
    assert type(fused_error.value) is type(torch_error.value), (
        f"nn raises {type(torch_error.value).__name__}: {torch_error.value}; "
        f"lstm_fused raises {type(fused_error.value).__name__}: {fused_error.value}"
    )


def test_unbatched_input_with_batched_state_does_not_crash():
    """The call that segfaults nn.LSTMCell (PyTorch's own shape check misses it) raises here."""
    with pytest.raises(RuntimeError, match=r"hx\[0\]"):
        lf.LSTMCell(1, 1)(torch.randn(1), (torch.randn(1, 1), torch.randn(1, 1)))
    with pytest.raises(RuntimeError, match=r"hx\[0\]"):
        lf.lstm_cell(torch.randn(1), (torch.randn(1, 1), torch.randn(1, 1)), torch.randn(4, 1), torch.randn(4, 1))


def test_input_not_a_tensor():
    with pytest.raises(TypeError, match=r"input must be a Tensor, got list"):
        lf.LSTMCell(3, 4)([1.0, 2.0, 3.0])


# --- the functional form: weights are arguments, so their shapes can be wrong too ------------------

def weights(input_size=INPUT_SIZE, hidden_size=HIDDEN_SIZE, ih_rows=None, hh_shape=None, bias_size=None):
    return (
        randn(ih_rows or 4 * hidden_size, input_size),
        randn(*(hh_shape or (4 * hidden_size, hidden_size))),
        randn(bias_size or 4 * hidden_size),
        randn(4 * hidden_size),
    )


# id: (weights, fragment of our message, whether torch.lstm_cell raises RuntimeError too)
FUNCTIONAL_CASES = {
    "weight_hh_not_square_by_four": (lambda: weights(hh_shape=(16, 5)),
                                     r"weight_hh must have shape \[4 \* hidden_size, hidden_size\], got \[16, 5\]",
                                     True),
    # torch.lstm_cell fails with an IndexError from deep inside: not compared
    "weight_hh_1d": (lambda: weights(hh_shape=(16,)), r"weight_hh must have shape", False),
    "weight_ih_rows": (lambda: weights(ih_rows=12), r"weight_ih must have shape \[4 \* hidden_size, input_size\]",
                       True),
    "bias_ih_size": (lambda: weights(bias_size=15), r"bias_ih must have shape \[16\]", True),
}


@pytest.mark.parametrize("case", FUNCTIONAL_CASES)
def test_functional_weight_shapes(case):
    make_weights, fragment, torch_raises_too = FUNCTIONAL_CASES[case]
    args = (randn(BATCH, INPUT_SIZE), state(BATCH), *make_weights())
    with pytest.raises(RuntimeError, match=fragment):
        lf.lstm_cell(*args)
    if torch_raises_too:  # nn's functional rejects them too, with the same type
        with pytest.raises(RuntimeError):
            torch.lstm_cell(*args)


# --- the raw ops ----------------------------------------------------------------------------------

def forward_args(**replace):
    args = dict(
        input=randn(BATCH, INPUT_SIZE), hx=randn(BATCH, HIDDEN_SIZE), cx=randn(BATCH, HIDDEN_SIZE),
        weight_ih=randn(4 * HIDDEN_SIZE, INPUT_SIZE), weight_hh=randn(4 * HIDDEN_SIZE, HIDDEN_SIZE),
        bias_ih=randn(4 * HIDDEN_SIZE), bias_hh=randn(4 * HIDDEN_SIZE),
    )
    args.update(replace)
    return list(args.values())


def pointwise_args(**replace):
    args = dict(
        gates=randn(BATCH, 4 * HIDDEN_SIZE), cx=randn(BATCH, HIDDEN_SIZE), bias=randn(4 * HIDDEN_SIZE),
        hy=torch.empty(BATCH, HIDDEN_SIZE), cy=torch.empty(BATCH, HIDDEN_SIZE),
    )
    args.update(replace)
    return list(args.values())


def gate_grads_args(**replace):
    args = dict(
        grad_hy=randn(BATCH, HIDDEN_SIZE), grad_cy=randn(BATCH, HIDDEN_SIZE), grad_gates=randn(BATCH, 4 * HIDDEN_SIZE),
        cx=randn(BATCH, HIDDEN_SIZE), cy=randn(BATCH, HIDDEN_SIZE), gates=torch.rand(BATCH, 4 * HIDDEN_SIZE),
    )
    args.update(replace)
    return list(args.values())


def transposed(rows, columns):
    return randn(columns, rows).t()


RAW_OP_CASES = {
    "forward_weight_hh_shape": (ops.cell_forward, lambda: forward_args(weight_hh=randn(16, 5)),
                                r"weight_hh must have shape \[4 \* hidden_size, hidden_size\], got \[16, 5\]"),
    "forward_weight_ih_shape": (ops.cell_forward, lambda: forward_args(weight_ih=randn(12, 3)),
                                r"weight_ih must have shape \[4 \* hidden_size, input_size\] = \[16, input_size\]"),
    "forward_input_width": (ops.cell_forward, lambda: forward_args(input=randn(BATCH, 5)),
                            r"input has inconsistent input_size: got 5, expected 3"),
    "forward_input_1d": (ops.cell_forward, lambda: forward_args(input=randn(INPUT_SIZE)), r"input must be 2-D"),
    "forward_hx_1d": (ops.cell_forward, lambda: forward_args(hx=randn(HIDDEN_SIZE)), r"hx \(h_0\) must be 2-D"),
    "forward_cx_batch": (ops.cell_forward, lambda: forward_args(cx=randn(BATCH + 1, HIDDEN_SIZE)),
                         r"doesn't match cx \(c_0\) batch size 3"),
    "forward_bias_hh_shape": (ops.cell_forward, lambda: forward_args(bias_hh=randn(4 * HIDDEN_SIZE + 1)),
                              r"bias_hh must have shape \[16\]"),
    "forward_integer": (ops.cell_forward, lambda: [t.long() for t in forward_args()],
                        r"input must be a floating-point tensor"),
    "forward_weight_ih_dtype": (ops.cell_forward,
                                lambda: forward_args(weight_ih=randn(16, 3, dtype=torch.float64)),
                                r"weight_ih has dtype Double but input has dtype Float"),
    "pointwise_gates_non_contiguous": (ops.cell_pointwise_,
                                       lambda: pointwise_args(gates=transposed(BATCH, 4 * HIDDEN_SIZE)),
                                       r"gates is written in place and must be contiguous"),
    "pointwise_hy_non_contiguous": (ops.cell_pointwise_, lambda: pointwise_args(hy=transposed(BATCH, HIDDEN_SIZE)),
                                    r"hy is written in place and must be contiguous"),
    "pointwise_cy_non_contiguous": (ops.cell_pointwise_, lambda: pointwise_args(cy=transposed(BATCH, HIDDEN_SIZE)),
                                    r"cy is written in place and must be contiguous"),
    "pointwise_gates_width": (ops.cell_pointwise_, lambda: pointwise_args(gates=randn(BATCH, 4 * HIDDEN_SIZE + 2)),
                              r"gates must be 2-D \[batch, 4 \* hidden_size\]"),
    "pointwise_cx_shape": (ops.cell_pointwise_, lambda: pointwise_args(cx=randn(BATCH, HIDDEN_SIZE + 1)),
                           r"cx must have shape \[2, 4\]"),
    "pointwise_hy_shape": (ops.cell_pointwise_, lambda: pointwise_args(hy=torch.empty(BATCH + 1, HIDDEN_SIZE)),
                           r"hy must have shape \[2, 4\]"),
    "pointwise_bias_shape": (ops.cell_pointwise_, lambda: pointwise_args(bias=randn(HIDDEN_SIZE)),
                             r"bias must have shape \[16\]"),
    "pointwise_cx_dtype": (ops.cell_pointwise_,
                           lambda: pointwise_args(cx=randn(BATCH, HIDDEN_SIZE, dtype=torch.float64)),
                           r"cx has dtype Double but gates has dtype Float"),
    "gate_grads_grad_hy_shape": (ops.cell_gate_grads, lambda: gate_grads_args(grad_hy=randn(BATCH, HIDDEN_SIZE + 1)),
                                 r"grad_hy must have shape \[2, 4\]"),
    "gate_grads_grad_cy_shape": (ops.cell_gate_grads, lambda: gate_grads_args(grad_cy=randn(1, HIDDEN_SIZE)),
                                 r"grad_cy must have shape \[2, 4\]"),
    "gate_grads_grad_gates_shape": (ops.cell_gate_grads,
                                    lambda: gate_grads_args(grad_gates=randn(BATCH, HIDDEN_SIZE)),
                                    r"grad_gates must have shape \[2, 16\]"),
    "gate_grads_gates_shape": (ops.cell_gate_grads, lambda: gate_grads_args(gates=randn(BATCH, 3 * HIDDEN_SIZE)),
                               r"gates must have shape \[2, 16\]"),
    "gate_grads_cy_dtype": (ops.cell_gate_grads,
                            lambda: gate_grads_args(cy=randn(BATCH, HIDDEN_SIZE, dtype=torch.float16)),
                            r"cy has dtype Half but cx has dtype Float"),
    "gate_grads_cx_1d": (ops.cell_gate_grads, lambda: gate_grads_args(cx=randn(HIDDEN_SIZE)), r"cx must be 2-D"),
    "gate_grads_integer": (ops.cell_gate_grads, lambda: [t.long() for t in gate_grads_args()],
                           r"cx must be a floating-point tensor"),
}


@pytest.mark.parametrize("case", RAW_OP_CASES)
def test_raw_op_errors(case):
    op, make_args, fragment = RAW_OP_CASES[case]
    with pytest.raises(RuntimeError, match=fragment):
        op(*make_args())


def backward_args(**replace):
    """cell_backward's arguments from a real forward, with replacements."""
    input, hx, cx, weight_ih, weight_hh, bias_ih, bias_hh = forward_args()
    _, cy, gates = ops.cell_forward(input, hx, cx, weight_ih, weight_hh, bias_ih, bias_hh)
    args = dict(
        grad_hy=randn(BATCH, HIDDEN_SIZE), grad_cy=randn(BATCH, HIDDEN_SIZE), grad_gates=None,
        input=input, hx=hx, cx=cx, cy=cy, gates=gates, weight_ih=weight_ih, weight_hh=weight_hh,
        output_mask=[True] * 6,
    )
    args.update(replace)
    return list(args.values())


@pytest.mark.parametrize(
    "name, replacement",
    [
        ("weight_ih", lambda: randn(4 * HIDDEN_SIZE, INPUT_SIZE + 1)),
        ("weight_hh", lambda: randn(4 * HIDDEN_SIZE, HIDDEN_SIZE + 1)),
        ("hx", lambda: randn(BATCH, HIDDEN_SIZE + 1)),
        ("input", lambda: randn(BATCH + 1, INPUT_SIZE)),
        ("weight_ih", lambda: randn(4 * HIDDEN_SIZE, INPUT_SIZE, dtype=torch.float64)),
    ],
    ids=["weight_ih_width", "weight_hh_width", "hx_width", "input_batch", "weight_ih_dtype"],
)
def test_cell_backward_checks_its_arguments(name, replacement):
    """The products alone would accept some of these silently (a weight_ih [16, 4] against input
    [2, 3] gave a grad_input of shape [2, 4]) or fail with at::mm's message, naming no argument."""
    with pytest.raises(RuntimeError, match=name):
        ops.cell_backward(*backward_args(**{name: replacement()}))


@pytest.mark.parametrize(
    "name, replacement, fragment",
    [
        ("cy", lambda: randn(BATCH, HIDDEN_SIZE + 1), r"cy must have shape"),
        ("gates", lambda: randn(BATCH + 1, 4 * HIDDEN_SIZE), r"gates must have shape"),
        ("grad_hy", lambda: randn(BATCH, 1), r"grad_hy must have shape"),
    ],
)
def test_cell_backward_checks_the_gate_arguments(name, replacement, fragment):
    with pytest.raises(RuntimeError, match=fragment):
        ops.cell_backward(*backward_args(**{name: replacement()}))


@pytest.mark.parametrize(
    "op, make_args, reference_name",
    [
        (ops.cell_pointwise_, lambda: pointwise_args(cx=randn(BATCH, HIDDEN_SIZE, dtype=torch.float64)), "gates"),
        (ops.cell_gate_grads, lambda: gate_grads_args(cy=randn(BATCH, HIDDEN_SIZE, dtype=torch.float16)), "cx"),
    ],
    ids=["cell_pointwise_", "cell_gate_grads"],
)
def test_dtype_errors_name_the_argument_compared_against(op, make_args, reference_name):
    """The ops without an `input` argument name the tensor they compared the dtype with."""
    with pytest.raises(RuntimeError, match=rf"but {reference_name} has dtype Float"):
        op(*make_args())

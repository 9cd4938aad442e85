"""The public names' docstrings are true and complete: help() on each module lists every option of
its constructor and of its call, and what the sequence module's docstring says about double
backward and proj_size is what it does (against nn.LSTM, on fresh random input)."""
import inspect
import pydoc

import pytest
import torch
from torch import nn

import lstm_fused as lf


def options(function, *leave_out):
    return [name for name in inspect.signature(function).parameters if name not in ("self", *leave_out)]


@pytest.mark.parametrize(
    "module, constructor",
    [(lf.LSTM, nn.RNNBase.__init__), (lf.LSTMCell, nn.LSTMCell.__init__)],
    ids=["LSTM", "LSTMCell"],
)
def test_help_lists_every_constructor_and_call_option(module, constructor):
    # nn.LSTM's own __init__ is (*args, **kwargs); RNNBase's holds the options (mode and
    # nonlinearity are fixed by the LSTM class).
    wanted = options(constructor, "mode", "nonlinearity") + options(module.forward)
    assert len(wanted) >= 5
    text = pydoc.render_doc(module, renderer=pydoc.plaintext)
    documented = module.__doc__
    missing = [name for name in wanted if f"{name}:" not in documented and f"{name}," not in documented]
    assert not missing, f"{module.__name__}'s docstring does not describe {missing}"
    assert documented.strip().splitlines()[0] in text


def test_every_public_name_has_a_docstring():
    for name in lf.__all__:
        value = getattr(lf, name)
        if callable(value) or inspect.ismodule(value):
            assert (value.__doc__ or "").strip(), name


def test_lstm_double_backward_works_as_its_docstring_says(helpers):
    assert "Double backward" in lf.LSTM.__doc__ and "double backward (a second" not in lf.LSTM.__doc__
    torch_lstm = nn.LSTM(3, 4, num_layers=2, bidirectional=True, dtype=torch.float64)
    fused_lstm = lf.LSTM(3, 4, num_layers=2, bidirectional=True, dtype=torch.float64)
    fused_lstm.load_state_dict(torch_lstm.state_dict())
    x = helpers.randn(5, 2, 3, dtype=torch.float64)
    penalties = []
    for lstm in (torch_lstm, fused_lstm):
        leaf = x.clone().requires_grad_()
        output, _ = lstm(leaf)
        (grad_x,) = torch.autograd.grad(output.square().sum(), leaf, create_graph=True)
        penalty = grad_x.square().sum()
        penalties.append((penalty, torch.autograd.grad(penalty, lstm.weight_hh_l1_reverse)[0]))
    (nn_penalty, nn_grad), (fused_penalty, fused_grad) = penalties
    assert nn_grad.abs().max() > 0
    torch.testing.assert_close(fused_penalty, nn_penalty, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(fused_grad, nn_grad, rtol=1e-8, atol=1e-10)


def test_lstm_proj_size_does_what_its_docstring_says():
    # h_n and the output have proj_size features, weight_hh_l0 proj_size columns, and the values are nn's.
    assert "weight_hr_l[k]" in lf.LSTM.__doc__ and "proj_size" in lf.LSTM.__doc__
    fused = lf.LSTM(3, 4, proj_size=2, dtype=torch.float64)
    torch_lstm = nn.LSTM(3, 4, proj_size=2, dtype=torch.float64)
    torch_lstm.load_state_dict(fused.state_dict())
    assert fused.weight_hh_l0.shape == (16, 2) and fused.weight_hr_l0.shape == (2, 4)
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    output, (h_n, c_n) = fused(x)
    assert output.shape == (5, 2, 2) and h_n.shape == (1, 2, 2) and c_n.shape == (1, 2, 4)
    expected_output, (expected_h, expected_c) = torch_lstm(x)
    for actual, expected in ((output, expected_output), (h_n, expected_h), (c_n, expected_c)):
        torch.testing.assert_close(actual, expected, rtol=1e-10, atol=1e-12)

"""lf.LSTMCell as a drop-in for nn.LSTMCell: parameters, initialisation, state_dict, copies,
serialisation, repr, defaults, empty sizes, dtype/device handling, gradient accumulation."""
import copy
import io
import pickle

import pytest
import torch
from torch import nn

import lstm_fused as lf

CONFIGS = [
    dict(input_size=3, hidden_size=4),
    dict(input_size=3, hidden_size=4, bias=False),
    dict(input_size=10, hidden_size=1),
]
CONFIG_IDS = ["3_4", "3_4_no_bias", "10_1"]


def assert_same_outputs(helpers, module, other, x, hx=None):
    with torch.no_grad():
        for actual, expected in zip(module(x, hx), other(x, hx), strict=True):
            helpers.assert_close(actual, expected)


def test_is_an_nn_lstm_cell():
    cell = lf.LSTMCell(3, 4)
    assert isinstance(cell, nn.LSTMCell)
    assert isinstance(cell, nn.RNNCellBase)
    assert lf.LSTMCell is lf.modules.LSTMCell


@pytest.mark.parametrize("config", CONFIGS, ids=CONFIG_IDS)
def test_parameters_and_attributes_like_nn(config):
    torch_cell, fused_cell = nn.LSTMCell(**config), lf.LSTMCell(**config)
    torch_params = dict(torch_cell.named_parameters())
    fused_params = dict(fused_cell.named_parameters())
    assert list(fused_params) == list(torch_params)
    for name, parameter in torch_params.items():
        assert fused_params[name].shape == parameter.shape, name
        assert fused_params[name].dtype == parameter.dtype, name
        assert isinstance(fused_params[name], nn.Parameter)
    for attribute in ("input_size", "hidden_size", "bias"):
        assert getattr(fused_cell, attribute) == getattr(torch_cell, attribute)
    if not config.get("bias", True):
        assert fused_cell.bias_ih is None and fused_cell.bias_hh is None
    assert list(fused_cell.state_dict()) == list(torch_cell.state_dict())


@pytest.mark.parametrize("config", CONFIGS, ids=CONFIG_IDS)
def test_same_initialisation(seed, config):
    torch.manual_seed(seed)
    torch_cell = nn.LSTMCell(**config)
    torch.manual_seed(seed)
    fused_cell = lf.LSTMCell(**config)
    torch.manual_seed(seed)
    reference_cell = lf.reference.LSTMCell(**config)
    for (name, expected), actual, reference in zip(
        torch_cell.named_parameters(), fused_cell.parameters(), reference_cell.parameters(), strict=True
    ):
        assert torch.equal(actual, expected), name
        assert torch.equal(reference, expected), name
    # and the draw is a real one: another seed gives other weights
    torch.manual_seed(seed + 1)
    assert not torch.equal(lf.LSTMCell(**config).weight_ih, fused_cell.weight_ih)


def test_reset_parameters_like_nn(seed):
    torch_cell, fused_cell = nn.LSTMCell(5, 6), lf.LSTMCell(5, 6)
    torch.manual_seed(seed)
    torch_cell.reset_parameters()
    torch.manual_seed(seed)
    fused_cell.reset_parameters()
    for expected, actual in zip(torch_cell.parameters(), fused_cell.parameters(), strict=True):
        assert torch.equal(actual, expected)


@pytest.mark.parametrize("config", CONFIGS, ids=CONFIG_IDS)
def test_state_dict_loads_both_ways(helpers, config):
    torch_cell, fused_cell = nn.LSTMCell(**config), lf.LSTMCell(**config)
    x = helpers.randn(2, config["input_size"])
    hx = helpers.state(2, config["hidden_size"])

    fused_cell.load_state_dict(torch_cell.state_dict())  # nn -> lf
    assert_same_outputs(helpers, fused_cell, torch_cell, x, hx)

    other_fused = lf.LSTMCell(**config)  # fresh weights, then lf -> nn
    other_torch = nn.LSTMCell(**config)
    other_torch.load_state_dict(other_fused.state_dict())
    for name, value in other_fused.state_dict().items():
        assert torch.equal(other_torch.state_dict()[name], value), name
    assert_same_outputs(helpers, other_fused, other_torch, x, hx)


def test_state_dict_strict_mismatch_raises_like_nn():
    with pytest.raises(RuntimeError, match="bias_ih") as fused_error:
        lf.LSTMCell(3, 4, bias=False).load_state_dict(nn.LSTMCell(3, 4).state_dict())
    with pytest.raises(RuntimeError) as torch_error:
        nn.LSTMCell(3, 4, bias=False).load_state_dict(nn.LSTMCell(3, 4).state_dict())
    assert str(fused_error.value) == str(torch_error.value)
    with pytest.raises(RuntimeError, match="size mismatch for weight_hh"):
        lf.LSTMCell(3, 4).load_state_dict(nn.LSTMCell(3, 5).state_dict())


def round_trips(cell):
    """Copies of cell by every route a user takes."""
    buffer = io.BytesIO()
    torch.save(cell, buffer)
    buffer.seek(0)
    return {
        "deepcopy": copy.deepcopy(cell),
        "pickle": pickle.loads(pickle.dumps(cell)),
        "torch.save": torch.load(buffer, weights_only=False),
    }


@pytest.mark.parametrize("route", ["deepcopy", "pickle", "torch.save"])
@pytest.mark.parametrize("config", CONFIGS, ids=CONFIG_IDS)
def test_copies_stay_fused_and_equal(helpers, config, route):
    cell = lf.LSTMCell(**config)
    copied = round_trips(cell)[route]
    assert type(copied) is lf.LSTMCell
    for (name, original), duplicate in zip(cell.named_parameters(), copied.parameters(), strict=True):
        assert torch.equal(duplicate, original), name
        assert duplicate.data_ptr() != original.data_ptr(), f"{name} shares memory with the original"
    x = helpers.randn(3, config["input_size"])
    hx = helpers.state(3, config["hidden_size"])
    with torch.no_grad():
        outputs = copied(x, hx, return_gates=True)  # the fused forward, with its extra keyword
    assert len(outputs) == 3
    assert_same_outputs(helpers, copied, cell, x, hx)


def test_state_dict_through_torch_save(helpers):
    cell = lf.LSTMCell(5, 7)
    buffer = io.BytesIO()
    torch.save(cell.state_dict(), buffer)
    buffer.seek(0)
    restored = lf.LSTMCell(5, 7)
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    assert_same_outputs(helpers, restored, cell, helpers.randn(2, 5), helpers.state(2, 7))


@pytest.mark.parametrize("config", CONFIGS, ids=CONFIG_IDS)
def test_repr_like_nn(config):
    assert repr(lf.LSTMCell(**config)) == repr(nn.LSTMCell(**config))
    assert repr(lf.reference.LSTMCell(**config)) == repr(nn.LSTMCell(**config))


@pytest.mark.parametrize("batched", [True, False], ids=["batched", "unbatched"])
def test_state_omitted_means_zeros(helpers, batched):
    torch_cell, fused_cell, _ = helpers.cells(7, 5)
    x = helpers.randn(*((4,) if batched else ()), 7)
    zeros = torch.zeros(*x.shape[:-1], 5)
    with torch.no_grad():
        omitted = fused_cell(x)
        explicit = fused_cell(x, (zeros, zeros))
        torch_omitted = torch_cell(x)
    for a, b, c in zip(omitted, explicit, torch_omitted, strict=True):
        assert torch.equal(a, b)
        helpers.assert_close(a, c)
        assert a.shape == c.shape


@pytest.mark.parametrize("hx_type", [tuple, list])
def test_hx_as_list_like_nn(helpers, hx_type):
    torch_cell, fused_cell, _ = helpers.cells(7, 5)
    x = helpers.randn(2, 7)
    hx = hx_type(helpers.state(2, 5))
    assert_same_outputs(helpers, fused_cell, torch_cell, x, hx)


@pytest.mark.parametrize(
    "batch, input_size, hidden_size", [(0, 3, 4), (2, 0, 4), (2, 3, 0), (0, 0, 0), (None, 0, 4), (None, 3, 0)]
)
def test_empty_sizes_like_nn(helpers, batch, input_size, hidden_size):
    torch_cell, fused_cell, _ = helpers.cells(input_size, hidden_size)
    lead = () if batch is None else (batch,)
    x = helpers.randn(*lead, input_size, requires_grad=True)
    hx = [helpers.randn(*lead, hidden_size, requires_grad=True) for _ in range(2)]

    def run(cell):
        h_1, c_1 = cell(x, hx)
        loss = (h_1 * 2).sum() + (c_1 * 3).sum()
        return [h_1, c_1, *torch.autograd.grad(loss, [x, *hx, *cell.parameters()])]

    for actual, expected in zip(run(fused_cell), run(torch_cell), strict=True):
        assert actual.shape == expected.shape and actual.dtype == expected.dtype
        helpers.assert_close(actual, expected)


def test_to_float64_and_back(helpers):
    torch_cell, fused_cell, _ = helpers.cells(6, 8)
    fused_cell.to(torch.float64)
    torch_cell.double()
    assert all(p.dtype == torch.float64 for p in fused_cell.parameters())
    x = helpers.randn(3, 6, dtype=torch.float64)
    hx = helpers.state(3, 8, torch.float64)
    with torch.no_grad():
        outputs = fused_cell(x, hx)
    assert all(t.dtype == torch.float64 for t in outputs)
    assert_same_outputs(helpers, fused_cell, torch_cell, x, hx)
    fused_cell.float()
    torch_cell.float()
    assert_same_outputs(helpers, fused_cell, torch_cell, x.float(), tuple(t.float() for t in hx))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_constructor_device_and_dtype(helpers, dtype):
    torch.manual_seed(1)
    fused_cell = lf.LSTMCell(4, 3, device="cpu", dtype=dtype)
    torch.manual_seed(1)
    torch_cell = nn.LSTMCell(4, 3, device=torch.device("cpu"), dtype=dtype)
    for (name, expected), actual in zip(torch_cell.named_parameters(), fused_cell.parameters(), strict=True):
        assert actual.dtype == dtype and actual.device.type == "cpu", name
        assert torch.equal(actual, expected), name
    with torch.no_grad():
        h_1, c_1 = fused_cell(helpers.randn(2, 4, dtype=dtype))
    assert h_1.dtype == c_1.dtype == dtype


def test_meta_device_construction():
    cell = lf.LSTMCell(4, 3, device="meta")
    assert all(p.device.type == "meta" for p in cell.parameters())
    assert [p.shape for p in cell.parameters()] == [p.shape for p in nn.LSTMCell(4, 3).parameters()]


@pytest.mark.parametrize("call", ["batched", "unbatched", "no_state"])
def test_meta_device_forward_like_nn(call):
    """Shape inference on the meta device (no data), as nn.LSTMCell allows."""
    cells = [cls(4, 3, device="meta") for cls in (nn.LSTMCell, lf.LSTMCell)]
    x = torch.empty(5, 4, device="meta") if call != "unbatched" else torch.empty(4, device="meta")
    hx = None if call == "no_state" else (torch.empty(*x.shape[:-1], 3, device="meta"),) * 2
    expected, actual = (cell(x, hx) for cell in cells)
    assert [(t.shape, t.device, t.dtype) for t in actual] == [(t.shape, t.device, t.dtype) for t in expected]


@pytest.mark.parametrize("layout", [torch.sparse_coo, torch.sparse_csr], ids=["coo", "csr"])
@pytest.mark.parametrize("sparse_state", [False, True], ids=["dense_state", "sparse_h_0"])
def test_sparse_input_like_nn(helpers, layout, sparse_state):
    """nn.LSTMCell's products take a sparse input (a one-hot batch, say): so does the fused cell,
    with the same outputs and gradient values."""
    torch_cell, fused_cell, _ = helpers.cells(6, 4)
    dense = helpers.randn(3, 6)
    dense[1, 2:] = 0  # some structure to leave out
    h_0, c_0 = helpers.state(3, 4)
    to_layout = (lambda t: t.to_sparse()) if layout == torch.sparse_coo else (lambda t: t.to_sparse_csr())
    results = []
    for cell in (torch_cell, fused_cell):
        x = to_layout(dense).requires_grad_()
        hx = (to_layout(h_0) if sparse_state else h_0, c_0)
        h_1, c_1 = cell(x, hx)
        (h_1.sum() + 2 * c_1.sum()).backward()
        results.append([h_1, c_1, x.grad.to_dense(), cell.weight_ih.grad, cell.weight_hh.grad, cell.bias_ih.grad])
    for actual, expected in zip(results[1], results[0], strict=True):
        helpers.assert_close(actual, expected)


def test_gradients_accumulate_like_nn(helpers):
    """Two backward passes into .grad, then an in-place update of one bias gradient: the
    gradients must be separate tensors (the backward returns one bias gradient for both biases)."""
    for batch in (1, 3):
        torch_cell, fused_cell, _ = helpers.cells(5, 4, dtype=torch.float64)
        inputs = [helpers.randn(batch, 5, dtype=torch.float64) for _ in range(2)]
        hx = helpers.state(batch, 4, torch.float64)
        for cell in (torch_cell, fused_cell):
            for x in inputs:
                h_1, c_1 = cell(x, hx)
                (h_1.sum() + (c_1 * 2).sum()).backward()
        for (name, expected), actual in zip(torch_cell.named_parameters(), fused_cell.parameters(), strict=True):
            helpers.assert_close(actual.grad, expected.grad, msg=lambda m: f"{name}.grad, batch {batch}: {m}")
        assert fused_cell.bias_ih.grad.data_ptr() != fused_cell.bias_hh.grad.data_ptr()
        before = fused_cell.bias_hh.grad.clone()
        fused_cell.bias_ih.grad.mul_(3)
        assert torch.equal(fused_cell.bias_hh.grad, before), f"bias_ih.grad aliases bias_hh.grad (batch {batch})"


def test_training_steps_like_nn(helpers):
    """A few SGD steps on a sequence task move both cells' weights identically."""
    torch_cell, fused_cell, _ = helpers.cells(3, 6, dtype=torch.float64)
    sequence = helpers.randn(5, 4, 3, dtype=torch.float64)
    targets = helpers.randn(4, 6, dtype=torch.float64)
    for cell in (torch_cell, fused_cell):
        optimizer = torch.optim.SGD(cell.parameters(), lr=0.3, momentum=0.9)
        for _ in range(4):
            optimizer.zero_grad()
            hx = None
            for x in sequence:
                hx = cell(x, hx)
            nn.functional.mse_loss(hx[0], targets).backward()
            optimizer.step()
    for (name, expected), actual in zip(torch_cell.named_parameters(), fused_cell.parameters(), strict=True):
        helpers.assert_close(actual, expected, msg=lambda m: f"{name}: {m}")


def test_no_grad_and_inference_mode(helpers):
    torch_cell, fused_cell, _ = helpers.cells(7, 5)
    x = helpers.randn(3, 7)
    hx = helpers.state(3, 5)
    for context in (torch.no_grad, torch.inference_mode):
        with context():
            outputs = fused_cell(x, hx)
            expected = torch_cell(x, hx)
        for actual, wanted in zip(outputs, expected, strict=True):
            assert not actual.requires_grad
            helpers.assert_close(actual, wanted)


def test_train_and_eval_modes_agree(helpers):
    _, fused_cell, _ = helpers.cells(7, 5)
    x = helpers.randn(3, 7)
    with torch.no_grad():
        train_outputs = fused_cell.train()(x)
        eval_outputs = fused_cell.eval()(x)
    for a, b in zip(train_outputs, eval_outputs, strict=True):
        assert torch.equal(a, b)


def test_in_place_on_outputs_never_gives_wrong_gradients(helpers):
    """h_1 is not saved for backward: scaling it in place before the loss gives nn's gradients.
    c_1 is (backward reads it): an in-place change must be caught by autograd's version check
    (nn.LSTMCell saves tanh(c_1) instead and does not need to), never silently used."""
    torch_cell, fused_cell, _ = helpers.cells(3, 4, dtype=torch.float64)
    x = helpers.randn(2, 3, dtype=torch.float64)
    hx = helpers.state(2, 4, torch.float64)

    def grads(cell, which):
        h_1, c_1 = cell(x, hx)
        (h_1 if which == "h" else c_1).mul_(2)
        (h_1.sum() + (c_1 * 3).sum()).backward()
        result = [p.grad.clone() for p in cell.parameters()]
        cell.zero_grad()
        return result

    for actual, expected in zip(grads(fused_cell, "h"), grads(torch_cell, "h"), strict=True):
        helpers.assert_close(actual, expected)
    expected = grads(torch_cell, "c")
    try:
        actual = grads(fused_cell, "c")
    except RuntimeError as error:
        assert "modified by an inplace operation" in str(error)
    else:
        for a, e in zip(actual, expected, strict=True):
            helpers.assert_close(a, e)

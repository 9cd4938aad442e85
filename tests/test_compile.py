"""torch.compile(fullgraph=True) of a small recurrent model built on lf.LSTMCell: one graph,
no breaks, the same outputs and gradients as eager. Each compile costs seconds on two cores, so
these are few."""
import pytest
import torch
from torch import nn

import lstm_fused as lf


class SequenceModel(nn.Module):
    """A few steps of the cell from a zero state, then a Linear head on the last hidden state;
    with return_gates, the mean forget gate of every step is returned as well."""

    def __init__(self, input_size, hidden_size, output_size, return_gates):
        super().__init__()
        self.cell = lf.LSTMCell(input_size, hidden_size)
        self.head = nn.Linear(hidden_size, output_size)
        self.return_gates = return_gates

    def forward(self, inputs):
        hx = None
        forget_means = []
        for step in range(inputs.shape[0]):
            if self.return_gates:
                h, c, gates = self.cell(inputs[step], hx, return_gates=True)
                forget_means.append(gates.forget.mean(dim=-1))
            else:
                h, c = self.cell(inputs[step], hx)
            hx = (h, c)
        output = self.head(hx[0])
        if self.return_gates:
            return output, hx[1], torch.stack(forget_means)
        return output, hx[1]


def forward_and_gradients(model, inputs, loss_weights):
    inputs = inputs.clone().requires_grad_(True)
    outputs = model(inputs)
    loss = sum((output * weight).sum() for output, weight in zip(outputs, loss_weights, strict=True))
    return [*outputs, *torch.autograd.grad(loss, [inputs, *model.parameters()])]


@pytest.mark.parametrize("return_gates", [False, True], ids=["states", "with_gates"])
def test_compiled_model_matches_eager(helpers, return_gates):
    torch._dynamo.reset()
    model = SequenceModel(5, 8, 3, return_gates)
    inputs = helpers.randn(4, 6, 5)
    with torch.no_grad():
        shapes = [o.shape for o in model(inputs)]
    loss_weights = [helpers.randn(*shape) for shape in shapes]

    eager = forward_and_gradients(model, inputs, loss_weights)
    compiled_model = torch.compile(model, fullgraph=True)
    compiled = forward_and_gradients(compiled_model, inputs, loss_weights)
    for index, (actual, expected) in enumerate(zip(compiled, eager, strict=True)):
        assert actual.shape == expected.shape
        helpers.assert_close(actual, expected, msg=lambda m: f"output/gradient {index}: {m}")

    # the compiled graph runs the fused kernels, and a second call (new inputs) reuses it
    other_inputs = helpers.randn(4, 6, 5)
    with torch.no_grad():
        for actual, expected in zip(compiled_model(other_inputs), model(other_inputs), strict=True):
            helpers.assert_close(actual, expected)


def test_compiled_functional_cell_matches_nn(helpers):
    """lf.lstm_cell traced by the aot_eager backend (no C++ compile): fake tensors, no graph break,
    values and gradients equal to nn.LSTMCell's."""
    torch._dynamo.reset()
    torch_cell, fused_cell, _ = helpers.cells(7, 5, True, torch.float64)
    step = torch.compile(
        lambda x, hx: lf.lstm_cell(x, hx, *fused_cell.parameters()), fullgraph=True, backend="aot_eager"
    )
    x = helpers.randn(3, 7, dtype=torch.float64)
    hx = helpers.state(3, 5, torch.float64)
    loss_weights = helpers.state(3, 5, torch.float64)

    def run(fn, parameters):
        leaves = [t.clone().requires_grad_(True) for t in (x, *hx)]
        h_1, c_1 = fn(leaves[0], (leaves[1], leaves[2]))
        loss = (h_1 * loss_weights[0]).sum() + (c_1 * loss_weights[1]).sum()
        return [h_1, c_1, *torch.autograd.grad(loss, [*leaves, *parameters])]

    compiled = run(step, list(fused_cell.parameters()))
    expected = run(torch_cell, list(torch_cell.parameters()))
    for actual, wanted in zip(compiled, expected, strict=True):
        helpers.assert_close(actual, wanted)


def test_graph_calls_the_fused_op(helpers):
    """Dynamo captures lstm_fused's operator as one node (not a trace of its Python wrapper into
    something else), with return_gates too."""
    torch._dynamo.reset()
    graphs = []

    def recording_backend(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module.forward

    cell = lf.LSTMCell(4, 3)
    step = torch.compile(lambda x, hx: cell(x, hx, return_gates=True), fullgraph=True, backend=recording_backend)
    x = helpers.randn(2, 4)
    hx = helpers.state(2, 3)
    with torch.no_grad():
        h_1, c_1, gates = step(x, hx)
        expected = cell(x, hx, return_gates=True)
    assert len(graphs) == 1
    fused_op = torch.ops.lstm_fused.cell_forward
    targets = [node.target for node in graphs[0].graph.nodes if node.op == "call_function"]
    assert sum(target in (fused_op, fused_op.default) for target in targets) == 1, targets
    for actual, wanted in zip([h_1, c_1, *gates], [*expected[:2], *expected[2]], strict=True):
        assert torch.equal(actual, wanted)


@pytest.mark.parametrize("capture", ["export", "jit_trace"])
@pytest.mark.filterwarnings("ignore:`torch.jit.trace:FutureWarning")  # deprecated, still used
def test_exported_and_traced_cell_match_nn(helpers, capture):
    """torch.export and torch.jit.trace record the fused op; the captured program, run on new
    inputs, gives nn.LSTMCell's outputs."""
    torch_cell, fused_cell, _ = helpers.cells(6, 4)
    example = (helpers.randn(3, 6), helpers.state(3, 4))
    if capture == "export":
        program = torch.export.export(fused_cell, example)
        targets = [node.target for node in program.graph.nodes if node.op == "call_function"]
        assert torch.ops.lstm_fused.cell_forward.default in targets, targets
        captured = program.module()
    else:
        captured = torch.jit.trace(fused_cell, example)
        assert "lstm_fused::cell_forward" in str(captured.graph)
    x, hx = helpers.randn(3, 6), helpers.state(3, 4)
    with torch.no_grad():
        for actual, expected in zip(captured(x, hx), torch_cell(x, hx), strict=True):
            helpers.assert_close(actual, expected)


def test_compiled_lstm_with_projection_matches_eager(helpers):
    """An LSTM with projections (proj_size > 0) under torch.compile(fullgraph=True): the sequence
    op with weight_hr through its fake implementation, the same outputs and gradients as eager."""
    torch._dynamo.reset()
    model = nn.Sequential()
    lstm = lf.LSTM(5, 8, num_layers=2, bidirectional=True, proj_size=3, batch_first=True)
    head = nn.Linear(6, 2)

    def forward(x):
        output, (h_n, c_n) = lstm(x)
        return head(output), h_n, c_n

    model.lstm, model.head = lstm, head
    inputs = helpers.randn(4, 6, 5)
    shapes = [(4, 6, 2), (4, 4, 3), (4, 4, 8)]
    loss_weights = [helpers.randn(*shape) for shape in shapes]
    eager = forward_and_gradients_of(forward, model, inputs, loss_weights)
    with torch._dynamo.config.patch(allow_rnn=True):
        compiled = forward_and_gradients_of(torch.compile(forward, fullgraph=True), model, inputs, loss_weights)
    for index, (actual, expected) in enumerate(zip(compiled, eager, strict=True)):
        assert actual.shape == expected.shape
        helpers.assert_close(actual, expected, msg=lambda m: f"output/gradient {index}: {m}")


def forward_and_gradients_of(fn, model, inputs, loss_weights):
    inputs = inputs.clone().requires_grad_(True)
    outputs = fn(inputs)
    loss = sum((output * weight).sum() for output, weight in zip(outputs, loss_weights, strict=True))
    return [*outputs, *torch.autograd.grad(loss, [inputs, *model.parameters()])]

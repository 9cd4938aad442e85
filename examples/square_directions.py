"""Clockwise or counter-clockwise? An LSTM classifies how a square was drawn.

Each sequence is the four corners of a square, visited clockwise or counter-clockwise from a
random corner, with a random rotation, size and position and noise on every point. The direction
is the sign of the turn between consecutive edges, so no single point gives it away: the cell
must keep the earlier points in its state and compare. A small lstm_fused cell, looped over the
four points, learns it; then the script loads the same weights into torch.nn.LSTMCell and checks,
step by step, that both give the same gates, cell states and hidden states, nn's gates worked
out by hand from its weights, so "drop-in" is shown rather than claimed.

    python examples/square_directions.py [--seed 0] [--plot square_directions.png]
"""
import argparse
import math
import time

import torch
import torch.nn.functional as F
from torch import nn

import lstm_fused

HIDDEN_SIZE = 16
BATCH_SIZE = 64
TRAIN_STEPS = 200
LEARNING_RATE = 0.02
TEST_BATCH_SIZE = 1000
NOISE = 0.15  # standard deviation of each coordinate, relative to the square's half-side
CLOCKWISE, COUNTER_CLOCKWISE = 0, 1
DIRECTION_NAMES = ("clockwise", "counter-clockwise")
NO_MATPLOTLIB = "matplotlib is not installed, so no plot (pip install matplotlib to get one)."
# A unit square's corners in counter-clockwise order.
CORNERS = torch.tensor([[1.0, 1.0], [-1.0, 1.0], [-1.0, -1.0], [1.0, -1.0]])


def make_batch(batch_size, generator):
    """Returns points (4, batch, 2), time first, and directions (batch,): 0 clockwise, 1 counter."""
    directions = torch.randint(0, 2, (batch_size,), generator=generator)
    start = torch.randint(0, 4, (batch_size,), generator=generator)
    steps = torch.arange(4)
    # Counter-clockwise walks forward through CORNERS, clockwise walks backward.
    sign = torch.where(directions == COUNTER_CLOCKWISE, 1, -1)
    corner_index = (start[:, None] + sign[:, None] * steps[None, :]) % 4  # (batch, 4)
    points = CORNERS[corner_index] + NOISE * torch.randn(batch_size, 4, 2, generator=generator)
    # A rotation, a scale and a shift preserve the direction of travel, so the model has to learn
    # the turn, not the coordinates of one particular square.
    angle = 2 * math.pi * torch.rand(batch_size, generator=generator)
    cos, sin = angle.cos(), angle.sin()
    rotation = torch.stack([torch.stack([cos, -sin], -1), torch.stack([sin, cos], -1)], -2)  # (batch, 2, 2)
    scale = 0.5 + torch.rand(batch_size, 1, 1, generator=generator)
    shift = 0.5 * torch.randn(batch_size, 1, 2, generator=generator)
    points = scale * points @ rotation.transpose(-1, -2) + shift
    return points.transpose(0, 1).contiguous(), directions


class DirectionClassifier(nn.Module):
    """An lstm_fused cell over the points; the last hidden state decides the direction."""

    def __init__(self, hidden_size=HIDDEN_SIZE):
        super().__init__()
        self.cell = lstm_fused.LSTMCell(input_size=2, hidden_size=hidden_size)
        self.readout = nn.Linear(hidden_size, 2)

    def forward(self, points):
        """points: (time, batch, 2). Returns logits (batch, 2) and, per step, (h, c, gates)."""
        state, trace = None, []
        for point in points:
            hidden, cell_state, gates = self.cell(point, state, return_gates=True)
            state = (hidden, cell_state)
            trace.append((hidden, cell_state, gates))
        return self.readout(state[0]), trace


def train(model, generator):
    optimizer = torch.optim.Adam(model.parameters(), lr=LEARNING_RATE)
    for _ in range(TRAIN_STEPS):
        points, directions = make_batch(BATCH_SIZE, generator)  # fresh squares every step
        optimizer.zero_grad()
        logits, _ = model(points)
        loss = F.cross_entropy(logits, directions)
        loss.backward()
        optimizer.step()
    return loss.item()


def nn_gates_by_hand(cell: nn.LSTMCell, x, state):
    """The activated gates of an nn.LSTMCell step, from its weights: nn.LSTMCell does not return
    them. Rows of weight_ih/weight_hh and the biases are stacked in the order i, f, g, o."""
    hidden, _ = state
    preactivations = x @ cell.weight_ih.T + cell.bias_ih + hidden @ cell.weight_hh.T + cell.bias_hh
    input_gate, forget_gate, candidate, output_gate = preactivations.chunk(4, dim=-1)
    return lstm_fused.LSTMGates(input_gate.sigmoid(), forget_gate.sigmoid(), candidate.tanh(), output_gate.sigmoid())


def compare_with_nn(model, points):
    """Runs nn.LSTMCell, loaded with the fused cell's weights, over the same points on its own
    state (so any difference would compound over the steps rather than be reset). Returns, per
    step, the largest absolute difference of each gate and state, and nn's predictions."""
    nn_cell = nn.LSTMCell(2, model.cell.hidden_size)
    nn_cell.load_state_dict(model.cell.state_dict())  # same parameter names and shapes: drop-in
    zeros = points.new_zeros(points.shape[1], model.cell.hidden_size)
    nn_state = (zeros, zeros)
    _, fused_trace = model(points)
    differences = []
    for point, (fused_hidden, fused_cell_state, fused_gates) in zip(points, fused_trace):
        nn_gates = nn_gates_by_hand(nn_cell, point, nn_state)
        nn_state = nn_cell(point, nn_state)
        step_difference = {name: (fused - reference).abs().max().item()
                           for name, fused, reference in zip(lstm_fused.LSTMGates._fields, fused_gates, nn_gates)}
        step_difference["c"] = (fused_cell_state - nn_state[1]).abs().max().item()
        step_difference["h"] = (fused_hidden - nn_state[0]).abs().max().item()
        differences.append(step_difference)
    nn_predictions = model.readout(nn_state[0]).argmax(-1)
    return differences, nn_predictions


def save_plot(path, points, directions, trace):
    """For one clockwise and one counter-clockwise test square: the path, then each gate as a
    heatmap (unit x step)."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    examples = [(directions == direction).nonzero()[0].item() for direction in (CLOCKWISE, COUNTER_CLOCKWISE)]
    gate_panels = [("input gate i", "input", "viridis", (0, 1)), ("forget gate f", "forget", "viridis", (0, 1)),
                   ("candidate g", "cell", "RdBu_r", (-1, 1)), ("output gate o", "output", "viridis", (0, 1))]
    figure, axes = plt.subplots(1 + len(gate_panels), 2, figsize=(8, 12))
    for column, example in enumerate(examples):
        path_axis = axes[0, column]
        xy = points[:, example]
        path_axis.plot(xy[:, 0].numpy(), xy[:, 1].numpy(), "k-", alpha=0.4)
        for step, (x, y) in enumerate(xy.tolist()):
            path_axis.annotate(str(step), (x, y), color="C3", ha="center", va="center", fontsize=12)
        path_axis.set_aspect("equal")
        path_axis.margins(0.2)
        path_axis.set_title(f"{DIRECTION_NAMES[directions[example]]} (test square {example})", fontsize=10)
        for axis, (title, field, colormap, (low, high)) in zip(axes[1:, column], gate_panels):
            values = torch.stack([getattr(gates, field)[example] for _, _, gates in trace], dim=1)
            image = axis.imshow(values.numpy(), aspect="auto", cmap=colormap, vmin=low, vmax=high, interpolation="nearest")
            axis.set_title(title, fontsize=9)
            axis.set_ylabel("unit")
            axis.set_xticks(range(len(trace)))
            figure.colorbar(image, ax=axis, fraction=0.05)
        axes[-1, column].set_xlabel("step (corner)")
    figure.tight_layout()
    figure.savefig(path, dpi=80)
    plt.close(figure)
    return path


def main(seed=0, quiet=False, plot_path=None):
    """Trains, evaluates, compares with nn.LSTMCell and reports. Returns the metrics; writes a
    PNG to plot_path if given and matplotlib is installed."""
    say = (lambda *args: None) if quiet else print
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    model = DirectionClassifier()
    started = time.perf_counter()
    final_loss = train(model, generator)
    train_seconds = time.perf_counter() - started

    with torch.no_grad():
        points, directions = make_batch(TEST_BATCH_SIZE, generator)
        logits, trace = model(points)
        predictions = logits.argmax(-1)
        differences, nn_predictions = compare_with_nn(model, points)
    accuracy = (predictions == directions).float().mean().item()
    per_direction = [(predictions[directions == d] == d).float().mean().item() for d in (CLOCKWISE, COUNTER_CLOCKWISE)]
    max_gate_difference = max(max(step[name] for name in lstm_fused.LSTMGates._fields) for step in differences)
    max_state_difference = max(max(step["c"], step["h"]) for step in differences)
    # Which hidden unit ends up most different between the two directions: the "answer" unit.
    final_hidden = trace[-1][0]
    mean_final = [final_hidden[directions == d].mean(0) for d in (CLOCKWISE, COUNTER_CLOCKWISE)]
    deciding_unit = (mean_final[0] - mean_final[1]).abs().argmax().item()

    metrics = {
        "accuracy": accuracy,
        "accuracy_clockwise": per_direction[CLOCKWISE],
        "accuracy_counter_clockwise": per_direction[COUNTER_CLOCKWISE],
        "max_gate_difference": max_gate_difference,
        "max_state_difference": max_state_difference,
        "nn_predictions_agree": (nn_predictions == predictions).float().mean().item(),
        "final_loss": final_loss,
        "train_seconds": train_seconds,
    }

    say("Task: the 4 corners of a randomly rotated, scaled and shifted square, with noise "
        f"({NOISE} of the half-side),\nin drawing order: clockwise or counter-clockwise?")
    say(f"Model: lstm_fused.LSTMCell(2, {HIDDEN_SIZE}) over the 4 points + Linear({HIDDEN_SIZE}, 2) on the "
        f"last h; Adam lr {LEARNING_RATE}, {TRAIN_STEPS} batches of {BATCH_SIZE}, seed {seed}.")
    say(f"Trained in {train_seconds:.1f} s, final loss {final_loss:.3f}.\n")
    say(f"Accuracy on {TEST_BATCH_SIZE} fresh squares: {accuracy:.3f} "
        f"(clockwise {per_direction[CLOCKWISE]:.3f}, counter-clockwise {per_direction[COUNTER_CLOCKWISE]:.3f}).")
    say(f"Unit {deciding_unit} carries the answer: its last h averages {mean_final[CLOCKWISE][deciding_unit]:+.2f} "
        f"on clockwise squares and {mean_final[COUNTER_CLOCKWISE][deciding_unit]:+.2f} on counter-clockwise ones.\n")
    say("Same weights in torch.nn.LSTMCell (load_state_dict of the fused cell's state_dict), run on its own state;")
    say("nn's gates computed by hand from its weights. Largest |fused - nn| over the test batch, per step:")
    columns = (*lstm_fused.LSTMGates._fields, "c", "h")  # input, forget, cell (the candidate), output
    say("  step  " + "  ".join(f"{name:>7}" for name in columns))
    for step, difference in enumerate(differences):
        say(f"  {step:4d}  " + "  ".join(f"{difference[name]:7.1e}" for name in columns))
    say(f"  nn.LSTMCell's last h through the same readout gives the same prediction on "
        f"{100 * metrics['nn_predictions_agree']:.1f}% of the squares:\n  the differences are float32 rounding, "
        "nothing more.\n")

    if plot_path is not None:
        saved = save_plot(plot_path, points, directions, trace)
        say(f"Saved the gate plot to {saved}." if saved else NO_MATPLOTLIB)
        metrics["plot_path"] = saved
    return metrics


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--plot", default="square_directions.png", help="PNG path (default: %(default)s)")
    arguments = parser.parse_args()
    # Matrices this small gain nothing from a second thread, and when another process is busy
    # on the machine the threads' waiting on each other makes training 10-20x slower.
    torch.set_num_threads(1)
    main(seed=arguments.seed, plot_path=arguments.plot)

"""Can an LSTM output 1, 0, 1, 0, ... from noise, given only X[0] = 1 as a start marker?

Yes. The input carries no information after the first step, so the alternation has to live in
the recurrent state: the cell learns an oscillator, a hidden unit that flips sign every step,
and the readout turns its sign into the class. This script trains a small lstm_fused cell,
looped over time, to do it; prints the accuracy at every step; prints the mistakes that make
the usual first attempt at this fail, next to the loop that works; and shows the hidden state
alternating.

    python examples/pattern_010101.py [--seed 0] [--plot pattern_010101.png]
"""
import argparse
import inspect
import textwrap
import time

import torch
import torch.nn.functional as F  # the import the usual first attempt forgets (see MISTAKES)
from torch import nn

import lstm_fused

SEQUENCE_LENGTH = 16
HIDDEN_SIZE = 16
BATCH_SIZE = 32
TRAIN_STEPS = 150
LEARNING_RATE = 0.03
TEST_BATCH_SIZE = 256
NO_MATPLOTLIB = "matplotlib is not installed, so no plot (pip install matplotlib to get one)."

MISTAKES = '''\
The usual first attempt, and why it does not learn (shown, not run):

    import torch                                            # (1) but no `import torch.nn.functional as F`
    ...
    class Model(nn.Module):
        def forward(self, inputs):
            ...
            return F.log_softmax(self.readout(hidden_states), dim=-1)    # (1)

    for epoch in range(epochs):
        for inputs, targets in sequences:
            log_probs = model(inputs)
            loss = F.nll_loss(log_probs, targets)
            loss.backward()                                 # (2) and no optimizer.zero_grad()
    optimizer.step()                                        # (3)

(1) model.forward calls F.log_softmax, but the script never did `import torch.nn.functional as F`:
    "NameError: name 'F' is not defined" on the first call. (Python looks a name up only when its
    line runs, so the file imports fine and fails later.)
(2) optimizer.zero_grad() is never called. .backward() ADDS into .grad, so every sequence's
    gradient piles onto all those before it, and each step follows a growing sum of stale
    gradients. Even with (1) and (3) fixed, leaving zero_grad out of this script's loop leaves
    the accuracy at chance (0.50) after the same 150 steps, seeds 0, 1 and 2 (the tests check it).
(3) optimizer.step() sits outside both loops, so the weights change once, after all the
    epochs, by one step on the summed gradient: nothing is learned while training runs.
'''


class AlternatingLSTM(nn.Module):
    """An lstm_fused cell looped over time, and a linear readout to two classes at every step."""

    def __init__(self, hidden_size=HIDDEN_SIZE):
        super().__init__()
        self.cell = lstm_fused.LSTMCell(input_size=1, hidden_size=hidden_size)
        self.readout = nn.Linear(hidden_size, 2)

    def forward(self, inputs):
        """inputs: (time, batch, 1). Returns log-probabilities (time, batch, 2), the hidden
        states (time, batch, hidden) and the gates, each stacked to (time, batch, hidden)."""
        state = None  # zeros, as nn.LSTMCell
        hidden_states, gates_per_step = [], []
        for step_input in inputs:
            hidden, cell_state, gates = self.cell(step_input, state, return_gates=True)
            state = (hidden, cell_state)
            hidden_states.append(hidden)
            gates_per_step.append(gates)
        hidden_states = torch.stack(hidden_states)
        gates = lstm_fused.LSTMGates(*(torch.stack(gate) for gate in zip(*gates_per_step)))
        return F.log_softmax(self.readout(hidden_states), dim=-1), hidden_states, gates


def make_batch(batch_size, sequence_length, generator):
    """Noise inputs with X[0] = 1, and targets 1, 0, 1, 0, ... that do not depend on the noise."""
    inputs = torch.randn(sequence_length, batch_size, 1, generator=generator)
    inputs[0] = 1.0
    targets = (torch.arange(sequence_length) % 2 == 0).long()  # 1 at even steps
    return inputs, targets.unsqueeze(1).expand(sequence_length, batch_size)


def train(model, optimizer, generator):
    for step in range(TRAIN_STEPS):
        # Fresh noise every step: the model cannot memorise it, only learn to ignore it.
        inputs, targets = make_batch(BATCH_SIZE, SEQUENCE_LENGTH, generator)
        optimizer.zero_grad()  # .backward() accumulates into .grad: clear last step's first
        log_probs, _, _ = model(inputs)
        loss = F.nll_loss(log_probs.flatten(0, 1), targets.flatten())
        loss.backward()
        optimizer.step()  # once per batch, inside the loop
    return loss.item()


def save_plot(path, inputs, hidden_states, gates, probability_of_one):
    """Heatmaps (unit x time) of the hidden state and the four gates for one sequence."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    panels = [
        ("hidden state h", hidden_states, "RdBu_r", (-1, 1)),
        ("input gate i", gates.input, "viridis", (0, 1)),
        ("forget gate f", gates.forget, "viridis", (0, 1)),
        ("candidate g", gates.cell, "RdBu_r", (-1, 1)),
        ("output gate o", gates.output, "viridis", (0, 1)),
    ]
    figure, axes = plt.subplots(len(panels) + 1, 1, figsize=(8, 12), sharex=True)
    axes[0].plot(inputs.numpy(), "k.-", label="input x")
    axes[0].plot(probability_of_one.numpy(), "C3o-", label="P(output = 1)")
    axes[0].legend(loc="upper right", fontsize=8)
    axes[0].set_title("One test sequence: noise in, 1 0 1 0 ... out")
    for axis, (title, values, colormap, (low, high)) in zip(axes[1:], panels):
        image = axis.imshow(values.T.numpy(), aspect="auto", cmap=colormap, vmin=low, vmax=high, interpolation="nearest")
        axis.set_ylabel("unit")
        axis.set_title(title, fontsize=9)
        figure.colorbar(image, ax=axis, fraction=0.03)
    axes[-1].set_xlabel("time step")
    figure.tight_layout()
    figure.savefig(path, dpi=80)
    plt.close(figure)
    return path


def main(seed=0, quiet=False, plot_path=None):
    """Trains, evaluates and reports. Returns the metrics; writes a PNG to plot_path if given
    and matplotlib is installed."""
    say = (lambda *args: None) if quiet else print
    torch.manual_seed(seed)  # the weights' initialisation
    generator = torch.Generator().manual_seed(seed)  # the data
    model = AlternatingLSTM()
    optimizer = torch.optim.Adam(model.parameters(), lr=LEARNING_RATE)

    started = time.perf_counter()
    final_loss = train(model, optimizer, generator)
    train_seconds = time.perf_counter() - started

    with torch.no_grad():
        inputs, targets = make_batch(TEST_BATCH_SIZE, SEQUENCE_LENGTH, generator)
        log_probs, hidden_states, gates = model(inputs)
        correct = log_probs.argmax(-1) == targets
        accuracy_per_step = correct.float().mean(dim=1)
        # Beyond the trained length: did it learn "flip every step" or only these 16 positions?
        long_inputs, long_targets = make_batch(TEST_BATCH_SIZE, 4 * SEQUENCE_LENGTH, generator)
        long_accuracy = (model(long_inputs)[0].argmax(-1) == long_targets).float().mean().item()

    # The unit whose hidden value swings most from one step to the next carries the parity.
    swing = (hidden_states[1:] - hidden_states[:-1]).abs().mean(dim=(0, 1))
    oscillator = swing.argmax().item()
    oscillator_signs = hidden_states[:, :, oscillator].sign()
    sign_flip_rate = (oscillator_signs[1:] != oscillator_signs[:-1]).float().mean().item()
    # How it flips: the candidate it writes has the sign opposite to its previous h.
    candidate_signs = gates.cell[1:, :, oscillator].sign()
    candidate_opposes_previous_h = (candidate_signs == -oscillator_signs[:-1]).float().mean().item()

    metrics = {
        "accuracy": correct.float().mean().item(),
        "min_step_accuracy": accuracy_per_step.min().item(),
        "accuracy_4x_length": long_accuracy,
        "sign_flip_rate": sign_flip_rate,
        "candidate_opposes_previous_h": candidate_opposes_previous_h,
        "final_loss": final_loss,
        "train_seconds": train_seconds,
    }

    say(f"Task: output 1 0 1 0 ... for {SEQUENCE_LENGTH} steps; input N(0, 1) noise with X[0] = 1.")
    say(f"Model: lstm_fused.LSTMCell(1, {HIDDEN_SIZE}) looped over time + Linear({HIDDEN_SIZE}, 2); "
        f"Adam lr {LEARNING_RATE}, {TRAIN_STEPS} batches of {BATCH_SIZE}, seed {seed}.\n")
    say(MISTAKES)
    say("The loop this script runs:\n")
    say(textwrap.indent(inspect.getsource(train), "    "))
    say(f"Trained in {train_seconds:.1f} s, final loss {final_loss:.4f}.\n")
    say(f"Accuracy per step on {TEST_BATCH_SIZE} fresh noise sequences:")
    say("  step     " + " ".join(f"{t:>4d}" for t in range(SEQUENCE_LENGTH)))
    say("  target   " + " ".join(f"{y:>4d}" for y in targets[:, 0].tolist()))
    say("  accuracy " + " ".join(f"{a:4.2f}" for a in accuracy_per_step.tolist()))
    say(f"  overall {metrics['accuracy']:.3f}; on sequences 4x as long as trained: {long_accuracy:.3f}\n")

    shown_steps = 8
    strongest = swing.argsort(descending=True)[:4].tolist()
    say(f"How the hidden state alternates (test sequence 0, first {shown_steps} steps, the 4 units that swing most):")
    say("  step   input  P(1)  " + "  ".join(f"h[{unit:2d}]" for unit in strongest))
    for t in range(shown_steps):
        units = "  ".join(f"{hidden_states[t, 0, unit].item():+5.2f}" for unit in strongest)
        say(f"  {t:4d}  {inputs[t, 0, 0].item():+6.3f}  {log_probs[t, 0, 1].exp().item():4.2f}  {units}")
    say(f"Unit {oscillator} changes sign on {100 * sign_flip_rate:.0f}% of steps across the test batch: the state is")
    say("the clock, and the readout reads the parity off units like this one. How the unit flips:")
    mean_gate = {name: getattr(gates, name)[:, :, oscillator].mean().item() for name in ("forget", "input")}
    say(f"  forget gate {mean_gate['forget']:.2f} on average: the old cell state is "
        f"{'mostly wiped' if mean_gate['forget'] < 0.5 else 'mostly kept'} at every step;")
    say(f"  input gate {mean_gate['input']:.2f} on average: the candidate is "
        f"{'written in' if mean_gate['input'] > 0.5 else 'mostly held back'};")
    say(f"  the candidate's sign is opposite to the unit's previous h on {100 * candidate_opposes_previous_h:.0f}% "
        "of steps:\n  h comes back, negated, through the recurrent weights (weight_hh).\n")

    if plot_path is not None:
        saved = save_plot(
            plot_path, inputs[:, 0, 0], hidden_states[:, 0], lstm_fused.LSTMGates(*(g[:, 0] for g in gates)),
            log_probs[:, 0, 1].exp(),
        )
        say(f"Saved the gate plot to {saved}." if saved else NO_MATPLOTLIB)
        metrics["plot_path"] = saved
    return metrics


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--plot", default="pattern_010101.png", help="PNG path (default: %(default)s)")
    arguments = parser.parse_args()
    # Matrices this small gain nothing from a second thread, and when another process is busy
    # on the machine the threads' waiting on each other makes training 10-20x slower.
    torch.set_num_threads(1)
    main(seed=arguments.seed, plot_path=arguments.plot)

"""Reading an LSTM by hand: a character model learns "hello", then we watch its gates.

The model sees "hell" one character at a time and must predict the next: h->e, e->l, l->l,
l->o. The two l's are the interesting part: the same input must give different answers, so the
prediction has to come from the state, from what came before. After training, the script walks
the sequence step by step and prints, for every hidden unit, the four gates the fused cell
returns (forget, input, candidate, output), the cell state and the hidden state, and works one
unit's update out by hand:

    c_t = forget * c_(t-1) + input * candidate      what to keep + what to write
    h_t = output * tanh(c_t)                         what to show the next layer and step

    python examples/hello_gates.py [--seed 0] [--plot hello_gates.png]
"""
import argparse
import time

import torch
import torch.nn.functional as F
from torch import nn

import lstm_fused

VOCABULARY = "helo"
WORD = "hello"
HIDDEN_SIZE = 8
TRAIN_STEPS = 150
LEARNING_RATE = 0.05
NO_MATPLOTLIB = "matplotlib is not installed, so no plot (pip install matplotlib to get one)."


def one_hot(text):
    """(len(text), 1, len(VOCABULARY)): a batch of one sequence, time first."""
    indices = torch.tensor([VOCABULARY.index(char) for char in text])
    return F.one_hot(indices, len(VOCABULARY)).float().unsqueeze(1)


class CharLSTM(nn.Module):
    """One lstm_fused cell over one-hot characters, and a linear readout to next-character logits."""

    def __init__(self, hidden_size=HIDDEN_SIZE):
        super().__init__()
        self.cell = lstm_fused.LSTMCell(input_size=len(VOCABULARY), hidden_size=hidden_size)
        self.readout = nn.Linear(hidden_size, len(VOCABULARY))

    def step(self, char_one_hot, state):
        """One time step: returns logits, the new (h, c) and the step's gates."""
        hidden, cell_state, gates = self.cell(char_one_hot, state, return_gates=True)
        return self.readout(hidden), (hidden, cell_state), gates

    def forward(self, inputs):
        """inputs: (time, 1, vocabulary). Returns the logits (time, 1, vocabulary) and, per step,
        (h, c, gates)."""
        state = None  # zeros
        logits, trace = [], []
        for char_one_hot in inputs:
            step_logits, state, gates = self.step(char_one_hot, state)
            logits.append(step_logits)
            trace.append((*state, gates))
        return torch.stack(logits), trace


def train(model):
    inputs = one_hot(WORD[:-1])  # "hell"
    targets = torch.tensor([VOCABULARY.index(char) for char in WORD[1:]])  # "ello"
    optimizer = torch.optim.Adam(model.parameters(), lr=LEARNING_RATE)
    for _ in range(TRAIN_STEPS):
        optimizer.zero_grad()
        logits, _ = model(inputs)
        loss = F.cross_entropy(logits.squeeze(1), targets)
        loss.backward()
        optimizer.step()
    return loss.item()


def update_by_hand(row):
    """The cell and hidden state from the step's gates: what the kernel computes, written out."""
    cell_state = row["forget"] * row["previous_cell"] + row["input"] * row["candidate"]
    return cell_state, row["output"] * cell_state.tanh()


def generate(model, first_char, length):
    """Greedy generation: feed each predicted character back in as the next input."""
    text, state = first_char, None
    with torch.no_grad():
        for _ in range(length - 1):
            logits, state, _ = model.step(one_hot(text[-1])[0], state)
            text += VOCABULARY[logits.argmax().item()]
    return text


def save_plot(path, input_chars, rows):
    """One heatmap per quantity (unit x time step) for the walk through "hell"."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    panels = [  # (title, key, colormap, value range)
        ("forget gate f", "forget", "viridis", (0, 1)),
        ("input gate i", "input", "viridis", (0, 1)),
        ("candidate g", "candidate", "RdBu_r", (-1, 1)),
        ("output gate o", "output", "viridis", (0, 1)),
        ("cell state c", "cell_state", "RdBu_r", (-3, 3)),  # c is not squashed: it can exceed 1
        ("hidden state h", "hidden", "RdBu_r", (-1, 1)),
    ]
    figure, axes = plt.subplots(2, 3, figsize=(10, 6), sharey=True)
    for axis, (title, key, colormap, (low, high)) in zip(axes.flat, panels):
        values = torch.stack([row[key] for row in rows], dim=1)  # (unit, time)
        image = axis.imshow(values.numpy(), aspect="auto", cmap=colormap, vmin=low, vmax=high, interpolation="nearest")
        axis.set_title(title, fontsize=10)
        axis.set_xticks(range(len(input_chars)), [f"'{char}'" for char in input_chars])
        axis.set_ylabel("unit")
        figure.colorbar(image, ax=axis, fraction=0.05)
    figure.suptitle('Gates and states of the fused cell while reading "hell" (predicting "ello")')
    figure.tight_layout()
    figure.savefig(path, dpi=80)
    plt.close(figure)
    return path


def main(seed=0, quiet=False, plot_path=None):
    """Trains, walks the gates and reports. Returns the metrics; writes a PNG to plot_path if
    given and matplotlib is installed."""
    say = (lambda *args: None) if quiet else print
    torch.manual_seed(seed)
    model = CharLSTM()
    started = time.perf_counter()
    final_loss = train(model)
    train_seconds = time.perf_counter() - started

    input_chars = WORD[:-1]
    with torch.no_grad():
        logits, trace = model(one_hot(input_chars))
    probabilities = logits.squeeze(1).softmax(-1)
    predicted = "".join(VOCABULARY[i] for i in probabilities.argmax(-1).tolist())
    accuracy = sum(p == t for p, t in zip(predicted, WORD[1:])) / len(predicted)

    # One row per step, each quantity a vector over the hidden units (the batch of one dropped).
    rows, previous_cell = [], torch.zeros(HIDDEN_SIZE)
    for hidden, cell_state, gates in trace:
        rows.append({
            "forget": gates.forget[0], "input": gates.input[0], "candidate": gates.cell[0], "output": gates.output[0],
            "previous_cell": previous_cell, "cell_state": cell_state[0], "hidden": hidden[0],
        })
        previous_cell = cell_state[0]
    # The update worked by hand from the returned gates must reproduce the kernel's states.
    hand_error = 0.0
    for row in rows:
        cell_state, hidden = update_by_hand(row)
        hand_error = max(hand_error, (cell_state - row["cell_state"]).abs().max().item(),
                         (hidden - row["hidden"]).abs().max().item())
    # The unit whose hidden value differs most between the two l's is the one that tells them apart.
    first_l, second_l = 2, 3
    distinguishing_unit = (rows[first_l]["hidden"] - rows[second_l]["hidden"]).abs().argmax().item()
    generated = generate(model, WORD[0], len(WORD))

    metrics = {
        "accuracy": accuracy,
        "predicted": predicted,
        "generated": generated,
        "final_loss": final_loss,
        "hand_computation_error": hand_error,
        "distinguishing_unit": distinguishing_unit,
        "train_seconds": train_seconds,
    }

    say(f'Task: read "{input_chars}", predict "{WORD[1:]}" (h->e, e->l, l->l, l->o).')
    say(f"Model: lstm_fused.LSTMCell({len(VOCABULARY)}, {HIDDEN_SIZE}) on one-hot characters + "
        f"Linear({HIDDEN_SIZE}, {len(VOCABULARY)}); Adam lr {LEARNING_RATE}, {TRAIN_STEPS} steps, seed {seed}.")
    say(f"Trained in {train_seconds:.1f} s, final loss {final_loss:.4f}. Predicted \"{predicted}\" "
        f"(accuracy {accuracy:.2f}); greedy generation from 'h' gives \"{generated}\".\n")
    say("How to read the gates (each between 0 and 1, the candidate between -1 and 1):")
    say("  forget f   how much of the old cell state to keep      (1 = keep all, 0 = wipe)")
    say("  input i    how much of the candidate to write in       (1 = write all)")
    say("  candidate  the new content proposed for the cell       (g = tanh(...))")
    say("  output o   how much of tanh(cell) to expose as h\n")

    for t, row in enumerate(rows):
        context = WORD[: t + 1]
        best = probabilities[t].argmax().item()
        say(f"Step {t}: input '{input_chars[t]}' (read so far \"{context}\") -> predicts "
            f"'{VOCABULARY[best]}' with p = {probabilities[t, best].item():.2f} (target '{WORD[t + 1]}')")
        say("  unit  forget  input  candidate  output   c_prev ->    c      h")
        for unit in range(HIDDEN_SIZE):
            marker = "  <- tells the two l's apart" if unit == distinguishing_unit else ""
            say(f"  {unit:4d}  {row['forget'][unit]:6.2f}  {row['input'][unit]:5.2f}  {row['candidate'][unit]:+9.2f}"
                f"  {row['output'][unit]:6.2f}   {row['previous_cell'][unit]:+6.2f} -> {row['cell_state'][unit]:+5.2f}"
                f"  {row['hidden'][unit]:+5.2f}{marker}")
        f, i, g, o = (row[key][distinguishing_unit].item() for key in ("forget", "input", "candidate", "output"))
        c_prev, c, h = (row[key][distinguishing_unit].item() for key in ("previous_cell", "cell_state", "hidden"))
        label = f"  by hand, unit {distinguishing_unit}:  "
        cell_terms, hidden_terms = f"{f:.2f}*({c_prev:+.2f}) + {i:.2f}*({g:+.2f})", f"{o:.2f}*tanh({c:+.2f})"
        say(f"{label}c = f*c_prev + i*g = {cell_terms} = {c:+.2f}")
        say(f"{'':{len(label)}}h = o*tanh(c)      = {hidden_terms:{len(cell_terms)}} = {h:+.2f}\n")

    say(f"The same input 'l' at steps {first_l} and {second_l} must give 'l' then 'o'. The input is identical, so the")
    say(f"difference comes from the state carried in. Unit {distinguishing_unit} shows it:")
    for t, context in ((first_l, "after \"hel\": "), (second_l, "after \"hell\":")):
        row = {key: value[distinguishing_unit].item() for key, value in rows[t].items()}
        say(f"  {context} forget {row['forget']:.2f}  input {row['input']:.2f}  candidate {row['candidate']:+.2f}"
            f"  output {row['output']:.2f}  ->  c {row['cell_state']:+.2f}  h {row['hidden']:+.2f}")
    say("Even the gates differ: each is computed from the previous h as well as from the input.")
    say(f"Checking the by-hand formulas against the kernel's c and h on every unit and step: "
        f"largest difference {hand_error:.1e}.\n")

    if plot_path is not None:
        saved = save_plot(plot_path, input_chars, rows)
        say(f"Saved the gate plot to {saved}." if saved else NO_MATPLOTLIB)
        metrics["plot_path"] = saved
    return metrics


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--plot", default="hello_gates.png", help="PNG path (default: %(default)s)")
    arguments = parser.parse_args()
    # Matrices this small gain nothing from a second thread, and when another process is busy
    # on the machine the threads' waiting on each other makes training 10-20x slower.
    torch.set_num_threads(1)
    main(seed=arguments.seed, plot_path=arguments.plot)

"""What goes into an LSTM and what comes out: the first questions about nn.LSTM, answered with
lstm_fused.LSTM (a drop-in for it, so every answer holds for nn.LSTM too).

1. Shapes: input, output, h_n and c_n, time-first, batch_first and unbatched.
2. What h_n and c_n hold: the last step's states of every layer; the output is only the last
   layer's h at every step, so output[-1] is h_n[-1] and c_n is in no output.
3. One step at a time: calling the LSTM on each step, carrying (h, c), gives what one call over
   the whole sequence gives (and a layer is an LSTMCell looped over the steps).
4. Bidirectional: the output's forward and backward halves, which step of each half is in h_n,
   and h_n's order over layers and directions.

Every claim is checked on random numbers and the largest difference printed. Runs in seconds.

    python examples/lstm_shapes.py [--seed 0]
"""
import argparse
import time

import torch
from torch import nn

import lstm_fused

STEPS, BATCH, INPUT_SIZE, HIDDEN_SIZE, NUM_LAYERS = 7, 4, 3, 5, 2


def largest_difference(a, b):
    return (a - b).abs().max().item()


def shapes(say):
    """Part 1: the shapes for time-first, batch_first and unbatched input."""
    lstm = lstm_fused.LSTM(INPUT_SIZE, HIDDEN_SIZE, num_layers=NUM_LAYERS)
    batch_first = lstm_fused.LSTM(INPUT_SIZE, HIDDEN_SIZE, num_layers=NUM_LAYERS, batch_first=True)
    cases = {
        "time-first (T, B, I)": (lstm, torch.randn(STEPS, BATCH, INPUT_SIZE)),
        "batch_first (B, T, I)": (batch_first, torch.randn(BATCH, STEPS, INPUT_SIZE)),
        "unbatched (T, I)": (lstm, torch.randn(STEPS, INPUT_SIZE)),
    }
    say(f"1. Shapes, for T={STEPS} steps, B={BATCH} sequences, I={INPUT_SIZE} input features, "
        f"H={HIDDEN_SIZE} hidden, {NUM_LAYERS} layers:")
    found = {}
    for name, (module, x) in cases.items():
        output, (h_n, c_n) = module(x)
        found[name] = dict(input=tuple(x.shape), output=tuple(output.shape), h_n=tuple(h_n.shape), c_n=tuple(c_n.shape))
        say(f"   {name:22} input {tuple(x.shape)} -> output {tuple(output.shape)}, "
            f"h_n {tuple(h_n.shape)}, c_n {tuple(c_n.shape)}")
    say("   batch_first moves the batch in input and output only: h_n and c_n are always "
        "(layers * directions, B, H).")
    return found


def final_states(say):
    """Part 2: h_n and c_n against the output and the per-step states."""
    lstm = lstm_fused.LSTM(INPUT_SIZE, HIDDEN_SIZE, num_layers=NUM_LAYERS)
    x = torch.randn(STEPS, BATCH, INPUT_SIZE)
    output, (h_n, c_n), states = lstm(x, return_states=True)
    last_step = largest_difference(output[-1], h_n[-1])
    # Layer 0's hidden states are not in the output; its last one is h = o * tanh(c) of its last step.
    layer0 = states[0]
    layer0_h = largest_difference(layer0.gates.output[-1] * layer0.cell_state[-1].tanh(), h_n[0])
    cells = max(largest_difference(states[layer].cell_state[-1], c_n[layer]) for layer in range(NUM_LAYERS))
    say("2. h_n[l] and c_n[l] are layer l's hidden and cell state after the last step. The output holds the "
        "last layer's h at every step, so:")
    say(f"   |output[-1] - h_n[-1]| = {last_step:.1e}   (h_n[0], layer 0's, is in no output; "
        f"o * tanh(c) of its last step gives it: {layer0_h:.1e})")
    say(f"   c_n is in no output either: return_states=True gives every step's c, whose last is c_n: {cells:.1e}")
    return dict(last_step_vs_h_n=last_step, layer0_h_from_states=layer0_h, cell_states_vs_c_n=cells)


def step_by_step(say):
    """Part 3: the sequence fed one step at a time, (h, c) carried, against one call."""
    lstm = lstm_fused.LSTM(INPUT_SIZE, HIDDEN_SIZE, num_layers=NUM_LAYERS)
    x = torch.randn(STEPS, BATCH, INPUT_SIZE)
    with torch.no_grad():
        output, (h_n, c_n) = lstm(x)
        state, outputs = None, []
        for t in range(STEPS):
            step_output, state = lstm(x[t : t + 1], state)  # a sequence of length 1, the state carried
            outputs.append(step_output)
        output_difference = largest_difference(torch.cat(outputs), output)
        state_difference = max(largest_difference(state[0], h_n), largest_difference(state[1], c_n))
        # One layer is one cell looped over the steps: an LSTMCell with layer 0's weights.
        cell = lstm_fused.LSTMCell(INPUT_SIZE, HIDDEN_SIZE)
        for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
            getattr(cell, name).copy_(getattr(lstm, f"{name}_l0"))
        h, c = torch.zeros(BATCH, HIDDEN_SIZE), torch.zeros(BATCH, HIDDEN_SIZE)
        for t in range(STEPS):
            h, c = cell(x[t], (h, c))
        _, (layer0_h_n, layer0_c_n), _ = lstm(x, return_states=True)
        cell_difference = max(largest_difference(h, layer0_h_n[0]), largest_difference(c, layer0_c_n[0]))
    say("3. One step at a time, carrying (h, c) from each call to the next, gives one call's answer "
        "(float rounding apart):")
    say(f"   outputs {output_difference:.1e}, final (h, c) {state_difference:.1e}; an LSTMCell with layer 0's "
        f"weights looped over the steps ends in layer 0's (h_n[0], c_n[0]): {cell_difference:.1e}")
    return dict(step_by_step_output=output_difference, step_by_step_state=state_difference,
                cell_loop_vs_layer0=cell_difference)


def bidirectional(say):
    """Part 4: a bidirectional stack's output halves and h_n's order, and nn.LSTM agreeing."""
    lstm = lstm_fused.LSTM(INPUT_SIZE, HIDDEN_SIZE, num_layers=NUM_LAYERS, bidirectional=True)
    x = torch.randn(STEPS, BATCH, INPUT_SIZE)
    with torch.no_grad():
        output, (h_n, c_n) = lstm(x)
        forward_half, backward_half = output[..., :HIDDEN_SIZE], output[..., HIDDEN_SIZE:]
        by_layer = h_n.view(NUM_LAYERS, 2, BATCH, HIDDEN_SIZE)  # [layer, direction]
        last = NUM_LAYERS - 1
        forward_end = largest_difference(forward_half[-1], by_layer[last, 0])
        # The backward direction runs from step T-1 down to 0: its last state sits at output step 0.
        backward_end = largest_difference(backward_half[0], by_layer[last, 1])
        backward_at_last_step = largest_difference(backward_half[-1], by_layer[last, 1])
        torch_lstm = nn.LSTM(INPUT_SIZE, HIDDEN_SIZE, num_layers=NUM_LAYERS, bidirectional=True)
        torch_lstm.load_state_dict(lstm.state_dict())
        torch_output, (torch_h_n, torch_c_n) = torch_lstm(x)
        nn_difference = max(largest_difference(output, torch_output), largest_difference(h_n, torch_h_n),
                            largest_difference(c_n, torch_c_n))
    say(f"4. Bidirectional: output is (T, B, 2H) = {tuple(output.shape)}: [..., :H] the forward direction, "
        "[..., H:] the backward one, which reads the sequence from its end.")
    say(f"   h_n is (layers * 2, B, H) = {tuple(h_n.shape)}, ordered layer 0 forward, layer 0 backward, "
        "layer 1 forward, ...: h_n.view(layers, 2, B, H)[layer, direction].")
    say(f"   forward half at the last step = h_n[-2]: {forward_end:.1e}; backward half at step 0 = h_n[-1]: "
        f"{backward_end:.1e};")
    say(f"   the backward half at the last step is NOT h_n[-1] (it is the backward direction's first step): "
        f"differs by {backward_at_last_step:.2f}.")
    say(f"   nn.LSTM with the same state_dict gives the same output, h_n and c_n: {nn_difference:.1e}")
    return dict(forward_last_step_vs_h_n=forward_end, backward_first_step_vs_h_n=backward_end,
                backward_last_step_vs_h_n=backward_at_last_step, nn_difference=nn_difference)


def main(seed=0, quiet=False):
    """Prints the report (unless quiet) and returns every shape and largest difference it shows."""
    say = (lambda *args: None) if quiet else print
    torch.manual_seed(seed)
    started = time.perf_counter()
    metrics = dict(shapes=shapes(say))
    for part in (final_states, step_by_step, bidirectional):
        metrics.update(part(say))
    say(f"Ran in {time.perf_counter() - started:.1f} s.")
    return metrics


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seed", type=int, default=0)
    arguments = parser.parse_args()
    # Tiny matrices: a second thread only adds synchronisation.
    torch.set_num_threads(1)
    main(seed=arguments.seed)

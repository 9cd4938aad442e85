"""Zoneout, step by step: which units kept their old value, and proof that the masks tell all.

Zoneout (Krueger et al. 2016; Tacotron 2 uses 0.1) regularises an LSTM by letting each unit of
each state keep its previous value at random, instead of updating:

    c_t = d_c * c_(t-1) + (1 - d_c) * c~_t        d = 1 with probability z: the unit "zones out"
    h_t = d_h * h_(t-1) + (1 - d_h) * h~_t        c~, h~: the ordinary LSTM update

In eval mode there is no randomness: the expectation, c_t = z c_(t-1) + (1 - z) c~_t.

lstm_fused.LSTM(..., zoneout=z) fuses this into its kernels, and with return_states=True it hands
back every d it drew. This script
  1. prints the hidden-state mask of one sequence step by step ('#': kept, '.': updated) and
     checks every kept unit is bit-for-bit its previous value and every other one is the
     un-zoned LSTM's update;
  2. replays the whole training call from the masks with the plain-PyTorch loop of the formulas
     (lstm_fused.reference.regularised_lstm) and gets the same outputs and gradients;
  3. checks eval mode's blend against the same loop.

    python examples/zoneout_masks.py [--seed 0] [--plot zoneout_masks.png]
"""
import argparse
import time

import torch

import lstm_fused
from lstm_fused import reference

STEPS, BATCH, INPUT_SIZE, HIDDEN_SIZE = 12, 3, 4, 8
ZONEOUT = (0.25, 0.4)  # (cell, hidden)
NO_MATPLOTLIB = "matplotlib is not installed, so no plot (pip install matplotlib to get one)."


def save_plot(path, hidden_mask, cell_mask):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(NO_MATPLOTLIB)
        return None
    figure, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for axis, mask, title in ((axes[0], cell_mask, "cell state"), (axes[1], hidden_mask, "hidden state")):
        axis.imshow(mask.T, cmap="Greys", vmin=0, vmax=1, aspect="auto")
        axis.set_title(f"zoneout mask, {title} (black: kept)")
        axis.set_xlabel("step")
        axis.set_ylabel("unit")
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
    return path


def main(seed=0, quiet=False, plot_path=None):
    """Runs the three parts and returns their measurements; writes a PNG to plot_path if
    matplotlib is installed."""
    say = (lambda *args: None) if quiet else print
    started = time.perf_counter()
    torch.manual_seed(seed)
    lstm = lstm_fused.LSTM(INPUT_SIZE, HIDDEN_SIZE, zoneout=ZONEOUT, dtype=torch.float64).train()
    plain = lstm_fused.LSTM(INPUT_SIZE, HIDDEN_SIZE, dtype=torch.float64)
    plain.load_state_dict(lstm.state_dict())  # same weights, no zoneout: the un-zoned update
    x = torch.randn(STEPS, BATCH, INPUT_SIZE, dtype=torch.float64)

    # 1. The masks, step by step, for sequence 0.
    output, (h_n, c_n), (states,) = lstm(x, return_states=True)
    hidden_mask, cell_mask = states.zoneout_hidden_mask, states.zoneout_cell_mask  # [T, B, H] of 0/1
    say(f"1. Zoneout {ZONEOUT} (cell, hidden) in training: sequence 0's hidden state, '#' kept, '.' updated")
    max_kept_difference = max_updated_difference = 0.0
    h_prev = torch.zeros(BATCH, HIDDEN_SIZE, dtype=torch.float64)
    c_prev = torch.zeros(BATCH, HIDDEN_SIZE, dtype=torch.float64)
    for t in range(STEPS):
        # What an ordinary LSTM step would have written, from the state this step started from.
        _, (h_new, c_new) = plain(x[t:t + 1], (h_prev[None], c_prev[None]))
        h_new, c_new = h_new[0], c_new[0]
        for value, old, new, mask in ((output[t], h_prev, h_new, hidden_mask[t]),
                                      (states.cell_state[t], c_prev, c_new, cell_mask[t])):
            kept = mask.bool()
            max_kept_difference = max(max_kept_difference, (value[kept] - old[kept]).abs().max().item()
                                      if kept.any() else 0.0)
            max_updated_difference = max(max_updated_difference, (value[~kept] - new[~kept]).abs().max().item()
                                         if (~kept).any() else 0.0)
        row = "".join("#" if d else "." for d in hidden_mask[t, 0].tolist())
        say(f"   step {t:2d}: {row}   h[0, :3] = {', '.join(f'{v:+.3f}' for v in output[t, 0, :3].tolist())}")
        h_prev, c_prev = output[t].detach(), states.cell_state[t].detach()
    kept_hidden = hidden_mask.mean().item()
    kept_cell = cell_mask.mean().item()
    say(f"   kept: {kept_hidden:.2f} of hidden units (z = {ZONEOUT[1]}), {kept_cell:.2f} of cell units "
        f"(z = {ZONEOUT[0]})")
    say(f"   largest |kept unit - its previous value|: {max_kept_difference:.1e} (exactly its old value)")
    say(f"   largest |updated unit - the un-zoned LSTM's update|: {max_updated_difference:.1e}")

    # 2. The masks are the whole story: replaying them gives the same outputs and gradients.
    weights = list(lstm.parameters())
    loss = output.square().sum() + h_n.sum() + c_n.sum()
    grads = torch.autograd.grad(loss, weights)
    replay_output, (replay_h, replay_c) = reference.regularised_lstm(lstm, x, states=[states])
    replay_grads = torch.autograd.grad(replay_output.square().sum() + replay_h.sum() + replay_c.sum(), weights)
    replay_output_difference = (replay_output - output).abs().max().item()
    replay_grad_difference = max((a - b).abs().max().item() for a, b in zip(grads, replay_grads))
    say("2. Replaying the call with the plain-PyTorch loop and the returned masks:")
    say(f"   largest |output difference| {replay_output_difference:.1e}, "
        f"largest |gradient difference| {replay_grad_difference:.1e}")

    # 3. Eval mode: no masks, the expectation.
    lstm.eval()
    eval_output, _, (eval_states,) = lstm(x, return_states=True)
    expected_output, _ = reference.regularised_lstm(lstm, x)
    eval_difference = (eval_output - expected_output).abs().max().item()
    say("3. Eval mode: c_t = z c_(t-1) + (1 - z) c~_t; masks returned: "
        f"{eval_states.zoneout_hidden_mask is not None}; largest |fused - loop| {eval_difference:.1e}")

    metrics = dict(
        kept_fraction_hidden=kept_hidden,
        kept_fraction_cell=kept_cell,
        max_kept_difference=max_kept_difference,
        max_updated_difference=max_updated_difference,
        replay_output_difference=replay_output_difference,
        replay_grad_difference=replay_grad_difference,
        eval_difference=eval_difference,
        eval_has_masks=eval_states.zoneout_hidden_mask is not None,
        plot_path=None,
    )
    if plot_path is not None:
        metrics["plot_path"] = save_plot(plot_path, hidden_mask[:, 0].numpy(), cell_mask[:, 0].numpy())
        if metrics["plot_path"] is not None:
            say(f"Plot of sequence 0's masks written to {plot_path}")
    say(f"Ran in {time.perf_counter() - started:.1f} s")
    return metrics


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--plot", default="zoneout_masks.png", help="where to write the PNG (needs matplotlib)")
    arguments = parser.parse_args()
    main(seed=arguments.seed, plot_path=arguments.plot)

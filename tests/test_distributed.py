"""Data-parallel training of a model built from lf.LSTM and lf.LSTMCell, on 2 CPU ranks over gloo:
under DistributedDataParallel and under FSDP2's fully_shard, a few SGD steps on half the batch per
rank leave the parameters that one process training on the full batch gets.

The ranks are two subprocesses running this file as a script (a pytest module loaded with
--import-mode=importlib cannot be pickled for torch.multiprocessing's spawn). They meet through a
FileStore in the test's temporary directory (no network port to race for), with a timeout on the
process group and on the subprocesses, so that a hang fails the test instead of stalling CI."""
import argparse
import os
import subprocess
import sys
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
from torch import nn

import lstm_fused as lf

WORLD_SIZE = 2
BATCH, STEPS_T, INPUT, HIDDEN, CELL_HIDDEN, OUTPUTS = 8, 5, 3, 6, 4, 2
SGD_STEPS, LEARNING_RATE = 3, 0.5
TIMEOUT_S = 240  # both ranks, from start to the last parameter written


class Model(nn.Module):
    """A bidirectional two-layer lf.LSTM over the sequence, an lf.LSTMCell stepping over its output,
    and a linear head on the cell's last hidden state."""

    def __init__(self):
        super().__init__()
        self.lstm = lf.LSTM(INPUT, HIDDEN, num_layers=2, batch_first=True, bidirectional=True)
        self.cell = lf.LSTMCell(2 * HIDDEN, CELL_HIDDEN)
        self.head = nn.Linear(CELL_HIDDEN, OUTPUTS)

    def forward(self, x):
        output, _ = self.lstm(x)
        state = None
        for step in output.unbind(1):
            state = self.cell(step, state)
        return self.head(state[0])


def train(model, inputs, targets):
    """SGD on the mean squared error, which is a mean over the batch: the average of the ranks'
    gradients, as DDP and FSDP reduce them, is the full batch's gradient."""
    optimizer = torch.optim.SGD(model.parameters(), lr=LEARNING_RATE)
    for _ in range(SGD_STEPS):
        optimizer.zero_grad()
        nn.functional.mse_loss(model(inputs), targets).backward()
        optimizer.step()


def full_parameters(model):
    # FSDP2 leaves each parameter a DTensor holding this rank's shard.
    return {
        name: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
        for name, p in model.named_parameters()
    }


def problem():
    """The initial weights and the full batch, the same in every process."""
    torch.manual_seed(1234)
    model = Model()
    inputs = torch.randn(BATCH, STEPS_T, INPUT)
    targets = torch.randn(BATCH, OUTPUTS)
    return model.state_dict(), inputs, targets


def worker(rank, store_path, out_dir):
    torch.set_num_threads(1)  # two ranks on a 2-core machine
    dist.init_process_group(
        "gloo", init_method=f"file://{store_path}", rank=rank, world_size=WORLD_SIZE, timeout=timedelta(seconds=120)
    )
    state, inputs, targets = problem()
    rows = slice(rank * BATCH // WORLD_SIZE, (rank + 1) * BATCH // WORLD_SIZE)
    mine = inputs[rows], targets[rows]

    model = Model()
    model.load_state_dict(state)
    ddp = nn.parallel.DistributedDataParallel(model)
    train(ddp, *mine)
    torch.save(full_parameters(model), os.path.join(out_dir, f"ddp_rank{rank}.pt"))

    try:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard
    except ImportError as error:
        with open(os.path.join(out_dir, "fsdp_unavailable.txt"), "w") as note:
            note.write(str(error))
    else:
        model = Model()
        model.load_state_dict(state)
        mesh = init_device_mesh("cpu", (WORLD_SIZE,))
        for module in (model.lstm, model.cell, model):  # each recurrent module its own unit, as users shard
            fully_shard(module, mesh=mesh)
        train(model, *mine)
        torch.save(full_parameters(model), os.path.join(out_dir, f"fsdp_rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Runs both ranks once for the module; returns (their output directory, the single-process
    full-batch parameters, the initial parameters)."""
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with the gloo backend is not available in this torch build")
    out_dir = tmp_path_factory.mktemp("distributed")
    store = out_dir / "store"
    ranks = [
        subprocess.Popen(
            [sys.executable, __file__, "--rank", str(rank), "--store", str(store), "--out", str(out_dir)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        for rank in range(WORLD_SIZE)
    ]
    outputs = []
    try:
        for process in ranks:
            outputs.append(process.communicate(timeout=TIMEOUT_S)[0])
    except subprocess.TimeoutExpired:
        for process in ranks:
            process.kill()
        pytest.fail(f"the {WORLD_SIZE} ranks did not finish within {TIMEOUT_S} s")
    for rank, (process, output) in enumerate(zip(ranks, outputs)):
        assert process.returncode == 0, f"rank {rank} failed:\n{output}"

    state, inputs, targets = problem()
    model = Model()
    model.load_state_dict(state)
    initial = full_parameters(model)
    train(model, inputs, targets)
    return out_dir, full_parameters(model), initial


def assert_matches_full_batch_training(out_dir, prefix, expected, initial):
    for rank in range(WORLD_SIZE):
        parameters = torch.load(out_dir / f"{prefix}_rank{rank}.pt")
        assert parameters.keys() == expected.keys()
        for name, value in parameters.items():
            # Training moved every parameter: equality is not the initial weights matching.
            assert not torch.equal(value, initial[name]), name
            # Half-batch gradients averaged over ranks round differently from full-batch ones.
            torch.testing.assert_close(value, expected[name], rtol=1e-5, atol=1e-6, msg=f"rank {rank} {name}")


def test_distributed_data_parallel_trains_as_one_process_on_the_full_batch(trained):
    out_dir, expected, initial = trained
    assert_matches_full_batch_training(out_dir, "ddp", expected, initial)


def test_fsdp2_fully_shard_trains_as_one_process_on_the_full_batch(trained):
    out_dir, expected, initial = trained
    if (out_dir / "fsdp_unavailable.txt").exists():
        pytest.skip(f"FSDP2 is not in this torch: {(out_dir / 'fsdp_unavailable.txt').read_text()}")
    assert_matches_full_batch_training(out_dir, "fsdp", expected, initial)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="one rank of the distributed test")
    parser.add_argument("--rank", type=int, required=True)
    parser.add_argument("--store", required=True)
    parser.add_argument("--out", required=True)
    arguments = parser.parse_args()
    worker(arguments.rank, arguments.store, arguments.out)

"""The benchmark's machinery, not its speed: every implementation is checked before it is timed, a
wrong one is reported as failed and gets no time, the interleaved timing keeps going past a call
that raises, the grids hold what the help says, and the verdict states what the figures it is given
say. (Speeds are never asserted: they live in benchmarks/results.)"""
import dataclasses
import io
import importlib.util
import json
import re

import pytest
import torch

from lstm_fused import benchmark

HAVE_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None
TINY = benchmark.Shape(device="cpu", dtype="float32", threads=1, batch=3, input_size=5, hidden_size=4, steps=2)


def run_tiny(names):
    return benchmark.run_shape(TINY, [benchmark.FORWARD, benchmark.TRAINING], names, min_run_time=0.01, seed=0)


def test_every_implementation_is_checked_and_timed():
    names = ["nn", "fused", "reference", "nn.LSTM", "fused.LSTM"]
    results = run_tiny(names)
    assert [r.case.mode for r in results] == [benchmark.FORWARD, benchmark.TRAINING]
    for result in results:
        assert result.floor_ms == min(result.floor_ms_by_library.values()) > 0
        assert "blas" in result.floor_ms_by_library
        for name in names:
            outcome = result.outcomes[name]
            assert outcome.status == "ok", (name, outcome.message)
            assert outcome.median_ms > 0 and outcome.speedup_vs_nn > 0
            if name != "nn":
                assert outcome.relative_error <= outcome.tolerance
        assert result.outcomes["nn"].speedup_vs_nn == pytest.approx(1.0)


def test_a_wrong_implementation_fails_and_is_not_timed(monkeypatch):
    def build_off_by_a_little(baseline):
        prepared = benchmark.build_fused(baseline)
        inner = prepared.run

        def run(step_inputs, h, c):
            outputs, final_cell = inner(step_inputs, h, c)
            return [o * 1.001 for o in outputs], final_cell

        return dataclasses.replace(prepared, run=run)

    wrong = benchmark.Implementation("wrong", "lstm_fused.LSTMCell with outputs 0.1% off", build_off_by_a_little)
    monkeypatch.setitem(benchmark.IMPLEMENTATIONS, "wrong", wrong)
    for result in run_tiny(["nn", "wrong"]):
        outcome = result.outcomes["wrong"]
        assert outcome.status == "FAILED" and "relative error" in outcome.message
        assert outcome.median_ms is None and outcome.speedup_vs_nn is None


def test_interleaved_timing_survives_a_raising_call():
    calls_made = []

    def good():
        calls_made.append("good")

    def bad():
        raise RuntimeError("broken on purpose")

    measurements, errors = benchmark.measure_interleaved(
        {"good": good, "bad": bad}, threads=1, min_run_time=0.01, device=torch.device("cpu")
    )
    assert set(measurements) == {"good"} and set(errors) == {"bad"}
    assert "broken on purpose" in str(errors["bad"])
    # Blocks of every round are merged: more than the warm-up calls ran, and the median is a time.
    assert len(calls_made) > benchmark.WARMUP_CALLS and measurements["good"].median > 0


def test_the_default_grid_is_the_cell_for_one_step_and_the_sequence_module_over_a_sequence():
    jobs = benchmark.shapes_from(benchmark.parse_arguments([]))
    cell = [shape for shape, names in jobs if names == ["nn", "fused"]]
    sequence = [shape for shape, names in jobs if names == ["nn", "nn.LSTM", "fused.LSTM"]]
    assert len(cell) + len(sequence) == len(jobs) and cell and sequence
    assert {s.steps for s in cell} == {1} and min(s.steps for s in sequence) > 1
    for shapes in (cell, sequence):
        assert sorted({s.batch for s in shapes}) == list(benchmark.DEFAULT_BATCHES)
        assert len({s.hidden_size for s in shapes}) >= 2


def test_full_runs_every_implementation_over_the_whole_grid_and_flags_override_every_part():
    full = benchmark.shapes_from(benchmark.parse_arguments(["--full"]))
    assert len(full) == 4 * 3 * 2
    assert all(names == list(benchmark.IMPLEMENTATIONS) for _, names in full)
    overridden = benchmark.shapes_from(benchmark.parse_arguments(["--batch", "3", "--impl", "fused"]))
    assert {s.batch for s, _ in overridden} == {3}
    assert all(names == ["nn", "fused"] for _, names in overridden)
    # Identical parts after --steps are run once.
    one_t = benchmark.shapes_from(benchmark.parse_arguments(["--steps", "2", "--impl", "fused"]))
    assert len(one_t) == len(set(s for s, _ in one_t))


def timed_result(batch, hidden, mode, ours_ms, theirs_ms, steps=16, ours="fused.LSTM", theirs="nn.LSTM"):
    shape = benchmark.Shape("cpu", "float32", 2, batch, hidden, hidden, steps)
    outcomes = {
        "nn": benchmark.Outcome("ok", median_ms=theirs_ms * 3),
        theirs: benchmark.Outcome("ok", median_ms=theirs_ms),
        ours: benchmark.Outcome("ok", median_ms=ours_ms),
    }
    return benchmark.CaseResult(benchmark.Case(shape, mode), outcomes, floor_ms=ours_ms / 2)


MACHINE = dict(cpu="Some CPU 9000", cpu_flags=["avx2", "fma"], cores_usable=2, torch="2.x", gpu=None,
               load_average_at_start=0.0)


def test_the_verdict_says_where_it_is_faster_about_as_fast_and_slower():
    ratios = {1: [2.0, 1.5], 8: [1.3, 1.4], 64: [1.02, 0.97], 256: [0.5, 0.4]}
    results = [
        timed_result(batch, hidden, benchmark.TRAINING, ours_ms=1.0, theirs_ms=ratio)
        for batch, pair in ratios.items()
        for hidden, ratio in zip((64, 256), pair)
    ]
    text = benchmark.verdict(results, MACHINE)
    lines = text.splitlines()
    assert lines[0].startswith("Verdict on this CPU (Some CPU 9000, AVX2, no AVX-512, 2 cores), float32, 2 threads")
    assert lines[1:] == [
        "  lstm_fused.LSTM (T=16 steps) trains 1.3-2.0x faster than nn.LSTM at batch 1-8; "
        "about as fast (0.97-1.02x) at batch 64; 2.0-2.5x slower at batch 256."
    ]


def test_the_verdict_spells_out_a_batch_where_hidden_sizes_disagree_and_covers_both_modules():
    results = [
        timed_result(1, 64, benchmark.FORWARD, 1.0, 3.0, steps=1, ours="fused", theirs="nn"),
        timed_result(4, 64, benchmark.FORWARD, 1.0, 1.5, steps=1, ours="fused", theirs="nn"),
        timed_result(4, 256, benchmark.FORWARD, 1.0, 0.8, steps=1, ours="fused", theirs="nn"),
        timed_result(1, 64, benchmark.TRAINING, 1.0, 0.5),
    ]
    lines = benchmark.verdict(results, MACHINE).splitlines()[1:]
    assert lines == [
        "  lstm_fused.LSTMCell runs inference 3.0x faster than nn.LSTMCell at batch 1; "
        "at batch 4: 1.5x faster at hidden 64, 1.2x slower at hidden 256.",
        "  lstm_fused.LSTM (T=16 steps) trains against nn.LSTM: 2.0x slower at batch 1.",
    ]


def test_the_main_command_ends_with_a_verdict_a_plot_and_a_progress_line_per_case(tmp_path, capsys):
    plot, figures = tmp_path / "plot.png", tmp_path / "figures.json"
    status = benchmark.main(["--batch", "1", "3", "--hidden", "4", "--min-run-time", "0.01",
                             "--plot", str(plot), "--json", str(figures)])
    out, err = capsys.readouterr()
    assert status == 0, err
    verdict = out[out.index("Verdict on this CPU"):].splitlines()
    subjects = [re.match(r"  (lstm_fused\.LSTM\S*(?: \(T=16 steps\))?) (runs inference|trains) ", line).groups()
                for line in verdict[1:5]]
    assert subjects == [
        ("lstm_fused.LSTMCell", "runs inference"), ("lstm_fused.LSTMCell", "trains"),
        ("lstm_fused.LSTM (T=16 steps)", "runs inference"), ("lstm_fused.LSTM (T=16 steps)", "trains"),
    ]
    progress = [line for line in err.splitlines() if "ETA" in line]
    assert len(progress) == 2 * 2 * 2  # batches x (cell, sequence) x modes
    assert progress[-1].startswith("[" + "#" * benchmark.Progress.WIDTH + "] 8/8")
    if HAVE_MATPLOTLIB:
        assert plot.stat().st_size > 0
    else:
        assert not plot.exists() and "matplotlib is not installed" in err
    cases = json.loads(figures.read_text())["cases"]
    assert len(cases) == 8 and all(case["implementations"]["nn"]["status"] == "ok" for case in cases)


def test_on_a_terminal_the_progress_bar_is_redrawn_in_place_with_an_eta():
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    terminal = Terminal()
    progress = benchmark.Progress([1.0, 3.0], stream=terminal)
    progress.advance("first case")
    progress.advance("second case")
    progress.finish()
    drawn = terminal.getvalue()
    assert drawn.endswith("\n") and drawn.count("\n") == 1  # one line, redrawn
    frames = drawn.rstrip("\n").split("\r")[1:]
    assert frames[0].startswith("[" + "." * benchmark.Progress.WIDTH + "] 0/2") and "ETA ?" in frames[0]
    # A quarter of the weight done after the first case: a quarter of the bar.
    assert frames[1].startswith("[" + "#" * (benchmark.Progress.WIDTH // 4) + ".") and "1/2" in frames[1]
    assert "ETA" in frames[1] and "first case" in frames[1]
    assert frames[2].startswith("[" + "#" * benchmark.Progress.WIDTH + "] 2/2") and "ETA 0:00" in frames[2]


def test_regularised_benchmark_runs_and_reports(helpers, capsys):
    # benchmarks/regularised.py (issue 16) at toy sizes: every option, its table and its summary line.
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "benchmarks" / "regularised.py"
    spec = importlib.util.spec_from_file_location("regularised_benchmark", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    with helpers.torch_threads(1):  # as main sets it; restored afterwards
        assert module.main(["--hidden", "8", "--batch", "2", "-T", "3", "--threads", "1", "--min-run-time", "0.01"]) == 0
    report = capsys.readouterr().out
    for option in module.OPTIONS:
        assert f"{option:>18}    8   2" in report
    assert "vs the Python loop:" in report and "vs plain lf.LSTM:" in report

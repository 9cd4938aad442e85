"""The benchmark's machinery, not its speed: every implementation is checked before it is timed, a
wrong one is reported as failed and gets no time, and the interleaved timing keeps going past a
call that raises. (Speeds are never asserted: they live in benchmarks/results.)"""
import dataclasses

import pytest
import torch

from lstm_fused import benchmark

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

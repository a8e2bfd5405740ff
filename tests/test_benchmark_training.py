"""The timing harness of `scripts/benchmark_training.py` (the steps themselves are the trainer's, tested there)."""

import numpy as np
import pytest

from sd_jax.config import preset
from sd_jax.training import benchmark


def test_time_alternating_interleaves_rounds_and_times_only_after_warmup():
    calls = []

    def side(name):
        def run():
            calls.append(name)
            return np.float32(len(calls))

        return run

    results = benchmark.time_alternating({"a": side("a"), "b": side("b")}, steps=3, warmup=2)
    assert calls == ["a", "b"] * 6  # the first calls, 2 warm-up rounds, 3 timed rounds
    assert [len(r["times_s"]) for r in results.values()] == [3, 3]
    assert results["a"]["loss"] == 11.0 and results["b"]["loss"] == 12.0
    assert all(r["first_s"] >= 0 for r in results.values())


def test_summarize_rates_from_the_mean():
    summary = benchmark.summarize({"times_s": [0.5, 1.0, 1.5], "first_s": 9.0, "loss": 1.0}, batch=4)
    assert summary["min_s"] == 0.5 and summary["mean_s"] == pytest.approx(1.0)
    assert summary["steps_per_s"] == pytest.approx(1.0) and summary["examples_per_s"] == pytest.approx(4.0)


@pytest.mark.parametrize("cached", [True, False])
def test_random_batch_shapes(cached):
    config = preset("tiny")
    batch = benchmark.random_batch(config, 3, 32, cached)
    assert batch["input_ids"].shape == (3, 77) and batch["input_ids"].max() < config.text_encoder.vocab_size
    if cached:
        assert set(batch) == {"input_ids", "moments"} and batch["moments"].shape == (3, 4, 4, 8)
    else:
        assert set(batch) == {"input_ids", "pixels"} and batch["pixels"].shape == (3, 32, 32, 3)

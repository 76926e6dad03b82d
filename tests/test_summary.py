"""Run-long statistics in bounded memory."""

from __future__ import annotations

import numpy as np
import pytest

from gradtrack.summary import HISTORY_BUCKETS, NormHistogram, NormHistory, RunSummary


def test_histogram_quantiles_are_within_its_resolution() -> None:
    values = np.random.default_rng(0).lognormal(0.0, 2.0, 20_000)
    histogram = NormHistogram()
    for value in values:
        histogram.add(float(value))
    histogram.add(float("nan"))
    for q in (0.5, 0.95, 0.99):
        assert histogram.quantile(q) == pytest.approx(np.quantile(values, q), rel=0.015)
    assert histogram.max == values.max() and histogram.count == values.size
    assert NormHistogram().quantile(0.5) is None


def test_history_is_max_pooled_to_a_fixed_size() -> None:
    history = NormHistory()
    for step in range(10_000):
        history.add(step, 1000.0 if step == 7777 else 1.0)
    buckets = history.buckets()
    assert len(buckets) <= HISTORY_BUCKETS
    assert max(v for _, v in buckets) == 1000.0
    first_steps = [s for s, _ in buckets]
    hit = max(i for i, s in enumerate(first_steps) if s <= 7777)
    assert buckets[hit][1] == 1000.0


def test_recommended_max_norm_ignores_exploded_steps() -> None:
    summary = RunSummary()
    for step in range(100):
        summary.add_step(step, float(step % 10 + 1), False, False, False, exploded=False)
    summary.add_step(100, 1e9, False, False, False, exploded=True)
    frozen = summary.freeze()
    assert frozen.recommended_max_norm == pytest.approx(10.0, rel=0.02)
    assert frozen.norm_max == 1e9 and frozen.steps == 101

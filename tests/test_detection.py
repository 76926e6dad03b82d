"""Explosion rules and the divergence judgement on host numbers."""

from __future__ import annotations

import math

import numpy as np
import pytest

from gradtrack.detection import DivergenceDetector, ExplosionDetector, offenders


def test_explosion_kinds_in_order() -> None:
    detector = ExplosionDetector(explosion_threshold=100.0, spike_factor=10.0, warmup=5)
    assert detector.check(math.nan) == ("nonfinite", 100.0)
    assert detector.check(500.0) == ("threshold", 100.0)
    detector = ExplosionDetector(explosion_threshold=100.0, spike_factor=10.0, warmup=5)
    for _ in range(5):
        assert detector.check(1.0) is None
    assert detector.check(9.0) is None
    assert detector.check(20.0) == ("spike", 10.0)


def test_a_new_scale_is_learnt_instead_of_alarming_forever() -> None:
    detector = ExplosionDetector(explosion_threshold=1e6, window=20, warmup=5)
    for _ in range(20):
        detector.check(1.0)
    kinds = [detector.check(50.0) for _ in range(30)]
    assert kinds[0] is not None and kinds[-1] is None


def test_bad_detector_settings() -> None:
    with pytest.raises(ValueError, match="explosion_threshold must be a number > 0"):
        ExplosionDetector(explosion_threshold=0)
    with pytest.raises(ValueError, match="spike_factor must be a number > 1"):
        ExplosionDetector(spike_factor=1.0)
    assert ExplosionDetector(spike_factor=math.inf).spike_limit() == math.inf


def test_offenders_lists_every_nonfinite_layer_then_the_top_k() -> None:
    norms = np.array([1.0, math.nan, 5.0, 3.0, math.inf, 4.0])
    names = ["a", "b", "c", "d", "e", "f"]
    picked = offenders(norms, names, threshold=1.0, top_k=2)
    assert [(o.name, o.nonfinite) for o in picked] == [("b", True), ("e", True), ("c", False), ("f", False)]


def test_nonfinite_loss_diverges_at_once() -> None:
    detector = DivergenceDetector()
    assert detector.update(0, 0, 1.0, 0.0) is None
    verdict = detector.update(1, 0, math.inf, 0.0)
    assert verdict is not None and verdict.step == 1 and verdict.reason == "loss is inf"
    assert detector.update(2, 0, math.nan, 0.0) is None  # raised once


def test_nonfinite_gradients_must_persist() -> None:
    detector = DivergenceDetector(nonfinite_patience=3)
    for step, bad in enumerate([1, 1, 0, 1, 1]):
        assert detector.update(step, bad, None, 0.0) is None
    assert detector.update(5, 2, None, 0.0) is not None


def test_loss_blowup_must_be_sustained_and_far_above_the_start() -> None:
    detector = DivergenceDetector(loss_blowup=10.0, loss_patience=3, loss_smoothing=1.0)
    losses = [2.0, 1.0, 0.5, 0.1, 15.0, 0.1, 30.0, 30.0]
    assert all(detector.update(i, 0, loss, 0.0) is None for i, loss in enumerate(losses))
    assert detector.update(8, 0, 30.0, 0.0) is not None


@pytest.mark.parametrize("seed", range(5))
def test_noisy_but_stable_losses_never_diverge(seed: int) -> None:
    rng = np.random.default_rng(seed)
    detector = DivergenceDetector()
    base = np.concatenate([np.linspace(3.0, 1e-4, 500), np.full(2000, 1e-4)])
    noisy = base * rng.lognormal(0.0, 1.0, base.size)  # factor-of-e noise around the trend
    assert all(detector.update(i, 0, float(v), 0.0) is None for i, v in enumerate(noisy))

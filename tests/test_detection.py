"""Explosion rules and the divergence judgement on host numbers."""

from __future__ import annotations

import math

import numpy as np
import pytest

from gradtrack.judge.detection import DivergenceDetector, ExplosionDetector, offenders


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
    assert detector.update(step=0, nonfinite=0, loss=1.0, timestamp=0.0) is None
    verdict = detector.update(step=1, nonfinite=0, loss=math.inf, timestamp=0.0)
    assert verdict is not None and verdict.step == 1 and verdict.reason == "loss is inf"
    assert detector.update(step=2, nonfinite=0, loss=math.nan, timestamp=0.0) is None  # raised once


def test_nonfinite_gradients_must_persist() -> None:
    detector = DivergenceDetector(nonfinite_patience=3)
    for step, bad in enumerate([1, 1, 0, 1, 1]):
        assert detector.update(step=step, nonfinite=bad, loss=None, timestamp=0.0) is None
    assert detector.update(step=5, nonfinite=2, loss=None, timestamp=0.0) is not None


def test_loss_blowup_must_be_sustained_and_far_above_the_start() -> None:
    detector = DivergenceDetector(loss_blowup=10.0, loss_patience=3, loss_smoothing=1.0)
    losses = [2.0, 1.0, 0.5, 0.1, 15.0, 0.1, 30.0, 30.0]
    assert all(detector.update(step=i, loss=loss, timestamp=0.0) is None for i, loss in enumerate(losses))
    assert detector.update(step=8, nonfinite=0, loss=30.0, timestamp=0.0) is not None


@pytest.mark.parametrize("seed", range(5))
def test_noisy_but_stable_losses_never_diverge(seed: int) -> None:
    rng = np.random.default_rng(seed)
    detector = DivergenceDetector()
    base = np.concatenate([np.linspace(3.0, 1e-4, 500), np.full(2000, 1e-4)])
    noisy = base * rng.lognormal(0.0, 1.0, base.size)  # factor-of-e noise around the trend
    assert all(detector.update(step=i, loss=float(v), timestamp=0.0) is None for i, v in enumerate(noisy))


def test_a_smooth_geometric_blowup_is_a_growth_explosion_once_per_episode() -> None:
    detector = ExplosionDetector(explosion_threshold=1e9, warmup=5, growth_window=6, growth_factor=4.0)
    rng = np.random.default_rng(0)
    for value in 1.0 + 0.1 * rng.standard_normal(30):  # healthy, noisy
        assert detector.check(float(value)) is None
    kinds = [detector.check(1.3**step) for step in range(1, 20)]  # x1.3 a step
    fired = [(step, kind[0]) for step, kind in enumerate(kinds, 1) if kind is not None]
    # at 4x where it stood before the climb (the low quantile of the history, ~0.87 here), before any spike
    assert fired[0][1] == "growth" and 3.4 <= 1.3 ** fired[0][0] < 10.0
    assert [kind for _, kind in fired].count("growth") == 1  # once per episode (later steps spike as well)
    for value in (0.5, 0.6, 0.4, 0.5, 0.45, 0.5, 0.4):  # the episode ends when the norm stops rising
        detector.check(value)
    kinds = [detector.check(0.5 * 1.5**step) for step in range(1, 12)]
    assert [kind[0] for kind in kinds if kind is not None][:1] == ["growth"]  # a second episode fires again


def test_noisy_stable_norms_never_count_as_growth() -> None:
    for seed in range(5):
        detector = ExplosionDetector(warmup=10)
        rng = np.random.default_rng(seed)
        norms = np.concatenate([np.full(200, 1.0), np.full(300, 3.0)]) * rng.lognormal(0.0, 0.5, 500)
        kinds = [detector.check(value) for value in norms.tolist()]  # a 3x change of scale, and noise
        assert all(kind is None or kind[0] != "growth" for kind in kinds)


def test_nonfinite_gradients_right_after_explosions_diverge_at_once() -> None:
    detector = DivergenceDetector(nonfinite_patience=3)
    for step, exploded in enumerate([False] * 10 + [True, True]):
        assert detector.update(step=step, timestamp=0.0, exploded=exploded, total_norm=1.0, baseline=1.0) is None
    verdict = detector.update(step=12, nonfinite=4, loss=None, timestamp=0.0, exploded=True, baseline=1.0)
    assert verdict is not None and "after explosions" in verdict.reason
    isolated = DivergenceDetector(nonfinite_patience=3)  # a single bad batch in a healthy run: patience
    for step in range(10):
        isolated.update(step=step, timestamp=0.0, total_norm=1.0, baseline=1.0)
    assert isolated.update(step=10, nonfinite=2, loss=None, timestamp=0.0, exploded=True, baseline=1.0) is None


def test_divergence_from_gradients_alone_needs_dense_explosions_far_above_the_baseline() -> None:
    blowing_up = DivergenceDetector()
    verdicts = [blowing_up.update(step=step, timestamp=0.0, exploded=step >= 5, total_norm=10.0 ** max(0, step - 4),
                                  baseline=1.0) for step in range(20)]  # fmt: skip
    first = next(v for v in verdicts if v is not None)
    assert "explosions on" in first.reason and first.step <= 15
    clipped_but_training = DivergenceDetector()  # a third of the steps spike 100x, the rest stay healthy
    for step in range(300):
        spike = step % 3 == 0
        assert clipped_but_training.update(step=step, timestamp=0.0, exploded=spike,
                                           total_norm=100.0 if spike else 1.0, baseline=1.0) is None  # fmt: skip

"""The clip policies that learn their bound, against their papers' formulas on hand-computed cases (issue 11)."""

from __future__ import annotations

import math
import statistics

import numpy as np
import pytest
import torch

from gradtrack import GradTracker
from gradtrack.adaptive import AGC, AdaGC, AutoClip, ZClip
from gradtrack.clipping import make_clip_policy
from gradtrack.policy import ClipPolicy
from gradtrack.stats import measure
from gradtrack_testing.models import mlp


def _norm(values: list[torch.Tensor]) -> float:
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(v) for v in values])).item()


def test_zclip_clips_a_spike_by_adaptive_scaling_and_feeds_the_ema_its_clipped_norm() -> None:
    policy = ZClip(alpha=0.9, z_thresh=2.0, warmup=4)
    warm = [1.0, 2.0, 1.5, 1.5]
    for value in warm:
        grads = [torch.full((4,), value / 2)]  # norm == value
        assert policy.clip_(measure(grads, 2.0)) is None  # warming up: nothing clipped
        policy.observe(value, 1.0)
    mean, var = statistics.fmean(warm), statistics.pvariance(warm)
    assert policy.mean == pytest.approx(mean) and policy.var == pytest.approx(var)
    std = math.sqrt(var)
    grads = [torch.full((4,), 5.0)]  # norm 10: z = (10 - 1.5) / 0.3536 = 24
    coef = policy.clip_(measure(grads, 2.0))
    z = (10.0 - mean) / std
    expected_bound = mean + 2.0**2 * std / z
    assert coef is not None and coef.item() == pytest.approx(expected_bound / (10.0 + 1e-6), rel=1e-5)
    assert _norm(grads) == pytest.approx(expected_bound, rel=1e-5)
    policy.observe(10.0, coef.item())
    delta = expected_bound - mean
    assert policy.mean == pytest.approx(mean + 0.1 * delta, rel=1e-5)
    assert policy.var == pytest.approx(0.9 * var + 0.1 * delta * delta, rel=1e-5)
    calm = [torch.full((4,), 0.8)]  # norm 1.6: z < 2, untouched
    assert policy.clip_(measure(calm, 2.0)).item() == pytest.approx(1.0)


def test_zclip_ceiling_applies_in_warmup_too() -> None:
    capped = ZClip(warmup=2, ceiling=3.0)
    grads = [torch.full((4,), 5.0)]
    assert capped.clip_(measure(grads, 2.0)).item() == pytest.approx(3.0 / 10.0, rel=1e-5)


def feed(policy: AutoClip, norms: list[float]) -> None:
    for value in norms:
        coef = policy.clip_(measure([torch.full((1,), value)], 2.0))
        policy.observe(value, 1.0 if coef is None else coef.item())


def test_auto_bounds_the_first_steps_before_zclip_has_statistics() -> None:
    auto = AutoClip(max_norm=0.1)
    assert auto.clip_(measure([torch.full((1,), 50.0)], 2.0)) is None  # the first step: nothing to judge by
    auto.observe(50.0, 1.0)
    feed(auto, [1.0, 2.0])  # clipped norms so far: 50, 1, 2 (median 2)
    assert auto.clip_(measure([torch.full((1,), 100.0)], 2.0)).item() == pytest.approx(4 * 2.0 / 100.0, rel=1e-5)
    assert not auto.in_trouble  # one high step in warm-up is not trouble: max_norm (0.1) was never applied


def test_auto_holds_a_smooth_blowup_to_max_norm_but_not_a_change_of_scale() -> None:
    rng = np.random.default_rng(0)
    growing = AutoClip(max_norm=0.5)
    feed(growing, (1.0 + 0.1 * rng.standard_normal(100)).tolist())
    assert not growing.in_trouble
    feed(growing, [1.05**step for step in range(1, 60)])  # +5% a step: z stays small, the EMA follows
    assert growing.in_trouble
    assert growing.clip_(measure([torch.full((1,), 2.0)], 2.0)).item() == pytest.approx(0.25, rel=1e-5)
    feed(growing, [0.4] * 49)
    assert growing.in_trouble
    feed(growing, [0.4])  # 50 calm steps within max_norm: over
    assert not growing.in_trouble

    shifted = AutoClip(max_norm=0.5)  # new data at step 100: the norm jumps 5x, once, then stays there
    feed(shifted, (1.0 + 0.1 * rng.standard_normal(100)).tolist())
    feed(shifted, (5.0 + 0.5 * rng.standard_normal(100)).tolist())
    assert not shifted.in_trouble


def test_auto_enforces_max_norm_after_repeated_or_severe_spikes() -> None:
    rng = np.random.default_rng(1)
    base = (1.0 + 0.1 * rng.standard_normal(60)).tolist()
    repeated = AutoClip(max_norm=0.5)
    feed(repeated, base)
    feed(repeated, [30.0, 1.0, 30.0, 1.0])
    assert not repeated.in_trouble  # two spikes in 10 steps
    feed(repeated, [30.0])
    assert repeated.in_trouble  # the third
    severe = AutoClip(max_norm=0.5)
    feed(severe, base)
    feed(severe, [1e3])  # 100x the spike limit at once
    assert severe.in_trouble
    with pytest.raises(ValueError, match="spikes must be at most window"):
        AutoClip(spikes=11, window=10)


def test_adagc_warms_up_globally_then_clips_each_tensor_against_its_own_ema() -> None:
    policy = AdaGC(lambda_rel=1.05, beta=0.5, lambda_abs=1.0, warmup=2)
    steps = [[3.0, 4.0], [0.3, 0.4], [0.3, 4.0]]  # per-tensor norms at each step
    gammas = None
    for index, norms in enumerate(steps):
        grads = [torch.tensor([norms[0]]), torch.tensor([norms[1]])]
        total = math.hypot(*norms)
        coef = policy.clip_(measure(grads, 2.0)).item()
        if index < 2:  # warm-up: global clipping at lambda_abs
            factors = [min(1.0, 1.0 / (total + 1e-6))] * 2
        else:
            factors = [min(1.0, 1.05 * g / n) for g, n in zip(gammas, norms, strict=True)]
        clipped = [n * f for n, f in zip(norms, factors, strict=True)]
        assert [g.item() for g in grads] == pytest.approx(clipped, rel=1e-5)
        if index == 2:
            assert coef == pytest.approx(math.hypot(*clipped) / total, rel=1e-5)
        gammas = clipped if gammas is None else [0.5 * g + 0.5 * c for g, c in zip(gammas, clipped, strict=True)]
    assert policy._gamma.tolist() == pytest.approx(gammas, rel=1e-5)  # private: the state under test


def test_agc_clips_units_against_their_weight_norms_like_the_nfnet_reference() -> None:
    weight = torch.tensor([[3.0, 4.0], [0.0, 0.0001]])  # unit norms 5 and 1e-4 (below eps 1e-3)
    grad = torch.tensor([[0.3, 0.4], [0.06, 0.08]])  # unit norms 0.5 and 0.1
    bias, bias_grad = torch.tensor([2.0, -1.0]), torch.tensor([0.01, 0.5])
    reference = [grad.clone(), bias_grad.clone()]
    for g, w in zip(reference, (weight, bias), strict=True):  # NFNet's unitwise_norm and clip, written out
        unit = lambda x: x.abs() if x.ndim <= 1 else x.norm(dim=1, keepdim=True)  # noqa: E731
        limit = 0.1 * unit(w).clamp(min=1e-3)
        norm = unit(g)
        g.mul_(torch.where(norm > limit, limit / norm.clamp(min=1e-6), 1.0))
    policy = AGC(clipping=0.1)
    grads = [grad.clone(), bias_grad.clone()]
    coef = policy.clip_(measure(grads, 2.0, weights=[weight, bias]))
    for mine, expected in zip(grads, reference, strict=True):
        torch.testing.assert_close(mine, expected)
    assert coef.item() == pytest.approx(min(1.0, 1e-4 / 0.1), rel=1e-4)  # the 2nd row: limited to 0.1 x 1e-3


@pytest.mark.parametrize("name", ["zscore", "adagc", "agc", "auto"])
def test_every_policy_trains_by_name_and_says_its_settings(name: str) -> None:
    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    with GradTracker(model, clip=name) as tracker:
        for _ in range(40):
            optimizer.zero_grad()
            model(torch.randn(8, 8)).square().mean().backward()
            optimizer.step()
    assert tracker.steps == 40 and tracker.config()["clip"] == name
    assert isinstance(tracker.clip_policy, ClipPolicy)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_max_norm_means_each_policys_own_bound_or_is_refused() -> None:
    assert make_clip_policy("zscore", 5.0).ceiling == 5.0  # type: ignore[union-attr]
    assert make_clip_policy("adagc", 2.0).lambda_abs == 2.0  # type: ignore[union-attr]
    assert make_clip_policy("auto", 0.5).max_norm == 0.5  # type: ignore[union-attr]
    with pytest.raises(ValueError, match="max_norm is not used by clip='agc'"):
        make_clip_policy("agc", 1.0)
    with pytest.raises(ValueError, match="max_norm is not used by clip='value'"):
        make_clip_policy("value", 1.0, clip_value=0.1)
    with pytest.raises(ValueError, match="z_thresh must be a finite number > 0"):
        ZClip(z_thresh=-1)
    with pytest.raises(ValueError, match="beta must be in"):
        AdaGC(beta=1.0)

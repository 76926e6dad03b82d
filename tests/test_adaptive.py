"""The clip policies that learn their bound, against their papers' formulas on hand-computed cases (issue 11)."""

from __future__ import annotations

import io
import math
import statistics

import numpy as np
import pytest
import torch

from gradtrack import GradTracker
from gradtrack.measure.stats import measure
from gradtrack.policies.adaptive import AGC, AdaGC, AutoClip, ZClip
from gradtrack.policies.clipping import make_clip_policy
from gradtrack.policies.policy import ClipPolicy
from gradtrack_testing.models import VanillaRNN, mlp


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


def test_auto_holds_the_warmup_to_max_norm_but_learns_the_runs_own_scale() -> None:
    auto = AutoClip(max_norm=1.0, warmup=5)
    assert auto.clip_(measure([torch.full((1,), 50.0)], 2.0)).item() == pytest.approx(1 / (50 + 1e-6), rel=1e-5)
    auto.observe(50.0, 1 / 50)
    feed(auto, [0.01, 0.02])  # norms far below max_norm: 4x their median (0.02) is the tighter bound
    assert auto.clip_(measure([torch.full((1,), 0.5)], 2.0)).item() == pytest.approx(4 * 0.02 / 0.5, rel=1e-4)
    held = AutoClip(max_norm=1.0, warmup=5)
    feed(held, [5.0, 4.0, 6.0, 5.0, 5.0])  # every step clipped to 1.0 ...
    assert held.mean == pytest.approx(5.0)  # ... yet ZClip learns the run's scale, not max_norm's


def test_auto_releases_the_hold_gradually_up_to_zclips_own_level() -> None:
    auto = AutoClip(max_norm=1.0, warmup=5, release=1.1)
    feed(auto, [5.0] * 5)
    ceilings = []
    while auto.threshold_ceiling() is not None:
        ceilings.append(auto.threshold_ceiling())
        feed(auto, [5.0])
    assert ceilings == pytest.approx([1.1**k for k in range(17)])  # 1.1**17 > 5: ZClip alone from then on
    assert not auto.in_trouble


def test_auto_is_in_trouble_when_a_released_run_rebounds() -> None:
    rng = np.random.default_rng(3)
    calm = AutoClip(max_norm=1.0, warmup=10)
    feed(calm, (5.0 + 0.5 * rng.standard_normal(80)).tolist())  # released, then left alone
    assert not calm.in_trouble and calm.threshold_ceiling() is None
    hot = AutoClip(max_norm=1.0, warmup=10)
    feed(hot, (5.0 + 0.5 * rng.standard_normal(15)).tolist())  # held, then releasing
    assert not hot.in_trouble
    feed(hot, [12.0, 13.0])
    assert not hot.in_trouble  # two high steps are not a rebound yet: the median of five is judged
    feed(hot, [12.0])
    assert hot.in_trouble and hot.threshold_ceiling() == 1.0  # 2.4x its level under the hold


def test_auto_warms_up_again_when_zclip_clips_half_of_the_recent_steps() -> None:
    rng = np.random.default_rng(4)
    auto = AutoClip(max_norm=1.0, warmup=10)
    feed(auto, (0.5 + 0.05 * rng.standard_normal(100)).tolist())
    assert auto.threshold_ceiling() is None  # settled: ZClip alone
    steps = 0
    while auto.mean is not None and steps < 10:
        steps += 1
        feed(auto, [3.0 + 0.3 * rng.standard_normal()])  # the learning rate went up: a new, larger scale
    assert steps == 5 and not auto.in_trouble  # ZClip clipped 5 of the last 10 steps: warm up again
    assert auto.threshold_ceiling() == 1.0  # held to max_norm while ZClip learns the new scale
    feed(auto, (3.0 + 0.3 * rng.standard_normal(10)).tolist())
    assert auto.mean == pytest.approx(3.0, rel=0.1) and auto.threshold_ceiling() == 1.0  # the release begins


def test_auto_recognises_a_smooth_geometric_growth_within_ten_steps_of_its_start() -> None:
    rng = np.random.default_rng(2)
    auto = AutoClip(max_norm=0.5)
    feed(auto, (1.0 + 0.1 * rng.standard_normal(150)).tolist())  # past the hold, the release and its probation
    assert not auto.in_trouble
    steps = 0
    while not auto.in_trouble and steps < 50:
        steps += 1
        feed(auto, [1.1**steps])  # +10% a step, as least squares 5% past its stability limit
    assert steps <= 10  # gradtrack's 50-step growth rule alone needs 19 here


def test_auto_holds_a_recurrent_net_too_hot_from_its_first_step_to_max_norm() -> None:
    """A tanh RNN at spectral radius 2 with SGD at 0.2 blows up in its first steps unclipped. auto's warm-up is
    clip="norm" at max_norm, step for step, and once released the run rebounds and is held again."""

    def train(clip: str | None) -> tuple[list[float], GradTracker]:
        model = VanillaRNN(radius=2.0, seed=0)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.2)
        generator = torch.Generator().manual_seed(0)
        losses = []
        with GradTracker(model, clip=clip) as tracker:
            for _ in range(60):
                x = torch.randn(16, 20, 4, generator=generator)
                optimizer.zero_grad()
                loss = torch.nn.functional.mse_loss(model(x), x[:, -1, 0] + 0.5 * x[:, -2, 1])
                loss.backward()
                optimizer.step()
                losses.append(loss.item())
        return losses, tracker

    unclipped, _ = train(None)
    assert not max(unclipped) < 100 * unclipped[0]
    auto, tracker = train("auto")
    norm, _ = train("norm")
    policy = tracker.clip_policy
    assert isinstance(policy, AutoClip) and policy.warmup == 25
    assert auto[:25] == norm[:25]  # the hold: max_norm from the first step
    assert policy.in_trouble and auto[-1] < auto[0]  # held again after the release, and learning


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


def test_auto_resumed_at_any_step_decides_every_later_step_as_the_uninterrupted_policy() -> None:
    rng = np.random.default_rng(5)

    def noisy(level: float, steps: int) -> list[float]:
        return (level * (1 + 0.1 * rng.standard_normal(steps))).tolist()

    norms = noisy(5, 50) + [12.0] * 4 + [0.5] * 32  # hold, release, a rebound on probation, 30 calm steps
    norms += noisy(15, 30) + [40.0] * 5 + [0.5] * 32  # a new scale: warm up again; a rebound while releasing
    norms += noisy(0.5, 30) + [60.0] + noisy(0.5, 12) + [0.5 * 1.1**k for k in range(20)]  # a spike, a growth

    def run(policy: AutoClip, values: list[float]) -> list[tuple[float | None, bool]]:
        decisions = []
        for value in values:
            decisions.append((policy.threshold_ceiling(), policy.in_trouble))
            feed(policy, [value])
        return decisions

    whole = AutoClip(warmup=20, calm=30)
    expected = run(whole, norms)
    trouble = [step for step, (_, in_trouble) in enumerate(expected) if in_trouble]
    assert 50 < trouble[0] < 54 and any(110 < step < 150 for step in trouble) and trouble[-1] == len(norms) - 1
    for cut in range(1, len(norms), 3):
        first = AutoClip(warmup=20, calm=30)
        run(first, norms[:cut])
        buffer = io.BytesIO()
        torch.save(first.state_dict(), buffer)
        buffer.seek(0)
        resumed = AutoClip(warmup=20, calm=30)
        resumed.load_state_dict(torch.load(buffer))  # weights_only: plain values only
        assert run(resumed, norms[cut:]) == expected[cut:], f"resumed at step {cut}"
        assert resumed.state_dict() == whole.state_dict()


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

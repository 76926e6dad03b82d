"""Clip policies produce exactly what torch's clipping functions produce."""

from __future__ import annotations

import math

import pytest
import torch

from gradtrack.measure.stats import measure
from gradtrack.policies.clipping import AdaptiveClip, ClipPolicy, NormClip, ValueClip, make_clip_policy


def _grads(mixed: bool = False, scale: float = 5.0) -> list[torch.Tensor]:
    torch.manual_seed(1)
    grads = [torch.randn(10, 4) * scale, torch.randn(3) * scale, torch.randn(2, 5) * scale]
    if mixed:
        grads.append((torch.randn(6) * scale).double())
    return grads


@pytest.mark.parametrize("norm_type", [1.0, 2.0, math.inf])
@pytest.mark.parametrize("mixed", [False, True])
@pytest.mark.parametrize("max_norm", [0.5, 1e6])
def test_norm_clip_is_bitwise_clip_grad_norm(norm_type: float, mixed: bool, max_norm: float) -> None:
    ours, theirs = _grads(mixed), _grads(mixed)
    params = [torch.nn.Parameter(torch.zeros_like(g)) for g in theirs]
    for p, g in zip(params, theirs, strict=True):
        p.grad = g
    reference = torch.nn.utils.clip_grad_norm_(params, max_norm, norm_type=norm_type, foreach=True)
    batch = measure(ours, norm_type)
    coef = NormClip(max_norm).clip_(batch)
    assert torch.equal(batch.total_norm, reference)
    for mine, expected in zip(ours, (p.grad for p in params), strict=True):
        assert torch.equal(mine, expected)
    assert coef.item() == pytest.approx(min(1.0, max_norm / (reference.item() + 1e-6)))


def test_value_clip_matches_clip_grad_value_and_reports_the_largest_factor() -> None:
    ours, theirs = _grads(), _grads()
    params = [torch.nn.Parameter(torch.zeros_like(g)) for g in theirs]
    for p, g in zip(params, theirs, strict=True):
        p.grad = g
    largest = max(g.abs().max().item() for g in ours)
    torch.nn.utils.clip_grad_value_(params, 0.3)
    coef = ValueClip(0.3).clip_(measure(ours, 2.0))
    for mine, expected in zip(ours, (p.grad for p in params), strict=True):
        assert torch.equal(mine, expected)
    assert coef.item() == pytest.approx(0.3 / largest)


def test_adaptive_clip_learns_the_percentile_of_healthy_norms() -> None:
    policy = AdaptiveClip(max_norm=1.0, percentile=95, warmup=5, window=100)
    assert policy.threshold == 1.0
    for norm in range(1, 101):
        policy.observe(float(norm), 1.0)
    policy.observe(math.nan, 1.0)  # ignored
    assert policy.threshold == pytest.approx(95.05)
    grads = [torch.full((4,), 100.0)]
    batch = measure(grads, 2.0)
    policy.clip_(batch)
    assert torch.linalg.vector_norm(grads[0]).item() == pytest.approx(95.05, rel=1e-5)
    assert isinstance(policy, ClipPolicy)


def test_registry_and_bad_input() -> None:
    assert make_clip_policy(None) is None
    assert isinstance(make_clip_policy("norm", 5.0), NormClip)
    assert isinstance(make_clip_policy("adaptive"), AdaptiveClip)
    assert isinstance(make_clip_policy("value", clip_value=0.1), ValueClip)
    with pytest.raises(ValueError, match=r"clip='nrom'.*accepted.*'adaptive', 'agc', 'auto', 'norm', 'value'"):
        make_clip_policy("nrom")
    with pytest.raises(ValueError, match="clip='value' needs clip_value"):
        make_clip_policy("value")
    with pytest.raises(ValueError, match="clip_value is only used with clip='value'"):
        make_clip_policy("norm", clip_value=1.0)
    for bad in (0, -1.0, math.nan, math.inf):
        with pytest.raises(ValueError, match="max_norm must be a finite number > 0"):
            make_clip_policy("norm", bad)
    with pytest.raises(TypeError, match="clip must be None"):
        make_clip_policy(3)  # type: ignore[arg-type]


def test_adaptive_clip_forgets_norms_older_than_its_window() -> None:
    import numpy as np

    policy = AdaptiveClip(max_norm=100.0, percentile=90, warmup=3, window=10)
    values = np.random.default_rng(0).lognormal(size=40)
    for value in values:
        policy.observe(float(value), 1.0)
    assert policy.threshold == pytest.approx(np.percentile(values[-10:], 90))

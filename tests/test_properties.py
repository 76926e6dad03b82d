"""Property-based checks (hypothesis): names stay valid and distinct; norms and clipping match torch (issue 10)."""

from __future__ import annotations

import math
import re

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gradtrack.measure.stats import measure
from gradtrack.naming import MLFLOW_INVALID, sanitize_names
from gradtrack.policies.clipping import NormClip, ValueClip

_NAME = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=0, max_size=300)


@settings(max_examples=200, deadline=None)
@given(st.lists(_NAME, min_size=1, max_size=30, unique=True))
def test_mlflow_keys_are_valid_and_injective(names: list[str]) -> None:
    keys = sanitize_names(names, prefix="grad_norm/")
    assert len(set(keys.values())) == len(names)
    for key in keys.values():
        assert re.fullmatch(r"[/\w.\- :]*", key) and not re.search(MLFLOW_INVALID, key)
        assert "//" not in key and not key.startswith("/") and len(key) <= 250
    assert sanitize_names(list(reversed(names)), prefix="grad_norm/") == keys  # order never matters


@settings(max_examples=200, deadline=None)
@given(st.lists(_NAME, min_size=1, max_size=30, unique=True))
def test_wandb_keys_are_valid_and_injective_ignoring_case(names: list[str]) -> None:
    pytest.importorskip("wandb")
    from gradtrack_wandb.backend import _wandb_keys

    keys = _wandb_keys(names)
    assert len({key.lower() for key in keys.values()}) == len(names)
    for key in keys.values():
        assert re.fullmatch(r"[/A-Za-z0-9_]+", key) and len(key) <= 200


_DTYPES = st.sampled_from([torch.float32, torch.float64, torch.bfloat16, torch.float16])
_SHAPES = st.lists(st.integers(1, 6), min_size=1, max_size=3).map(tuple)


@st.composite
def gradients(draw: st.DrawFn) -> list[torch.Tensor]:
    """A few tensors of random shapes and dtypes; some hold NaN or Inf, some are huge or tiny."""
    count = draw(st.integers(1, 6))
    grads = []
    for _ in range(count):
        shape = draw(_SHAPES)
        scale = draw(st.sampled_from([1e-6, 1.0, 1e3]))
        seed = draw(st.integers(0, 2**16))
        values = torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * scale
        poison = draw(st.sampled_from([None, None, None, math.nan, math.inf, -math.inf]))
        if poison is not None:
            values.view(-1)[draw(st.integers(0, values.numel() - 1))] = poison
        grads.append(values.to(draw(_DTYPES)))
    return grads


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(gradients(), st.sampled_from([1.0, 2.0, math.inf]))
def test_norms_match_torch_on_random_tensors(grads: list[torch.Tensor], norm_type: float) -> None:
    batch = measure(grads, norm_type)
    reference = torch.nn.utils.get_total_norm(grads, norm_type, foreach=True)
    assert torch.equal(batch.clip_norm, reference) or (reference.isnan() and batch.clip_norm.isnan())
    exact = [torch.linalg.vector_norm(g.double(), norm_type).item() for g in grads]
    by_index = dict(zip(batch.order, batch.layer_norms.double().tolist(), strict=True))
    for index, expected in enumerate(exact):
        got = by_index[index]
        if math.isfinite(expected):
            assert got == pytest.approx(expected, rel=1e-5, abs=1e-30)  # fp32 or wider, never 16-bit
        else:
            assert not math.isfinite(got) and math.isnan(got) == math.isnan(expected)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(gradients(), st.sampled_from([1.0, 2.0, math.inf]), st.sampled_from([1e-3, 1.0, 1e4]))
def test_norm_clipping_is_torchs_wherever_torch_is_finite(
    grads: list[torch.Tensor], norm_type: float, max_norm: float
) -> None:
    ours, theirs = [g.clone() for g in grads], [g.clone() for g in grads]
    params = [torch.nn.Parameter(torch.zeros_like(g)) for g in theirs]
    for param, grad in zip(params, theirs, strict=True):
        param.grad = grad
    reference = torch.nn.utils.clip_grad_norm_(params, max_norm, norm_type=norm_type, foreach=True)
    NormClip(max_norm).clip_(measure(ours, norm_type))
    if torch.isfinite(reference):
        for mine, expected in zip(ours, (p.grad for p in params), strict=True):
            assert torch.equal(mine, expected)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(gradients(), st.sampled_from([1e-3, 0.5, 10.0]))
def test_value_clipping_is_torchs(grads: list[torch.Tensor], clip_value: float) -> None:
    ours, theirs = [g.clone() for g in grads], [g.clone() for g in grads]
    params = [torch.nn.Parameter(torch.zeros_like(g)) for g in theirs]
    for param, grad in zip(params, theirs, strict=True):
        param.grad = grad
    torch.nn.utils.clip_grad_value_(params, clip_value, foreach=True)
    ValueClip(clip_value).clip_(measure(ours, 2.0))
    for mine, expected in zip(ours, (p.grad for p in params), strict=True):
        torch.testing.assert_close(mine, expected, rtol=0, atol=0, equal_nan=True)

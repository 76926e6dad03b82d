"""The fused pass agrees with PyTorch's own reference functions."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from gradtrack.measure.stats import measure, transfer


def _grads(mixed: bool) -> list[torch.Tensor]:
    torch.manual_seed(0)
    grads = [torch.randn(7, 3), torch.randn(5), torch.randn(2, 2, 2) * 10]
    if mixed:
        grads += [torch.randn(4, dtype=torch.float64), torch.randn(6).to(torch.bfloat16), torch.randn(3)]
    return grads


@pytest.mark.parametrize("norm_type", [1.0, 2.0, math.inf])
@pytest.mark.parametrize("mixed", [False, True])
def test_total_and_layer_norms_match_torch(norm_type: float, mixed: bool) -> None:
    grads = _grads(mixed)
    batch = measure(grads, norm_type)
    reference_total = torch.nn.utils.get_total_norm(grads, norm_type, foreach=True)
    assert torch.equal(batch.clip_norm, reference_total)  # torch's own arithmetic, for clipping
    if not mixed:
        assert batch.total_norm is batch.clip_norm
    host = transfer(batch, None)
    for position, index in enumerate(batch.order):
        expected = torch.linalg.vector_norm(grads[index].double(), norm_type).item()
        assert host.layer_norms[position] == pytest.approx(expected, rel=1e-6)  # bf16 reduced in fp32
    exact = torch.linalg.vector_norm(
        torch.stack([torch.linalg.vector_norm(g.double(), norm_type) for g in grads]), norm_type
    )
    assert host.total_norm == pytest.approx(exact.item(), rel=1e-6)
    assert host.clip_coef == 1.0 and host.loss is None


def test_order_maps_back_to_the_callers_grads_when_groups_reorder() -> None:
    grads = [torch.full((2,), 1.0), torch.full((2,), 2.0, dtype=torch.float64), torch.full((2,), 3.0)]
    batch = measure(grads, 2.0, loss=torch.tensor(0.25))
    host = transfer(batch, None)
    by_index = {index: host.layer_norms[pos] for pos, index in enumerate(batch.order)}
    assert sorted(batch.order) == [0, 1, 2]
    assert by_index == pytest.approx({0: math.sqrt(2), 1: 2 * math.sqrt(2), 2: 3 * math.sqrt(2)})
    assert host.loss == 0.25


def test_nonfinite_gradients_show_as_nonfinite_layer_norms() -> None:
    grads = [torch.tensor([1.0, float("nan")]), torch.tensor([float("inf"), 0.0]), torch.ones(3)]
    host = transfer(measure(grads, 2.0), None)
    assert math.isnan(host.layer_norms[0]) and math.isinf(host.layer_norms[1])
    assert host.layer_norms[2] == pytest.approx(math.sqrt(3))
    assert not math.isfinite(host.total_norm)


def test_parameters_without_grads_are_not_measured() -> None:
    model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 1))
    model[0].weight.requires_grad_(False)
    model(torch.randn(4, 3)).sum().backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert len(grads) == 3
    batch = measure(grads, 2.0)
    assert batch.layer_norms.numel() == 3
    assert torch.equal(batch.total_norm, torch.nn.utils.get_total_norm(grads, 2.0, foreach=True))

"""Any float dtype, alone or mixed in one model, against torch's own clipping functions (issue 8)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from gradtrack import GradTracker
from gradtrack_testing.recording import RecordingBackend

_DTYPES = {
    "fp32": [torch.float32] * 3,
    "bf16": [torch.bfloat16] * 3,
    "fp16": [torch.float16] * 3,
    "fp64": [torch.float64] * 3,
    "mixed": [torch.bfloat16, torch.float32, torch.float16, torch.float64],
}


class Layered(nn.Module):
    """Linear layers, each in its own dtype; activations are cast at each layer's door."""

    def __init__(self, dtypes: list[torch.dtype], width: int = 12, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.layers = nn.ModuleList(nn.Linear(width, width).to(dtype) for dtype in dtypes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = torch.tanh(layer(x.to(layer.weight.dtype)))
        return x.float()


def _backward(model: nn.Module, scale: float) -> None:
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(16, 12, generator=generator)
    (model(x).square().mean() * scale).backward()


def _exact_total(model: nn.Module, norm_type: float) -> float:
    norms = [torch.linalg.vector_norm(p.grad.double(), norm_type) for p in model.parameters()]
    return torch.linalg.vector_norm(torch.stack(norms), norm_type).item()


@pytest.mark.parametrize("clip", [None, "norm", "value"])
@pytest.mark.parametrize("norm_type", [2.0, math.inf])
@pytest.mark.parametrize("dtypes", _DTYPES.values(), ids=_DTYPES.keys())
def test_every_dtype_is_measured_in_fp32_and_clipped_bitwise_like_torch(
    dtypes: list[torch.dtype], norm_type: float, clip: str | None, recorder: RecordingBackend
) -> None:
    ours = Layered(dtypes)
    theirs = copy.deepcopy(ours)
    for model in (ours, theirs):
        _backward(model, scale=50.0)
    exact = _exact_total(ours, norm_type)
    options: dict[str, object] = {"clip": clip, "norm_type": norm_type, "layer_every": 1}
    if clip == "value":
        options["clip_value"] = 0.01
    with GradTracker(ours, backend=recorder, **options) as tracker:  # type: ignore[arg-type]
        tracker.step()
    if clip == "norm":
        torch.nn.utils.clip_grad_norm_(theirs.parameters(), 1.0, norm_type=norm_type, foreach=True)
    elif clip == "value":
        torch.nn.utils.clip_grad_value_(theirs.parameters(), 0.01, foreach=True)
    for mine, reference in zip(ours.parameters(), theirs.parameters(), strict=True):
        assert mine.grad is not None and reference.grad is not None
        assert mine.grad.dtype == reference.grad.dtype
        assert torch.equal(mine.grad, reference.grad)
    [stats] = recorder.of("step")
    assert stats.total_norm == pytest.approx(exact, rel=1e-5)  # fp32 accumulation, not the 16-bit result
    assert stats.clipped == (clip is not None)
    assert all(math.isfinite(v) for v in (stats.layer_norms or {}).values())


def test_fp16_norms_above_65504_are_reported_and_clipped_correctly(recorder: RecordingBackend) -> None:
    ours = Layered([torch.float16] * 3)
    theirs = copy.deepcopy(ours)
    for model in (ours, theirs):
        _backward(model, scale=6e5)
    assert all(torch.isfinite(p.grad).all() for p in ours.parameters())  # every element fits in fp16
    exact = _exact_total(ours, 2.0)
    assert exact > 65504
    reference = torch.nn.utils.clip_grad_norm_(theirs.parameters(), 1.0, foreach=True)
    assert math.isinf(reference.item())  # torch's own fp16 norm overflows and zeroes the gradients
    with GradTracker(ours, backend=recorder, layer_every=1) as tracker:
        tracker.step()
    [stats] = recorder.of("step")
    assert stats.total_norm == pytest.approx(exact, rel=1e-5)
    assert stats.nonfinite == 0 and not stats.skipped
    assert stats.clip_coef == pytest.approx(1.0 / exact, rel=1e-3)
    clipped = _exact_total(ours, 2.0)
    assert clipped == pytest.approx(1.0, rel=2e-3)  # the direction kept, the norm bounded, in fp16


def test_a_bf16_model_trains_with_adamw_and_reports(recorder: RecordingBackend) -> None:
    model = Layered([torch.bfloat16] * 3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    with GradTracker(model, backend=recorder) as tracker:
        for _ in range(5):
            optimizer.zero_grad()
            loss = model(torch.randn(8, 12)).square().mean()
            loss.backward()
            tracker.observe(loss)
            optimizer.step()
    steps = recorder.of("step")
    assert len(steps) == 5 and all(math.isfinite(s.total_norm) and s.loss is not None for s in steps)

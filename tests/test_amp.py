"""AMP with GradScaler on the CPU: optimizers that unscale first and fused ones that take the scale (issue 8)."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable

import pytest
import torch
from torch import nn

from gradtrack import GradTracker
from gradtrack.policies.clipping import AdaptiveClip
from gradtrack_testing.models import mlp, regression_batches
from gradtrack_testing.recording import RecordingBackend

Factory = Callable[[list[nn.Parameter]], torch.optim.Optimizer]

_OPTIMIZERS: dict[str, Factory] = {
    "sgd": lambda params: torch.optim.SGD(params, lr=0.05),
    "adam-foreach": lambda params: torch.optim.Adam(params, lr=1e-2, foreach=True),
    "adam-fused": lambda params: torch.optim.Adam(params, lr=1e-2, fused=True),
    "adamw-fused": lambda params: torch.optim.AdamW(params, lr=1e-2, fused=True),
}
_FUSED = {"adam-fused", "adamw-fused"}
_OVERFLOW_STEPS = {2, 5, 6, 7, 8}  # four in a row: never divergence


def _loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return nn.functional.mse_loss(model(x).squeeze(-1), y) * 20  # large enough to be clipped at 1.0


def _poison(model: nn.Module) -> None:
    """An overflow as the scaler sees one: an inf in the scaled gradients."""
    weight = next(model.parameters())
    assert weight.grad is not None
    weight.grad[0, 0] = math.inf


def _reference(model: nn.Module, factory: Factory, steps: int) -> tuple[list[float], nn.Module]:
    """PyTorch's recipe: unscale_, clip_grad_norm_, step, update; the norms it returns."""
    optimizer = factory(list(model.parameters()))
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=3)
    norms = []
    for step, (x, y) in enumerate(regression_batches(steps, seed=4)):
        optimizer.zero_grad()
        scaler.scale(_loss(model, x, y)).backward()
        if step in _OVERFLOW_STEPS:
            _poison(model)
        scaler.unscale_(optimizer)
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0, foreach=True)
        if step not in _OVERFLOW_STEPS:
            norms.append(norm.item())
        scaler.step(optimizer)
        scaler.update()
    return norms, model


@pytest.mark.parametrize("name", _OPTIMIZERS)
def test_scaled_gradients_are_reported_unscaled_and_clipped_true(name: str, recorder: RecordingBackend) -> None:
    steps = 12
    model = mlp(seed=3)
    expected_norms, reference = _reference(copy.deepcopy(model), _OPTIMIZERS[name], steps)
    optimizer = _OPTIMIZERS[name](list(model.parameters()))
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=3)
    with GradTracker(model, backend=recorder, scaler=scaler, clip="norm", max_norm=1.0) as tracker:
        for step, (x, y) in enumerate(regression_batches(steps, seed=4)):
            optimizer.zero_grad()
            loss = _loss(model, x, y)
            scaler.scale(loss).backward()
            tracker.observe(loss * 1000 if step in _OVERFLOW_STEPS else loss)
            if step in _OVERFLOW_STEPS:
                _poison(model)
            scaler.step(optimizer)
            scaler.update()
    records = recorder.of("step")
    assert [r.step for r in records] == list(range(steps))
    overflowed = [r.step for r in records if r.amp_overflow]
    assert overflowed == sorted(_OVERFLOW_STEPS)
    measured = [r for r in records if not r.amp_overflow]
    assert [r.total_norm for r in measured] == pytest.approx(expected_norms, rel=1e-5)
    assert all(r.clipped for r in measured)  # the true norm, not the scaled one, was compared with 1.0
    assert all(r.loss is not None and r.loss < 1000 for r in measured)  # a skipped step's loss never leaks
    summary = tracker.summary()
    assert summary.amp_overflow_steps == len(_OVERFLOW_STEPS) and summary.steps == steps
    assert summary.explosions == 0 and summary.nonfinite_steps == 0 and summary.skipped_steps == 0
    assert not tracker.diverged and not recorder.of("explosion") and not recorder.of("divergence")
    assert records[2].metrics() == {
        "grad/amp_overflow": 1.0,
        "grad/clipped": 0.0,
        "grad/explosion": 0.0,
        "grad/nonfinite": 0.0,
        "grad/diverged": 0.0,
    }
    assert records[0].metrics()["grad/amp_overflow"] == 0.0
    tolerance = {} if name not in _FUSED else {"rtol": 1e-5, "atol": 1e-7}  # unscaled inside the fused kernel
    for mine, theirs in zip(model.parameters(), reference.parameters(), strict=True):
        if tolerance:
            torch.testing.assert_close(mine, theirs, **tolerance)
        else:
            assert torch.equal(mine, theirs)


@pytest.mark.parametrize("name", ["sgd", "adam-fused"])
def test_overflow_steps_never_enter_an_adaptive_history(name: str) -> None:
    model = mlp(seed=3)
    optimizer = _OPTIMIZERS[name](list(model.parameters()))
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    policy = AdaptiveClip(max_norm=1.0, warmup=2)
    with GradTracker(model, scaler=scaler, clip=policy):
        for step, (x, y) in enumerate(regression_batches(10, seed=4)):
            optimizer.zero_grad()
            scaler.scale(_loss(model, x, y)).backward()
            if step in _OVERFLOW_STEPS:
                _poison(model)
            scaler.step(optimizer)
            scaler.update()
    assert len(policy._history) == 10 - len(_OVERFLOW_STEPS)  # private: the history under test
    assert all(math.isfinite(norm) for norm in policy._history)


def test_fused_overflow_is_seen_without_passing_the_scaler(recorder: RecordingBackend) -> None:
    model = mlp(seed=3)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2, fused=True)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    with GradTracker(model, backend=recorder) as tracker:
        for step, (x, y) in enumerate(regression_batches(4, seed=4)):
            optimizer.zero_grad()
            scaler.scale(_loss(model, x, y)).backward()
            if step == 1:
                _poison(model)
            scaler.step(optimizer)
            scaler.update()
    assert [r.amp_overflow for r in recorder.of("step")] == [False, True, False, False]
    assert tracker.summary().amp_overflow_steps == 1


def test_scaler_update_is_restored_on_exit_and_validated() -> None:
    model = mlp()
    scaler = torch.amp.GradScaler("cpu")
    with GradTracker(model, scaler=scaler):
        assert "update" in vars(scaler)
    assert "update" not in vars(scaler)
    with pytest.raises(TypeError, match="scaler must be a torch.amp.GradScaler or None, got str"):
        GradTracker(model, scaler="amp")  # type: ignore[arg-type]

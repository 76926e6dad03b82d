"""Resuming a run from a checkpoint: ``tracker.state_dict()`` and ``load_state_dict()``.

Every detector's and policy's state after a resume equals an uninterrupted run's when the same batches are
replayed; the state is plain values and tensors (``torch.load(weights_only=True)``); bad states are refused
with an error that names the problem, and leave the tracker as it was.
"""

from __future__ import annotations

import copy
import io
import math
from typing import Any

import pytest
import torch
from torch import nn

from gradtrack import GradTracker, StateError
from gradtrack_testing.models import VanillaRNN

STEPS, CUT = 120, 70


def _batches(steps: int = STEPS, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for step in range(steps):
        x = torch.randn(8, 12, 4, generator=generator)
        scale = 40.0 if step in (30, 31, 32, 90) else 1.0  # spikes, before and after the cut
        batches.append((x * scale, torch.randn(8, generator=generator)))
    return batches


def _model() -> nn.Module:
    return VanillaRNN(radius=1.3, seed=1)


def _train(tracker: GradTracker, model: nn.Module, optimizer: torch.optim.Optimizer, batches: list[Any]) -> None:
    for x, y in batches:
        optimizer.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        tracker.observe(loss)
        loss.backward()
        optimizer.step()


def _comparable(state: dict[str, Any]) -> dict[str, Any]:
    """The state without wall-clock times (the verdict's timestamp) and the summary's float sum of the
    norms, whose chunked folds land at other places once a run restarts."""
    state = copy.deepcopy(state)
    state.pop("backends")
    verdict = state["judge"]["divergence"]["verdict"]
    if verdict is not None:
        verdict.pop("timestamp")
    summary = state.pop("summary")
    for key in ("all_norms", "healthy_norms", "overshoot"):
        summary[key].pop("total")
    summary.pop("resumed_from")
    if summary["divergence"] is not None:
        summary["divergence"].pop("timestamp")
    state["summary"] = summary
    return state


def _differences(left: Any, right: Any, where: str = "state") -> list[str]:
    """Where two states differ: tensors compared exactly, NaN equal to NaN."""
    if isinstance(left, dict):
        if not isinstance(right, dict) or left.keys() != right.keys():
            return [where]
        return [found for key in left for found in _differences(left[key], right[key], f"{where}[{key!r}]")]
    if isinstance(left, list | tuple):
        if not isinstance(right, list | tuple) or len(left) != len(right):
            return [f"{where} (length)"]
        pairs = enumerate(zip(left, right, strict=True))
        return [found for i, (a, b) in pairs for found in _differences(a, b, f"{where}[{i}]")]
    if isinstance(left, torch.Tensor):
        return [] if isinstance(right, torch.Tensor) and torch.equal(left, right) else [where]
    if isinstance(left, float) and isinstance(right, float) and math.isnan(left):
        return [] if math.isnan(right) else [where]
    return [] if left == right else [f"{where}: {left!r} != {right!r}"]


OPTIONS = {
    "auto": {"clip": "auto", "on_spike": "skip"},
    "zscore": {"clip": "zscore"},
    "adaptive": {"clip": "adaptive", "max_norm": 5.0},
    "adagc": {"clip": "adagc", "max_norm": 5.0},
}


@pytest.mark.parametrize("policy", list(OPTIONS))
def test_a_resumed_run_replaying_the_same_batches_ends_in_the_state_of_an_uninterrupted_one(policy: str) -> None:
    options = {**OPTIONS[policy], "layer_every": 5}
    batches = _batches()

    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    with GradTracker(model, **options) as whole:
        _train(whole, model, optimizer, batches)
    reference = whole.state_dict()

    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    with GradTracker(model, **options) as first:
        _train(first, model, optimizer, batches[:CUT])
        buffer = io.BytesIO()
        torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "gradtrack": first.state_dict()},
                   buffer)  # fmt: skip
        _train(first, model, optimizer, batches[CUT : CUT + 7])  # trained past the checkpoint, then lost

    buffer.seek(0)
    checkpoint = torch.load(buffer)  # weights_only=True, torch's default
    model = _model()
    model.load_state_dict(checkpoint["model"])
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    optimizer.load_state_dict(checkpoint["optimizer"])
    second = GradTracker(model, **options)
    second.load_state_dict(checkpoint["gradtrack"])
    with second:
        _train(second, model, optimizer, batches[CUT:])
    resumed = second.state_dict()

    assert resumed["step"] == reference["step"] == STEPS
    assert _differences(_comparable(resumed), _comparable(reference)) == []
    summary, expected = second.summary(), whole.summary()
    assert summary.resumed_from == (CUT,)
    assert (summary.steps, summary.clipped_steps, summary.skipped_steps, summary.explosions) == (
        expected.steps, expected.clipped_steps, expected.skipped_steps, expected.explosions
    )  # fmt: skip
    assert summary.top_offenders == expected.top_offenders
    assert summary.norm_median == expected.norm_median and summary.recommended_max_norm == expected.recommended_max_norm


# -- bad input: a clear error, and the tracker as it was -------------------------------------------------


def _saved(steps: int = 20, **options: Any) -> dict[str, Any]:
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    with GradTracker(model, **options) as tracker:
        _train(tracker, model, optimizer, _batches(steps))
    return tracker.state_dict()


def test_a_state_from_another_model_is_refused_naming_both() -> None:
    state = _saved()
    other = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 1))
    with pytest.raises(StateError, match=r"another model \(5 parameters, the first 'W_x.weight'\); this Sequential "
                                         r"has 4 parameters, the first '0.weight'"):  # fmt: skip
        GradTracker(other).load_state_dict(state)
    renamed = copy.deepcopy(state)
    renamed["model"]["first"] = "encoder.weight"
    with pytest.raises(StateError, match="another model"):
        GradTracker(_model()).load_state_dict(renamed)


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda s: s.update(version=99), "format version 99, which gradtrack .* does not read"),
        (lambda s: s.update(format="something"), "not a gradtrack state"),
        (lambda s: s["judge"]["explosions"].update(history="x"), "damaged.*'history' must be a list of numbers"),
        (lambda s: s["judge"].pop("divergence"), "damaged.*'divergence' must be a dict"),
        (lambda s: s["summary"]["all_norms"].update(bins=[10**9]), "damaged.*'bins' and 'counts'"),
        (lambda s: s.update(step="12"), "damaged.*'step' must be an integer"),
        (lambda s: s["clip"]["state"].update(mean=object()), "damaged.*not a plain value"),
    ],
    ids=["version", "format", "window", "missing", "histogram", "step", "object"],
)
def test_a_damaged_or_unknown_state_is_refused_and_changes_nothing(damage: Any, message: str) -> None:
    state = _saved(clip="zscore")
    damage(state)
    tracker = GradTracker(_model(), clip="zscore")
    before = tracker.state_dict()
    with pytest.raises(StateError, match=message):
        tracker.load_state_dict(state)
    assert tracker.steps == 0 and not tracker.diverged
    assert _differences(tracker.state_dict(), before) == []


def test_load_state_dict_takes_a_dict_and_comes_before_entering() -> None:
    model = _model()
    with pytest.raises(TypeError, match="must be the dict tracker.state_dict\\(\\) returned, got list"):
        GradTracker(model).load_state_dict([])  # type: ignore[arg-type]
    state = _saved()
    with GradTracker(model) as tracker, pytest.raises(RuntimeError, match="before entering"):
        tracker.load_state_dict(state)


def test_a_changed_clip_policy_starts_afresh_with_a_warning() -> None:
    state = _saved(clip="zscore")
    tracker = GradTracker(_model(), clip="adaptive")
    with pytest.warns(RuntimeWarning, match=r"the clip policy changed \('zscore' then, 'adaptive' now\)"):
        tracker.load_state_dict(state)
    assert tracker.steps == 20  # everything else goes on


def test_the_state_is_plain_values_and_tensors_that_torch_load_reads_back(tmp_path: Any) -> None:
    state = _saved(clip="adagc", max_norm=5.0)
    torch.save({"gradtrack": state}, tmp_path / "checkpoint.pt")
    loaded = torch.load(tmp_path / "checkpoint.pt", weights_only=True)["gradtrack"]
    assert _differences(loaded, state) == []
    assert isinstance(state["clip"]["state"]["gamma"], torch.Tensor)
    assert isinstance(state["layers"]["ema"], torch.Tensor)


def test_the_reporters_summary_of_a_resumed_run_starts_from_the_saved_one() -> None:
    from gradtrack.events import RunStart
    from gradtrack.handover.messages import RunStarted
    from gradtrack.handover.summary import RunSummary

    state = _saved(40)
    start = RunStart(config={}, layer_names=(), num_parameters=0, model_class="m", timestamp=0.0)
    reporter = RunSummary()
    reporter.add(RunStarted(start=start, summary=state["summary"]))  # what the reporter process does
    trainer = RunSummary()
    trainer.load_state_dict(state["summary"])
    assert reporter.freeze() == trainer.freeze() and reporter.freeze().steps == 40

"""gradtrack.step.silence: a tracker that sees training but measures nothing warns, and the run says why (issue 24)."""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
from torch import nn

from gradtrack import GradTracker
from gradtrack.delivery.notes import summary_note
from gradtrack.step.silence import FOREIGN_PATIENCE, PATIENCE
from gradtrack_testing.models import mlp, regression_batches
from gradtrack_testing.recording import RecordingBackend


def _loop(model: nn.Module, optimizer: torch.optim.Optimizer, steps: int, backward: bool = True) -> None:
    for x, y in regression_batches(steps):
        optimizer.zero_grad()
        loss = nn.functional.mse_loss(model(x).squeeze(-1), y)
        if backward:
            loss.backward()
        optimizer.step()


def _run(train: Callable[[GradTracker], None]) -> tuple[list[str], RecordingBackend, GradTracker]:
    recorder = RecordingBackend()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with GradTracker(mlp(seed=0), backend=recorder) as tracker:
            train(tracker)
    said = [str(w.message) for w in caught if issubclass(w.category, UserWarning) and "gradtrack" in str(w.message)]
    return said, recorder, tracker


def test_an_optimizer_over_other_tensors_is_named_within_the_first_steps() -> None:
    other = mlp(seed=1)  # the optimizer steps another module's parameters (or an engine's flat copies)
    optimizer = torch.optim.SGD(other.parameters(), lr=0.01)
    early: list[str] = []

    def train(tracker: GradTracker) -> None:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            _loop(other, optimizer, FOREIGN_PATIENCE)
        early.extend(str(w.message) for w in caught if "gradtrack" in str(w.message))
        _loop(other, optimizer, 5)

    said, recorder, tracker = _run(train)
    assert len(early) == 1 and said == []  # warned within the first FOREIGN_PATIENCE steps, and only then
    assert f"{FOREIGN_PATIENCE} optimizer step(s) of SGD updated tensors that are not parameters" in early[0]
    assert "DeepSpeed engine" in early[0] and "GradTracker(engine)" in early[0]
    summary = tracker.summary()
    assert summary.steps == 0 and summary.unmeasured is not None
    assert "15 optimizer step(s) of SGD" in summary.unmeasured  # the count at the end
    ended = recorder.of("run_end")[0].summary
    assert ended.unmeasured == summary.unmeasured  # what the backends store and show
    assert summary_note(ended, "finished").startswith("### gradtrack: nothing measured")


def test_steps_that_find_no_gradient_warn_after_a_few() -> None:
    def train(tracker: GradTracker) -> None:
        _loop(tracker.model, torch.optim.SGD(tracker.model.parameters(), lr=0.01), PATIENCE + 2, backward=False)

    said, _, tracker = _run(train)
    assert len(said) == 1 and f"{PATIENCE} optimizer step(s) over the parameters of Sequential found no gradient" in (
        said[0]
    )
    assert "5 optimizer step(s)" in (tracker.summary().unmeasured or "")


def test_a_tracker_left_without_a_step_says_so_at_exit() -> None:
    said, recorder, _ = _run(lambda tracker: None)
    assert len(said) == 1 and "gradtrack measured nothing: the tracker saw no optimizer step of Sequential" in said[0]
    assert "nothing measured" in summary_note(recorder.of("run_end")[0].summary, "finished")


def test_a_measured_run_says_nothing_of_the_kind() -> None:
    other = mlp(seed=1)  # a second optimizer over another model beside the tracked one (a GAN): no warning
    other_optimizer = torch.optim.SGD(other.parameters(), lr=0.01)

    def train(tracker: GradTracker) -> None:
        optimizer = torch.optim.SGD(tracker.model.parameters(), lr=0.01)
        for _ in range(3):
            _loop(other, other_optimizer, 5)  # a critic's five steps per generator step
            _loop(tracker.model, optimizer, 1)

    said, _, tracker = _run(train)
    assert said == [] and tracker.summary().unmeasured is None and tracker.summary().steps == 3


def test_by_hand_steps_without_gradients_count_too() -> None:
    def train(tracker: GradTracker) -> None:
        for _ in range(PATIENCE):
            tracker.step()

    said, _, _ = _run(train)
    assert len(said) == 1 and "found no gradient" in said[0]

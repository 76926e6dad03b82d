"""Backends run off the training thread; a slow one is decimated by rule, never silently."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from gradtrack import GradTracker, hookimpl
from gradtrack.delivery.dispatch import Dispatcher
from gradtrack.events import StepStats
from gradtrack.handover.messages import StepRecord
from gradtrack_testing.models import mlp
from gradtrack_testing.recording import RecordingBackend


class Gate(RecordingBackend):
    """A backend stuck until the test opens the gate, like a tracker that stopped answering."""

    def __init__(self) -> None:
        super().__init__()
        self.open = threading.Event()

    @hookimpl
    def gradtrack_step(self, stats: StepStats) -> None:
        self.open.wait(30)
        self._record("step", stats)


def test_a_stuck_backend_neither_blocks_training_nor_its_sibling(recorder: RecordingBackend) -> None:
    gate = Gate()
    model = mlp()
    with (
        pytest.warns(RuntimeWarning, match="'Gate' is falling behind; keeping one routine step record in 10"),
        GradTracker(model, backend=[gate, recorder], max_pending=20, explosion_threshold=1e9) as tracker,
    ):
        for step in range(200):
            model(torch.randn(4, 8)).sum().backward()
            if step == 150:
                model[0].weight.grad.mul_(1e12)  # type: ignore[index, union-attr]  # one flagged step
            tracker.step()
        assert tracker.flush(timeout=0.5) is False  # the gate is still shut
        deadline = time.monotonic() + 10
        while len(recorder.of("step")) < 200 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(recorder.of("step")) == 200  # the healthy sibling is not held up by the stuck one
        gate.open.set()
    kept = [s.step for s in gate.of("step")]
    assert 150 in kept  # flagged steps are never dropped
    dropped = [s for s in range(200) if s not in kept]
    assert dropped and all(s % 10 for s in dropped)  # only routine steps off the 1-in-10 grid
    assert tracker.summary().dropped_records == len(dropped)
    assert gate.of("run_end") and gate.of("explosion")


def test_close_returns_within_its_timeout_when_a_backend_hangs() -> None:
    gate = Gate()
    dispatcher = Dispatcher([("gate", gate)])
    dispatcher.send([StepRecord(step=0, timestamp=0.0, total_norm=1.0)])
    started = time.monotonic()
    assert dispatcher.close(timeout=0.3) == ["gate"]
    assert time.monotonic() - started < 5
    gate.open.set()


def test_exit_warns_about_a_backend_that_outlives_close_timeout() -> None:
    gate = Gate()
    model = mlp()
    with (
        pytest.warns(RuntimeWarning, match=r"\['Gate'\] did not finish within close_timeout=0.2s"),
        GradTracker(model, backend=gate, close_timeout=0.2) as tracker,
    ):
        model(torch.randn(4, 8)).sum().backward()
        tracker.step()
    gate.open.set()


def test_the_backlog_is_bounded_even_when_every_step_explodes() -> None:
    gate = Gate()
    model = mlp()
    with (
        pytest.warns(RuntimeWarning, match="falling behind"),
        GradTracker(model, backend=gate, clip=None, max_pending=5, explosion_threshold=1e-9) as tracker,
    ):
        for _ in range(200):
            model(torch.randn(4, 8)).sum().backward()
            tracker.step()
        backlog = len(tracker._pipeline.outbox.local._workers[0]._pending)  # private: the bound under test
        assert backlog <= 5 * 10 + 1
        model[0].weight.grad.fill_(float("nan"))  # type: ignore[index, union-attr]
        for _ in range(3):
            tracker.step()  # diverges: its record is kept past the hard bound
        gate.open.set()
    assert len(gate.of("divergence")) == 1 and gate.of("run_end")
    assert tracker.summary().dropped_records > 0

"""``RecordingBackend``: a real gradtrack plugin, registered through pluggy, that keeps every hook call.

Why it exists: contract tests check what each hook received and in which order, in the training process
(pass it as ``backend=``) and inside ``torch.distributed`` ranks, without mocks; the tests and the
distributed workers share this one.
"""

from __future__ import annotations

import threading
from typing import Any

from gradtrack import hookimpl
from gradtrack.events import Divergence, Explosion, Instability, LayersAdded, Rollback, RunEnd, RunStart, StepStats

__all__ = ["CONTRACT_METRICS", "RecordingBackend", "check_resumed_run"]

# The per-step metrics every backend logs under these names (PRODUCT.md's contract; "loss" when observed).
CONTRACT_METRICS = (
    "grad/total_norm",
    "grad/clip_coef",
    "grad/clipped",
    "grad/explosion",
    "grad/nonfinite",
    "grad/diverged",
    "grad/layer_p50",
    "grad/layer_p95",
    "grad/layer_max",
)


class RecordingBackend:
    """A real gradtrack plugin that keeps every hook call, in order, for contract tests."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []
        self.threads: set[str] = set()

    def _record(self, hook: str, value: Any) -> None:
        self.threads.add(threading.current_thread().name)
        self.calls.append((hook, value))

    @hookimpl
    def gradtrack_run_start(self, start: RunStart) -> None:
        self._record("run_start", start)

    @hookimpl
    def gradtrack_step(self, stats: StepStats) -> None:
        self._record("step", stats)

    @hookimpl
    def gradtrack_layers_added(self, layers: LayersAdded) -> None:
        self._record("layers_added", layers)

    @hookimpl
    def gradtrack_explosion(self, event: Explosion) -> None:
        self._record("explosion", event)

    @hookimpl
    def gradtrack_divergence(self, event: Divergence) -> None:
        self._record("divergence", event)

    @hookimpl
    def gradtrack_rollback(self, event: Rollback) -> None:
        self._record("rollback", event)

    @hookimpl
    def gradtrack_instability(self, event: Instability) -> None:
        self._record("instability", event)

    @hookimpl
    def gradtrack_run_end(self, end: RunEnd) -> None:
        self._record("run_end", end)

    @hookimpl
    def gradtrack_flush(self, timeout: float) -> None:
        self._record("flush", timeout)

    def of(self, hook: str) -> list[Any]:
        return [value for name, value in self.calls if name == hook]


def check_resumed_run(first: RecordingBackend, second: RecordingBackend, uninterrupted: RecordingBackend,
                      summary: Any, steps: int, rel: float) -> None:  # fmt: skip
    """A run of ``steps`` steps resumed for as many again (``first`` then ``second``) is the uninterrupted one:
    the resumed start says where, the step axis goes on, the norms are the same, the summary covers both."""
    import pytest  # only the tests call this; the distributed workers import this module too

    (start,) = second.of("run_start")
    assert start.resumed is not None and start.resumed.step == steps
    resumed = second.of("step")
    assert [s.step for s in resumed] == list(range(steps, 2 * steps))
    whole = uninterrupted.of("step")
    assert [s.total_norm for s in first.of("step") + resumed] == pytest.approx([s.total_norm for s in whole], rel=rel)
    assert summary.steps == 2 * steps and summary.resumed_from == (steps,)  # the counts cover both
    assert summary.clipped_steps == uninterrupted.of("run_end")[0].summary.clipped_steps

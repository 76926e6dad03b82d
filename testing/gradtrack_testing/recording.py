"""``RecordingBackend``: a real gradtrack plugin, registered through pluggy, that keeps every hook call.

Why it exists: contract tests check what each hook received and in which order, in the training process
(pass it as ``backend=``) and inside ``torch.distributed`` ranks, without mocks; the tests and the
distributed workers share this one.
"""

from __future__ import annotations

import threading
from typing import Any

from gradtrack import hookimpl
from gradtrack.events import Divergence, Explosion, LayersAdded, Rollback, RunEnd, RunStart, StepStats

__all__ = ["RecordingBackend"]


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
    def gradtrack_run_end(self, end: RunEnd) -> None:
        self._record("run_end", end)

    @hookimpl
    def gradtrack_flush(self, timeout: float) -> None:
        self._record("flush", timeout)

    def of(self, hook: str) -> list[Any]:
        return [value for name, value in self.calls if name == hook]

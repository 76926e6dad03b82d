"""Delivering records to backends, one worker thread per backend.

The reporter process runs the backends named by string here; backends passed as objects run here
too, in the training process. Each backend gets its own worker thread, queue and plugin manager, so
a slow or broken tracker delays nobody else, and the caller only ever appends to a deque. A step
arrives as a compact ``StepRecord``; the worker turns it into the ``StepStats`` its hook receives.

Back-pressure rule: when a backend has ``max_pending`` records waiting, a routine step record
(one not flagged by an explosion, non-finite gradients, a skip or divergence) is kept only if its
step is a multiple of ``decimate``; the others are dropped and counted. Run, explosion and
divergence records and flagged steps are kept, up to a hard bound of ten times ``max_pending``
waiting records; past it (a backend stuck while every step explodes) only run start, run end and
divergence are kept, so memory stays bounded. Drops are reported once as a warning and in the
summary's ``dropped_records``.
"""

from __future__ import annotations

import logging
import threading
import time
import warnings
from collections import deque
from collections.abc import Sequence
from typing import Any, final

import pluggy

from gradtrack.plugins import new_plugin_manager
from gradtrack.records import StepRecord, step_stats
from gradtrack.secrets import redact
from gradtrack.validate import join_timeout

__all__ = ["Dispatcher"]

log = logging.getLogger(__name__)

_STOP = object()
_ALWAYS_KEPT = frozenset({"gradtrack_run_start", "gradtrack_run_end", "gradtrack_divergence", "gradtrack_flush"})
_HARD_LIMIT = 10  # times max_pending: past it, flagged steps and explosion events are dropped too


@final
class _Step:
    """A step record waiting for its ``StepStats``, built once by whichever worker needs it first."""

    __slots__ = ("_stats", "names", "record")

    def __init__(self, record: StepRecord, names: Sequence[str] | None) -> None:
        self.record = record
        self.names = names
        self._stats: Any = None

    def stats(self) -> Any:
        if self._stats is None:
            self._stats = step_stats(self.record, self.names)
        return self._stats


def drops(hook: str, item: Any, backlog: int, max_pending: int, decimate: int) -> bool:
    """The back-pressure rule (module docstring), for a queue ``backlog`` records long."""
    if backlog < max_pending or hook in _ALWAYS_KEPT:
        return False
    if backlog >= max_pending * _HARD_LIMIT:  # memory stays bounded even if every step is flagged
        return True
    record = item.record if isinstance(item, _Step) else item if isinstance(item, StepRecord) else None
    return record is not None and not record.flagged and record.step % decimate != 0


@final
class _Worker:
    def __init__(self, name: str, backend: object, max_pending: int, decimate: int) -> None:
        self.name = name
        self.manager: pluggy.PluginManager = new_plugin_manager()
        self.manager.register(backend, name=name)
        self.manager.check_pending()
        self.max_pending = max_pending
        self.decimate = decimate
        self.dropped = 0
        self._pending: deque[Any] = deque()
        self._ready = threading.Condition()
        self._failed_hooks: set[str] = set()
        self._idle = True
        self.thread = threading.Thread(target=self._run, name=f"gradtrack-{name}", daemon=True)

    def put(self, hook: str, kwargs: Any) -> None:
        with self._ready:
            if drops(hook, kwargs, len(self._pending), self.max_pending, self.decimate):
                if not self.dropped:
                    warnings.warn(
                        f"gradtrack backend {self.name!r} is falling behind; keeping one routine step "
                        f"record in {self.decimate} until it catches up",
                        RuntimeWarning,
                        stacklevel=4,
                    )
                self.dropped += 1
                return
            self._pending.append((hook, kwargs))
            self._ready.notify()

    def stop(self) -> None:
        with self._ready:
            self._pending.append(_STOP)
            self._ready.notify()

    def wait_idle(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._ready:
                if not self._pending and self._idle:
                    return True
            time.sleep(0.005)
        return False

    def _run(self) -> None:
        while True:
            with self._ready:
                while not self._pending:
                    self._idle = True
                    self._ready.wait()
                item = self._pending.popleft()
                self._idle = False
            if item is _STOP:
                return
            hook, kwargs = item
            try:
                if isinstance(kwargs, _Step):
                    kwargs = {"stats": kwargs.stats()}
                getattr(self.manager.hook, hook)(**kwargs)
            except Exception as exc:  # a backend must never break training or its siblings
                if hook not in self._failed_hooks:
                    self._failed_hooks.add(hook)
                    warnings.warn(
                        f"gradtrack backend {self.name!r} failed in {hook}: {redact(repr(exc))}; carrying on",
                        RuntimeWarning,
                        stacklevel=2,
                    )
                log.debug("backend %s failed in %s: %s", self.name, hook, redact(repr(exc)))


@final
class Dispatcher:
    """Fans each hook call out to every backend's worker without waiting for any of them."""

    def __init__(
        self, backends: Sequence[tuple[str, object]], max_pending: int = 1000, decimate: int = 10
    ) -> None:
        self._workers = [_Worker(name, backend, max_pending, decimate) for name, backend in backends]
        for worker in self._workers:  # only once every backend passed validation
            worker.thread.start()

    @property
    def dropped(self) -> int:
        return sum(worker.dropped for worker in self._workers)

    @property
    def names(self) -> list[str]:
        return [worker.name for worker in self._workers]

    def emit(self, hook: str, **kwargs: Any) -> None:
        for worker in self._workers:
            worker.put(hook, kwargs)

    def emit_step(self, record: StepRecord, names: Sequence[str] | None) -> None:
        """A reported step; ``names`` are the layer names in the order of ``record.layer_norms``."""
        if self._workers:
            step = _Step(record, names)
            for worker in self._workers:
                worker.put("gradtrack_step", step)

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until every backend has handled, and sent, what was emitted so far."""
        self.emit("gradtrack_flush", timeout=timeout)
        deadline = time.monotonic() + timeout
        return all(w.wait_idle(max(0.0, deadline - time.monotonic())) for w in self._workers)

    def close(self, timeout: float) -> list[str]:
        """Stop every worker after its queue drains; return the names still busy at the deadline."""
        for worker in self._workers:
            worker.stop()
        deadline = time.monotonic() + timeout
        late = []
        for worker in self._workers:
            worker.thread.join(join_timeout(deadline - time.monotonic()))
            if worker.thread.is_alive():
                late.append(worker.name)
        return late

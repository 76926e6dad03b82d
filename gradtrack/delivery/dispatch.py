"""Delivering the hand-over's messages to backends, one worker thread per backend.

The reporter process runs the backends named by string here; backends passed as objects run here
too, in the training process. Each backend gets its own worker thread, queue and plugin manager, so
a slow or broken tracker delays nobody else, and the caller only ever appends to a deque.

Steps travel in groups: the caller hands over every step record it has (the reporter: everything a read
of the pipe brought, often hundreds), the group's ``StepBatch`` is built once for all backends, and a
backend that implements ``gradtrack_steps`` gets it in one call; one that implements only
``gradtrack_step`` gets one ``StepStats`` per step, as before. Layer names are resolved here, from the run
start, layer and layout messages, before anything is queued, so no backend queue ever holds a message that
later ones depend on.

Back-pressure rule (``drops``), by each message's class (``gradtrack.handover.messages.Keep``): when a backend has
``max_pending`` step records and events waiting, a routine step is kept only if its step is a multiple
of ``decimate``; the others are dropped and counted. Flagged steps and explosions are kept up to a hard
bound of ten times ``max_pending``; past it (a backend stuck while every step explodes) only the messages
kept always are, so memory stays bounded. Drops are reported once as a warning and in the summary's
``dropped_records``.
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

from gradtrack.delivery.plugins import new_plugin_manager
from gradtrack.delivery.secrets import redact
from gradtrack.events import StepBatch
from gradtrack.handover.messages import (
    Diverged,
    ExplosionRaised,
    FlushRequested,
    InstabilityRaised,
    Keep,
    LayersAnnounced,
    LayoutAnnounced,
    Message,
    RolledBack,
    RunEnded,
    RunStarted,
    StepRecord,
)
from gradtrack.handover.records import step_batch
from gradtrack.validate import join_timeout

__all__ = ["Dispatcher", "LayerNames", "drops"]

log = logging.getLogger(__name__)

_STOP = object()
_HARD_LIMIT = 10  # times max_pending: past it, flagged steps and explosion events are dropped too
_MERGE = 256  # a worker merges consecutive step groups smaller than this into one batch


def drops(keep: Keep, step: int, backlog: int, max_pending: int, decimate: int) -> bool:
    """The back-pressure rule (module docstring), for a message of class ``keep`` and a queue ``backlog`` long."""
    if backlog < max_pending or keep is Keep.ALWAYS:
        return False
    if backlog >= max_pending * _HARD_LIMIT:  # memory stays bounded even if every step is flagged
        return True
    return keep is Keep.ROUTINE and step % decimate != 0


@final
class LayerNames:
    """The run's layer-name table and layouts, followed message by message (in order, on one thread)."""

    def __init__(self) -> None:
        self.table: list[str] = []
        self.layouts: dict[int, tuple[str, ...]] = {}

    def follow(self, message: Message) -> None:
        if isinstance(message, RunStarted):
            self.table = list(message.start.layer_names)
        elif isinstance(message, LayersAnnounced):
            del self.table[message.first :]
            self.table.extend(message.layers.names)
        elif isinstance(message, LayoutAnnounced):
            self.layouts[message.key] = tuple(self.table[i] for i in message.positions)

    def of(self, record: StepRecord) -> tuple[str, ...] | None:
        return self.layouts.get(record.layout) if record.with_layers else None


@final
class _Steps:
    """Reported step records and their layer names, whose ``StepBatch`` is built once, by the first worker
    that needs it."""

    __slots__ = ("_batch", "names", "records")

    def __init__(self, records: list[StepRecord], names: list[tuple[str, ...] | None]) -> None:
        self.records = records
        self.names = names
        self._batch: StepBatch | None = None

    def batch(self) -> StepBatch:
        if self._batch is None:
            self._batch = step_batch(self.records, self.names)
        return self._batch

    def thinned(self, keep: list[bool]) -> _Steps | None:
        if all(keep):
            return self
        records = [r for r, kept in zip(self.records, keep, strict=True) if kept]
        names = [n for n, kept in zip(self.names, keep, strict=True) if kept]
        return _Steps(records, names) if records else None


@final
class _Worker:
    def __init__(self, name: str, backend: object, max_pending: int, decimate: int) -> None:
        self.name = name
        self.manager: pluggy.PluginManager = new_plugin_manager()
        self.manager.register(backend, name=name)
        self.manager.check_pending()
        self.batched = bool(self.manager.hook.gradtrack_steps.get_hookimpls())
        self.max_pending = max_pending
        self.decimate = decimate
        self.dropped = 0
        self._pending: deque[Any] = deque()
        self._backlog = 0  # step records and events waiting (a step group counts its records)
        self._ready = threading.Condition()
        self._failed_hooks: set[str] = set()
        self._idle = True
        self.thread = threading.Thread(target=self._run, name=f"gradtrack-{name}", daemon=True)

    def put(self, message: Message) -> None:
        with self._ready:
            if drops(message.keep, 0, self._backlog, self.max_pending, self.decimate):
                self._dropped(1)
                return
            self._pending.append(message)
            self._backlog += message.keep is not Keep.ALWAYS
            self._ready.notify()

    def put_steps(self, steps: _Steps) -> None:
        with self._ready:
            backlog = self._backlog
            if backlog >= self.max_pending:
                kept = [not drops(r.keep, r.step, backlog, self.max_pending, self.decimate) for r in steps.records]
                thinned = steps.thinned(kept)
                self._dropped(len(steps.records) - (len(thinned.records) if thinned is not None else 0))
                if thinned is None:
                    return
                steps = thinned
            self._pending.append(steps)
            self._backlog += len(steps.records)
            self._ready.notify()

    def _dropped(self, count: int) -> None:
        if count and not self.dropped:
            warnings.warn(
                f"gradtrack backend {self.name!r} is falling behind; keeping one routine step record in "
                f"{self.decimate} until it catches up",
                RuntimeWarning,
                stacklevel=5,
            )
        self.dropped += count

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

    def _take(self) -> Any:
        """The next item; consecutive small step groups merged into one (an in-process backend gets one
        record at a time)."""
        with self._ready:
            while not self._pending:
                self._idle = True
                self._ready.wait()
            item = self._pending.popleft()
            self._idle = False
            if isinstance(item, _Steps):
                self._backlog -= len(item.records)
                if len(item.records) < _MERGE and self._pending and isinstance(self._pending[0], _Steps):
                    records, names = list(item.records), list(item.names)
                    while self._pending and isinstance(self._pending[0], _Steps) and len(records) < _MERGE:
                        more = self._pending.popleft()
                        self._backlog -= len(more.records)
                        records += more.records
                        names += more.names
                    item = _Steps(records, names)
            elif item is not _STOP:
                self._backlog -= item.keep is not Keep.ALWAYS
            return item

    def _run(self) -> None:
        while True:
            item = self._take()
            if item is _STOP:
                return
            hook = "gradtrack_steps" if isinstance(item, _Steps) else _HOOKS[type(item)]
            try:
                if isinstance(item, _Steps):
                    self._deliver_steps(item)
                else:
                    _DELIVER[type(item)](self.manager.hook, item)
            except Exception as exc:  # a backend must never break training or its siblings
                if hook not in self._failed_hooks:
                    self._failed_hooks.add(hook)
                    name = hook if hook != "gradtrack_steps" or self.batched else "gradtrack_step"
                    warnings.warn(
                        f"gradtrack backend {self.name!r} failed in {name}: {redact(repr(exc))}; carrying on",
                        RuntimeWarning,
                        stacklevel=2,
                    )
                log.debug("backend %s failed in %s: %s", self.name, hook, redact(repr(exc)))

    def _deliver_steps(self, steps: _Steps) -> None:
        batch = steps.batch()
        if self.batched:
            self.manager.hook.gradtrack_steps(batch=batch)
            return
        for stats in batch.each_stats():
            self.manager.hook.gradtrack_step(stats=stats)


# Each message a backend receives, and the hook that receives it.
_DELIVER: dict[type, Any] = {
    RunStarted: lambda hook, m: hook.gradtrack_run_start(start=m.start),
    LayersAnnounced: lambda hook, m: hook.gradtrack_layers_added(layers=m.layers),
    ExplosionRaised: lambda hook, m: hook.gradtrack_explosion(event=m.event),
    Diverged: lambda hook, m: hook.gradtrack_divergence(event=m.event),
    RolledBack: lambda hook, m: hook.gradtrack_rollback(event=m.event),
    InstabilityRaised: lambda hook, m: hook.gradtrack_instability(event=m.event),
    FlushRequested: lambda hook, m: hook.gradtrack_flush(timeout=m.timeout),
    RunEnded: lambda hook, m: hook.gradtrack_run_end(end=m.end),
}
_HOOKS = {
    RunStarted: "gradtrack_run_start",
    LayersAnnounced: "gradtrack_layers_added",
    ExplosionRaised: "gradtrack_explosion",
    Diverged: "gradtrack_divergence",
    RolledBack: "gradtrack_rollback",
    InstabilityRaised: "gradtrack_instability",
    FlushRequested: "gradtrack_flush",
    RunEnded: "gradtrack_run_end",
}


@final
class Dispatcher:
    """Fans the hand-over's messages out to every backend's worker without waiting for any of them."""

    def __init__(self, backends: Sequence[tuple[str, object]], max_pending: int = 1000, decimate: int = 10) -> None:
        self._workers = [_Worker(name, backend, max_pending, decimate) for name, backend in backends]
        self.names_table = LayerNames()
        for worker in self._workers:  # only once every backend passed validation
            worker.thread.start()

    @property
    def dropped(self) -> int:
        return sum(worker.dropped for worker in self._workers)

    @property
    def names(self) -> list[str]:
        return [worker.name for worker in self._workers]

    def __bool__(self) -> bool:
        return bool(self._workers)

    def send(self, messages: Sequence[Message]) -> None:
        """Deliver ``messages`` in order: the reported steps among them in groups, everything else as it is.

        Steps that are not reported (off the ``log_every`` cadence) and the layout messages stop here.
        """
        if not self._workers:
            return
        records: list[StepRecord] = []
        names: list[tuple[str, ...] | None] = []
        table = self.names_table
        for message in messages:
            if type(message) is StepRecord:
                if message.reported:
                    records.append(message)
                    names.append(table.of(message))
                continue
            if records:
                self._put_steps(records, names)
                records, names = [], []
            table.follow(message)
            if type(message) in _DELIVER:
                for worker in self._workers:
                    worker.put(message)
        if records:
            self._put_steps(records, names)

    def _put_steps(self, records: list[StepRecord], names: list[tuple[str, ...] | None]) -> None:
        steps = _Steps(records, names)
        for worker in self._workers:
            worker.put_steps(steps)

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until every backend has handled, and sent, what was handed over so far."""
        self.send([FlushRequested(seq=0, timeout=timeout)])
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

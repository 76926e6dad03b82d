"""The backend's own sender thread: batches records, sends them with bounded requests, spools the rest.

The gradtrack hooks only append to ``Sender.put``'s inbox. Every ``flush_every_s`` (or at once
for urgent records such as the divergence tag) the sender merges what arrived into ``log_batch``
operations within MLflow's limits and sends them in order. The first transient failure moves
that operation and everything after it to the spool file, and from then on new operations are
appended behind them, so order is kept; the spool is replayed with exponential backoff, and the
sender goes back to sending live once it is empty. A server that answers, but more slowly than
training produces records, is treated the same way: no cycle sends for longer than ``SLICE_S``;
what it could not send by then goes to the spool and is caught up from disk, slice by slice, so
at most a few seconds of records wait in memory and nothing is lost.

Nothing here ends the thread: a spool that cannot be written (a full disk, a read-only directory)
keeps the operations in memory instead, in order and with one warning, up to ``MAX_HELD_VALUES``
metric values (past it, batches of routine metrics are dropped and counted; runs, tags, artifacts and
the run's end are always kept); ``close`` then says what could be neither sent nor written. An
exception that is neither MLflow's refusal nor a network or store error (an MLflow internal whose
signature changed, say) is warned about once and retried ``UNEXPECTED_RETRIES`` times, then the
operation is set aside in ``rejected.jsonl`` like a refused one.
"""

from __future__ import annotations

import math
import threading
import time
import warnings
from collections.abc import Sequence
from typing import Any, final

from gradtrack.delivery.secrets import redact, strip_userinfo
from gradtrack.validate import join_timeout
from gradtrack_mlflow.spool import Spool
from gradtrack_mlflow.transport import Sink, failure_kind

__all__ = ["MAX_ENTITIES", "MAX_PARAMS_OR_TAGS", "Sender", "coalesce"]

Op = dict[str, Any]

MAX_ENTITIES = 1000  # MLflow's log_batch limit: metrics + params + tags
MAX_PARAMS_OR_TAGS = 100  # ... and at most 100 params and 100 tags
_BACKOFF_FIRST, _BACKOFF_MAX = 0.5, 30.0
SLICE_S = 2.0  # the longest a cycle sends before taking the inbox again: bounds memory by time
MAX_HELD_VALUES = 500_000  # metric values kept in memory while the spool cannot be written
UNEXPECTED_RETRIES = 3


def coalesce(items: Sequence[Op], run_key: str, run_id: str | None, tracking_uri: str) -> list[Op]:
    """Merge consecutive metric/param/tag fragments into ``log_batch`` ops within MLflow's limits.

    Other operations (create_run, log_artifact, terminate) keep their place between batches.
    """
    ops: list[Op] = []
    batch: Op | None = None

    def close_batch() -> None:
        nonlocal batch
        if batch is not None:
            ops.append(batch)
            batch = None

    def open_batch() -> Op:
        nonlocal batch
        if batch is None:
            batch = {"op": "log_batch", "metrics": [], "params": {}, "tags": {}}
            batch.update(run_key=run_key, run_id=run_id, tracking_uri=tracking_uri)
        return batch

    def size(op: Op) -> int:
        return len(op["metrics"]) + len(op["params"]) + len(op["tags"])

    for item in items:
        if item["op"] != "fragment":
            close_batch()
            ops.append({"run_key": run_key, "run_id": run_id, "tracking_uri": tracking_uri, **item})
            continue
        metrics = item.get("metrics", ())
        start = 0
        while start < len(metrics):  # as many as the open batch takes, a slice at a time
            room = MAX_ENTITIES - size(open_batch())
            if room <= 0:
                close_batch()
                continue
            open_batch()["metrics"].extend(metrics[start : start + room])
            start += room
        for kind in ("params", "tags"):
            for key, value in item.get(kind, {}).items():
                current = open_batch()
                if size(current) >= MAX_ENTITIES or (
                    key not in current[kind] and len(current[kind]) >= MAX_PARAMS_OR_TAGS
                ):
                    close_batch()
                    current = open_batch()
                current[kind][key] = value
    close_batch()
    return ops


@final
class Sender:
    """One thread per run that owns all traffic to MLflow; see the module docstring."""

    def __init__(self, sink: Sink, spool: Spool, run_key: str, run_id: str | None, flush_every_s: float) -> None:
        self.sink = sink
        self.spool = spool
        self.run_key = run_key
        self.run_id = run_id
        self.flush_every_s = flush_every_s
        self.rejected = 0
        self._cond = threading.Condition()
        self._inbox: list[Op] = []
        self._queued = 0
        self._handled = 0
        self._urgent = False
        self._give_up_at: float | None = None
        self._offline = False
        self._backoff = _BACKOFF_FIRST
        self._next_retry = 0.0
        self._last_cycle = time.monotonic()
        self._held: list[Op] = []  # operations the spool could not take, in order, behind the spool's
        self._held_values = 0
        self.lost_values = 0
        self.spool_error: OSError | None = None
        self._unexpected = 0
        self._warned_unexpected = False
        self.thread = threading.Thread(target=self._run, name=f"gradtrack-mlflow-{run_key[:8]}", daemon=True)
        self.thread.start()

    # -- called from the hook thread ----------------------------------------------------------------

    def put(self, *items: Op, urgent: bool = False) -> None:
        with self._cond:
            was_empty = not self._inbox
            self._inbox.extend(items)
            self._queued += 1
            self._urgent = self._urgent or urgent
            if urgent or was_empty:  # an idle sender sleeps without a deadline: give it one
                self._cond.notify_all()

    def flush(self, timeout: float) -> bool:
        """Wait until everything put so far was sent or spooled; True if that happened in time."""
        deadline = time.monotonic() + timeout
        with self._cond:
            target = self._queued
            self._urgent = True
            self._cond.notify_all()
            while self._handled < target:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._cond.wait(remaining)
        return True

    def close(self, timeout: float) -> bool:
        """Send what is left, retrying the spool until ``timeout``; True if nothing is left on disk.

        No request starts that could end past the deadline, but one under way when ``close`` is called
        may (a server that stopped answering): waiting for it, at most ``request_timeout`` more, lets the
        thread write what it holds to the spool before this process may end."""
        with self._cond:
            self._give_up_at = time.monotonic() + timeout
            self._cond.notify_all()
        self.thread.join(join_timeout(timeout + self.sink.request_timeout + 1.0))
        return not self.thread.is_alive() and not self._offline and not self._held

    @property
    def held(self) -> int:
        """Operations that could be neither sent nor written to the spool (kept in memory)."""
        return len(self._held)

    # -- the sender thread --------------------------------------------------------------------------

    def _wait_for_work(self) -> tuple[list[Op], int, bool]:
        with self._cond:
            while True:
                closing = self._give_up_at is not None
                now = time.monotonic()
                wake = self._last_cycle + self.flush_every_s if self._inbox else math.inf
                if self._offline:
                    wake = min(wake, self._next_retry)
                if closing or self._urgent or now >= wake:
                    break
                self._cond.wait(None if math.isinf(wake) else wake - now)
            items, self._inbox = self._inbox, []
            self._urgent = False
            return items, self._queued, closing

    def _run(self) -> None:
        while True:
            items, target, closing = self._wait_for_work()
            self._last_cycle = time.monotonic()
            if self._offline and time.monotonic() >= self._next_retry:
                self._replay(None if closing else SLICE_S)
            self._deliver(coalesce(items, self.run_key, self.run_id, strip_userinfo(self.sink.tracking_uri)))
            with self._cond:
                self._handled = target
                self._cond.notify_all()
                done = closing and not self._inbox
            if done and self._finish():
                return

    def _finish(self) -> bool:
        """While closing: retry the spool until it is empty or the deadline passes."""
        assert self._give_up_at is not None
        while self._offline:
            wait = self._next_retry - time.monotonic()
            if time.monotonic() + max(wait, 0.0) + self.sink.request_timeout > self._give_up_at:
                return True
            if wait > 0:
                time.sleep(wait)
            self._replay()
        return True

    def _may_send(self) -> bool:
        if self._give_up_at is None:
            return True
        return time.monotonic() + self.sink.request_timeout <= self._give_up_at

    def _deliver(self, ops: list[Op]) -> None:
        stop_at = time.monotonic() + SLICE_S
        for index, op in enumerate(ops):
            if self._offline or not self._may_send():
                self._to_spool(ops[index:])
                return
            if index and time.monotonic() >= stop_at and self._give_up_at is None:
                self._to_spool(ops[index:])  # slower than training: catch up from disk, not memory
                self._next_retry = time.monotonic()
                return
            if not self._execute(op):
                self._to_spool(ops[index:])
                return

    def _execute(self, op: Op) -> bool:
        """Send one operation; True when it is settled (sent, or set aside for good)."""
        try:
            self.sink.execute(op)
        except Exception as exc:
            if op["op"] == "create_run":  # the store may have made the run before the answer was lost:
                op["attempted"] = True  # a retry, live or from the spool, first looks for it
            return self._handle_failure(op, exc)
        self._unexpected = 0
        return True

    def _replay(self, slice_s: float | None = None) -> None:
        """Send the spool, then what the spool could not take, in order; with ``slice_s``, return after
        that long to take the inbox again."""
        stop_at = math.inf if slice_s is None else time.monotonic() + slice_s
        try:
            if self.spool.path.exists():
                start = self.spool.offset
                for index, op in self.spool.pending():
                    if not self._may_send():
                        return
                    if time.monotonic() >= stop_at and index > start:
                        self._next_retry = time.monotonic()  # more to replay: go on after this cycle
                        return
                    if not self._execute(op):
                        return
                    self.spool.set_offset(index + 1)
                self.spool.clear()
        except OSError as exc:  # the spool cannot be read or its offset written: retry later
            self._spool_failed(exc)
            return
        while self._held:
            if not self._may_send() or not self._execute(self._held[0]):
                return
            self._held_values -= len(self._held.pop(0).get("metrics", ()))
        self._offline = False
        self._backoff = _BACKOFF_FIRST

    def _handle_failure(self, op: Op, exc: Exception) -> bool:
        """True when the op is settled (set aside for good); False when it must be retried later."""
        kind = failure_kind(exc)
        if kind == "unexpected":
            self._unexpected += 1
            if not self._warned_unexpected:
                self._warned_unexpected = True
                warnings.warn(
                    f"gradtrack's MLflow backend met an unexpected error sending a {op['op']}: "
                    f"{redact(repr(exc), [self.sink.tracking_uri])}; it retries {UNEXPECTED_RETRIES} times, "
                    "then sets the operation aside in rejected.jsonl",
                    RuntimeWarning,
                    stacklevel=2,
                )
            kind = "permanent" if self._unexpected > UNEXPECTED_RETRIES else "transient"
        if kind == "permanent":
            self._unexpected = 0
            self.rejected += 1
            try:
                self.spool.reject(op, exc, self.sink.tracking_uri)
            except OSError as error:
                self._spool_failed(error)
            if self.rejected == 1:
                warnings.warn(
                    f"MLflow refused a gradtrack {op['op']} for good "
                    f"({redact(str(exc), [self.sink.tracking_uri])}); kept in {self.spool.rejected_path}",
                    RuntimeWarning,
                    stacklevel=2,
                )
            return True
        self._offline = True
        self._next_retry = time.monotonic() + self._backoff
        self._backoff = min(self._backoff * 2, _BACKOFF_MAX)
        return False

    def _to_spool(self, ops: list[Op]) -> None:
        for op in ops:  # a run created live is named by its id, so a later replay needs no map
            if op.get("run_id") is None and op["run_key"] in self.sink.run_ids:
                op["run_id"] = self.sink.run_ids[op["run_key"]]
        if ops and not self._offline:
            self._offline = True
            self._next_retry = time.monotonic() + self._backoff
        if not self._held:
            try:
                self.spool.append(ops)
                return
            except OSError as exc:
                self._spool_failed(exc)
        self._hold(ops)  # behind what is already held, so order is kept

    def _hold(self, ops: list[Op]) -> None:
        for op in ops:
            values = len(op.get("metrics", ()))
            routine = op["op"] == "log_batch" and not op.get("params") and not op.get("tags")
            if routine and self._held_values + values > MAX_HELD_VALUES:
                self.lost_values += values
                continue
            self._held.append(op)
            self._held_values += values

    def _spool_failed(self, exc: OSError) -> None:
        if self.spool_error is None:
            warnings.warn(
                f"gradtrack cannot write its MLflow spool in {self.spool.directory} ({exc!r}); what the server "
                f"does not take now is kept in memory (up to {MAX_HELD_VALUES:,} metric values) and is lost if "
                "this process ends first. Training goes on.",
                RuntimeWarning,
                stacklevel=2,
            )
        self.spool_error = exc

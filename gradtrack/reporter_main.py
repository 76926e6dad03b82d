"""The reporter process: runs the backends through pluggy, off the training process, and outlives it.

``python -m gradtrack.reporter_main DATA_FD ACK_FD PARENT_PID``, started by ``gradtrack.reporter``.
It reads frames of messages from DATA_FD, feeds a ``Dispatcher`` (one worker thread per backend, as in
the training process), and answers on ACK_FD (ready, flushed, closed, and the warnings its backends
raise, which the training process raises again). It runs at the lowest CPU priority, so on a machine
with no idle core it falls behind and catches up rather than slowing training, and it never imports
torch: every record is plain numbers.

The run ends in one of three ways:

* the training process sends ``end`` and closes the pipe: the run ends with its status;
* the pipe closes without ``end``, the parent process is gone (SIGKILL, OOM kill, segfault, SIGTERM
  with its default action), or the reporter itself gets SIGTERM: everything received is delivered and
  the run ends ``killed``, with the summary of every step received;
* either way the backends then get as long as they need, up to ``LINGER_S`` (the MLflow backend bounds
  itself by its ``exit_timeout`` and leaves the rest in its spool), then the process exits. The
  training process waits for this at most its ``close_timeout``; past it, the reporter goes on alone.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import signal
import sys
import threading
import time
import warnings
from dataclasses import replace
from typing import Any

from gradtrack.channel import Incoming, encode
from gradtrack.dispatch import Dispatcher
from gradtrack.events import Divergence, Explosion, RunEnd, RunStart
from gradtrack.records import StepRecord
from gradtrack.secrets import redact
from gradtrack.summary import RunSummary

_POLL = 0.5  # seconds between checks that the parent is alive
_TERM_GRACE = 5.0  # after SIGTERM, seconds to wait for the trainer to end the run before ending it killed
LINGER_S = 600.0  # how long backends may take to finish the run, whoever is waiting for them
BACKLOG_FACTOR = 20  # times the tracker's max_pending: each backend's queue bound in the reporter


class _Acks:
    """The way back to the training process; silent once it is gone."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._lock = threading.Lock()

    def send(self, *message: Any) -> bool:
        """True when the message reached the pipe (the training process may be gone, or done listening)."""
        with self._lock:
            try:
                os.write(self.fd, encode([message]))
            except OSError:
                return False
            return True

    def forward_warnings(self) -> None:
        """Warnings go to the training process (to stderr once it stops listening), credentials masked."""

        def show(message: Any, category: type[Warning], *args: Any, **kwargs: Any) -> None:
            text = redact(str(message))
            if not self.send("warning", category.__module__, category.__qualname__, text):
                print(f"{category.__name__}: {text}", file=sys.stderr, flush=True)

        warnings.showwarning = show


class _Run:
    """What the reporter knows of the run: enough to end it properly if the trainer never does."""

    def __init__(self, dispatcher: Dispatcher) -> None:
        self.dispatcher = dispatcher
        self.summary = RunSummary()
        self.layouts: dict[int, list[str]] = {}
        self.names: tuple[str, ...] = ()
        self.started = False
        self.ended = False

    def handle(self, message: tuple[Any, ...], acks: _Acks) -> None:
        kind = message[0]
        if kind == "step":
            record: StepRecord = message[1]
            if record.amp_overflow:
                self.summary.add_amp_overflow()
            else:
                self.summary.add_step(record.step, record.total_norm, record.clipped, record.skipped,
                                      record.nonfinite > 0, record.explosion)  # fmt: skip
            if record.reported:
                self.dispatcher.emit_step(record, self.layouts.get(record.layout))
        elif kind == "layout":
            self.layouts[message[1]] = [self.names[i] for i in message[2]]
        elif kind == "explosion":
            event: Explosion = message[1]
            self.summary.add_explosion(event)
            self.dispatcher.emit("gradtrack_explosion", event=event)
        elif kind == "divergence":
            divergence: Divergence = message[1]
            self.summary.divergence = divergence
            self.dispatcher.emit("gradtrack_divergence", event=divergence)
        elif kind == "start":
            start: RunStart = message[1]
            self.names, self.started = start.layer_names, True
            self.dispatcher.emit("gradtrack_run_start", start=start)
        elif kind == "end":
            self.end(message[1])
        elif kind == "flush":
            _, seq, timeout = message
            acks.send("flushed", seq, self.dispatcher.flush(timeout))

    def end(self, end: RunEnd) -> None:
        if self.ended or not self.started:
            return
        self.ended = True
        summary = replace(end.summary, dropped_records=end.summary.dropped_records + self.dispatcher.dropped)
        self.dispatcher.emit("gradtrack_run_end", end=replace(end, summary=summary))

    def end_killed(self) -> None:
        """The trainer is gone without ending the run: end it ``killed`` with what was received."""
        self.end(RunEnd("killed", self.summary.freeze(self.dispatcher.dropped), time.time()))


def _start(incoming: Incoming, acks: _Acks) -> Dispatcher:
    """Read the init message and create the backends; say ready, or say why not."""
    while not incoming.closed:
        for frame in incoming.read(_POLL):
            (kind, init), *_ = frame
            assert kind == "init", kind
            backends = []
            for name, pickled in init["backends"]:
                try:
                    backends.append((name, pickle.loads(pickled)))
                except Exception as exc:
                    acks.send("failed", f"gradtrack's reporter could not create backend {name!r}: {exc!r}")
                    raise SystemExit(2) from exc
            # Here, off the training process, falling behind costs memory, not training time: a backend
            # may fall much further behind before routine steps are decimated (a niced reporter on a busy
            # machine catches up later).
            dispatcher = Dispatcher(backends, max_pending=init["max_pending"] * BACKLOG_FACTOR)
            acks.send("ready")
            return dispatcher
    raise SystemExit(0)


def _handle(run: _Run, message: tuple[Any, ...], acks: _Acks) -> None:
    try:
        run.handle(message, acks)
    except Exception as exc:  # one bad message must not end the report of the whole run
        warnings.warn(f"gradtrack's reporter could not handle a {message[0]!r} message: {exc!r}", RuntimeWarning,
                      stacklevel=1)  # fmt: skip


def main(argv: list[str]) -> None:
    data_fd, ack_fd, parent = (int(value) for value in argv[:3])
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the user's Ctrl-C ends training, not the report of it
    terminated = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: terminated.set())
    with contextlib.suppress(OSError):
        os.nice(19)  # with no idle core, fall behind and catch up instead of slowing training
    acks = _Acks(ack_fd)
    incoming = Incoming(data_fd)
    dispatcher = _start(incoming, acks)
    acks.forward_warnings()
    run = _Run(dispatcher)
    give_up = float("inf")
    while not incoming.closed and time.monotonic() < give_up:
        for frame in incoming.read(_POLL):
            for message in frame:
                _handle(run, message, acks)
        if os.getppid() != parent:  # the trainer died but a child of it still holds the pipe open
            break
        if terminated.is_set() and give_up == float("inf"):  # preemption: the trainer got it too, most
            give_up = time.monotonic() + _TERM_GRACE  # likely; let it end the run itself if it can
    for frame in incoming.read(0.0):  # whatever arrived with the end of file
        for message in frame:
            _handle(run, message, acks)
    run.end_killed()  # a no-op when the trainer ended the run itself
    late = dispatcher.close(LINGER_S if not terminated.is_set() else _TERM_GRACE)
    acks.send("closed", late)
    sys.stdout.flush()
    sys.stderr.flush()
    if late:  # a backend stuck past the deadline must not keep the process alive
        os._exit(0)


if __name__ == "__main__":
    main(sys.argv[1:])

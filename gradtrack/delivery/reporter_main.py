"""The reporter process: runs the backends through pluggy, off the training process, and outlives it.

``python -m gradtrack.delivery.reporter_main DATA_FD ACK_FD PARENT_PID``, started by ``gradtrack.delivery.reporter``.
It reads the hand-over's messages from DATA_FD (everything the pipe holds at a time, then a pause of
``COALESCE_S`` so that a fast loop's steps arrive hundreds at a time), feeds them to its ``RunSummary`` and
to a ``Dispatcher`` (one worker thread per backend, as in the training process), and answers on ACK_FD
(ready, flushed, closed with its CPU time, and the warnings its backends raise, which the training process
raises again). It runs at the lowest CPU priority, so on a machine
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
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from gradtrack.delivery.dispatch import Dispatcher
from gradtrack.delivery.secrets import redact
from gradtrack.events import RunEnd
from gradtrack.handover.channel import Incoming, encode
from gradtrack.handover.messages import FlushRequested, Message, RunEnded, RunStarted, StepRecord
from gradtrack.handover.summary import RunSummary

_POLL = 0.5  # seconds between checks that the parent is alive
COALESCE_S = 0.2  # after a read, let more records arrive: the reporter's work is per batch, not per record
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
        self.records = 0
        self.started = False
        self.ended = False

    def handle(self, messages: Sequence[Message], acks: _Acks) -> bool:
        """Take one read's messages, in order; True when one of them waits for an answer (a flush, the end)."""
        urgent = False
        start = 0
        for index, message in enumerate(messages):
            if type(message) is StepRecord:
                self.records += 1
                self.summary.add(message)
                continue
            self.summary.add(message)
            if isinstance(message, RunStarted):
                self.started = True
            elif isinstance(message, FlushRequested | RunEnded):
                self._send(messages[start:index])
                start = index + 1
                urgent = True
                if isinstance(message, FlushRequested):
                    acks.send("flushed", message.seq, self.dispatcher.flush(message.timeout))
                else:
                    self.end(message.end)
        self._send(messages[start:])
        return urgent

    def _send(self, messages: Sequence[Message]) -> None:
        try:
            self.dispatcher.send(messages)
        except Exception as exc:  # one bad message must not end the report of the whole run
            warnings.warn(f"gradtrack's reporter could not hand {len(messages)} messages to its backends: {exc!r}",
                          RuntimeWarning, stacklevel=1)  # fmt: skip

    def end(self, end: RunEnd) -> None:
        if self.ended or not self.started:
            return
        self.ended = True
        summary = replace(end.summary, dropped_records=end.summary.dropped_records + self.dispatcher.dropped)
        self.dispatcher.send([RunEnded(end=replace(end, summary=summary))])

    def end_killed(self) -> None:
        """The trainer is gone without ending the run: end it ``killed`` with what was received."""
        self.end(RunEnd("killed", self.summary.freeze(self.dispatcher.dropped), time.time()))


def _start(incoming: Incoming, acks: _Acks) -> tuple[Dispatcher, list[Message]]:
    """Read the init message and create the backends; say ready, or say why not. Also returns whatever
    came after the init message in the same read."""
    while not incoming.closed:
        messages = incoming.read(_POLL)
        if messages:
            kind, init = messages[0]
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
            return dispatcher, messages[1:]
    raise SystemExit(0)


def _handle(run: _Run, messages: Sequence[Message], acks: _Acks) -> bool:
    try:
        return run.handle(messages, acks)
    except Exception as exc:  # one bad message must not end the report of the whole run
        warnings.warn(f"gradtrack's reporter could not handle a message: {exc!r}", RuntimeWarning, stacklevel=1)
        return False


def main(argv: list[str]) -> None:
    data_fd, ack_fd, parent = (int(value) for value in argv[:3])
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the user's Ctrl-C ends training, not the report of it
    terminated = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: terminated.set())
    with contextlib.suppress(OSError):
        os.nice(19)  # with no idle core, fall behind and catch up instead of slowing training
    acks = _Acks(ack_fd)
    incoming = Incoming(data_fd)
    dispatcher, early = _start(incoming, acks)
    acks.forward_warnings()
    run = _Run(dispatcher)
    _handle(run, early, acks)
    give_up = float("inf")
    while not incoming.closed and time.monotonic() < give_up:
        messages = incoming.read(_POLL)
        if messages and not _handle(run, messages, acks):
            time.sleep(COALESCE_S)
        if os.getppid() != parent:  # the trainer died but a child of it still holds the pipe open
            break
        if terminated.is_set() and give_up == float("inf"):  # preemption: the trainer got it too, most
            give_up = time.monotonic() + _TERM_GRACE  # likely; let it end the run itself if it can
    _handle(run, incoming.read(0.0), acks)  # whatever arrived with the end of file
    run.end_killed()  # a no-op when the trainer ended the run itself
    late = dispatcher.close(LINGER_S if not terminated.is_set() else _TERM_GRACE)
    acks.send("closed", late, {"cpu_s": time.process_time(), "records": run.records})
    sys.stdout.flush()
    sys.stderr.flush()
    if late:  # a backend stuck past the deadline must not keep the process alive
        os._exit(0)


if __name__ == "__main__":
    main(sys.argv[1:])

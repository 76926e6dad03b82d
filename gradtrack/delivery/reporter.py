"""The training process's end of the reporter process: start it, hand records over, close it.

The reporter is a separate Python process (``python -m gradtrack.delivery.reporter_main``), started with
``subprocess`` (fork and exec at once: never a bare fork of a process with torch threads or CUDA),
in a process group of its own so that a Ctrl-C meant for training does not reach it. It runs the backends;
this side pickles each message and writes it at once to a non-blocking pipe (a few microseconds), so
that what was handed over survives a SIGKILL of the training process. Nothing here waits, except
``flush`` and ``close``, which the user asks for.

When the reporter falls behind (or is still starting) and the pipe is full, bytes wait here, then
messages: past ``max_pending`` waiting messages routine steps are decimated by the rule of
``gradtrack.delivery.dispatch`` (each message declares its class: run start, layer names, layouts, divergence and
run end are always kept). A thread wakes every 0.2 s to write what is waiting while the training loop is
busy elsewhere (a long evaluation).
"""

from __future__ import annotations

import contextlib
import importlib
import os
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Sequence
from typing import Any, final

from gradtrack.delivery.dispatch import drops
from gradtrack.handover.channel import ChannelClosed, Incoming, Outgoing, encode, pipe_capacity
from gradtrack.handover.messages import FlushRequested, Message, StepRecord
from gradtrack.validate import join_timeout

__all__ = ["Reporter", "ReporterStartError"]

_PUMP_EVERY = 0.2
_MAX_BYTES = 16 << 20  # frames waiting for the pipe before records wait as records (and may be decimated)
_DECIMATE = 10


class ReporterStartError(RuntimeError):
    """The reporter process could not start, or could not create a backend."""


@final
class Reporter:
    """Hands messages to a reporter process running ``backends`` (name, pickled object)."""

    def __init__(
        self,
        backends: Sequence[tuple[str, bytes]],
        *,
        max_pending: int,
        start_timeout: float = 60.0,
    ) -> None:
        self.names = [name for name, _ in backends]
        self.max_pending = max_pending
        self.dropped = 0
        self._lock = threading.Lock()
        self._messages: list[Message] = []
        self._seq = 0
        self.stats: dict[str, Any] | None = None  # the reporter's own account of its work, once it closed
        self._warnings: list[tuple[str, str, str]] = []
        self._acks_seen: dict[tuple[Any, ...], Any] = {}
        self._dead: str | None = None
        data_read, data_write = os.pipe()
        ack_read, ack_write = os.pipe()
        pipe_capacity(data_write)
        try:
            self.process = _spawn(data_read, ack_write)
        except OSError as exc:
            for fd in (data_read, data_write, ack_read, ack_write):
                os.close(fd)
            raise ReporterStartError(f"gradtrack could not start its reporter process: {exc}") from exc
        os.close(data_read)
        os.close(ack_write)
        self._out = Outgoing(data_write)
        os.set_blocking(ack_read, False)  # never stuck in a read: see _read_acks
        self._acks = Incoming(ack_read)
        self._acks_lock = threading.Lock()
        init = {"backends": list(backends), "max_pending": max_pending}
        self._out.push(encode([("init", init)]))
        try:
            self._wait_ready(time.monotonic() + start_timeout)
        except BaseException:
            self._kill()
            raise
        self._stop = threading.Event()
        self._pump = threading.Thread(target=self._pump_loop, name="gradtrack-reporter-pump", daemon=True)
        self._pump.start()

    # -- the training thread's calls -------------------------------------------------------------

    def send(self, message: Message) -> None:
        """Hand one message to the pipe now (write-through: a record in the pipe survives a SIGKILL of
        this process); when the pipe is full, keep it here, as bytes, then as a message."""
        with self._lock:
            if self._dead is not None:
                self.dropped += type(message) is StepRecord
                return
            if self._messages or self._out.pending >= _MAX_BYTES:  # congested: wait as a message
                step = message.step if type(message) is StepRecord else 0
                if drops(message.keep, step, len(self._messages), self.max_pending, _DECIMATE):
                    if not self.dropped:
                        warnings.warn(
                            "gradtrack's reporter process is falling behind; keeping one routine step record in "
                            f"{_DECIMATE} until it catches up",
                            RuntimeWarning,
                            stacklevel=4,
                        )
                    self.dropped += 1
                    return
                self._messages.append(message)
            else:
                self._out.push(encode([message]))
            self._write()
        if self._warnings:
            self._reissue_warnings()

    def flush(self, timeout: float) -> bool:
        """Everything sent so far handled by every backend in the reporter (its ``gradtrack_flush``)."""
        deadline = time.monotonic() + timeout
        with self._lock:
            self._seq += 1
            seq = self._seq
        self.send(FlushRequested(seq=seq, timeout=timeout))
        done = self._drain(deadline) and self._await(("flushed", seq), deadline) is not None
        self._reissue_warnings()
        return done

    def end_stream(self, deadline: float) -> None:
        """Write what waits (until ``deadline``) and close the pipe: the reporter finishes the run and exits."""
        self._stop.set()
        self._drain(deadline)
        self._out.close()

    def wait(self, deadline: float) -> list[str]:
        """Wait for the reporter to finish; the backends still busy at ``deadline`` keep going on their own
        (and print their warnings to standard error, since nobody here reads them any more)."""
        closed = self._await(("closed",), deadline)
        self._reissue_warnings()
        if closed is not None:
            self.stats = closed[2]
        with contextlib.suppress(OSError):
            os.close(self._acks.fd)
        if closed is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):  # it exits right after saying so
                self.process.wait(join_timeout(deadline - time.monotonic() + 1.0))
            return list(closed[1])
        return [] if self._dead is not None else list(self.names)

    # -- internals --------------------------------------------------------------------------------

    def _write(self) -> None:
        """Under the lock: frame the waiting messages (unless frames already pile up) and write."""
        if self._messages and self._out.pending < _MAX_BYTES:
            self._out.push(encode(self._messages))
            self._messages = []
        try:
            self._out.pump()
        except ChannelClosed:
            self._died()

    def _drain(self, deadline: float) -> bool:
        with self._lock:
            if self._dead is not None:
                return False
            if self._messages:
                self._out.push(encode(self._messages))
                self._messages = []
        try:
            return self._out.drain(deadline)
        except ChannelClosed:
            with self._lock:
                self._died()
            return False

    def _pump_loop(self) -> None:
        while not self._stop.wait(_PUMP_EVERY):
            with self._lock:
                if self._dead is None and (self._messages or self._out.pending):
                    self._write()
            self._read_acks(0.0)

    def _read_acks(self, timeout: float) -> None:
        # The pump thread and a waiting flush or exit both read the acks: one at a time, or one of them could
        # take the bytes the other's select saw and leave it waiting for an answer already received.
        try:
            with self._acks_lock:
                acks = self._acks.read(timeout)
        except OSError:
            return
        for message in acks:
            if message[0] == "warning":
                self._warnings.append(message[1:])
            else:
                self._acks_seen[_ack_key(message)] = message

    def _await(self, key: tuple[Any, ...], deadline: float) -> Any:
        while True:
            if key in self._acks_seen:
                return self._acks_seen.pop(key)
            if self._acks.closed or time.monotonic() >= deadline:
                return None
            self._read_acks(min(0.1, max(0.0, deadline - time.monotonic())))

    def _wait_ready(self, deadline: float) -> None:
        self._out.drain(deadline)
        while time.monotonic() < deadline:
            self._read_acks(0.1)
            if ("failed",) in self._acks_seen:
                raise ReporterStartError(self._acks_seen[("failed",)][1])
            if ("ready",) in self._acks_seen:
                return
            if self._acks.closed or self.process.poll() is not None:
                raise ReporterStartError(
                    f"gradtrack's reporter process exited while starting (exit code {self.process.poll()}); "
                    "its error is on standard error above"
                )
        raise ReporterStartError("gradtrack's reporter process did not start within its timeout")

    def _died(self) -> None:
        """Under the lock: the reporter is gone; say so once and count what is lost from now on."""
        if self._dead is not None:
            return
        self._dead = f"exit code {self.process.poll()}"
        self.dropped += sum(1 for message in self._messages if type(message) is StepRecord)
        self._messages = []
        warnings.warn(
            f"gradtrack's reporter process ended unexpectedly ({self._dead}); backends {self.names} receive "
            "nothing more from this run. Training goes on.",
            RuntimeWarning,
            stacklevel=4,
        )

    def _reissue_warnings(self) -> None:
        """Warnings raised in the reporter, raised again here, where the user sees and filters them."""
        while self._warnings:
            module, name, text = self._warnings.pop(0)
            category: Any = RuntimeWarning
            try:
                found = getattr(importlib.import_module(module), name)
                if isinstance(found, type) and issubclass(found, Warning):
                    category = found
            except Exception:
                pass
            warnings.warn(text, category, stacklevel=3)

    def _kill(self) -> None:
        try:
            self.process.kill()
            self.process.wait(5)
        except OSError:
            pass
        self._out.close()


def _ack_key(message: tuple[Any, ...]) -> tuple[Any, ...]:
    return (message[0], message[1]) if message[0] == "flushed" else (message[0],)


def _spawn(data_read: int, ack_write: int) -> subprocess.Popen[bytes]:
    # The reporter imports the same modules as this process (backends, plugins found on sys.path).
    path = os.pathsep.join(entry for entry in sys.path if entry and os.path.exists(entry))
    env = {**os.environ, "PYTHONPATH": path}
    return subprocess.Popen(
        [sys.executable, "-m", "gradtrack.delivery.reporter_main", str(data_read), str(ack_write), str(os.getpid())],
        pass_fds=(data_read, ack_write),
        stdin=subprocess.DEVNULL,
        # A process group of its own: a Ctrl-C meant for training (SIGINT to the terminal's foreground
        # group) does not reach it. Not a session of its own: where the kernel groups CPU shares by
        # session (autogroup), the reporter's nice 19 would only rank it within its own session, and
        # a busy reporter would take a full share from the trainers.
        process_group=0,
        env=env,
    )

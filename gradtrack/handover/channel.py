"""Length-prefixed frames over a pipe between the training process and its reporter process.

A frame is a 4-byte big-endian length, a one-byte tag and a payload: ``S``, one step record in its fixed
binary layout (``StepRecord.encode``: a few hundred nanoseconds, where a pickle takes microseconds); ``P``,
a pickle of a list of the other messages of ``gradtrack.handover.messages``. Pickle is safe here: both ends are the
same program, the pipe is private to a parent and the child it started, and nothing outside them can
write to it. (What lands on disk, the MLflow spool, is JSON.)

The training side never blocks: ``Outgoing`` writes with ``O_NONBLOCK`` and keeps what the pipe does not
take yet; ``drain`` is the only waiting call, used by ``flush`` and at exit, with a deadline.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import select
import struct
import time
from collections.abc import Sequence
from typing import Any, final

from gradtrack.handover.messages import StepRecord

__all__ = ["ChannelClosed", "Incoming", "Outgoing", "decode", "encode", "pipe_capacity"]

_HEADER = struct.Struct(">I")
_STEP, _PICKLED = b"S", b"P"
_PIPE_SIZE = 1 << 20  # ask Linux for a 1 MiB pipe instead of 64 KiB: room for a slow-starting reader
_F_SETPIPE_SZ = 1031


class ChannelClosed(EOFError):
    """The other end of the pipe is gone."""


def encode(messages: Sequence[Any]) -> bytes:
    """Frames for ``messages``, in order: one per step record, one per run of other messages."""
    if len(messages) == 1 and type(messages[0]) is StepRecord:  # the common case, on the training thread
        payload = messages[0].encode()
        return _HEADER.pack(len(payload) + 1) + _STEP + payload
    frames: list[bytes] = []
    others: list[Any] = []
    for message in messages:
        if type(message) is StepRecord:
            if others:
                frames.append(_pickled(others))
                others = []
            payload = message.encode()
            frames.append(_HEADER.pack(len(payload) + 1) + _STEP + payload)
        else:
            others.append(message)
    if others:
        frames.append(_pickled(others))
    return b"".join(frames)


def _pickled(messages: list[Any]) -> bytes:
    payload = pickle.dumps(messages, protocol=pickle.HIGHEST_PROTOCOL)
    return _HEADER.pack(len(payload) + 1) + _PICKLED + payload


def decode(frame: memoryview) -> list[Any]:
    """The messages of one frame (tag and payload, without the length)."""
    if frame[:1] == _STEP:
        return [StepRecord.decode(frame[1:])]
    return list(pickle.loads(frame[1:]))


def pipe_capacity(fd: int) -> None:
    """Grow a pipe's buffer where the platform allows; a smaller pipe only means more buffering here."""
    try:
        import fcntl

        fcntl.fcntl(fd, _F_SETPIPE_SZ, _PIPE_SIZE)
    except (ImportError, OSError):
        pass


@final
class Outgoing:
    """Bytes waiting for a non-blocking pipe, in order; ``pending`` says how many."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        os.set_blocking(fd, False)
        self._buffer = bytearray()
        self._start = 0  # bytes of _buffer already written, compacted lazily

    @property
    def pending(self) -> int:
        return len(self._buffer) - self._start

    def push(self, frame: bytes) -> None:
        self._buffer += frame

    def pump(self) -> bool:
        """Write what the pipe takes now; True when nothing is left. Raises ChannelClosed."""
        while self.pending:
            try:
                written = os.write(self.fd, memoryview(self._buffer)[self._start :])
            except BlockingIOError:
                return False
            except (BrokenPipeError, OSError) as exc:
                raise ChannelClosed(str(exc)) from exc
            self._start += written
        if self._start:
            del self._buffer[: self._start]
            self._start = 0
        return True

    def drain(self, deadline: float) -> bool:
        """Wait (at most until ``deadline``, a ``time.monotonic()``) until everything is written."""
        while not self.pump():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            select.select([], [self.fd], [], min(remaining, 0.1))
        return True

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self.fd)


@final
class Incoming:
    """Reads frames from a pipe; ``read`` waits at most ``timeout`` seconds for the next bytes."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._buffer = bytearray()
        self.closed = False

    def read(self, timeout: float | None) -> list[Any]:
        """The messages of every complete frame available within ``timeout`` (all that the pipe holds,
        in order); sets ``closed`` at end of file."""
        if not self.closed:
            ready, _, _ = select.select([self.fd], [], [], timeout)
            while ready:
                try:
                    chunk = os.read(self.fd, 1 << 20)
                except BlockingIOError:  # a non-blocking pipe another reader emptied since the select
                    break
                if not chunk:
                    self.closed = True
                    break
                self._buffer += chunk
                if len(chunk) < 1 << 20:
                    break
                ready, _, _ = select.select([self.fd], [], [], 0)
        messages: list[Any] = []
        buffer, start, end = memoryview(self._buffer), 0, len(self._buffer)
        try:
            while end - start >= _HEADER.size:
                (size,) = _HEADER.unpack_from(buffer, start)
                if end - start < _HEADER.size + size:
                    break
                messages.extend(decode(buffer[start + _HEADER.size : start + _HEADER.size + size]))
                start += _HEADER.size + size
        finally:
            buffer.release()
        if start:
            del self._buffer[:start]
        return messages

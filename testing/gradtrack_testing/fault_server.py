"""One fault server for the tests and the benchmarks: a loopback HTTP proxy that misbehaves on demand.

Why it exists: gradtrack promises that a sick tracking server costs a run nothing (nothing lost, nothing
sent twice, training never waits, exit bounded), and that can only be checked against a server that is
sick in known ways, switched at run time. There were three (the tests' ``FaultProxy`` and
``SilentServer``, ``benchmarks/slow_server.py``'s ``Loopback``); this is the one left.

``FaultServer(upstream)`` listens on 127.0.0.1 in front of a real server, in an asyncio loop on a thread
of its own. Each client connection gets its own connection to the upstream server, kept open as long as
the client's (keep-alive and chunked uploads pass through byte for byte). Requests are parsed only as
far as needed to find where each one ends. What it does with a request is decided when its head
arrives, by ``mode``:

* ``"pass"``: forward the request, and the answer back as it comes;
* ``"delay"``: forward each piece of the request ``delay_s`` after it arrived, order kept, the answer
  back at once; a connection holds at most 64 pieces, so a client sending faster is slowed by TCP's own
  flow control, not buffered without bound;
* ``"status"``: answer ``status`` (500, 503) with MLflow's JSON error, forwarding nothing;
* ``"silent"``: read and discard what the client sends and never answer; when the mode changes, close
  the connection (its request never reaches the server). With no upstream (``FaultServer()``) this is
  the mode, a tracking server that hangs.

Two one-shot rules come first: ``refuse(part, times)`` answers 400 to the next matching requests, as
MLflow does to an invalid one; ``drop_response(part, times)`` forwards the next matching requests and
hangs up once the server starts answering, before the client hears anything, as when a timeout hits
after the server acted. ``requests`` counts, by path, the requests the upstream server answered.
At most ``max_open`` connections are served at once; more are closed on arrival.
"""

from __future__ import annotations

import asyncio
import enum
import http
import threading
from collections.abc import AsyncIterator, Coroutine
from dataclasses import dataclass
from typing import Any, TypeVar, final

__all__ = ["FaultServer", "Mode"]

MAX_OPEN = 64  # connections served at once
HELD_PIECES = 64  # pieces of a request a connection holds in delay mode before it stops reading the client
PIECE = 65536  # bytes read at a time
LOOPBACK = ("127.0.0.1", "localhost")
_T = TypeVar("_T")


class Mode(str, enum.Enum):
    """What the server does with each new request (see the module's docstring)."""

    PASS = "pass"
    DELAY = "delay"
    STATUS = "status"
    SILENT = "silent"


@dataclass
class _Request:
    """What the proxy needs to know of one request: where it goes and where its body ends."""

    target: str  # path and query, as the client sent them
    length: int  # Content-Length (0 when chunked or absent)
    chunked: bool
    close: bool  # the client asked for the connection to close after the answer
    drop: bool = False  # hang up once the server starts answering
    answered: bool = False  # the server started answering

    @property
    def path(self) -> str:
        return self.target.split("?")[0]

    @classmethod
    def parse(cls, head: bytes) -> _Request:
        lines = head.decode("latin-1").split("\r\n")
        _method, target, _version = lines[0].split(" ", 2)
        headers = {}
        for line in lines[1:]:
            if line:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip().lower()
        chunked = "chunked" in headers.get("transfer-encoding", "")
        length = 0 if chunked else int(headers.get("content-length") or 0)
        return cls(target, length, chunked, headers.get("connection") == "close")


async def _exactly(reader: asyncio.StreamReader, count: int) -> AsyncIterator[bytes]:
    while count > 0:
        piece = await reader.read(min(PIECE, count))
        if not piece:
            raise asyncio.IncompleteReadError(b"", count)
        count -= len(piece)
        yield piece


async def _body(reader: asyncio.StreamReader, request: _Request) -> AsyncIterator[bytes]:
    """The request's body as it arrives, framing included (chunk sizes, trailers), ending where it ends."""
    if not request.chunked:
        async for piece in _exactly(reader, request.length):
            yield piece
        return
    while True:
        line = await reader.readuntil(b"\r\n")
        yield line
        size = int(line.split(b";")[0].strip() or b"0", 16)
        if size == 0:  # the last chunk: trailers, then a blank line
            while (line := await reader.readuntil(b"\r\n")) != b"\r\n":
                yield line
            yield line
            return
        async for piece in _exactly(reader, size + 2):  # the chunk and its CRLF
            yield piece


def _error_answer(status: int, refused: bool) -> bytes:
    code = b"INVALID_PARAMETER_VALUE" if refused else b"TEMPORARILY_UNAVAILABLE"
    payload = b'{"error_code": "' + code + b'", "message": "fault proxy"}'
    head = f"HTTP/1.1 {status} {http.HTTPStatus(status).phrase}\r\nContent-Type: application/json\r\n"
    return head.encode() + f"Content-Length: {len(payload)}\r\n\r\n".encode() + payload


class _Link:
    """One client connection's connection to the upstream server: requests held and forwarded, answers back."""

    def __init__(
        self, server: FaultServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
        client: asyncio.StreamWriter,
    ) -> None:  # fmt: skip
        self.server, self.reader, self.writer, self.client = server, reader, writer, client
        self.held: asyncio.Queue[tuple[float, bytes] | None] = asyncio.Queue(HELD_PIECES)
        self.awaiting: _Request | None = None  # the request the next answer bytes belong to (no pipelining)
        self.tasks = [server._spawn(self._forward()), server._spawn(self._answer())]

    async def hold(self, due: float, data: bytes) -> None:
        """Forward ``data`` at loop time ``due``, after everything held before it."""
        await self.held.put((due, data))

    async def finish(self) -> None:
        """The client sent its last byte: forward what is held, then the end of stream, and wait for the answers."""
        await self.held.put(None)
        await asyncio.gather(*self.tasks, return_exceptions=True)

    def close(self) -> None:
        for task in self.tasks:
            task.cancel()
        self.writer.close()

    async def _forward(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while (item := await self.held.get()) is not None:
                due, data = item
                await asyncio.sleep(max(0.0, due - loop.time()))
                self.writer.write(data)
                await self.writer.drain()
            if self.writer.can_write_eof():
                self.writer.write_eof()
        except OSError as exc:  # the upstream hung up: so does the proxy, as a real one would
            self.server._record(f"forwarding to {self.server.upstream}: {exc!r}")
            self.client.close()
            while await self.held.get() is not None:  # never leave the client's side waiting on a full queue
                pass

    async def _answer(self) -> None:
        try:
            while data := await self.reader.read(PIECE):
                request = self.awaiting
                if request is not None and not request.answered:
                    request.answered = True
                    self.server._count(request.path)
                    if request.drop:  # the server did it; the client never hears so
                        break
                self.client.write(data)
                await self.client.drain()
        except OSError as exc:
            self.server._record(f"reading from {self.server.upstream}: {exc!r}")
        self.client.close()
        self.writer.close()


@final
class FaultServer:
    """A loopback HTTP proxy to ``upstream`` (``http://127.0.0.1:<port>``) that fails on demand.

    With no upstream it never answers (``mode`` is ``"silent"``; ``"status"`` works too). ``mode``,
    ``status`` and ``delay_s`` may be changed at any time from any thread; each new request sees the
    current values. ``close()`` (or leaving a ``with`` block) stops it and drops every connection.
    """

    def __init__(
        self, upstream: str | None = None, *, mode: Mode | str | None = None, status: int = 503,
        delay_s: float = 0.5, max_open: int = MAX_OPEN,
    ) -> None:  # fmt: skip
        self.upstream = upstream
        self._address = None if upstream is None else _loopback_address(upstream)
        self._mode = self._checked(mode if mode is not None else Mode.SILENT if upstream is None else Mode.PASS)
        self.status = status
        self.delay_s = delay_s
        self.max_open = max_open
        self.accepted = 0  # connections accepted so far
        self.open = 0  # connections open now
        self.errors: list[str] = []  # what went wrong with the upstream server, for a failing test to show
        self._requests: dict[str, int] = {}
        self._refusals: dict[str, int] = {}
        self._drops: dict[str, int] = {}
        self._lock = threading.Lock()
        self._closed = False
        self._changed = asyncio.Event()  # set (and replaced) whenever the mode changes
        self._tasks: set[asyncio.Task[Any]] = set()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="fault-server", daemon=True)
        self._thread.start()
        self._server = asyncio.run_coroutine_threadsafe(self._listen(), self._loop).result(10)
        self.port = int(self._server.sockets[0].getsockname()[1])
        self.uri = f"http://127.0.0.1:{self.port}"

    # -- control, from any thread ---------------------------------------------------------------------

    @property
    def mode(self) -> Mode:
        return self._mode

    @mode.setter
    def mode(self, value: Mode | str) -> None:
        self._mode = self._checked(value)
        if not self._closed:
            self._loop.call_soon_threadsafe(self._wake)

    @property
    def requests(self) -> dict[str, int]:
        """Requests the upstream server answered so far, by path (a copy)."""
        with self._lock:
            return dict(self._requests)

    def refuse(self, path_part: str, times: int = 1) -> None:
        """Answer 400 to the next ``times`` requests whose path contains ``path_part`` (MLflow: an invalid request)."""
        with self._lock:
            self._refusals[path_part] = times

    def drop_response(self, path_part: str, times: int = 1) -> None:
        """Forward the next ``times`` requests whose path contains ``path_part``, then hang up before the answer."""
        with self._lock:
            self._drops[path_part] = times

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        asyncio.run_coroutine_threadsafe(self._stop(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    def __enter__(self) -> FaultServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _checked(self, value: Mode | str) -> Mode:
        mode = Mode(value)  # a misspelt mode fails here, not as a test that silently passes
        if self._address is None and mode in (Mode.PASS, Mode.DELAY):
            raise ValueError(f"mode {mode.value!r} needs an upstream server to forward to")
        return mode

    # -- the loop's side ------------------------------------------------------------------------------

    def _spawn(self, work: Coroutine[Any, Any, _T]) -> asyncio.Task[_T]:
        task = asyncio.ensure_future(work)
        self._adopt(task)
        return task

    def _adopt(self, task: asyncio.Task[Any] | None) -> None:
        """Keep ``task`` until it is done, so that ``close()`` can cancel it."""
        if task is not None:
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def _wake(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    def _record(self, error: str) -> None:
        with self._lock:
            self.errors.append(error)

    def _count(self, path: str) -> None:
        with self._lock:
            self._requests[path] = self._requests.get(path, 0) + 1

    def _take(self, rules: dict[str, int], text: str) -> bool:
        """Use up one of the rules whose part is in ``text``; whether there was one."""
        with self._lock:
            part = next((part for part, left in rules.items() if left and part in text), None)
            if part is not None:
                rules[part] -= 1
            return part is not None

    async def _listen(self) -> asyncio.Server:
        return await asyncio.start_server(self._serve, "127.0.0.1", 0)

    async def _stop(self) -> None:
        self._server.close()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._adopt(asyncio.current_task())
        self.accepted += 1
        self.open += 1
        try:
            if self.open <= self.max_open:
                await self._converse(reader, writer)
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass  # the client hung up, or the answer task hung up on it
        except ValueError as exc:
            self._record(f"a request the proxy could not read: {exc!r}")
        except asyncio.CancelledError:  # closing
            pass
        finally:
            self.open -= 1
            writer.close()

    async def _converse(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Serve one client connection's requests, one after another."""
        loop = asyncio.get_running_loop()
        link: _Link | None = None
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except asyncio.IncompleteReadError:  # the client is done
                    if link is not None:
                        await link.finish()
                    return
                arrived = loop.time()
                request = _Request.parse(head)
                mode = self._mode
                if mode is Mode.SILENT:
                    await self._hold(reader)
                    return
                refused = self._take(self._refusals, request.target)
                if refused or mode is Mode.STATUS:
                    async for _ in _body(reader, request):
                        pass
                    writer.write(_error_answer(400 if refused else self.status, refused))
                    await writer.drain()
                    if request.close:
                        return
                    continue
                if link is None:
                    link = await self._connect(writer)
                request.drop = self._take(self._drops, request.path)
                link.awaiting = request
                await link.hold(arrived + (self.delay_s if mode is Mode.DELAY else 0.0), head)
                async for piece in _body(reader, request):
                    await link.hold(loop.time() + (self.delay_s if self._mode is Mode.DELAY else 0.0), piece)
        finally:
            if link is not None:
                link.close()

    async def _connect(self, client: asyncio.StreamWriter) -> _Link:
        assert self._address is not None  # forwarding modes need one (checked when the mode was set)
        try:
            reader, writer = await asyncio.open_connection(*self._address)
        except OSError as exc:  # the upstream is down: hang up on the client, as a real proxy would
            self._record(f"connecting to {self.upstream}: {exc!r}")
            raise
        return _Link(self, reader, writer, client)

    async def _hold(self, reader: asyncio.StreamReader) -> None:
        """Silent: read and discard until the client hangs up or the mode changes; never answer."""
        reading: asyncio.Task[bytes] | None = None
        changed: asyncio.Task[Any] | None = None
        try:
            while self._mode is Mode.SILENT:
                changed = self._spawn(self._changed.wait())
                reading = reading or self._spawn(reader.read(PIECE))
                done, _ = await asyncio.wait((reading, changed), return_when=asyncio.FIRST_COMPLETED)
                changed.cancel()
                if reading in done:
                    if not reading.result():
                        return
                    reading = None
        finally:
            for task in (reading, changed):
                if task is not None:
                    task.cancel()


def _loopback_address(uri: str) -> tuple[str, int]:
    """``http://127.0.0.1:5000`` -> ("127.0.0.1", 5000); anything but plain HTTP on loopback is refused."""
    scheme, _, rest = uri.partition("://")
    host, _, port = rest.rstrip("/").rpartition(":")
    if scheme != "http" or host not in LOOPBACK or not port.isdigit():
        raise ValueError(f"the fault server forwards only to http://127.0.0.1:<port>, not {uri!r}")
    return host, int(port)

"""A loopback server that never answers, and a fault proxy (``gradtrack_testing.mlflow_server`` starts the server)."""

from __future__ import annotations

import http.client
import http.server
import socket
import threading
import time

__all__ = ["FaultProxy", "SilentServer"]


class SilentServer:
    """Accepts TCP connections on loopback and never answers: a hung tracking server."""

    def __init__(self) -> None:
        self._socket = socket.socket()
        self._socket.bind(("127.0.0.1", 0))
        self._socket.listen(64)
        self.uri = f"http://127.0.0.1:{self._socket.getsockname()[1]}"
        self._held: list[socket.socket] = []
        self._stopped = False
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while not self._stopped:
            try:
                connection, _ = self._socket.accept()
            except OSError:
                return
            self._held.append(connection)

    def close(self) -> None:
        self._stopped = True
        self._socket.close()
        for connection in self._held:
            connection.close()


class FaultProxy:
    """An HTTP proxy on loopback in front of a real server, with faults switched on and off mid-run.

    ``mode``: ``"pass"`` forwards; ``"silent"`` accepts and never answers; ``"status"`` answers
    ``status`` (500, 503) without forwarding; ``"delay"`` forwards each request ``delay_s`` late.
    ``refuse(path_part, times)``: answer 400 to the next ``times`` requests whose path contains ``path_part``.
    ``drop_response(path_part, times)``: forward the next ``times`` requests whose path contains
    ``path_part``, then hang up without answering, as when a timeout hits after the server acted.
    ``requests`` counts what reached the upstream server, by path.
    """

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream.removeprefix("http://")
        self.mode = "pass"
        self.status = 503
        self.delay_s = 0.5
        self.requests: dict[str, int] = {}
        self._drops: dict[str, int] = {}
        self._refusals: dict[str, int] = {}
        self.errors: list[str] = []
        self._lock = threading.Lock()
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def _handle(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                if "chunked" in self.headers.get("Transfer-Encoding", ""):  # (an empty file is sent chunked)
                    body = self._read_chunks()
                mode = proxy.mode
                if mode == "silent":
                    while proxy.mode == "silent" and not proxy.closed:
                        time.sleep(0.05)
                    self.close_connection = True
                    return
                with proxy._lock:
                    refused = next((part for part, left in proxy._refusals.items() if left and part in self.path), None)
                    if refused is not None:
                        proxy._refusals[refused] -= 1
                if refused is not None:
                    mode = "refuse"
                if mode in ("status", "refuse"):
                    code = b"INVALID_PARAMETER_VALUE" if mode == "refuse" else b"TEMPORARILY_UNAVAILABLE"
                    payload = b'{"error_code": "' + code + b'", "message": "fault proxy"}'
                    self.send_response(400 if mode == "refuse" else proxy.status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                    return
                if mode == "delay":
                    time.sleep(proxy.delay_s)
                connection = http.client.HTTPConnection(proxy.upstream, timeout=60)
                dropped = ("host", "connection", "transfer-encoding", "content-length")
                headers = {k: v for k, v in self.headers.items() if k.lower() not in dropped}
                headers["Content-Length"] = str(len(body or b""))
                try:
                    connection.request(self.command, self.path, body=body, headers=headers)
                    response = connection.getresponse()
                    data = response.read()
                except OSError as exc:  # the upstream hung up: so does the proxy, as a real one would
                    proxy.errors.append(f"{self.command} {self.path} {dict(headers)}: {exc!r}")
                    self.close_connection = True
                    return
                finally:
                    connection.close()
                path = self.path.split("?")[0]
                with proxy._lock:
                    proxy.requests[path] = proxy.requests.get(path, 0) + 1
                    drop = next((part for part, left in proxy._drops.items() if left and part in path), None)
                    if drop is not None:
                        proxy._drops[drop] -= 1
                if drop is not None:  # the server did it; the client never hears so
                    self.close_connection = True
                    return
                self.send_response(response.status)
                for key, value in response.getheaders():
                    if key.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(key, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _read_chunks(self) -> bytes:
                body = b""
                while True:
                    size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                    if size == 0:
                        self.rfile.readline()  # the blank line after the last chunk
                        return body
                    body += self.rfile.read(size)
                    self.rfile.readline()

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _handle

        self.closed = False
        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.uri = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def refuse(self, path_part: str, times: int = 1) -> None:
        """Answer the next ``times`` matching requests 400, as MLflow does for an invalid request."""
        with self._lock:
            self._refusals[path_part] = times

    def drop_response(self, path_part: str, times: int = 1) -> None:
        with self._lock:
            self._drops[path_part] = times

    def close(self) -> None:
        self.closed = True
        self._server.shutdown()
        self._server.server_close()

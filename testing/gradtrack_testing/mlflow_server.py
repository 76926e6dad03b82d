"""One way to start a real ``mlflow server`` for the tests and the benchmarks.

Why it exists: gradtrack's MLflow backend is tested and measured against the real server, over HTTP on
loopback, never a mock. Tests and benchmarks each had their own way to start one (``MlflowServer`` in
the tests, ``mlflow_server()`` in ``benchmarks/_configs.py``); this is the one left. It can be stopped
and started again on the same port (the fault tests kill the server mid-run), stores in sqlite under
``root`` or in any store URI given (the load test's PostgreSQL), and is a context manager for the
benchmarks.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import final

from gradtrack_testing.ports import free_port

__all__ = ["MlflowServer"]


@final
class MlflowServer:
    """``mlflow server`` on 127.0.0.1 with its store, artifacts and log under ``root``.

    ``store`` is a backend store URI (default: ``sqlite:///<root>/mlflow.db``); ``port`` defaults to a
    free one and stays the same across ``restart()``. The server and its workers run in a process group
    of their own, stopped as one. ``with MlflowServer(root) as server:`` starts it and stops it.
    """

    def __init__(self, root: Path, *, port: int | None = None, store: str | None = None, workers: int = 1) -> None:
        self.root = root
        self.store = store or f"sqlite:///{root / 'mlflow.db'}"
        self.workers = workers
        self.port = port or free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen[bytes] | None = None
        self.log_path = root / "server.log"

    def __enter__(self) -> MlflowServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self, timeout: float = 90.0) -> None:
        """Start the server and return once ``/health`` answers; raise with the end of its log if it does not."""
        if self.process is not None:
            raise RuntimeError(f"the mlflow server at {self.uri} is already running")
        self.root.mkdir(parents=True, exist_ok=True)
        mlflow = Path(sys.executable).with_name("mlflow")
        command = [
            str(mlflow), "server", "--host", "127.0.0.1", "--port", str(self.port), "--workers", str(self.workers),
            "--backend-store-uri", self.store,
            "--serve-artifacts", "--artifacts-destination", str(self.root / "artifacts"),
        ]  # fmt: skip
        log = self.log_path.open("ab")  # appended: a restart keeps the earlier log
        # MLflow 3 starts job-runner processes (8 helpers importing MLflow) that serve no tracking request
        # and load both cores of a small machine for ~20 s after /health answers: leave them off.
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        self.process = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=self.root, env=env
        )
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                self.process = None
                raise RuntimeError(f"mlflow server exited: {self.log_path.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as response:
                    if response.status == 200:
                        return
            except OSError:
                time.sleep(0.25)
        self.stop()
        raise RuntimeError(f"mlflow server did not answer /health within {timeout}s")

    def stop(self) -> None:
        """Stop the server and its workers (the process group it leads, by its id); return once the port is free."""
        if self.process is None:
            return
        try:
            os.killpg(self.process.pid, signal.SIGTERM)
            self.process.wait(3)  # uvicorn drains slowly; sqlite survives a kill
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(5)
        except ProcessLookupError:
            pass
        self.process = None
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:  # the port is free again once the workers are gone
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", self.port)) != 0:
                    return
            time.sleep(0.1)

    def restart(self, timeout: float = 90.0) -> None:
        """Stop the server, then start it again on the same port with the same store."""
        self.stop()
        self.start(timeout)

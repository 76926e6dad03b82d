"""A throwaway PostgreSQL server on loopback for the load test: Debian's ``postgresql``, run as its user.

Why it exists: the load test and ``benchmarks/load.py`` put eight trainers against an MLflow server whose
store is a real PostgreSQL, as a shared team server is; both start it the same way.

``.ci/run`` installs the package when it is missing; ``Postgres.find()`` says why it cannot run here
(no binaries, no ``postgres`` user to run them as) so the test is skipped with that reason, never passed.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import subprocess
import time
from pathlib import Path

from gradtrack_testing.ports import free_port

__all__ = ["Postgres"]


class Postgres:
    """``initdb`` a data directory under ``root`` and serve it on 127.0.0.1 with trust authentication."""

    def __init__(self, bindir: Path, root: Path) -> None:
        self.bindir = bindir
        self.root = root
        self.port = free_port()
        self.data = root / "data"
        self.uri = f"postgresql+psycopg2://postgres@127.0.0.1:{self.port}/mlflow"

    @classmethod
    def find(cls, root: Path) -> tuple[Postgres | None, str]:
        """A server ready to start, or None and the reason it cannot run on this machine."""
        candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), reverse=True)
        found = shutil.which("initdb")
        initdb = Path(candidates[0]) if candidates else Path(found) if found else None
        if initdb is None:
            return None, "PostgreSQL is not installed (Debian: apt-get install postgresql; .ci/run does that)"
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            return None, "there is no 'postgres' user to run PostgreSQL as (it refuses to run as root)"
        return cls(initdb.resolve().parent, root), ""

    def _as_postgres(self, *command: str, **kwargs: object) -> subprocess.CompletedProcess[str]:
        prefix = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        return subprocess.run([*prefix, *command], capture_output=True, text=True, check=True, timeout=120,
                              **kwargs)  # type: ignore[call-overload]  # fmt: skip

    def start(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            shutil.chown(self.root, "postgres", "postgres")
            os.chmod(self.root, 0o755)
            for parent in self.root.parents:  # the postgres user must reach its data directory
                if parent == Path("/") or parent == Path(os.sep):
                    break
                os.chmod(parent, os.stat(parent).st_mode | 0o011)
        self._as_postgres(str(self.bindir / "initdb"), "-D", str(self.data), "-U", "postgres", "--auth=trust",
                          "-E", "UTF8")  # fmt: skip
        options = f"-c listen_addresses=127.0.0.1 -c port={self.port} -c unix_socket_directories={self.root}"
        self._as_postgres(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-o", options,
                          "-l", str(self.root / "postgres.log"), "-w", "start")  # fmt: skip
        deadline = time.monotonic() + 30
        while True:
            try:
                self._as_postgres(str(self.bindir / "createdb"), "-h", "127.0.0.1", "-p", str(self.port),
                                  "-U", "postgres", "mlflow")  # fmt: skip
                return
            except subprocess.CalledProcessError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)

    def stop(self) -> None:
        with contextlib.suppress(subprocess.CalledProcessError, FileNotFoundError):
            self._as_postgres(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "stop")

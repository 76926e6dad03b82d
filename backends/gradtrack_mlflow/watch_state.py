"""What ``gradtrack watch`` remembers: the alerts delivered, in a state file per tracking URI and set of
experiments, written atomically, owner-readable only, without credentials, and locked against a second watcher.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from gradtrack.delivery.secrets import strip_userinfo
from gradtrack_mlflow.alerts import DIVERGED, Alert

STATE_VERSION = 1

# -- the state file ----------------------------------------------------------------------------------------


class StateError(ValueError):
    """The state file exists but is not one ``gradtrack watch`` wrote."""


class StateInUseError(RuntimeError):
    """Another watcher holds the state file's lock."""


def _cache_home() -> Path:
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    return Path(xdg) if os.path.isabs(xdg) else Path.home() / ".cache"


def default_state_path(tracking_uri: str, experiments: Sequence[str]) -> Path:
    """``<cache>/gradtrack/watch-<hash of the tracking URI (without credentials) and experiments>.json``."""
    key = json.dumps([strip_userinfo(tracking_uri), sorted(set(experiments))])
    digest = hashlib.sha256(key.encode("utf-8")).hexdigest()[:16]
    return _cache_home() / "gradtrack" / f"watch-{digest}.json"


def _private_directories(directory: Path) -> None:
    """Create ``directory`` and its missing parents readable by their owner only (existing ones untouched)."""
    missing = [d for d in (directory, *directory.parents) if not d.exists()]
    for folder in reversed(missing):
        with contextlib.suppress(FileExistsError):
            folder.mkdir(mode=0o700)
            os.chmod(folder, 0o700)


@dataclass
class _Sent:
    diverged: bool = False
    explosions: int = 0
    rollbacks: int = 0


class WatchState:
    """What was delivered, per run: the divergence alerted or not, and the explosion and rollback counts alerted
    (a state written before rollbacks were watched has none: 0)."""

    def __init__(self, path: Path, tracking_uri: str, experiments: Sequence[str]) -> None:
        self.path = path
        self.tracking_uri = strip_userinfo(tracking_uri)
        self.experiments = sorted(set(experiments))
        self.runs: dict[str, _Sent] = {}
        self._lock: IO[str] | None = None

    def load(self) -> None:
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return
        except OSError as exc:
            raise StateError(f"cannot read the state file {self.path}: {exc.strerror or exc!r}") from None
        try:
            data = json.loads(text)
            if not isinstance(data, dict) or data.get("version") != STATE_VERSION:
                raise ValueError(f"not a version {STATE_VERSION} gradtrack watch state")
            runs = {}
            for run_id, sent in data["runs"].items():
                diverged, explosions, rollbacks = sent["diverged"], sent["explosions"], sent.get("rollbacks", 0)
                counts_ok = all(isinstance(n, int) and not isinstance(n, bool) for n in (explosions, rollbacks))
                if not isinstance(diverged, bool) or not counts_ok:
                    raise ValueError(f"bad entry for run {run_id!r}")
                runs[str(run_id)] = _Sent(diverged, explosions, rollbacks)
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise StateError(
                f"{self.path} is not a gradtrack watch state file ({exc}); move it away to start afresh "
                "(every flagged run is then alerted again)"
            ) from None
        self.runs = runs

    def lock(self) -> None:
        """Hold ``<state>.lock`` for this process's lifetime: two watchers on one state would alert twice."""
        try:
            import fcntl
        except ImportError:  # pragma: no cover - not POSIX: no lock
            return
        _private_directories(self.path.parent)
        lock_path = self.path.with_name(self.path.name + ".lock")
        handle = open(os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600), "r+", encoding="utf-8")  # noqa: SIM115
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.close()
            raise StateInUseError(
                f"another gradtrack watch is using the state file {self.path}; give this one its own --state"
            ) from None
        self._lock = handle

    def unlock(self) -> None:
        if self._lock is not None:
            self._lock.close()  # closing releases the lock
            self._lock = None

    def sent(self, run_id: str) -> _Sent:
        return self.runs.get(run_id, _Sent())

    def record(self, alert: Alert) -> None:
        sent = self.runs.setdefault(alert.run.run_id, _Sent())
        if alert.event == DIVERGED:
            sent.diverged = True  # covers the explosions so far: no explosion alert for them afterwards
        sent.explosions = max(sent.explosions, alert.run.explosions)  # every alert says the counts so far
        sent.rollbacks = max(sent.rollbacks, alert.run.rollbacks)

    def save(self) -> None:
        """Write the whole state to a temporary file in the same folder (0600), then rename it over the old."""
        data = {
            "version": STATE_VERSION,
            "tracking_uri": self.tracking_uri,
            "experiments": self.experiments,
            "runs": {
                run_id: {"diverged": s.diverged, "explosions": s.explosions, "rollbacks": s.rollbacks}
                for run_id, s in self.runs.items()
            },
        }
        _private_directories(self.path.parent)
        descriptor, temporary = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.", suffix=".tmp")
        try:
            with open(descriptor, "w", encoding="utf-8") as file:
                json.dump(data, file, indent=1, sort_keys=True)
                file.flush()
                os.fsync(file.fileno())
            os.chmod(temporary, 0o600)
            os.replace(temporary, self.path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(temporary)
            raise



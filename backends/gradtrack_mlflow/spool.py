"""The on-disk journal of operations that could not be sent yet.

``spool.jsonl`` starts with a header line (``{"gradtrack_spool": 1}``) and then holds one operation per
line, in the order they were produced; ``spool.offset`` holds how many lines were handled, rewritten
after each one, so a replay (live or by ``python -m gradtrack_mlflow replay``) resumes where the last
one stopped and never sends a batch twice. Operations MLflow refused for good go to ``rejected.jsonl``
for a human to read.

Everything is JSON (never pickle), owner-only (files 0600, directories 0700), and free of credentials:
operations carry the tracking URI without its ``user:password@``, and error texts are redacted. A
replay then takes the credentials from the environment (``MLFLOW_TRACKING_USERNAME`` and
``MLFLOW_TRACKING_PASSWORD``, or ``MLFLOW_TRACKING_TOKEN``) or from ``--tracking-uri``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO, Any, final

from gradtrack.delivery.secrets import redact

__all__ = ["NotASpoolError", "Spool", "private_directory", "private_open"]

HEADER = {"gradtrack_spool": 1}


class NotASpoolError(ValueError):
    """The file given to replay was not written by gradtrack."""


def private_directory(directory: Path) -> None:
    """Create ``directory`` (and parents) readable by its owner only."""
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(directory, 0o700)


def private_open(path: Path, mode: str = "a") -> IO[str]:
    """Open a text file that only its owner can read, whatever the umask."""
    flags = os.O_WRONLY | os.O_CREAT | (os.O_APPEND if mode == "a" else os.O_TRUNC)
    return open(os.open(path, flags, 0o600), mode, encoding="utf-8")


@final
class Spool:
    """A journal directory: ``spool.jsonl``, ``spool.offset`` and ``rejected.jsonl``."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.path = directory / "spool.jsonl"
        self._offset_path = directory / "spool.offset"
        self.rejected_path = directory / "rejected.jsonl"

    @classmethod
    def at(cls, path: str | os.PathLike[str]) -> Spool:
        """The spool of a directory or of its ``spool.jsonl`` file (what the replay command takes)."""
        target = Path(path)
        if target.is_dir() or target.suffix != ".jsonl":
            return cls(target)
        spool = cls(target.parent)
        spool.path = target  # whatever its name: replay reads the file it was given, and checks it
        return spool

    def append(self, ops: Sequence[dict[str, Any]]) -> None:
        """Write ``ops`` durably (fsync) before returning; raises OSError when the disk refuses."""
        if not ops:
            return
        private_directory(self.directory)
        fresh = not self.path.exists()
        with private_open(self.path) as file:
            if fresh:
                file.write(json.dumps(HEADER) + "\n")
            file.writelines(json.dumps(op, allow_nan=False) + "\n" for op in ops)
            file.flush()
            os.fsync(file.fileno())

    @property
    def offset(self) -> int:
        try:
            return max(1, int(self._offset_path.read_text()))
        except (FileNotFoundError, ValueError):
            return 1  # line 0 is the header

    def set_offset(self, offset: int) -> None:
        temporary = self._offset_path.with_suffix(".tmp")
        with private_open(temporary, "w") as file:
            file.write(str(offset))
        temporary.replace(self._offset_path)

    def check(self) -> None:
        """Refuse a file gradtrack did not write, before anything of it is sent anywhere."""
        try:
            with self.path.open(encoding="utf-8") as file:
                header = json.loads(file.readline() or "null")
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            raise NotASpoolError(f"{self.path} is not a gradtrack spool: {exc}") from exc
        if header != HEADER:
            raise NotASpoolError(f"{self.path} is not a gradtrack spool (its first line is not {json.dumps(HEADER)})")

    def pending(self) -> Iterator[tuple[int, dict[str, Any]]]:
        """Unsent operations with their line numbers, read lazily (a spool may be large)."""
        if not self.path.exists():
            return
        start = self.offset
        with self.path.open(encoding="utf-8") as file:
            for index, line in enumerate(file):
                if index >= start and line.strip():
                    op = json.loads(line)
                    if not isinstance(op, dict) or not isinstance(op.get("op"), str):
                        raise NotASpoolError(f"{self.path} line {index + 1} is not a gradtrack operation")
                    yield index, op

    def count_pending(self) -> int:
        return sum(1 for _ in self.pending())

    def has_pending(self) -> bool:
        return next(self.pending(), None) is not None

    def reject(self, op: dict[str, Any], error: BaseException, uri: str = "") -> None:
        private_directory(self.directory)
        with private_open(self.rejected_path) as file:
            file.write(json.dumps({"error": redact(repr(error), [uri]), "op": op}, allow_nan=False) + "\n")

    def clear(self) -> None:
        """Forget the journal once every operation reached the store."""
        for path in (self.path, self._offset_path):
            path.unlink(missing_ok=True)

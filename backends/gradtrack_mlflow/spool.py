"""The on-disk journal of operations that could not be sent yet.

``spool.jsonl`` holds one operation per line, in the order they were produced; ``spool.offset``
holds how many of them reached the tracking store, rewritten after each one, so a replay (live or
by ``python -m gradtrack_mlflow replay``) resumes where the last one stopped and never sends a batch
twice. Operations MLflow refused for good go to ``rejected.jsonl`` for a human to read.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, final

__all__ = ["Spool"]


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
        return cls(target.parent if target.suffix == ".jsonl" else target)

    def append(self, ops: Sequence[dict[str, Any]]) -> None:
        if not ops:
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8") as file:
            file.writelines(json.dumps(op, allow_nan=False) + "\n" for op in ops)
            file.flush()
            os.fsync(file.fileno())

    @property
    def offset(self) -> int:
        try:
            return int(self._offset_path.read_text())
        except (FileNotFoundError, ValueError):
            return 0

    def set_offset(self, offset: int) -> None:
        temporary = self._offset_path.with_suffix(".tmp")
        temporary.write_text(str(offset))
        temporary.replace(self._offset_path)

    def pending(self) -> Iterator[tuple[int, dict[str, Any]]]:
        """Unsent operations with their line numbers, read lazily (a spool may be large)."""
        if not self.path.exists():
            return
        start = self.offset
        with self.path.open(encoding="utf-8") as file:
            for index, line in enumerate(file):
                if index >= start and line.strip():
                    yield index, json.loads(line)

    def count_pending(self) -> int:
        return sum(1 for _ in self.pending())

    def has_pending(self) -> bool:
        return next(self.pending(), None) is not None

    def reject(self, op: dict[str, Any], error: BaseException) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        with self.rejected_path.open("a", encoding="utf-8") as file:
            file.write(json.dumps({"error": repr(error), "op": op}, allow_nan=False) + "\n")

    def clear(self) -> None:
        """Forget the journal once every operation reached the store."""
        for path in (self.path, self._offset_path):
            path.unlink(missing_ok=True)

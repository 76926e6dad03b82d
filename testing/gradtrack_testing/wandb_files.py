"""Reading what wandb wrote: the run's ``.wandb`` file, decoded record by record.

An offline run stores everything it would send to the server in ``run-<id>.wandb``: a 7-byte
header (``:W&B``, magic 0xBEE1, version 0), then LevelDB-log framing (32 KiB blocks of records with a
crc32 of type and data, a length and a FULL/FIRST/MIDDLE/LAST type) around serialized
``wandb_internal_pb2.Record`` protobufs. wandb 0.31 ships no Python reader, so this is one, with
checksums verified, so tests assert on exactly what W&B would receive.
"""

from __future__ import annotations

import json
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from wandb.proto import wandb_internal_pb2 as _generated

__all__ = ["WandbRun", "read_records", "run_files"]

# wandb picks the generated protobuf module for the installed protobuf at import time: typed loosely.
pb: Any = _generated

_HEADER = b":W&B" + struct.pack("<HB", 0xBEE1, 0)
_BLOCK = 32768
_FRAME = 7
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def read_records(path: Path) -> Iterator[Any]:
    """Every complete record in a ``.wandb`` file, in order; raises on a bad header or checksum.

    A file still being written may end in a partial record: reading stops before it.
    """
    data = path.read_bytes()
    if data[:_FRAME] != _HEADER:
        raise ValueError(f"{path} does not start with the W&B header: {data[:_FRAME]!r}")
    pos, parts = _FRAME, list[bytes]()
    while pos + _FRAME <= len(data):
        left = _BLOCK - pos % _BLOCK
        if left < _FRAME:  # block trailer: zero padding
            pos += left
            continue
        checksum, length, kind = struct.unpack("<IHB", data[pos : pos + _FRAME])
        if kind == 0 and length == 0:  # the unwritten end of the last block
            break
        if pos + _FRAME + length > len(data):  # a record wandb-core is still writing
            break
        body = data[pos + _FRAME : pos + _FRAME + length]
        if zlib.crc32(bytes([kind]) + body) != checksum:
            raise ValueError(f"{path}: bad checksum at offset {pos}")
        pos += _FRAME + length
        if kind == _FIRST:
            parts = [body]
            continue
        if kind == _MIDDLE:
            parts.append(body)
            continue
        payload = body if kind == _FULL else b"".join([*parts, body])
        record = pb.Record()
        record.ParseFromString(payload)
        yield record


def run_files(root: Path) -> list[Path]:
    """Every run's ``.wandb`` file under a W&B ``dir``."""
    return sorted(root.rglob("run-*.wandb"))


def _items(items: Any) -> dict[str, Any]:
    """History/summary items (``nested_key`` paths or plain ``key``) as one flat dict."""
    out: dict[str, Any] = {}
    for item in items:
        path = list(item.nested_key) or [item.key]
        target = out
        for part in path[:-1]:
            target = target.setdefault(part, {})
        target[path[-1]] = json.loads(item.value_json)
    return out


@dataclass
class WandbRun:
    """The decoded content of one run file: what the W&B server would show for that run."""

    path: Path
    run_id: str = ""
    config: dict[str, Any] = field(default_factory=dict)
    tag_updates: list[tuple[int, tuple[str, ...]]] = field(default_factory=list)  # (position in order, tags)
    history: list[dict[str, Any]] = field(default_factory=list)
    metrics: list[Any] = field(default_factory=list)
    alerts: list[Any] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    exit_code: int | None = None
    order: list[str] = field(default_factory=list)

    @classmethod
    def read(cls, path: Path) -> WandbRun:
        run = cls(path)
        for record in read_records(path):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                run.run_id = record.run.run_id
                run.config.update(_items(record.run.config.update))
                run.tag_updates.append((len(run.order), tuple(record.run.tags)))
            elif kind == "config":
                run.config.update(_items(record.config.update))
            elif kind == "history":
                run.history.append(_items(record.history.item))
            elif kind == "metric":
                run.metrics.append(record.metric)
            elif kind == "alert":
                run.alerts.append(record.alert)
            elif kind == "summary":
                run.summary.update(_items(record.summary.update))
            elif kind == "exit":
                run.exit_code = record.exit.exit_code
            if kind is not None:
                run.order.append(kind)
        return run

    @property
    def tags(self) -> tuple[str, ...]:
        """The run's tags as last recorded."""
        return self.tag_updates[-1][1] if self.tag_updates else ()

    def first_tagged(self, tag: str) -> int:
        """Position in ``order`` of the first run record carrying ``tag``."""
        return next(position for position, tags in self.tag_updates if tag in tags)

    def rows_with(self, key: str) -> list[dict[str, Any]]:
        return [row for row in self.history if key in row]

    def metric(self, name: str) -> Any:
        """The last ``define_metric`` for a name or glob."""
        found = [m for m in self.metrics if name in (m.name, m.glob_name)]
        if not found:
            raise KeyError(f"no define_metric for {name!r} in {self.path}")
        return found[-1]

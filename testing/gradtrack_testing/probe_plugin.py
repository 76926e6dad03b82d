"""A gradtrack plugin for reporter tests, found through an entry point like any third-party backend.

``Probe`` writes every hook call it receives, in order, as a JSON line (with its process id) to
``path``, so a test in the training process can read what the reporter process delivered. It can also
misbehave on purpose: sleep in every step (``delay_s``), raise in one hook (``fail_in``), or take its
whole process down at a given step (``crash_at_step``).

Why it exists: what runs in the reporter process can only be observed from outside it, and a plugin
reaches the reporter only as users' plugins do, through the ``gradtrack`` entry-point group. It is not
registered by this distribution (every test would then load it): ``installed(directory)`` writes a
distribution that names it and puts it on ``sys.path`` for as long as the ``with`` block lasts, and a
reporter process started meanwhile inherits that path.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from gradtrack import hookimpl
from gradtrack.events import Divergence, Explosion, LayersAdded, RunEnd, RunStart, StepStats

__all__ = ["Probe", "gradtrack_make_backend", "installed", "read"]


class Probe:
    def __init__(
        self, path: str, delay_s: float = 0.0, fail_in: str | None = None, crash_at_step: int | None = None
    ) -> None:
        self.path = path
        self.delay_s = delay_s
        self.fail_in = fail_in
        self.crash_at_step = crash_at_step

    def _write(self, hook: str, **fields: Any) -> None:
        if self.fail_in in (hook, "*"):
            raise OSError(f"probe fails in {hook}")
        line = {"hook": hook, "pid": os.getpid(), "torch": "torch" in sys.modules, **fields}
        with open(self.path, "a", encoding="utf-8") as file:
            file.write(json.dumps(line) + "\n")

    @hookimpl
    def gradtrack_run_start(self, start: RunStart) -> None:
        self._write("run_start", layers=list(start.layer_names), config=dict(start.config))

    @hookimpl
    def gradtrack_step(self, stats: StepStats) -> None:
        if self.crash_at_step is not None and stats.step == self.crash_at_step:
            os._exit(3)  # like a segfault in an SDK: no cleanup, no goodbye
        if self.delay_s:
            time.sleep(self.delay_s)
        self._write(
            "step",
            step=stats.step,
            total_norm=stats.total_norm,
            loss=stats.loss,
            layer_norms=stats.layer_norms,
            layer_p95=stats.layer_p95,
            amp_overflow=stats.amp_overflow,
        )

    @hookimpl
    def gradtrack_layers_added(self, layers: LayersAdded) -> None:
        self._write("layers_added", step=layers.step, names=list(layers.names))

    @hookimpl
    def gradtrack_explosion(self, event: Explosion) -> None:
        self._write("explosion", step=event.step, kind=event.kind, offenders=[o.name for o in event.offenders])

    @hookimpl
    def gradtrack_divergence(self, event: Divergence) -> None:
        self._write("divergence", step=event.step, reason=event.reason)

    @hookimpl
    def gradtrack_run_end(self, end: RunEnd) -> None:
        self._write("run_end", status=end.status, summary=end.summary.to_dict())

    @hookimpl
    def gradtrack_flush(self, timeout: float) -> None:
        self._write("flush")


@hookimpl
def gradtrack_make_backend(name: str, options: dict[str, Any]) -> Probe | None:
    return Probe(**options) if name == "probe" else None


def read(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    try:
        with open(path, encoding="utf-8") as file:
            return [json.loads(line) for line in file if line.strip()]
    except FileNotFoundError:
        return []


@contextlib.contextmanager
def installed(directory: Path) -> Iterator[None]:
    """The probe installed as the ``probe`` backend while inside: a distribution written to ``directory``."""
    dist_info = directory / "gradtrack_probe-1.0.dist-info"
    dist_info.mkdir(parents=True, exist_ok=True)
    (dist_info / "METADATA").write_text("Metadata-Version: 2.1\nName: gradtrack-probe\nVersion: 1.0\n")
    (dist_info / "entry_points.txt").write_text(f"[gradtrack]\nprobe = {__name__}\n")
    sys.path.insert(0, str(directory))
    importlib.invalidate_caches()  # importlib.metadata caches what each path entry holds
    try:
        yield
    finally:
        sys.path.remove(str(directory))
        importlib.invalidate_caches()

"""The built-in ``console`` backend: one concise line per explosion, rollback, divergence and run end."""

from __future__ import annotations

import sys
from collections.abc import Mapping
from typing import Any, TextIO, final

from gradtrack.events import Divergence, Explosion, Rollback, RunEnd, RunStart, StepBatch
from gradtrack.hookspecs import hookimpl
from gradtrack.validate import count

__all__ = ["ConsoleBackend"]


@final
class ConsoleBackend:
    """Prints like the hand-written loops it replaces: ``Step 3: loss=..., grad_norm=... [EXPLODING]``.

    ``every``: also print every N-th step (0: only explosions, rollbacks, divergence and the end).
    ``stream``: where to print (default: standard output, which the reporter process shares with the
    training process). A stream object keeps the console in the training process, on a thread.
    """

    def __init__(self, every: int = 0, stream: TextIO | None = None) -> None:
        self.every = count("console option 'every'", every, minimum=0)
        if stream is not None and not callable(getattr(stream, "write", None)):
            raise ValueError(f"console option 'stream' must have a write() method, got {stream!r}")
        self.stream = stream
        self.gradtrack_in_process = stream is not None  # an object, not a file descriptor: it stays here

    def _print(self, line: str) -> None:
        print(f"[gradtrack] {line}", file=self.stream or sys.stdout, flush=True)

    @hookimpl
    def gradtrack_run_start(self, start: RunStart) -> None:
        config = start.config
        clip = config["clip"]
        if clip != "none":
            clip += f" ({config.get('max_norm', config.get('clip_value'))})"
        self._print(f"tracking {len(start.layer_names)} tensors of {start.model_class}; clip={clip}")

    @hookimpl
    def gradtrack_steps(self, batch: StepBatch) -> None:
        if not self.every:
            return
        for row in (batch.step % self.every == 0).nonzero()[0].tolist():
            stats = batch.stats(row)
            if stats.amp_overflow:
                self._print(f"Step {stats.step:4d}: skipped by the AMP GradScaler (overflow) [OK]")
                continue
            loss = f"loss={stats.loss:.4f}, " if stats.loss is not None else ""
            status = "EXPLODING" if stats.explosion else "OK"
            clipped = f", clipped x{stats.clip_coef:.3g}" if stats.clipped else ""
            self._print(f"Step {stats.step:4d}: {loss}grad_norm={stats.total_norm:.4g}{clipped} [{status}]")

    @hookimpl
    def gradtrack_explosion(self, event: Explosion) -> None:
        self._print(f"EXPLOSION {event.describe()}")

    @hookimpl
    def gradtrack_rollback(self, event: Rollback) -> None:
        self._print(f"ROLLBACK {event.describe()}")

    @hookimpl
    def gradtrack_divergence(self, event: Divergence) -> None:
        self._print(f"DIVERGED at step {event.step}: {event.reason}")

    @hookimpl
    def gradtrack_run_end(self, end: RunEnd) -> None:
        s = end.summary
        median = f"{s.norm_median:.4g}" if s.norm_median is not None else "n/a"
        advice = f", recommended max_norm {s.recommended_max_norm:.3g}" if s.recommended_max_norm else ""
        overflow = f", AMP overflow steps {s.amp_overflow_steps}" if s.amp_overflow_steps else ""
        rollbacks = f", rollbacks {len(s.rollbacks)} (learning rate x{s.lr_scale:g})" if s.rollbacks else ""
        self._print(
            f"run {end.status}: {s.steps} steps, median norm {median}, clipped {s.clipped_steps}, "
            f"explosions {s.explosions}{rollbacks}, diverged {s.diverged}{overflow}{advice}"
        )


@hookimpl
def gradtrack_make_backend(name: str, options: Mapping[str, Any]) -> ConsoleBackend | None:
    return ConsoleBackend(**options) if name == "console" else None

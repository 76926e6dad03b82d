"""Explosion events (one step) and divergence (the whole run), judged on host numbers.

Explosion, checked at every step in this order:

* ``nonfinite``: the total norm is NaN or Inf.
* ``threshold``: the total norm exceeds ``explosion_threshold`` (an absolute floor, default 1e3).
* ``spike``: after ``warmup`` healthy steps, the total norm exceeds ``spike_factor`` (default 10)
  times the median of the last ``window`` healthy norms. Spiking norms enter the history capped at
  that limit, so a legitimate shift of scale is learnt within half a window instead of alarming forever.

Divergence, judged once per run and never undone:

* the observed loss is NaN or Inf;
* gradients are non-finite on ``nonfinite_patience`` consecutive steps (default 3);
* the smoothed loss (EMA, ``loss_smoothing``) stays above ``min + loss_blowup * scale`` for
  ``loss_patience`` consecutive steps, where ``min`` is its running minimum and ``scale`` is
  ``max(|min|, |first smoothed loss|)``: the loss must climb back far above where training started,
  which noise and a clipped spike never do.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, final

import numpy as np

from gradtrack.events import Divergence, ExplosionKind, Offender
from gradtrack.validate import count, number

__all__ = ["DivergenceDetector", "ExplosionDetector", "ExplosionRule", "offenders"]


def offenders(
    layer_norms: np.ndarray, names: Sequence[str], threshold: float, top_k: int
) -> tuple[Offender, ...]:
    """Every layer with a non-finite norm, then the ``top_k`` largest finite norms."""
    finite = np.isfinite(layer_norms)
    bad = [Offender(names[i], float(layer_norms[i]), True) for i in np.flatnonzero(~finite).tolist()]
    finite_idx = np.flatnonzero(finite)
    k = min(top_k, finite_idx.size)
    if k:
        values = layer_norms[finite_idx]
        top = finite_idx[np.argpartition(-values, k - 1)[:k]]
        top = top[np.argsort(-layer_norms[top], kind="stable")]
        bad.extend(Offender(names[i], float(layer_norms[i]), False) for i in top.tolist())
    return tuple(bad)


class ExplosionRule(Protocol):
    """Decides whether one step's gradients exploded; returns the kind and the threshold crossed."""

    def check(self, total_norm: float) -> tuple[ExplosionKind, float] | None: ...

    def config(self) -> dict[str, float]: ...


@final
class ExplosionDetector:
    """The default rule: non-finite, absolute floor, then a spike against recent healthy history."""

    def __init__(
        self,
        explosion_threshold: float = 1e3,
        spike_factor: float = 10.0,
        window: int = 100,
        warmup: int = 10,
    ) -> None:
        self.explosion_threshold = number("explosion_threshold", explosion_threshold, allow_inf=True)
        self.spike_factor = number("spike_factor", spike_factor, minimum=1.0, allow_inf=True)
        self.warmup = count("spike warmup", warmup)
        self._history: deque[float] = deque(maxlen=count("spike window", window))

    def spike_limit(self) -> float:
        if len(self._history) < self.warmup or math.isinf(self.spike_factor):
            return math.inf
        return self.spike_factor * statistics.median(self._history)

    def check(self, total_norm: float) -> tuple[ExplosionKind, float] | None:
        if not math.isfinite(total_norm):
            return "nonfinite", self.explosion_threshold
        limit = self.spike_limit()
        self._history.append(min(total_norm, limit))
        if total_norm > self.explosion_threshold:
            return "threshold", self.explosion_threshold
        if total_norm > limit:
            return "spike", limit
        return None

    def config(self) -> dict[str, float]:
        return {
            "explosion_threshold": self.explosion_threshold,
            "spike_factor": self.spike_factor,
            "spike_window": float(self._history.maxlen or 0),
            "spike_warmup": float(self.warmup),
        }


@dataclass(slots=True)
class _LossState:
    ema: float | None = None
    first: float | None = None
    minimum: float = math.inf
    above: int = 0


@final
class DivergenceDetector:
    """Run-level judgement: sticky once raised."""

    def __init__(
        self,
        nonfinite_patience: int = 3,
        loss_blowup: float = 10.0,
        loss_patience: int = 5,
        loss_smoothing: float = 0.1,
    ) -> None:
        self.nonfinite_patience = count("nonfinite_patience", nonfinite_patience)
        self.loss_blowup = number("loss_blowup", loss_blowup)
        self.loss_patience = count("loss_patience", loss_patience)
        if number("loss_smoothing", loss_smoothing) > 1:
            raise ValueError(f"loss_smoothing must be in (0, 1], got {loss_smoothing!r}")
        self.loss_smoothing = float(loss_smoothing)
        self._nonfinite_run = 0
        self._loss = _LossState()
        self.verdict: Divergence | None = None

    def update(self, step: int, nonfinite: int, loss: float | None, timestamp: float) -> Divergence | None:
        """Feed one step; returns the Divergence the first time the run is judged diverged."""
        if self.verdict is not None:
            return None
        reason = self._nonfinite_reason(nonfinite) or self._loss_reason(loss)
        if reason is None:
            return None
        self.verdict = Divergence(step=step, reason=reason, timestamp=timestamp)
        return self.verdict

    def _nonfinite_reason(self, nonfinite: int) -> str | None:
        self._nonfinite_run = self._nonfinite_run + 1 if nonfinite else 0
        if self._nonfinite_run >= self.nonfinite_patience:
            return f"non-finite gradients on {self._nonfinite_run} consecutive steps"
        return None

    def _loss_reason(self, loss: float | None) -> str | None:
        if loss is None:
            return None
        if not math.isfinite(loss):
            return f"loss is {loss}"
        state = self._loss
        state.ema = loss if state.ema is None else state.ema + self.loss_smoothing * (loss - state.ema)
        if state.first is None:
            state.first = state.ema
        state.minimum = min(state.minimum, state.ema)
        scale = max(abs(state.minimum), abs(state.first))
        limit = state.minimum + self.loss_blowup * scale
        state.above = state.above + 1 if state.ema > limit else 0
        if state.above >= self.loss_patience:
            return (
                f"smoothed loss {state.ema:.4g} above {limit:.4g} (running min {state.minimum:.4g} "
                f"+ {self.loss_blowup:g}x scale) for {state.above} steps"
            )
        return None

    def config(self) -> dict[str, float]:
        return {
            "nonfinite_patience": float(self.nonfinite_patience),
            "loss_blowup": self.loss_blowup,
            "loss_patience": float(self.loss_patience),
            "loss_smoothing": self.loss_smoothing,
        }

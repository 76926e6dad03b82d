"""A run's norms over time, in bounded memory: what the plots are drawn from.

Backends keep one while the run goes (from the records they receive); ``gradtrack report`` rebuilds one
from a run's logged metrics. Total norms are max-pooled into at most ``BUCKETS`` points, per-layer
norms likewise (one row per layer), so a run of a million steps of a 5,000-layer model stays a few
megabytes; explosions and rollbacks keep their latest thousand.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import final

import numpy as np

__all__ = ["BUCKETS", "RunHistory"]

BUCKETS = 512


@final
class _Pooled:
    """Max-pooled values over step buckets that double their width when full (NaN kept: it is news)."""

    def __init__(self, size: int = BUCKETS) -> None:
        self.size = size
        self.width = 1
        self.first: int | None = None
        self.values = np.full(size, -np.inf)

    def add(self, step: int, value: float) -> None:
        if self.first is None:
            self.first = step
        slot = (step - self.first) // self.width
        while slot >= self.size:
            pairs = self.values.reshape(-1, 2)
            merged = np.where(np.isnan(pairs).any(axis=1), np.nan, pairs.max(axis=1))
            self.values = np.concatenate([merged, np.full(self.size // 2, -np.inf)])
            self.width *= 2
            slot = (step - self.first) // self.width
        current = self.values[slot]
        if math.isnan(value) or math.isnan(current):
            self.values[slot] = math.nan
        else:
            self.values[slot] = max(current, value)

    def add_many(self, steps: np.ndarray, values: np.ndarray) -> None:
        """``add`` for each pair, at once (the maximum of a bucket does not depend on the order)."""
        if not steps.size:
            return
        if self.first is None:
            self.first = int(steps[0])
        last = int(steps.max())
        while (last - self.first) // self.width >= self.size:
            pairs = self.values.reshape(-1, 2)
            merged = np.where(np.isnan(pairs).any(axis=1), np.nan, pairs.max(axis=1))
            self.values = np.concatenate([merged, np.full(self.size // 2, -np.inf)])
            self.width *= 2
        slots = (steps.astype(np.int64) - self.first) // self.width
        np.maximum.at(self.values, slots, values)  # NaN wins, as in ``add``

    def series(self) -> tuple[np.ndarray, np.ndarray]:
        """(first step of each bucket, its maximum), for the buckets that hold something."""
        used = ~np.isneginf(self.values)
        steps = (self.first or 0) + np.arange(self.size) * self.width
        return steps[used], self.values[used]


@final
@dataclass
class RunHistory:
    """Everything the two plots show: total norm, explosions, rollbacks, divergence, threshold, per-layer norms.

    ``rollbacks``: ``(step, restored_step)`` of each rollback (``on_divergence="rollback"``); the restored
    step is None where it is not known (a history rebuilt from metrics, which log only the step).
    """

    threshold: float | None = None
    explosions: list[tuple[int, float]] = field(default_factory=list)
    rollbacks: list[tuple[int, int | None]] = field(default_factory=list)
    diverged_step: int | None = None
    diverged_reason: str | None = None
    _totals: _Pooled = field(default_factory=_Pooled)
    _layers: dict[str, _Pooled] = field(default_factory=dict)

    def add_step(self, step: int, total_norm: float, layer_norms: Mapping[str, float] | None = None) -> None:
        self._totals.add(step, total_norm)
        if layer_norms:
            self.add_layer_values(step, layer_norms)

    def add_steps(self, steps: np.ndarray, total_norms: np.ndarray) -> None:
        """Many steps' total norms at once (a backend's batch of steps)."""
        self._totals.add_many(steps, total_norms)

    def add_step_layer(self, step: int, name: str, value: float) -> None:
        """One layer's norm at one step (when a history is rebuilt layer by layer)."""
        self.add_layer_values(step, {name: value})

    def add_layer_values(self, step: int, layer_norms: Mapping[str, float]) -> None:
        for name, value in layer_norms.items():
            pooled = self._layers.get(name)
            if pooled is None:
                pooled = self._layers[name] = _Pooled(min(BUCKETS, 256))
            pooled.add(step, value if math.isfinite(value) else math.inf)  # NaN here would read "not logged"

    def add_explosion(self, step: int, total_norm: float) -> None:
        self.explosions.append((step, total_norm))
        del self.explosions[:-1000]  # the latest thousand are plenty for a plot

    def add_rollback(self, step: int, restored_step: int | None) -> None:
        """At ``step`` the state of ``restored_step`` came back (None: not known)."""
        self.rollbacks.append((step, restored_step))
        del self.rollbacks[:-1000]

    def absorb(self, later: RunHistory) -> None:
        """Append a later part of the run (a resumed process's), whose steps all come after these."""
        self._totals.add_many(*later._totals.series())
        for name, pooled in later._layers.items():
            for step, value in zip(*pooled.series(), strict=True):
                self.add_layer_values(int(step), {name: float(value)})
        self.explosions = [*self.explosions, *later.explosions][-1000:]
        self.rollbacks = [*self.rollbacks, *later.rollbacks][-1000:]
        if later.diverged_step is not None:
            self.diverged_step, self.diverged_reason = later.diverged_step, later.diverged_reason
        self.threshold = later.threshold if later.threshold is not None else self.threshold

    def totals(self) -> tuple[np.ndarray, np.ndarray]:
        return self._totals.series()

    @property
    def layer_names(self) -> list[str]:
        return list(self._layers)

    def layers(self, names: Iterable[str] | None = None) -> tuple[list[str], np.ndarray, np.ndarray]:
        """(names, bucket steps, a names x buckets matrix of max norms; NaN where nothing was logged)."""
        chosen = list(self._layers) if names is None else [n for n in names if n in self._layers]
        if not chosen:
            return [], np.zeros(0), np.zeros((0, 0))
        width = max(self._layers[n].width for n in chosen)
        first = min(self._layers[n].first or 0 for n in chosen)
        last = max(int(s[-1]) if (s := self._layers[n].series()[0]).size else first for n in chosen)
        columns = max(1, (last - first) // width + 1)
        matrix = np.full((len(chosen), columns), np.nan)
        for row, name in enumerate(chosen):
            steps, values = self._layers[name].series()
            slots = ((steps - first) // width).astype(int)
            for slot, value in zip(slots, values, strict=True):
                current = matrix[row, slot]
                matrix[row, slot] = value if np.isnan(current) else max(current, value)
        return chosen, first + np.arange(columns) * width, matrix

    def peaks(self) -> dict[str, float]:
        """Each layer's largest finite norm (for choosing rows when there are too many)."""
        peaks = {}
        for name, pooled in self._layers.items():
            values = pooled.series()[1]
            finite = values[np.isfinite(values)]
            peaks[name] = float(finite.max()) if finite.size else math.inf
        return peaks

"""Run-long statistics in fixed memory, whatever the number of steps.

Total norms go into a log-spaced histogram (``BINS_PER_DECADE`` bins per decade from 1e-12 to 1e12),
so quantiles carry at most about 1.2% relative error; mean and max are exact. The norm history over
time is kept as ``HISTORY_BUCKETS`` max-pooled buckets that double their width when full.
"""

from __future__ import annotations

import math
from collections import Counter, deque
from collections.abc import Iterable
from typing import Any, final

import numpy as np

from gradtrack.events import Divergence, Explosion, Summary

__all__ = ["BINS_PER_DECADE", "HISTORY_BUCKETS", "NormHistogram", "NormHistory", "RunSummary", "SpikeScore"]

BINS_PER_DECADE = 200
_LOW, _HIGH = -12, 12
HISTORY_BUCKETS = 512


@final
class NormHistogram:
    def __init__(self) -> None:
        self.counts = np.zeros((_HIGH - _LOW) * BINS_PER_DECADE + 2, dtype=np.int64)
        self.count = 0
        self.total = 0.0
        self.max = -math.inf

    def add(self, value: float) -> None:
        if not math.isfinite(value):
            return
        self.count += 1
        self.total += value
        self.max = max(self.max, value)
        if value <= 0:
            index = 0
        else:
            index = int((math.log10(value) - _LOW) * BINS_PER_DECADE) + 1
            index = min(max(index, 0), self.counts.size - 1)
        self.counts[index] += 1

    def quantile(self, q: float) -> float | None:
        if not self.count:
            return None
        rank = q * (self.count - 1)
        index = int(np.searchsorted(np.cumsum(self.counts), rank, side="right"))
        if index == 0:
            return 0.0
        centre = 10 ** (_LOW + (index - 0.5) / BINS_PER_DECADE)
        return min(centre, self.max)


@final
class NormHistory:
    """Max-pooled total norm over time: ``buckets()`` gives ``(first_step, max_norm)`` pairs."""

    def __init__(self, size: int = HISTORY_BUCKETS) -> None:
        self.size = size
        self.width = 1
        self._maxima: list[float] = []
        self._first = 0

    def add(self, step: int, value: float) -> None:
        if not self._maxima:
            self._first = step
        slot = (step - self._first) // self.width
        if slot >= self.size:
            self._maxima = [_nanmax(self._maxima[i : i + 2]) for i in range(0, len(self._maxima), 2)]
            self.width *= 2
            slot = (step - self._first) // self.width
        while len(self._maxima) <= slot:
            self._maxima.append(-math.inf)
        self._maxima[slot] = _nanmax((self._maxima[slot], value))

    def buckets(self) -> list[tuple[int, float]]:
        return [(self._first + i * self.width, v) for i, v in enumerate(self._maxima)]


def _nanmax(values: Iterable[float]) -> float:
    values = list(values)
    if any(math.isnan(v) for v in values):
        return math.nan
    return max(values)


@final
class SpikeScore:
    """OLMo 2's spike score: the share of values lying ``sigmas`` standard deviations or more from the
    mean of the previous ``window`` values (O(1) a value: running sums over the window)."""

    def __init__(self, window: int = 1000, sigmas: float = 7.0, min_values: int = 20) -> None:
        self.sigmas = sigmas
        self.min_values = min_values
        self._window: deque[float] = deque(maxlen=window)
        self._sum = self._squares = 0.0
        self.values = 0
        self.spikes = 0

    def add(self, value: float | None) -> None:
        if value is None or not math.isfinite(value):
            return
        window = self._window
        if len(window) >= self.min_values:
            mean = self._sum / len(window)
            std = math.sqrt(max(self._squares / len(window) - mean * mean, 0.0))
            self.values += 1
            self.spikes += abs(value - mean) >= self.sigmas * std and std > 0
        if len(window) == window.maxlen:
            old = window[0]
            self._sum -= old
            self._squares -= old * old
        window.append(value)
        self._sum += value
        self._squares += value * value

    @property
    def score(self) -> float | None:
        return self.spikes / self.values if self.values else None


@final
class RunSummary:
    """Accumulates what ``Summary`` reports; everything is O(1) or O(layers) in memory."""

    def __init__(self) -> None:
        self.steps = 0
        self.clipped_steps = 0
        self.skipped_steps = 0
        self.nonfinite_steps = 0
        self.amp_overflow_steps = 0
        self.explosions = 0
        self.first_explosion_step: int | None = None
        self.divergence: Divergence | None = None
        self.all_norms = NormHistogram()
        self.healthy_norms = NormHistogram()
        self.history = NormHistory()
        self.offender_counts: Counter[str] = Counter()
        self.norm_spikes = SpikeScore()
        self.loss_spikes = SpikeScore()
        self.diagnosis: dict[str, Any] | None = None

    def add_step(
        self, step: int, total_norm: float, clipped: bool, skipped: bool, nonfinite: bool, exploded: bool
    ) -> None:
        self.steps += 1
        self.clipped_steps += clipped
        self.skipped_steps += skipped
        self.nonfinite_steps += nonfinite
        self.all_norms.add(total_norm)
        if not exploded:
            self.healthy_norms.add(total_norm)
        self.history.add(step, total_norm)
        self.norm_spikes.add(total_norm)

    def add_loss(self, loss: float | None) -> None:
        self.loss_spikes.add(loss)

    def add_amp_overflow(self) -> None:
        """A step the AMP scaler skipped: counted, but no norm enters the statistics."""
        self.steps += 1
        self.amp_overflow_steps += 1

    def add_explosion(self, event: Explosion) -> None:
        self.explosions += 1
        if self.first_explosion_step is None:
            self.first_explosion_step = event.step
        self.offender_counts.update(o.name for o in event.offenders)

    def freeze(self, dropped_records: int = 0, top: int = 10) -> Summary:
        norms = self.all_norms
        return Summary(
            steps=self.steps,
            clipped_steps=self.clipped_steps,
            skipped_steps=self.skipped_steps,
            nonfinite_steps=self.nonfinite_steps,
            explosions=self.explosions,
            first_explosion_step=self.first_explosion_step,
            diverged=self.divergence is not None,
            diverged_step=self.divergence.step if self.divergence else None,
            diverged_reason=self.divergence.reason if self.divergence else None,
            norm_mean=norms.total / norms.count if norms.count else None,
            norm_median=norms.quantile(0.5),
            norm_p95=norms.quantile(0.95),
            norm_p99=norms.quantile(0.99),
            norm_max=norms.max if norms.count else None,
            recommended_max_norm=self.healthy_norms.quantile(0.95),
            top_offenders=tuple(self.offender_counts.most_common(top)),
            dropped_records=dropped_records,
            amp_overflow_steps=self.amp_overflow_steps,
            spike_score=self.norm_spikes.score,
            loss_spike_score=self.loss_spikes.score,
            diagnosis=self.diagnosis,
        )

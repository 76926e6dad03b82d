"""The run's summary, built from the hand-over's messages in fixed memory, whatever the number of steps.

Both processes keep one and feed it the same way, with every message the training process hands over
(``RunSummary.add``): the training process for ``tracker.summary()`` and the run's end, the reporter process
for a run whose trainer died, which it ends ``killed`` with a summary equal to the one a finished run of
the same steps would have had.

Step records are folded ``CHUNK`` at a time with numpy (a list append per step on the training thread).
Folding at the same record counts on both sides keeps their arithmetic identical to the bit.

Total norms go into a log-spaced histogram (``BINS_PER_DECADE`` bins per decade from 1e-12 to 1e12), so
quantiles carry at most about 1.2% relative error; mean and max are exact.
"""

from __future__ import annotations

import copy
import math
from collections import Counter
from collections.abc import Mapping
from typing import Any, final

import numpy as np

from gradtrack.events import OVERSHOOT_EDGE, Divergence, Summary
from gradtrack.handover.messages import (
    Diagnosed,
    Diverged,
    ExplosionRaised,
    InstabilityRaised,
    Message,
    RolledBack,
    RunStarted,
    StepRecord,
)
from gradtrack.state import divergence, floats, integer, optional, part, real

__all__ = ["BINS_PER_DECADE", "CHUNK", "NormHistogram", "RunSummary", "SpikeScore"]

BINS_PER_DECADE = 200
_LOW, _HIGH = -12, 12
CHUNK = 256  # step records folded at once


@final
class NormHistogram:
    def __init__(self) -> None:
        self.counts = np.zeros((_HIGH - _LOW) * BINS_PER_DECADE + 2, dtype=np.int64)
        self.count = 0
        self.total = 0.0
        self.max = -math.inf

    def add(self, values: np.ndarray) -> None:
        """Add every finite value of ``values`` (float64)."""
        values = values[np.isfinite(values)]
        if not values.size:
            return
        self.count += int(values.size)
        self.total += float(values.sum())
        self.max = max(self.max, float(values.max()))
        with np.errstate(divide="ignore"):
            scaled = (np.log10(np.where(values > 0, values, 1.0)) - _LOW) * BINS_PER_DECADE
        index = np.clip(scaled.astype(np.int64) + 1, 0, self.counts.size - 1)
        index[values <= 0] = 0
        np.add.at(self.counts, index, 1)

    def state_dict(self) -> dict[str, Any]:
        """The non-empty bins only: a run's norms fill a few hundred of the 4,802."""
        bins = np.flatnonzero(self.counts)
        return {"bins": bins.tolist(), "counts": self.counts[bins].tolist(), "count": self.count,
                "total": self.total, "max": self.max}  # fmt: skip

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        bins, counts = state.get("bins"), state.get("counts")
        if not (isinstance(bins, list | tuple) and isinstance(counts, list | tuple) and len(bins) == len(counts)
                and all(type(b) is int and 0 <= b < self.counts.size for b in bins)
                and all(type(c) is int and c >= 0 for c in counts)):  # fmt: skip
            raise ValueError("'bins' and 'counts' must be lists of as many bin indices and counts")
        self.counts = np.zeros_like(self.counts)
        self.counts[np.asarray(bins, dtype=np.int64)] = np.asarray(counts, dtype=np.int64)
        self.count, self.total, self.max = integer(state, "count"), real(state, "total"), real(state, "max")

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
class SpikeScore:
    """OLMo 2's spike score: the share of values lying ``sigmas`` standard deviations or more from the
    mean of the previous ``window`` values (at least ``min_values`` of them)."""

    def __init__(self, window: int = 1000, sigmas: float = 7.0, min_values: int = 20) -> None:
        self.window = window
        self.sigmas = sigmas
        self.min_values = min_values
        self._tail = np.zeros(0)
        self.values = 0
        self.spikes = 0

    def add(self, values: np.ndarray) -> None:
        """Judge each finite value of ``values`` in order, against the window before it."""
        values = values[np.isfinite(values)]
        if not values.size:
            return
        series = np.concatenate([self._tail, values])
        shifted = series - series.mean()  # sums of squares of values near their mean: less cancellation
        sums = np.concatenate([[0.0], np.cumsum(shifted)])
        squares = np.concatenate([[0.0], np.cumsum(shifted * shifted)])
        position = np.arange(self._tail.size, series.size)
        low = np.maximum(position - self.window, 0)
        counted = position - low
        judged = counted >= self.min_values
        position, low, counted = position[judged], low[judged], counted[judged]
        mean = (sums[position] - sums[low]) / counted
        std = np.sqrt(np.maximum((squares[position] - squares[low]) / counted - mean * mean, 0.0))
        self.values += int(judged.sum())
        self.spikes += int(((np.abs(shifted[position] - mean) >= self.sigmas * std) & (std > 0)).sum())
        self._tail = series[-self.window :]

    def state_dict(self) -> dict[str, Any]:
        return {"tail": self._tail.tolist(), "values": self.values, "spikes": self.spikes}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._tail = np.asarray(floats(state, "tail")[-self.window :], dtype=np.float64)
        self.values, self.spikes = integer(state, "values"), integer(state, "spikes")

    @property
    def score(self) -> float | None:
        return self.spikes / self.values if self.values else None


@final
class RunSummary:
    """Accumulates what ``Summary`` reports from the hand-over's messages; O(1) or O(layers) in memory."""

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
        self.offender_counts: Counter[str] = Counter()
        self.norm_spikes = SpikeScore()
        self.loss_spikes = SpikeScore()
        self.diagnosis: dict[str, Any] | None = None
        self.resumed_from: list[int] = []
        self.rollbacks: list[tuple[int, int]] = []
        self.lr_scale = 1.0
        self.snapshot_bytes = 0
        self.overshoot = NormHistogram()  # grad/overshoot's samples (a ratio at or below 0 counts as 0)
        self.overshoot_above_edge = 0
        self.instabilities: list[dict[str, Any]] = []  # the overshoot warnings, plain values: the first, the last 9
        self.instability_count = 0
        self._pending: list[StepRecord] = []

    def add(self, message: Message) -> None:
        """Take one message of the hand-over (messages that say nothing about the run's health are ignored)."""
        if type(message) is StepRecord:
            self._pending.append(message)
            if len(self._pending) == CHUNK:
                self._fold(self._pending)
                self._pending = []
        elif isinstance(message, ExplosionRaised):
            event = message.event
            self.explosions += 1
            if self.first_explosion_step is None:
                self.first_explosion_step = event.step
            self.offender_counts.update(o.name for o in event.offenders)
        elif isinstance(message, Diverged):
            self.divergence = message.event
        elif isinstance(message, Diagnosed):
            self.diagnosis = dict(message.diagnosis)
        elif isinstance(message, RolledBack):
            self.rollbacks.append((message.event.step, message.event.restored_step))
            self.lr_scale, self.snapshot_bytes = message.event.lr_scale, message.snapshot_bytes
        elif isinstance(message, InstabilityRaised):
            self.instability_count += 1
            kept = self.instabilities  # the first warning, and the latest ones
            self.instabilities = [*kept[:1], *kept[1:][-8:], message.event.to_dict()]
        elif isinstance(message, RunStarted) and message.summary is not None:
            self.load_state_dict(message.summary)

    def state_dict(self) -> dict[str, Any]:
        """Plain values: the steps not yet folded are folded into a copy first (the folds stay put)."""
        folded = self._folded()
        divergence = folded.divergence
        return {
            "steps": folded.steps,
            "clipped_steps": folded.clipped_steps,
            "skipped_steps": folded.skipped_steps,
            "nonfinite_steps": folded.nonfinite_steps,
            "amp_overflow_steps": folded.amp_overflow_steps,
            "explosions": folded.explosions,
            "first_explosion_step": folded.first_explosion_step,
            "divergence": None if divergence is None else divergence.to_dict(),
            "all_norms": folded.all_norms.state_dict(),
            "healthy_norms": folded.healthy_norms.state_dict(),
            "offenders": dict(folded.offender_counts),
            "norm_spikes": folded.norm_spikes.state_dict(),
            "loss_spikes": folded.loss_spikes.state_dict(),
            "diagnosis": copy.deepcopy(folded.diagnosis),
            "resumed_from": list(folded.resumed_from),
            "rollbacks": [list(pair) for pair in folded.rollbacks],
            "lr_scale": folded.lr_scale,
            "overshoot": folded.overshoot.state_dict(),
            "overshoot_above_edge": folded.overshoot_above_edge,
            "instabilities": copy.deepcopy(folded.instabilities),
            "instability_count": folded.instability_count,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        for key in ("steps", "clipped_steps", "skipped_steps", "nonfinite_steps", "amp_overflow_steps", "explosions"):
            setattr(self, key, integer(state, key))
        self.first_explosion_step = optional(state, "first_explosion_step", integer)
        self.divergence = optional(state, "divergence", divergence)
        for key in ("all_norms", "healthy_norms", "norm_spikes", "loss_spikes"):
            getattr(self, key).load_state_dict(part(state, key))
        offenders = part(state, "offenders")
        if not all(isinstance(name, str) and type(n) is int for name, n in offenders.items()):
            raise ValueError("'offenders' must map layer names to counts")
        self.offender_counts = Counter(dict(offenders))
        diagnosis = state.get("diagnosis")
        self.diagnosis = None if diagnosis is None else dict(part(state, "diagnosis"))
        self.resumed_from = [integer({"step": step}, "step") for step in state.get("resumed_from") or []]
        rollbacks = state.get("rollbacks") or []
        if not all(isinstance(pair, list | tuple) and len(pair) == 2 and all(type(s) is int for s in pair)
                   for pair in rollbacks):  # fmt: skip
            raise ValueError("'rollbacks' must be a list of (step, restored step) pairs")
        self.rollbacks = [(int(a), int(b)) for a, b in rollbacks]
        self.lr_scale = real(state, "lr_scale") if "lr_scale" in state else 1.0
        self.overshoot = NormHistogram()
        if "overshoot" in state:  # saved before the overshoot indicator existed: it starts afresh
            self.overshoot.load_state_dict(part(state, "overshoot"))
        self.overshoot_above_edge = integer(state, "overshoot_above_edge") if "overshoot_above_edge" in state else 0
        self.instabilities = [dict(entry) for entry in state.get("instabilities") or []]
        self.instability_count = integer(state, "instability_count") if "instability_count" in state else 0
        self._pending = []

    def _folded(self) -> RunSummary:
        if not self._pending:
            return self
        folded = copy.deepcopy(self)
        folded._fold(folded._pending)
        folded._pending = []
        return folded

    def _fold(self, records: list[StepRecord]) -> None:
        fields = StepRecord._fields
        columns = dict(zip(fields, zip(*records, strict=True), strict=True))
        overflow = np.array(columns["amp_overflow"], dtype=bool)
        judged = ~overflow  # an AMP-overflow step is counted, and nothing of it enters the statistics
        self.steps += len(records)
        self.amp_overflow_steps += int(overflow.sum())
        self.clipped_steps += int(np.array(columns["clipped"], dtype=bool)[judged].sum())
        self.skipped_steps += int(np.array(columns["skipped"], dtype=bool)[judged].sum())
        self.nonfinite_steps += int((np.array(columns["nonfinite"], dtype=np.int64)[judged] > 0).sum())
        norms = np.array(columns["total_norm"], dtype=np.float64)[judged]
        exploded = np.array(columns["explosion"], dtype=bool)[judged]
        self.all_norms.add(norms)
        self.healthy_norms.add(norms[~exploded])
        self.norm_spikes.add(norms)
        losses = [loss for loss, skip in zip(columns["loss"], overflow, strict=True) if loss is not None and not skip]
        self.loss_spikes.add(np.array(losses, dtype=np.float64))
        overshoot = np.array(columns["overshoot"], dtype=np.float64)
        overshoot = overshoot[np.isfinite(overshoot)]
        if overshoot.size:
            self.overshoot.add(overshoot)
            self.overshoot_above_edge += int((overshoot > OVERSHOOT_EDGE).sum())

    def freeze(self, dropped_records: int = 0, top: int = 10) -> Summary:
        """The summary so far; steps not yet folded are folded into a copy, so that the folds of this
        summary stay where the other process makes them."""
        folded = self._folded()
        norms = folded.all_norms
        return Summary(
            steps=folded.steps,
            clipped_steps=folded.clipped_steps,
            skipped_steps=folded.skipped_steps,
            nonfinite_steps=folded.nonfinite_steps,
            explosions=folded.explosions,
            first_explosion_step=folded.first_explosion_step,
            diverged=folded.divergence is not None,
            diverged_step=folded.divergence.step if folded.divergence else None,
            diverged_reason=folded.divergence.reason if folded.divergence else None,
            norm_mean=norms.total / norms.count if norms.count else None,
            norm_median=norms.quantile(0.5),
            norm_p95=norms.quantile(0.95),
            norm_p99=norms.quantile(0.99),
            norm_max=norms.max if norms.count else None,
            recommended_max_norm=folded.healthy_norms.quantile(0.95),
            top_offenders=tuple(folded.offender_counts.most_common(top)),
            dropped_records=dropped_records,
            amp_overflow_steps=folded.amp_overflow_steps,
            spike_score=folded.norm_spikes.score,
            loss_spike_score=folded.loss_spikes.score,
            diagnosis=folded.diagnosis,
            resumed_from=tuple(folded.resumed_from),
            rollbacks=tuple(folded.rollbacks),
            lr_scale=folded.lr_scale,
            snapshot_bytes=folded.snapshot_bytes,
            overshoot_samples=folded.overshoot.count,
            overshoot_p50=folded.overshoot.quantile(0.5),
            overshoot_p95=folded.overshoot.quantile(0.95),
            overshoot_max=folded.overshoot.max if folded.overshoot.count else None,
            overshoot_above_edge=folded.overshoot_above_edge,
            instabilities=folded.instability_count,
            instability=folded.instabilities[0] if folded.instabilities else None,
        )

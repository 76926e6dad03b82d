"""The compact per-step record the training process hands over, and how it becomes a ``StepStats``.

The training thread builds a ``StepRecord`` of plain numbers and one ``bytes`` of per-layer norms,
nothing more: the distribution of layer norms, the name of each layer and the ``StepStats`` object
are made on the other side of the hand-over (the reporter process, or a backend's worker thread), so
their cost never lands on the training loop. Layer names travel once, at run start; each step says
which ordering of them (``layout``) its norms follow.

No torch here: the reporter process imports this module.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from gradtrack.events import StepStats

__all__ = ["StepRecord", "sorted_quantile", "step_stats"]


class StepRecord(NamedTuple):
    """One optimizer step, as the training thread knows it after the transfer.

    ``reported``: at the ``log_every`` cadence or flagged, so backends get it (every step is still
    handed over, so that a reporter left alone by a killed trainer can finish the run's summary).
    ``with_layers``: at the ``layer_every`` cadence, so backends get the per-layer norms by name.
    ``layer_norms``: float64 norms in the order of ``layout`` (reported steps only).
    ``weight_norms``: the parameters' own norms, in the same order, when measured (per-layer steps).
    """

    step: int
    timestamp: float
    total_norm: float
    clip_coef: float
    clipped: bool
    nonfinite: int
    explosion: bool
    diverged: bool
    skipped: bool
    loss: float | None
    amp_overflow: bool
    reported: bool
    with_layers: bool
    layout: int
    layer_norms: bytes | None
    weight_norms: bytes | None = None  # the parameters' own norms, same order, at the per-layer cadence

    @property
    def flagged(self) -> bool:
        return self.explosion or self.diverged or self.nonfinite > 0 or self.skipped or self.amp_overflow


def sorted_quantile(ordered: Sequence[float] | np.ndarray, q: float) -> float:
    """numpy's default (linear) quantile of already sorted values, without numpy's per-call overhead."""
    if not len(ordered):
        return math.nan
    position = q * (len(ordered) - 1)
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return float(ordered[low] + (ordered[high] - ordered[low]) * (position - low))


def step_stats(record: StepRecord, names: Sequence[str] | None) -> StepStats:
    """The ``StepStats`` backends receive; ``names`` are the layer names in the record's layout."""
    norms = np.frombuffer(record.layer_norms, dtype=np.float64) if record.layer_norms is not None else None
    p50 = p95 = layer_max = math.nan
    if norms is not None and norms.size:
        finite = np.sort(norms[np.isfinite(norms)])
        p50, p95 = sorted_quantile(finite, 0.5), sorted_quantile(finite, 0.95)
        layer_max = math.inf if record.nonfinite else (float(finite[-1]) if finite.size else math.nan)
    layer_norms = weight_norms = param_norm = None
    if record.with_layers and norms is not None and names is not None:
        layer_norms = dict(zip(names, norms.tolist(), strict=True))
    if record.weight_norms is not None:
        weights = np.frombuffer(record.weight_norms, dtype=np.float64)
        param_norm = float(np.sqrt(np.square(weights).sum()))
        if names is not None and record.with_layers:
            weight_norms = dict(zip(names, weights.tolist(), strict=True))
    return StepStats(
        step=record.step,
        total_norm=record.total_norm,
        clip_coef=record.clip_coef,
        clipped=record.clipped,
        nonfinite=record.nonfinite,
        explosion=record.explosion,
        diverged=record.diverged,
        skipped=record.skipped,
        layer_p50=p50,
        layer_p95=p95,
        layer_max=layer_max,
        loss=record.loss,
        timestamp=record.timestamp,
        layer_norms=layer_norms,
        amp_overflow=record.amp_overflow,
        weight_norms=weight_norms,
        param_norm=param_norm,
    )

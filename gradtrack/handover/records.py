"""Step records made into what backends receive, on the far side of the hand-over.

The training thread hands over compact ``StepRecord``\\ s (``gradtrack.handover.messages``): plain numbers and the
per-layer norms as bytes. The distribution of layer norms, the layer names and the ``StepBatch`` are made
here, in the reporter process (or on a backend's worker thread), many steps at a time with numpy, so
their cost never lands on the training loop.

No torch here: the reporter process imports this module.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from gradtrack.events import LayerNorms, StepBatch
from gradtrack.handover.messages import StepRecord
from gradtrack.judge.quantiles import sorted_quantile

__all__ = ["layer_quantiles", "step_batch"]

_QUANTILES = (0.5, 0.95)


def layer_quantiles(norms: np.ndarray, nonfinite: bool) -> tuple[float, float, float]:
    """p50, p95 and max of one step's finite layer norms; the max is inf when a layer is not finite."""
    finite = np.sort(norms[np.isfinite(norms)])
    p50, p95 = (sorted_quantile(finite, q) for q in _QUANTILES)
    layer_max = math.inf if nonfinite else (float(finite[-1]) if finite.size else math.nan)
    return p50, p95, layer_max


def _ranks(count: int, q: float) -> tuple[int, int, float]:
    position = q * (count - 1)
    low = int(position)
    return low, min(low + 1, count - 1), position - low


def _row_quantiles(norms: np.ndarray) -> np.ndarray:
    """p50, p95 and max of every row (all finite), as ``sorted_quantile`` computes them on a sorted row: only
    the ranks they need are put in place (``np.partition``, linear where a sort is not)."""
    count = norms.shape[1]
    ranks = [_ranks(count, q) for q in _QUANTILES]
    wanted = sorted({rank for low, high, _ in ranks for rank in (low, high)} | {count - 1})
    placed = np.partition(norms, wanted, axis=1)
    columns = [placed[:, low] + (placed[:, high] - placed[:, low]) * fraction for low, high, fraction in ranks]
    return np.stack([*columns, placed[:, count - 1]], axis=1)


def step_batch(records: Sequence[StepRecord], names: Sequence[Sequence[str] | None]) -> StepBatch:
    """The ``StepBatch`` of ``records``; ``names[i]`` are the layer names of record ``i``'s layout, where it
    has per-layer norms to report by name (``with_layers``), else None."""
    count = len(records)
    columns = list(zip(*records, strict=True))  # StepRecord is a tuple: its fields, column by column
    fields = StepRecord._fields
    column = {name: columns[index] for index, name in enumerate(fields)}
    quantiles = np.full((count, 3), math.nan)
    param_norm = np.full(count, math.nan)
    by_size: dict[int, list[int]] = {}
    for row, record in enumerate(records):
        if record.weight_norms is not None:
            weights = np.frombuffer(record.weight_norms, dtype=np.float64)
            param_norm[row] = math.sqrt(float(np.dot(weights, weights)))
        if record.layer_norms is None or record.amp_overflow:
            continue
        if record.nonfinite:  # rare: the finite ones, one row at a time
            quantiles[row] = layer_quantiles(np.frombuffer(record.layer_norms, dtype=np.float64), True)
        else:
            by_size.setdefault(len(record.layer_norms), []).append(row)
    for rows in by_size.values():  # every layer finite: all the rows of one size at once
        joined = b"".join([records[row].layer_norms for row in rows])  # type: ignore[misc]
        quantiles[rows] = _row_quantiles(np.frombuffer(joined, dtype=np.float64).reshape(len(rows), -1))
    layers = []
    for row, record in enumerate(records):
        layer_names = names[row]
        if layer_names is None or not record.with_layers or record.layer_norms is None:
            continue
        norms = np.frombuffer(record.layer_norms, dtype=np.float64).tolist()
        by_name: dict[str, float] | None = None
        if record.weight_norms is not None:
            weight_norms = np.frombuffer(record.weight_norms, dtype=np.float64).tolist()
            by_name = dict(zip(layer_names, weight_norms, strict=True))
        layers.append(LayerNorms(row, dict(zip(layer_names, norms, strict=True)), by_name))
    losses = column["loss"]
    return StepBatch(
        step=np.array(column["step"], dtype=np.int64),
        timestamp=np.array(column["timestamp"], dtype=np.float64),
        total_norm=np.array(column["total_norm"], dtype=np.float64),
        clip_coef=np.array(column["clip_coef"], dtype=np.float64),
        clipped=np.array(column["clipped"], dtype=bool),
        nonfinite=np.array(column["nonfinite"], dtype=np.int64),
        explosion=np.array(column["explosion"], dtype=bool),
        diverged=np.array(column["diverged"], dtype=bool),
        skipped=np.array(column["skipped"], dtype=bool),
        amp_overflow=np.array(column["amp_overflow"], dtype=bool),
        loss=np.array([math.nan if loss is None else loss for loss in losses], dtype=np.float64),
        loss_observed=np.array([loss is not None for loss in losses], dtype=bool),
        layer_p50=quantiles[:, 0],
        layer_p95=quantiles[:, 1],
        layer_max=quantiles[:, 2],
        param_norm=param_norm,
        layers=tuple(layers),
        overshoot=np.array(column["overshoot"], dtype=np.float64),
    )

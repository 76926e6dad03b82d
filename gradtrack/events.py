"""The records gradtrack hands to backends.

Every record is a small frozen dataclass of plain Python values (no tensors), built on the training
thread after the step's single device-to-host transfer, so a backend can keep, queue or serialise it
from any thread without touching the GPU.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np

__all__ = [
    "Divergence",
    "Explosion",
    "ExplosionKind",
    "Instability",
    "LayerNorms",
    "LayersAdded",
    "OVERSHOOT_EDGE",
    "Offender",
    "Resumed",
    "Rollback",
    "RunEnd",
    "RunStart",
    "RunStatus",
    "StepBatch",
    "StepStats",
    "Summary",
    "format_norm",
]

ExplosionKind = Literal["nonfinite", "threshold", "spike", "growth"]
RunStatus = Literal["finished", "failed", "killed"]


@dataclass(frozen=True, slots=True)
class Offender:
    """One layer named in an explosion: its gradient norm and whether it holds NaN/Inf."""

    name: str
    norm: float
    nonfinite: bool


@dataclass(frozen=True, slots=True)
class RunStart:
    """The tracker entered its context: what it watches and how it is configured.

    ``resumed``: set when the run goes on from a checkpoint (``tracker.load_state_dict``), in the run the
    backend's saved state names; None for a new run.
    """

    config: Mapping[str, Any]
    layer_names: tuple[str, ...]
    num_parameters: int
    model_class: str
    timestamp: float
    resumed: Resumed | None = None


@dataclass(frozen=True, slots=True)
class Resumed:
    """A run resumed from a checkpoint: where it goes on, and what a backend must not reset.

    ``step``: the first step this process reports (steps from there to where the last process stopped
    are trained, and logged, again). ``steps``: every step the run resumed at, this one last.
    ``divergence``: the verdict of an earlier process (a run that diverged stays diverged);
    ``explosions`` and ``first_explosion_step``: the run's counts so far.
    """

    step: int
    steps: tuple[int, ...]
    divergence: Divergence | None
    explosions: int
    first_explosion_step: int | None


@dataclass(frozen=True, slots=True)
class StepStats:
    """Everything measured at one optimizer step.

    ``layer_norms`` is filled only at the per-layer cadence (``layer_every``); it maps the cleaned
    parameter name to its gradient norm before clipping. ``weight_norms`` (the same names to the
    parameters' own norms) and ``param_norm`` (their total) come at the same cadence, when measured.
    On a step the AMP ``GradScaler`` skipped for overflow (``amp_overflow``) nothing was measured: the
    norms are NaN and ``metrics()`` leaves them out.
    """

    step: int
    total_norm: float
    clip_coef: float
    clipped: bool
    nonfinite: int
    explosion: bool
    diverged: bool
    skipped: bool
    layer_p50: float
    layer_p95: float
    layer_max: float
    loss: float | None
    timestamp: float
    layer_norms: Mapping[str, float] | None = None
    amp_overflow: bool = False
    weight_norms: Mapping[str, float] | None = None
    param_norm: float | None = None
    overshoot: float | None = None

    def metrics(self) -> dict[str, float]:
        """The contract metrics of PRODUCT.md for this step (without per-layer norms)."""
        if self.amp_overflow:  # the scaled gradients overflowed: there is no norm to report
            return {
                "grad/amp_overflow": 1.0,
                "grad/clipped": 0.0,
                "grad/explosion": 0.0,
                "grad/nonfinite": 0.0,
                "grad/diverged": float(self.diverged),
            }
        metrics = {
            "grad/total_norm": self.total_norm,
            "grad/clip_coef": self.clip_coef,
            "grad/clipped": float(self.clipped),
            "grad/explosion": float(self.explosion),
            "grad/nonfinite": float(self.nonfinite),
            "grad/amp_overflow": 0.0,
            "grad/diverged": float(self.diverged),
            "grad/layer_p50": self.layer_p50,
            "grad/layer_p95": self.layer_p95,
            "grad/layer_max": self.layer_max,
        }
        if self.loss is not None:
            metrics["loss"] = self.loss
        if self.param_norm is not None:
            metrics["grad/param_norm"] = self.param_norm
        if self.overshoot is not None:
            metrics["grad/overshoot"] = self.overshoot
        return metrics

    @property
    def flagged(self) -> bool:
        """A step that must reach every backend even under back-pressure."""
        return self.explosion or self.diverged or self.nonfinite > 0 or self.skipped or self.amp_overflow


@dataclass(frozen=True, slots=True)
class LayersAdded:
    """Parameters that started to train after the run started (unfrozen, added, replaced under a new name).

    ``names``: their cleaned names, in the model's order; from ``step`` on they appear in per-layer norms,
    offenders and summaries like the layers of ``RunStart.layer_names``.
    """

    step: int
    names: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class LayerNorms:
    """One per-layer step of a :class:`StepBatch`: the gradient norm of every layer by name, and the
    parameters' own norms when they were measured at that step."""

    row: int
    norms: Mapping[str, float]
    weights: Mapping[str, float] | None = None


@dataclass(frozen=True, slots=True, eq=False)
class StepBatch:
    """Consecutive reported steps, one numpy array per field: what ``gradtrack_steps`` receives.

    Row ``i`` holds what ``StepStats`` holds for step ``step[i]``; ``loss`` is NaN where ``loss_observed`` is
    False, ``param_norm`` NaN where the weights were not measured, and on AMP-overflow rows the norms are
    NaN; ``overshoot`` is NaN where no sample of the indicator completed. ``layers`` are the rows at the
    per-layer cadence. ``metric_columns()`` gives the contract metrics
    column by column, ``stats(i)`` one row as a ``StepStats``.
    """

    step: np.ndarray
    timestamp: np.ndarray
    total_norm: np.ndarray
    clip_coef: np.ndarray
    clipped: np.ndarray
    nonfinite: np.ndarray
    explosion: np.ndarray
    diverged: np.ndarray
    skipped: np.ndarray
    amp_overflow: np.ndarray
    loss: np.ndarray
    loss_observed: np.ndarray
    layer_p50: np.ndarray
    layer_p95: np.ndarray
    layer_max: np.ndarray
    param_norm: np.ndarray
    layers: tuple[LayerNorms, ...] = ()
    overshoot: np.ndarray | None = None  # None: a batch made without the column (all NaN)

    def __len__(self) -> int:
        return int(self.step.size)

    def metric_columns(self) -> list[tuple[str, np.ndarray, np.ndarray]]:
        """``(key, rows, values)`` for every contract metric (PRODUCT.md), as ``StepStats.metrics()`` gives
        them row by row: an AMP-overflow row has only the flags, a loss only where observed."""
        rows = np.arange(len(self))
        measured = rows[~self.amp_overflow]
        columns = [
            ("grad/total_norm", measured, self.total_norm[measured]),
            ("grad/clip_coef", measured, self.clip_coef[measured]),
            ("grad/clipped", rows, self.clipped.astype(np.float64)),
            ("grad/explosion", rows, self.explosion.astype(np.float64)),
            ("grad/nonfinite", rows, self.nonfinite.astype(np.float64)),
            ("grad/amp_overflow", rows, self.amp_overflow.astype(np.float64)),
            ("grad/diverged", rows, self.diverged.astype(np.float64)),
            ("grad/layer_p50", measured, self.layer_p50[measured]),
            ("grad/layer_p95", measured, self.layer_p95[measured]),
            ("grad/layer_max", measured, self.layer_max[measured]),
        ]
        with_loss = rows[self.loss_observed & ~self.amp_overflow]
        if with_loss.size:
            columns.append(("loss", with_loss, self.loss[with_loss]))
        with_params = rows[~np.isnan(self.param_norm) & ~self.amp_overflow]
        if with_params.size:
            columns.append(("grad/param_norm", with_params, self.param_norm[with_params]))
        overshoot = self._overshoot()
        sampled = rows[np.isfinite(overshoot)]
        if sampled.size:
            columns.append(("grad/overshoot", sampled, overshoot[sampled]))
        return columns

    def _overshoot(self) -> np.ndarray:
        return self.overshoot if self.overshoot is not None else np.full(len(self), math.nan)

    def each_stats(self) -> list[StepStats]:
        """Every row as a ``StepStats``, for a backend that only implements ``gradtrack_step``."""
        by_row = {entry.row: entry for entry in self.layers}
        columns = (self.step, self.total_norm, self.clip_coef, self.clipped, self.nonfinite, self.explosion,
                   self.diverged, self.skipped, self.layer_p50, self.layer_p95, self.layer_max, self.loss,
                   self.loss_observed, self.timestamp, self.amp_overflow, self.param_norm,
                   self._overshoot())  # fmt: skip
        stats = []
        rows = zip(*(column.tolist() for column in columns), strict=True)
        for row, (step, total, coef, clipped, nonfinite, explosion, diverged, skipped, p50, p95, top, loss, observed,
                  timestamp, overflow, param_norm, overshoot) in enumerate(rows):  # fmt: skip
            layer = by_row.get(row)
            stats.append(StepStats(
                step=step, total_norm=total, clip_coef=coef, clipped=clipped, nonfinite=nonfinite,
                explosion=explosion, diverged=diverged, skipped=skipped, layer_p50=p50, layer_p95=p95,
                layer_max=top, loss=loss if observed else None, timestamp=timestamp,
                layer_norms=layer.norms if layer is not None else None, amp_overflow=overflow,
                weight_norms=layer.weights if layer is not None else None,
                param_norm=None if math.isnan(param_norm) else param_norm,
                overshoot=overshoot if math.isfinite(overshoot) else None,
            ))  # fmt: skip
        return stats

    def stats(self, row: int, layer: LayerNorms | None = None) -> StepStats:
        """Row ``row``; ``layer`` is its entry of ``layers`` (looked up when not given)."""
        if layer is None:
            layer = next((entry for entry in self.layers if entry.row == row), None)
        param_norm = float(self.param_norm[row])
        return StepStats(
            step=int(self.step[row]),
            total_norm=float(self.total_norm[row]),
            clip_coef=float(self.clip_coef[row]),
            clipped=bool(self.clipped[row]),
            nonfinite=int(self.nonfinite[row]),
            explosion=bool(self.explosion[row]),
            diverged=bool(self.diverged[row]),
            skipped=bool(self.skipped[row]),
            layer_p50=float(self.layer_p50[row]),
            layer_p95=float(self.layer_p95[row]),
            layer_max=float(self.layer_max[row]),
            loss=float(self.loss[row]) if self.loss_observed[row] else None,
            timestamp=float(self.timestamp[row]),
            layer_norms=layer.norms if layer is not None else None,
            amp_overflow=bool(self.amp_overflow[row]),
            weight_norms=layer.weights if layer is not None else None,
            param_norm=None if math.isnan(param_norm) else param_norm,
            overshoot=overshoot if math.isfinite(overshoot := float(self._overshoot()[row])) else None,
        )


@dataclass(frozen=True, slots=True)
class Explosion:
    """A step whose gradient norm was non-finite, above the threshold, a spike, or a smooth blow-up.

    ``origin``: the layer whose norm jumped most against its own recent history (where the blow-up
    starts), ``origin_jump`` that factor; ``depth_growth``: the factor by which layer norms grow per
    layer from the output towards the input (above 1: gradients grow as they flow back).
    """

    step: int
    kind: ExplosionKind
    total_norm: float
    threshold: float
    offenders: tuple[Offender, ...]
    timestamp: float
    origin: str | None = None
    origin_jump: float = math.nan
    depth_growth: float = math.nan

    def to_dict(self) -> dict[str, Any]:
        return _jsonable(asdict(self))

    def describe(self, top: int | None = 3) -> str:
        """One human line for consoles and alerts; ``top`` offenders named (None: all of them)."""
        names = ", ".join(f"{o.name} ({format_norm(o.norm)})" for o in self.offenders[:top])
        text = (
            f"step {self.step}: {self.kind} explosion, total_norm={format_norm(self.total_norm)} "
            f"(threshold {format_norm(self.threshold)}); offenders: {names or 'none'}"
        )
        if self.origin is not None:
            text += f"; starts at {self.origin} (x{format_norm(self.origin_jump)} its recent norm)"
        return text


OVERSHOOT_EDGE = 2.0  # grad/overshoot (lr x curvature along the step) above it: the step overshoots its minimum


@dataclass(frozen=True, slots=True)
class Instability:
    """A leading warning: the optimizer's steps overshoot persistently (``gradtrack.judge.overshoot``).

    ``overshoot``: the median of the recent samples above the edge of ``grad/overshoot`` (lr x curvature
    along the step; 2 is the edge of stability), ``steps_above`` of the last ``window`` samples were above
    it, the first from the update of step ``since``. ``layers``: the layers that overshoot most, with their
    own ratio (largest first). ``lr_scale``: the factor on the learning rate that would bring the ratio
    back to 1, half the edge (the ratio is about proportional to the learning rate); ``learning_rates``:
    each parameter group's learning rate times that factor, when the tracker knows them.
    """

    step: int
    overshoot: float
    steps_above: int
    window: int
    since: int
    layers: tuple[tuple[str, float], ...]
    lr_scale: float
    learning_rates: tuple[float, ...]
    timestamp: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return _jsonable(asdict(self))

    def describe(self) -> str:
        """One human line for consoles and alerts."""
        layers = ", ".join(f"{name} ({format_norm(ratio)})" for name, ratio in self.layers[:3]) or "all layers"
        lrs = ", ".join(f"{lr:.3g}" for lr in self.learning_rates)
        advice = f"learning rate x{self.lr_scale:.2g}" + (f" (lr {lrs})" if lrs else "")
        return (
            f"step {self.step}: the steps overshoot (lr x curvature {format_norm(self.overshoot)}, above 2 on "
            f"{self.steps_above} of the last {self.window} samples, since step {self.since}); most: {layers}; "
            f"{advice} would bring it back to 1"
        )


@dataclass(frozen=True, slots=True)
class Rollback:
    """``on_divergence="rollback"`` healed the run: at ``step`` it was judged diverging, and the training
    state of ``restored_step`` (a snapshot taken before the trouble began) came back in its place.

    ``skipped``: the batches from ``restored_step`` to ``step``, which the loop does not see again;
    ``lr_scale``: the factor on every learning rate from now on (1.0 at a first rollback, halved by each
    further one soon after, which also holds every learning rate at or below the one the restored state
    trained with, whatever a schedule sets); ``count``: rollbacks so far in the run; ``reason``: what the
    divergence rule saw.
    """

    step: int
    restored_step: int
    skipped: int
    lr_scale: float
    count: int
    reason: str
    timestamp: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def describe(self) -> str:
        return (
            f"step {self.step}: rolled back to step {self.restored_step} ({self.reason}); {self.skipped} batches "
            f"skipped, learning rate x{self.lr_scale:g} (rollback {self.count})"
        )


@dataclass(frozen=True, slots=True)
class Divergence:
    """The run-level judgement that training has gone wrong; raised once per run."""

    step: int
    reason: str
    timestamp: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True, slots=True)
class Summary:
    """The run at a glance: what ``tracker.summary()`` returns and backends store at the end.

    ``spike_score`` / ``loss_spike_score``: OLMo 2's spike score, the share of steps whose total norm /
    loss lies 7 standard deviations or more from the mean of the previous 1,000. ``diagnosis``: what was
    measured on the device around the first explosion (see README, Diagnostics). ``resumed_from``: the
    steps the run was resumed at from checkpoints, one per restart; the counts cover every process.
    ``rollbacks``: ``(step, restored_step)`` of each rollback (``on_divergence="rollback"``), ``lr_scale``
    the learning-rate factor they left, ``snapshot_bytes`` the host memory (or disk) the snapshots hold.
    ``unmeasured``: for a run in which gradtrack measured no step, why (the optimizer stepped other tensors than
    the model's, no gradient reached it, no optimizer step ran). ``overshoot_*``: the distribution of the
    overshoot indicator's samples (``grad/overshoot``; quantiles within about 1.2%, a ratio at or below 0
    counted as 0), how many were above the edge 2; ``instabilities``: its warnings, ``instability`` the first
    one as plain values (an :class:`Instability`'s fields: when, which layers, the learning-rate advice).
    """

    steps: int
    clipped_steps: int
    skipped_steps: int
    nonfinite_steps: int
    explosions: int
    first_explosion_step: int | None
    diverged: bool
    diverged_step: int | None
    diverged_reason: str | None
    norm_mean: float | None
    norm_median: float | None
    norm_p95: float | None
    norm_p99: float | None
    norm_max: float | None
    recommended_max_norm: float | None
    top_offenders: tuple[tuple[str, int], ...] = field(default=())
    dropped_records: int = 0
    amp_overflow_steps: int = 0
    spike_score: float | None = None
    loss_spike_score: float | None = None
    diagnosis: Mapping[str, Any] | None = None
    resumed_from: tuple[int, ...] = ()
    rollbacks: tuple[tuple[int, int], ...] = ()
    lr_scale: float = 1.0
    snapshot_bytes: int = 0
    unmeasured: str | None = None  # a run that measured no step: why (see gradtrack.step.silence)
    overshoot_samples: int = 0
    overshoot_p50: float | None = None
    overshoot_p95: float | None = None
    overshoot_max: float | None = None
    overshoot_above_edge: int = 0
    instabilities: int = 0
    instability: Mapping[str, Any] | None = None

    @property
    def clip_rate(self) -> float:
        return self.clipped_steps / self.steps if self.steps else 0.0

    def to_dict(self) -> dict[str, Any]:
        data = _jsonable(asdict(self))
        data["clip_rate"] = self.clip_rate
        data["top_offenders"] = [{"name": n, "count": c} for n, c in self.top_offenders]
        return data


@dataclass(frozen=True, slots=True)
class RunEnd:
    """The tracker left its context, with the status of the training body."""

    status: RunStatus
    summary: Summary
    timestamp: float


def format_norm(value: float) -> str:
    """Four significant digits, and NaN/inf spelt out, the same in every backend's text."""
    return f"{value:.4g}" if math.isfinite(value) else str(value)


def _jsonable(value: Any) -> Any:
    """JSON has no NaN/Inf: write them as strings so files stay valid."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value

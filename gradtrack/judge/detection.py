"""Explosion events (one step) and divergence (the whole run), judged on host numbers.

Explosion, checked at every step in this order:

* ``nonfinite``: the total norm is NaN or Inf.
* ``threshold``: the total norm exceeds ``explosion_threshold`` (an absolute floor, default 1e3).
* ``spike``: after ``warmup`` steps (default 10), the total norm exceeds ``spike_factor`` (default 10)
  times the median of the last ``window`` norms (default 100; the *baseline*). During the warm-up the
  norm is judged from the second step on, against the median of the steps so far and at
  ``warmup_factor`` (default 4): a run that blows up in its first steps (a learning rate far too high)
  does so before any long history exists, and in the benchmark its norm had reached 4x that median by
  the step its loss blew up, where healthy runs stayed below (a heavy-tailed one aside). Spiking norms
  enter the history capped at the limit, so a legitimate shift of scale is learnt within half a window
  instead of alarming forever.
* ``growth``: a smooth geometric blow-up that never spikes (least squares past the stability limit, a
  learning rate that keeps growing). The last ``growth_window`` norms (default 50) rise consistently:
  their Kendall rank correlation with time is at least ``growth_trend`` (default 0.6; a one-off change
  of scale, a new learning rate or data mix, gives at most about 0.5, noise about 0); and the norm
  stands at least ``growth_factor`` (default 3) times the ``growth_quantile`` (default 0.1) of the last
  ``window`` norms, where it stood before it climbed. 3 is below sqrt(10): where the loss is quadratic
  in the error, the norm triples by the time the loss has grown tenfold. Raised once per episode; the
  episode ends when the trend falls below ``growth_trend``.

Every window is kept incrementally (a sorted copy updated by bisection, running sums), so a step costs
a few microseconds whatever the window sizes.

Divergence, judged once per run and never undone:

* the observed loss is NaN or Inf;
* gradients are non-finite on ``nonfinite_patience`` consecutive steps (default 3), or non-finite right
  after an explosion episode (explosions on 2 of the last 5 steps): the end of a blow-up;
* from the gradients alone, when the loss is not observed or has not told yet: explosions on
  ``explosion_share`` of the last ``explosion_window`` steps (default 80% of 10) while the norm's median
  over the last 5 steps is ``norm_blowup`` (default 100) times the baseline, explosions that clipping
  does not absorb. When those steps were clipped, clipping may well be absorbing them (the demo's clipped
  RNN: huge raw norms, a loss going down), so the parameters must show it too: their norm (measured at
  the per-layer cadence) ``param_blowup`` (default 2) times what it was at the start of the run;
* the smoothed loss (EMA, ``loss_smoothing``) stays above ``min + loss_blowup * scale`` for
  ``loss_patience`` consecutive steps, where ``min`` is its running minimum and ``scale`` is
  ``max(|min|, |first smoothed loss|)``: the loss must climb back far above where training started,
  which noise and a clipped spike never do.
"""

from __future__ import annotations

import bisect
import math
import statistics
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from itertools import islice
from typing import Literal, NamedTuple, Protocol, final

import numpy as np

from gradtrack.events import Divergence, ExplosionKind, Offender
from gradtrack.judge.quantiles import sorted_quantile
from gradtrack.state import divergence as _divergence
from gradtrack.state import flag as _flag
from gradtrack.state import flags as _flags
from gradtrack.state import floats as _floats
from gradtrack.state import integer as _int
from gradtrack.state import optional as _optional
from gradtrack.state import part as _part
from gradtrack.state import real as _float
from gradtrack.validate import count, number

__all__ = [
    "DivergenceDetector",
    "ExplosionDetector",
    "ExplosionRule",
    "Judge",
    "SpikeSkip",
    "Verdict",
    "offenders",
]

OnNonfinite = Literal["skip", "raise", "continue"]


def offenders(layer_norms: np.ndarray, names: Sequence[str], threshold: float, top_k: int) -> tuple[Offender, ...]:
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
class _SortedWindow:
    """The last ``size`` values in arrival order and in sorted order: O(log n) order statistics."""

    __slots__ = ("ordered", "size", "values")

    def __init__(self, size: int) -> None:
        self.size = size
        self.values: deque[float] = deque()
        self.ordered: list[float] = []

    def __len__(self) -> int:
        return len(self.ordered)

    def append(self, value: float) -> float | None:
        """Add ``value``; return the value that left the window, if one did."""
        left = None
        if len(self.ordered) == self.size:
            left = self.values.popleft()
            del self.ordered[bisect.bisect_left(self.ordered, left)]
        self.values.append(value)
        bisect.insort(self.ordered, value)
        return left

    def clear(self) -> None:
        self.values.clear()
        self.ordered.clear()

    def load(self, values: Sequence[float]) -> None:
        """Start again from ``values`` (oldest first; only the last ``size`` are kept)."""
        kept = [float(v) for v in values][-self.size :] if values else []
        self.values = deque(kept)
        self.ordered = sorted(kept)

    def median(self) -> float:
        ordered = self.ordered
        size = len(ordered)
        middle = size // 2
        return ordered[middle] if size % 2 else (ordered[middle - 1] + ordered[middle]) / 2


@final
class ExplosionDetector:
    """The default rule: non-finite, absolute floor, a spike against recent history, sustained growth."""

    def __init__(
        self,
        explosion_threshold: float = 1e3,
        spike_factor: float = 10.0,
        window: int = 100,
        warmup: int = 10,
        warmup_factor: float = 4.0,
        growth_window: int = 50,
        growth_trend: float = 0.6,
        growth_factor: float = 3.0,
        growth_quantile: float = 0.1,
    ) -> None:
        self.explosion_threshold = number("explosion_threshold", explosion_threshold, allow_inf=True)
        self.spike_factor = number("spike_factor", spike_factor, minimum=1.0, allow_inf=True)
        self.warmup = count("spike warmup", warmup)
        self.warmup_factor = number("warmup_factor", warmup_factor, minimum=1.0, allow_inf=True)
        self._history = _SortedWindow(count("spike window", window))
        self.growth_window = count("growth_window", growth_window, minimum=3)
        self.growth_trend = number("growth_trend", growth_trend)
        if self.growth_trend > 1:
            raise ValueError(f"growth_trend must be in (0, 1], got {growth_trend!r}")
        self.growth_factor = number("growth_factor", growth_factor, minimum=1.0, allow_inf=True)
        self.growth_quantile = number("growth_quantile", growth_quantile, inclusive=True)
        if self.growth_quantile > 1:
            raise ValueError(f"growth_quantile must be in [0, 1], got {growth_quantile!r}")
        self._recent = _SortedWindow(self.growth_window)
        self._concordance = 0  # Kendall's S over _recent: rising pairs minus falling pairs
        self._growing = False
        self._baseline = math.nan

    @property
    def baseline(self) -> float:
        """The median of the recent healthy norms (NaN during warm-up)."""
        return self._baseline

    @property
    def trend(self) -> float:
        """Kendall's tau of the last ``growth_window`` norms (NaN until the window is full)."""
        size = len(self._recent)
        return self._concordance / (size * (size - 1) / 2) if size == self.growth_window else math.nan

    def spike_limit(self) -> float:
        """The norm above which this step is a spike; inf when there is nothing to judge against yet."""
        history = self._history
        if len(history) >= self.warmup:
            factor, reference = self.spike_factor, self._baseline
        elif len(history):  # warm-up: against the median of the steps so far, more tightly
            factor, reference = self.warmup_factor, history.median()
        else:
            return math.inf
        return factor * reference if reference > 0 and math.isfinite(factor) else math.inf

    def check(self, total_norm: float) -> tuple[ExplosionKind, float] | None:
        if not math.isfinite(total_norm):
            self._recent.clear()
            self._concordance, self._growing = 0, False
            return "nonfinite", self.explosion_threshold
        self._baseline = self._history.median() if len(self._history) >= self.warmup else math.nan
        limit = self.spike_limit()
        self._history.append(min(total_norm, limit))
        self._add_to_trend(total_norm)
        if total_norm > self.explosion_threshold:
            return "threshold", self.explosion_threshold
        if total_norm > limit:
            return "spike", limit
        return self._growth(total_norm)

    def _add_to_trend(self, total_norm: float) -> None:
        """Kendall's S, updated by the pairs of the value that leaves the window and of the one that enters."""
        recent = self._recent
        if len(recent) == self.growth_window:
            oldest = recent.values[0]
            ordered = recent.ordered
            later = len(ordered) - 1  # every other value came after the oldest
            rising = later - (bisect.bisect_right(ordered, oldest) - 1)
            falling = bisect.bisect_left(ordered, oldest)
            self._concordance -= rising - falling
        recent.append(total_norm)
        ordered = recent.ordered
        earlier = len(ordered) - 1
        below = bisect.bisect_left(ordered, total_norm)
        above = earlier - (bisect.bisect_right(ordered, total_norm) - 1)
        self._concordance += below - above

    def _growth(self, total_norm: float) -> tuple[ExplosionKind, float] | None:
        if not self.trend >= self.growth_trend:
            self._growing = False
            return None
        if self._growing:
            return None
        floor = self.growth_factor * sorted_quantile(self._history.ordered, self.growth_quantile)
        if not total_norm >= floor or not floor > 0:
            return None
        self._growing = True
        return "growth", floor

    def state_dict(self) -> dict[str, object]:
        """The windows and the episode (plain values: they go into a user's checkpoint)."""
        return {"history": list(self._history.values), "recent": list(self._recent.values),
                "growing": self._growing, "baseline": self._baseline}  # fmt: skip

    def load_state_dict(self, state: Mapping[str, object]) -> None:
        self._history.load(_floats(state, "history"))
        self._recent.load(_floats(state, "recent"))
        values = list(self._recent.values)  # Kendall's S again from the values: exact, and a few µs
        self._concordance = sum(
            (later > earlier) - (later < earlier) for i, earlier in enumerate(values) for later in values[i + 1 :]
        )
        self._growing = _flag(state, "growing")
        self._baseline = _float(state, "baseline")

    def config(self) -> dict[str, float]:
        return {
            "explosion_threshold": self.explosion_threshold,
            "spike_factor": self.spike_factor,
            "spike_window": float(self._history.size),
            "spike_warmup": float(self.warmup),
            "spike_warmup_factor": self.warmup_factor,
            "growth_window": float(self.growth_window),
            "growth_trend": self.growth_trend,
            "growth_factor": self.growth_factor,
            "growth_quantile": self.growth_quantile,
        }


@final
class SpikeSkip:
    """``on_spike="skip"``: drop the update of a step whose norm is a spike (OLMo-core's rule).

    A step is skipped when, after ``min_steps`` steps, its total norm lies more than ``sigmas`` standard
    deviations above the mean of the last ``window`` norms. Skipped norms enter that window too, as in
    OLMo-core: a run whose norm settles at a new level (new data) resumes within a window, where leaving
    them out would skip every update from then on. Decided on the host from the step's one transfer
    (before ``optimizer.step()``), like the skip of non-finite gradients. The window's mean and variance
    slide with Welford's updates, recomputed exactly once per window against drift.
    """

    def __init__(self, sigmas: float = 6.0, window: int = 128, min_steps: int = 20) -> None:
        self.sigmas = number("spike sigmas", sigmas)
        self.min_steps = count("spike min_steps", min_steps)
        self.window = count("spike window", window)
        self._values: deque[float] = deque()
        self._mean = 0.0
        self._squares = 0.0  # sum of squared deviations from the mean
        self._slides = 0

    def skips(self, total_norm: float) -> bool:
        if not math.isfinite(total_norm):
            return False  # the non-finite rule decides these
        values = self._values
        spike = False
        if len(values) >= self.min_steps:
            std = math.sqrt(max(self._squares, 0.0) / len(values))
            spike = total_norm > self._mean + self.sigmas * std
        if len(values) == self.window:
            left = values.popleft()
            delta = left - self._mean
            self._mean -= delta / len(values)
            self._squares -= delta * (left - self._mean)
            self._slides += 1
        values.append(total_norm)
        delta = total_norm - self._mean
        self._mean += delta / len(values)
        self._squares += delta * (total_norm - self._mean)
        if self._slides >= self.window:  # exact again, once per window
            self._slides = 0
            self._mean = statistics.fmean(values)
            self._squares = sum((value - self._mean) ** 2 for value in values)
        return spike

    def state_dict(self) -> dict[str, object]:
        return {"values": list(self._values), "mean": self._mean, "squares": self._squares, "slides": self._slides}

    def load_state_dict(self, state: Mapping[str, object]) -> None:
        values = _floats(state, "values")
        if len(values) > self.window:  # a smaller window now: its statistics again, exactly
            values = values[-self.window :]
            self._mean, self._squares, self._slides = statistics.fmean(values), 0.0, 0
            self._squares = sum((value - self._mean) ** 2 for value in values)
        else:
            self._mean, self._squares = _float(state, "mean"), _float(state, "squares")
            self._slides = _int(state, "slides")
        self._values = deque(values)

    def config(self) -> dict[str, float]:
        return {"on_spike_sigmas": self.sigmas, "on_spike_window": float(self.window)}


LOSS_REGRESSED = 0.2  # see DivergenceDetector.loss_regressed
LOSS_PROGRESS = 0.01  # see DivergenceDetector.loss_stalled: an improvement of 1% of the loss's scale
LOSS_STALL = 20  # ... not made for this many observed losses
LOSS_LEARNT = 0.5  # ... while the smoothed loss is still above this share of its first value


@dataclass(slots=True)
class _LossState:
    ema: float | None = None
    first: float | None = None
    minimum: float = math.inf
    above: int = 0
    stalled: int = 0  # losses observed since the smoothed loss last went LOSS_PROGRESS below ``mark``
    mark: float = math.inf  # the smoothed loss when it last made that much progress


@final
class DivergenceDetector:
    """Run-level judgement: sticky once raised."""

    def __init__(
        self,
        nonfinite_patience: int = 3,
        loss_blowup: float = 10.0,
        loss_patience: int = 5,
        loss_smoothing: float = 0.1,
        explosion_window: int = 10,
        explosion_share: float = 0.8,
        norm_blowup: float = 100.0,
        param_blowup: float = 2.0,
    ) -> None:
        self.nonfinite_patience = count("nonfinite_patience", nonfinite_patience)
        self.loss_blowup = number("loss_blowup", loss_blowup)
        self.loss_patience = count("loss_patience", loss_patience)
        if number("loss_smoothing", loss_smoothing) > 1:
            raise ValueError(f"loss_smoothing must be in (0, 1], got {loss_smoothing!r}")
        self.loss_smoothing = float(loss_smoothing)
        self.explosion_window = count("explosion_window", explosion_window, minimum=2)
        self.explosion_share = number("explosion_share", explosion_share)
        if self.explosion_share > 1:
            raise ValueError(f"explosion_share must be in (0, 1], got {explosion_share!r}")
        self.norm_blowup = number("norm_blowup", norm_blowup, minimum=1.0, allow_inf=True)
        self.param_blowup = number("param_blowup", param_blowup, minimum=1.0, allow_inf=True)
        self._clipped: deque[bool] = deque(maxlen=self.explosion_window)
        self._clipped_count = 0
        self._param_start: float | None = None
        self._param_latest = math.nan
        self._nonfinite_run = 0
        self._exploded: deque[bool] = deque(maxlen=self.explosion_window)
        self._exploded_count = 0
        self._norms: deque[float] = deque(maxlen=5)
        self._loss = _LossState()
        self.verdict: Divergence | None = None

    @property
    def troubled(self) -> bool:
        """An explosion within the last ``explosion_window`` steps."""
        return self._exploded_count > 0

    @property
    def alarmed(self) -> bool:
        """Any rule on its way to a verdict: a recent explosion, non-finite gradients, a loss above its limit."""
        return self._exploded_count > 0 or self._nonfinite_run > 0 or self._loss.above > 0

    @property
    def loss_regressed(self) -> bool:
        """The smoothed loss has climbed ``LOSS_REGRESSED`` x its scale above its best: the run is losing what
        it learnt, though no rule has judged it yet (a learning rate creeping past the edge under a clip that
        bounds every norm). A state to go back to is not taken then."""
        state = self._loss
        if state.ema is None or state.first is None:
            return False
        return state.ema > state.minimum + LOSS_REGRESSED * max(abs(state.minimum), abs(state.first))

    @property
    def loss_stalled(self) -> bool:
        """Training makes no progress: the smoothed loss has not improved by ``LOSS_PROGRESS`` x its scale for
        ``LOSS_STALL`` observed losses while still above ``LOSS_LEARNT`` of its first value (a run that
        converged is not stuck), or it is losing what it learnt (``loss_regressed``). False while no loss is
        observed."""
        state = self._loss
        if state.ema is None or state.first is None:
            return False
        learnt_little = state.first - state.ema < LOSS_LEARNT * abs(state.first)
        return (state.stalled >= LOSS_STALL and learnt_little) or self.loss_regressed

    def update(
        self,
        *,
        step: int,
        timestamp: float,
        nonfinite: int = 0,
        loss: float | None = None,
        exploded: bool = False,
        total_norm: float = math.nan,
        baseline: float = math.nan,
        clipped: bool = False,
        param_norm: float | None = None,
    ) -> Divergence | None:
        """Feed one step; returns the Divergence the first time the run is judged diverged.

        ``exploded``: this step raised an explosion event; ``baseline``: the explosion rule's median of
        recent healthy norms; ``clipped``: the step's gradients were clipped; ``param_norm``: the
        parameters' total norm, on the steps where it was measured.
        """
        if self.verdict is not None:
            return None
        recent_explosions = sum(islice(reversed(self._exploded), 4))  # before this step
        self._exploded_count += exploded - (len(self._exploded) == self.explosion_window and self._exploded[0])
        self._exploded.append(exploded)
        self._clipped_count += clipped - (len(self._clipped) == self.explosion_window and self._clipped[0])
        self._clipped.append(clipped)
        if param_norm is not None and math.isfinite(param_norm):
            self._param_start = param_norm if self._param_start is None else self._param_start
            self._param_latest = param_norm
        if math.isfinite(total_norm):
            self._norms.append(total_norm)
        reason = (
            self._nonfinite_reason(nonfinite, recent_explosions)
            or self._loss_reason(loss)
            or self._gradient_reason(baseline)
        )
        if reason is None:
            return None
        self.verdict = Divergence(step=step, reason=reason, timestamp=timestamp)
        return self.verdict

    def _nonfinite_reason(self, nonfinite: int, recent_explosions: int) -> str | None:
        self._nonfinite_run = self._nonfinite_run + 1 if nonfinite else 0
        if self._nonfinite_run >= self.nonfinite_patience:
            return f"non-finite gradients on {self._nonfinite_run} consecutive steps"
        if nonfinite and recent_explosions >= 2:
            return f"non-finite gradients after explosions on {recent_explosions} of the 4 steps before"
        return None

    def _gradient_reason(self, baseline: float) -> str | None:
        window = self._exploded
        if len(window) < self.explosion_window or not baseline > 0 or not self._norms:
            return None
        share = self._exploded_count / len(window)
        if share < self.explosion_share:
            return None
        level = statistics.median(self._norms)
        if level < self.norm_blowup * baseline:
            return None
        reason = (
            f"explosions on {self._exploded_count} of the last {len(window)} steps, gradient norm "
            f"{level:.4g} = {level / baseline:.3g}x its healthy median {baseline:.4g}"
        )
        if self._clipped_count * 2 <= len(self._clipped):  # not clipped: nothing absorbs them
            return reason
        start = self._param_start
        if start is None or not start > 0 or not self._param_latest >= self.param_blowup * start:
            return None  # clipped, and the parameters show no blow-up: clipping absorbs them
        return f"{reason}, though clipped; parameter norm {self._param_latest / start:.3g}x its start"

    def _loss_reason(self, loss: float | None) -> str | None:
        if loss is None:
            return None
        if not math.isfinite(loss):
            return f"loss is {loss}"
        state = self._loss
        state.ema = loss if state.ema is None else state.ema + self.loss_smoothing * (loss - state.ema)
        if state.first is None:
            state.first = state.ema
        progress = LOSS_PROGRESS * max(abs(state.minimum if math.isfinite(state.minimum) else 0.0), abs(state.first))
        if state.ema < state.mark - progress:
            state.mark, state.stalled = state.ema, 0
        else:
            state.stalled += 1
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

    def state_dict(self) -> dict[str, object]:
        loss = self._loss
        verdict = self.verdict
        return {
            "exploded": list(self._exploded),
            "clipped": list(self._clipped),
            "param_start": self._param_start,
            "param_latest": self._param_latest,
            "nonfinite_run": self._nonfinite_run,
            "norms": list(self._norms),
            "loss": {
                "ema": loss.ema,
                "first": loss.first,
                "minimum": loss.minimum,
                "above": loss.above,
                "stalled": loss.stalled,
                "mark": loss.mark,
            },
            "verdict": None if verdict is None else verdict.to_dict(),
        }

    def load_state_dict(self, state: Mapping[str, object]) -> None:
        self._exploded = deque(_flags(state, "exploded"), maxlen=self.explosion_window)
        self._exploded_count = sum(self._exploded)
        self._clipped = deque(_flags(state, "clipped"), maxlen=self.explosion_window)
        self._clipped_count = sum(self._clipped)
        self._param_start = _optional(state, "param_start", _float)
        self._param_latest = _float(state, "param_latest")
        self._nonfinite_run = _int(state, "nonfinite_run")
        self._norms = deque(_floats(state, "norms"), maxlen=5)
        loss = _part(state, "loss")
        self._loss = _LossState(
            ema=_optional(loss, "ema", _float),
            first=_optional(loss, "first", _float),
            minimum=_float(loss, "minimum"),
            above=_int(loss, "above"),
            stalled=_int(loss, "stalled") if "stalled" in loss else 0,
            mark=_float(loss, "mark") if "mark" in loss else math.inf,
        )
        self.verdict = _optional(state, "verdict", _divergence)

    def config(self) -> dict[str, float]:
        return {
            "nonfinite_patience": float(self.nonfinite_patience),
            "loss_blowup": self.loss_blowup,
            "loss_patience": float(self.loss_patience),
            "loss_smoothing": self.loss_smoothing,
            "explosion_window": float(self.explosion_window),
            "explosion_share": self.explosion_share,
            "norm_blowup": self.norm_blowup,
            "param_blowup": self.param_blowup,
        }


class Verdict(NamedTuple):
    """The host-side decisions of one step: an explosion (its kind and the threshold it crossed), the run's
    divergence (the first time only), and whether the optimizer update is skipped."""

    explosion: tuple[ExplosionKind, float] | None
    divergence: Divergence | None
    skip: bool


HEALTHY = Verdict(explosion=None, divergence=None, skip=False)


@final
class Judge:
    """Everything decided on the host at each step, from the step's transferred numbers, in one call."""

    def __init__(
        self,
        *,
        explosions: ExplosionDetector,
        divergence: DivergenceDetector,
        on_nonfinite: OnNonfinite,
        on_spike: SpikeSkip | None = None,
    ) -> None:
        self.explosions = explosions
        self.divergence = divergence
        self.on_nonfinite: OnNonfinite = on_nonfinite
        self.on_spike = on_spike

    @property
    def troubled(self) -> bool:
        """An explosion within the divergence rule's window: measure what the rules want more often."""
        return self.divergence.troubled

    def step(
        self,
        *,
        step: int,
        timestamp: float,
        total_norm: float,
        nonfinite: int,
        loss: float | None,
        clipped: bool,
        param_norm: float | None,
    ) -> Verdict:
        found = self.explosions.check(total_norm)
        if found is None and nonfinite:
            found = ("nonfinite", self.explosions.explosion_threshold)
        divergence = self.divergence.update(
            step=step, timestamp=timestamp, nonfinite=nonfinite, loss=loss, exploded=found is not None,
            total_norm=total_norm, baseline=self.explosions.baseline, clipped=clipped, param_norm=param_norm,
        )  # fmt: skip
        skip = bool(nonfinite) and self.on_nonfinite == "skip"
        skip = skip or (self.on_spike is not None and self.on_spike.skips(total_norm))
        if found is None and divergence is None and not skip:
            return HEALTHY
        return Verdict(explosion=found, divergence=divergence, skip=skip)

    def state_dict(self) -> dict[str, object]:
        return {
            "explosions": self.explosions.state_dict(),
            "divergence": self.divergence.state_dict(),
            "on_spike": None if self.on_spike is None else self.on_spike.state_dict(),
        }

    def load_state_dict(self, state: Mapping[str, object]) -> None:
        """Load every part; an ``on_spike`` window saved without ``on_spike="skip"`` now (or the other way
        round) is left out: the option changed between the two processes."""
        self.explosions.load_state_dict(_part(state, "explosions"))
        self.divergence.load_state_dict(_part(state, "divergence"))
        if self.on_spike is not None and state.get("on_spike") is not None:
            self.on_spike.load_state_dict(_part(state, "on_spike"))

    def config(self) -> dict[str, object]:
        config: dict[str, object] = {**self.explosions.config(), **self.divergence.config()}
        config["on_spike"] = "skip" if self.on_spike is not None else "none"
        if self.on_spike is not None:
            config.update(self.on_spike.config())
        return config

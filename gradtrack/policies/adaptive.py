"""Clip policies that learn their bound from the run itself.

* ``adaptive`` (AutoClip, Seetharaman et al. 2020): clip at a percentile of the recent healthy norms.
* ``zscore`` (ZClip, Kumar et al. 2025): EMA mean and variance of the total norm; a step whose z-score
  exceeds ``z_thresh`` is clipped, by "adaptive scaling", to ``mean + z_thresh**2 * std / z``.
* ``adagc`` (AdaGC, 2025): each tensor against an EMA of its own past clipped norms.
* ``agc`` (Adaptive Gradient Clipping, Brock et al. 2021): unit-wise, against the weights' norms.
* ``auto``: ``max_norm`` while ZClip warms up, released gradually to ZClip, and ``max_norm`` again while
  the run is in trouble (see ``AutoClip``).

Host-side statistics are updated in ``observe`` from the step's transferred numbers and used from the
next step on, so no policy reads anything from the device during a step. AdaGC and AGC keep their
per-tensor work on the device.
"""

from __future__ import annotations

import bisect
import math
import statistics
from collections import deque
from collections.abc import Mapping
from typing import Any, final

import torch

from gradtrack.judge.detection import ExplosionDetector
from gradtrack.judge.quantiles import sorted_quantile
from gradtrack.measure.stats import GradBatch
from gradtrack.policies.policy import clip_coefficient, scale_, scale_each_
from gradtrack.state import flag, flags, floats, integer, optional, part, real
from gradtrack.validate import count, number

__all__ = ["AGC", "AdaGC", "AdaptiveClip", "AutoClip", "ZClip"]


@final
class AdaptiveClip:
    """Norm clipping at a percentile of the run's own recent healthy norms (AutoClip).

    Until ``warmup`` finite norms are seen it clips at ``max_norm``; afterwards at the
    ``percentile`` of the last ``window`` finite pre-clip norms, never above ``max_norm`` times
    ``ceiling``.
    """

    name = "adaptive"

    def __init__(
        self, max_norm: float = 1.0, percentile: float = 95.0, window: int = 1000, warmup: int = 20,
        ceiling: float = 100.0,
    ) -> None:  # fmt: skip
        self.max_norm = number("max_norm", max_norm)
        if number("percentile", percentile) > 100:
            raise ValueError(f"percentile must be in (0, 100], got {percentile!r}")
        self.percentile = float(percentile)
        self.warmup = count("warmup", warmup)
        self.ceiling = number("ceiling", ceiling)
        self.window = count("window", window)
        self._history: deque[float] = deque()
        self._sorted: list[float] = []  # the same values, kept sorted: O(window) memmove, no numpy per step
        self.threshold = self.max_norm

    def clip_(self, batch: GradBatch) -> torch.Tensor:
        return scale_(batch, self.threshold)

    def clip_coefficient(self, batch: GradBatch) -> torch.Tensor:
        return clip_coefficient(batch, self.threshold)

    def observe(self, total_norm: float, clip_coef: float) -> None:
        if not math.isfinite(total_norm):
            return
        if len(self._history) == self.window:
            del self._sorted[bisect.bisect_left(self._sorted, self._history.popleft())]
        self._history.append(total_norm)
        bisect.insort(self._sorted, total_norm)
        if len(self._sorted) >= self.warmup:
            learnt = sorted_quantile(self._sorted, self.percentile / 100)
            self.threshold = min(max(learnt, 1e-12), self.max_norm * self.ceiling)

    def state_dict(self) -> dict[str, Any]:
        return {"history": list(self._history), "threshold": self.threshold}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        history = floats(state, "history")[-self.window :]
        self._history, self._sorted = deque(history), sorted(history)
        self.threshold = real(state, "threshold")

    def config(self) -> dict[str, Any]:
        return {"clip": self.name, "max_norm": self.max_norm, "clip_percentile": self.percentile,
                "clip_window": self.window, "clip_warmup": self.warmup}  # fmt: skip


class ZClip:
    """ZClip: z-score clipping of the total norm against its EMA mean and standard deviation.

    During ``warmup`` steps the norms are collected (and clipped at ``ceiling`` only, if set); then the
    mean and variance start as theirs and follow an EMA with weight ``alpha`` on the past. A step with
    ``z = (norm - mean) / std > z_thresh`` is scaled to ``mean + z_thresh**2 * std / z`` (ZClip's
    "adaptive scaling": the larger the spike, the harder the clip); the EMA is fed the clipped norm.
    ``ceiling``: an absolute bound applied at every step (None: none). The coefficient is computed on
    the device from host floats learnt on earlier steps.
    """

    name = "zscore"

    def __init__(
        self, alpha: float = 0.97, z_thresh: float = 2.5, warmup: int = 25, ceiling: float | None = None,
        eps: float = 1e-6,
    ) -> None:  # fmt: skip
        if number("alpha", alpha) >= 1:
            raise ValueError(f"alpha must be in (0, 1), got {alpha!r}")
        self.alpha = float(alpha)
        self.z_thresh = number("z_thresh", z_thresh)
        self.warmup = count("warmup", warmup)
        self.ceiling = None if ceiling is None else number("ceiling", ceiling)
        self.eps = number("eps", eps)
        self._warm: list[float] = []
        self.mean: float | None = None
        self.var = 0.0

    def threshold_ceiling(self) -> float | None:
        return self.ceiling

    def clip_(self, batch: GradBatch) -> torch.Tensor | None:
        bound = self._bound(batch)
        return None if bound is None else scale_(batch, bound)

    def clip_coefficient(self, batch: GradBatch) -> torch.Tensor | None:
        bound = self._bound(batch)
        return None if bound is None else clip_coefficient(batch, bound)

    def _bound(self, batch: GradBatch) -> float | torch.Tensor | None:
        """This step's norm bound: the ceiling alone while warming up, then ZClip's adaptive bound."""
        ceiling = self.threshold_ceiling()
        if self.mean is None:
            return ceiling
        norm = batch.total_norm
        std = max(math.sqrt(self.var), self.eps)
        z = (norm - self.mean) / std
        bound = torch.where(z > self.z_thresh, self.mean + self.z_thresh**2 * std / z.clamp(min=self.eps), norm)
        if ceiling is not None:
            bound = bound.clamp(max=ceiling)
        return bound

    def observe(self, total_norm: float, clip_coef: float) -> None:
        if not math.isfinite(total_norm):
            return
        clipped = total_norm * min(clip_coef, 1.0)
        if self.mean is None:
            self._warm.append(clipped)
            if len(self._warm) >= self.warmup:
                self.mean = statistics.fmean(self._warm)
                self.var = statistics.pvariance(self._warm, self.mean)
            return
        delta = clipped - self.mean
        self.mean += (1 - self.alpha) * delta
        self.var = self.alpha * self.var + (1 - self.alpha) * delta * delta

    def state_dict(self) -> dict[str, Any]:
        return {"warm": list(self._warm), "mean": self.mean, "var": self.var}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._warm = floats(state, "warm")
        self.mean = optional(state, "mean", real)
        self.var = real(state, "var")

    def config(self) -> dict[str, Any]:
        return {"clip": self.name, "clip_alpha": self.alpha, "clip_z_thresh": self.z_thresh,
                "clip_warmup": self.warmup, "clip_ceiling": self.ceiling or 0.0}  # fmt: skip


@final
class AutoClip(ZClip):
    """``clip="auto"``: ``max_norm`` until the run has shown its scale, then ZClip; ``max_norm`` again in trouble.

    Each rule answers a failure the others miss; ``benchmarks/detection.py`` measures them on 16 diverging
    scenarios (10 held out) and their healthy twins, 5 seeds each, against ``clip="norm"`` at ``max_norm``:

    * **Hold.** A run too hot from its first step (a tanh RNN, a GRU, an LSTM, a transformer at an SGD learning
      rate far too high) blows up within a few steps, before ZClip has collected its ``warmup`` norms. Its
      gradient norms at step 0 are those of its healthy twin (same weights, same batch), so nothing tells the
      two apart yet: while ZClip warms up, every run is bounded by ``max_norm`` (and, from the second step, by
      ``warmup_factor`` times the median of the norms so far, for a run whose norms are far below ``max_norm``).
    * **Release.** Once ZClip has its statistics the bound rises by ``release`` a step from ``max_norm`` until it
      passes ZClip's own level (mean + ``z_thresh`` std): a healthy run is handed back to its own scale within
      a few dozen steps, and a hot one is given larger steps gradually, so that it shows itself before a step
      too large to undo. Released at once instead, 59 of 80 diverging runs were rescued instead of 65.
    * **Rebound.** During the release and ``calm`` steps after it, a run whose median norm over the last five
      steps climbs to ``rebound`` times its level under the hold (at least ``max_norm``) is in trouble: the hold
      was what kept it stable. Without this rule 51 of 80 were rescued.
    * **Spikes.** Then ZClip's z-score rule clips isolated spikes relative to the run's own scale. Its
      statistics follow the norms as ZClip alone would clip them, never the ceilings below, so that a run held
      to ``max_norm`` does not learn ``max_norm`` as its scale.
    * **Unsettled.** When ZClip clips at least half of the last ``window`` steps the run has left the scale it
      learnt (a learning rate that went up, new data): the warm-up starts over, hold and release included.
      A GRU whose learning rate ramps into a too-hot plateau is held again this way (rescued 5 of 5 seeds,
      1 of 5 without); a healthy change of scale costs a hold and a release (lr-switch -2.8%, data-switch -0.6%).
    * **Trouble.** A run that blows up smoothly (the norm grows a few % a step, and so does any EMA of it) or
      again and again is held to ``max_norm`` from the step after trouble is seen: a sustained geometric growth
      of the norm that no spike preceded within ``window`` steps (gradtrack's growth rule on 50 steps, and the
      same rule on the last 12 steps with a rank trend of 0.8 and a doubling: least squares past the stability
      limit, with momentum or a ramping learning rate, is in trouble 11 to 24 steps earlier than with the
      50-step rule alone), a spike ``severe`` times above the spike limit, ``spikes`` explosions within
      ``window`` steps, or a rebound. Trouble ends after ``calm`` consecutive steps whose norm is within
      ``max_norm``: the only sign that a run held down by the ceiling no longer needs it.

    On the benchmark (2026-12-03) this rescues 65 of 80 diverging runs where ``norm`` at 1.0 rescues 68 and the
    previous rules 33, at a mean cost of +4% on the 100 healthy runs where ``norm`` costs +627%; by issue 19's
    rule (``benchmarks/healing.py``: at least half the twin's progress kept) 62 of 80, as many as ``norm``
    (one fewer on ``rnn-r3``, one more on ``lstm-hot``). It still trails
    ``norm`` on tanh RNNs whose norms are 10 to 1,000 times ``max_norm`` and heavy-tailed (``rnn`` 4 of 5,
    ``rnn-r3`` 1 of 5): their norms give no sign before the loss blows up, and ``norm`` saves them only by
    keeping every step at ``max_norm``, which costs their healthy twins +100% to +240%.
    """

    name = "auto"

    def __init__(
        self, max_norm: float = 1.0, warmup_factor: float = 4.0, spikes: int = 3, window: int = 10,
        severe: float = 10.0, calm: int = 50, release: float = 1.1, rebound: float = 2.0, **zclip: Any,
    ) -> None:  # fmt: skip
        super().__init__(**zclip)
        self.max_norm = number("max_norm", max_norm)
        self.warmup_factor = number("warmup_factor", warmup_factor, minimum=1.0)
        self.spikes = count("spikes", spikes)
        self.severe = number("severe", severe, minimum=1.0, allow_inf=True)
        self.calm = count("calm", calm)
        self.release = number("release", release, minimum=1.0, allow_inf=True)
        self.rebound = number("rebound", rebound, minimum=1.0, allow_inf=True)
        window = count("window", window)
        if self.spikes > window:
            raise ValueError(f"spikes must be at most window ({window}), got {spikes!r}")
        self._recent: deque[bool] = deque(maxlen=window)  # explosions, for the trouble rules
        self._zclipped: deque[bool] = deque(maxlen=window)  # steps ZClip clipped, for the unsettled rule
        self._latest: deque[float] = deque(maxlen=_REBOUND_STEPS)
        self._detector = ExplosionDetector(explosion_threshold=math.inf)
        self._fast = _fast_growth()
        self.in_trouble = False
        self._calm_steps = 0
        self._releasing: float | None = None  # the bound while the hold is let go
        self._held_level = self.max_norm
        self._probation = 0  # steps after the release during which a rebound is trouble

    def threshold_ceiling(self) -> float | None:
        if self.in_trouble or self.mean is None:  # in trouble, or ZClip (again) warming up: the hold
            if self.mean is None and self._warm:
                return min(self.max_norm, self.warmup_factor * statistics.median(self._warm))
            return self.max_norm
        return self._releasing

    def _own_bound(self, total_norm: float) -> float:
        """The bound ZClip's rule alone sets for this norm: what its statistics learn from."""
        if self.mean is None:
            return self.warmup_factor * statistics.median(self._warm) if self._warm else math.inf
        std = max(math.sqrt(self.var), self.eps)
        z = (total_norm - self.mean) / std
        return self.mean + self.z_thresh**2 * std / z if z > self.z_thresh else total_norm

    def observe(self, total_norm: float, clip_coef: float) -> None:
        warming = self.mean is None
        finite = math.isfinite(total_norm)
        own = min(total_norm, self._own_bound(total_norm)) if finite else total_norm
        super().observe(total_norm, own / total_norm if finite and total_norm > 0 else 1.0)
        if finite:
            self._latest.append(total_norm)
        if not self.in_trouble:
            self._let_go(warming, zclipped=finite and not warming and own < total_norm)
        rebound = (
            (self._releasing is not None or self._probation > 0)
            and len(self._latest) == _REBOUND_STEPS
            and statistics.median(self._latest) >= self.rebound * self._held_level
        )
        found = self._detector.check(total_norm)
        fast = self._fast.check(total_norm)
        kind = found[0] if found is not None else None
        quiet_before = not any(self._recent)
        self._recent.append(kind in ("spike", "nonfinite", "threshold"))
        growth = kind == "growth" or (fast is not None and fast[0] == "growth")
        severe = found is not None and kind == "spike" and total_norm >= self.severe * found[1]
        repeated = self._recent[-1] and sum(self._recent) >= self.spikes
        if (growth and quiet_before) or severe or repeated or rebound:
            self.in_trouble, self._calm_steps = True, 0
            self._releasing, self._probation = None, 0
        elif self.in_trouble:
            self._calm_steps = self._calm_steps + 1 if total_norm <= self.max_norm else 0
            self.in_trouble = self._calm_steps < self.calm

    def _let_go(self, warming: bool, zclipped: bool) -> None:
        """Hold, release and probation, on a step out of trouble."""
        if self.mean is None:
            return
        if warming:  # ZClip has just learnt its statistics: release the hold
            self._releasing = self.max_norm
            self._held_level = max(statistics.median(self._warm), self.max_norm)
            self._probation = self.calm
            return
        if self._releasing is not None:
            self._releasing *= self.release
            if self._releasing >= self.mean + self.z_thresh * math.sqrt(self.var):
                self._releasing = None
        elif self._probation:
            self._probation -= 1
        self._zclipped.append(zclipped)
        if 2 * sum(self._zclipped) >= (self._zclipped.maxlen or 0):  # unsettled: warm up again
            self.mean, self.var, self._warm = None, 0.0, []
            self._releasing, self._probation = None, 0
            self._zclipped.clear()

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "detector": self._detector.state_dict(), "fast": self._fast.state_dict(),
                "recent": list(self._recent), "zclipped": list(self._zclipped), "latest": list(self._latest),
                "in_trouble": self.in_trouble, "calm_steps": self._calm_steps, "releasing": self._releasing,
                "held_level": self._held_level, "probation": self._probation}  # fmt: skip

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        self._detector.load_state_dict(part(state, "detector"))
        self._fast.load_state_dict(part(state, "fast"))
        self._recent = deque(flags(state, "recent"), maxlen=self._recent.maxlen)
        self._zclipped = deque(flags(state, "zclipped"), maxlen=self._zclipped.maxlen)
        self._latest = deque(floats(state, "latest"), maxlen=_REBOUND_STEPS)
        self.in_trouble = flag(state, "in_trouble")
        self._calm_steps = integer(state, "calm_steps")
        self._releasing = optional(state, "releasing", real)
        self._held_level = real(state, "held_level")
        self._probation = integer(state, "probation")

    def config(self) -> dict[str, Any]:
        return {**super().config(), "max_norm": self.max_norm, "clip_warmup_factor": self.warmup_factor,
                "clip_trouble_spikes": self.spikes, "clip_trouble_window": float(self._recent.maxlen or 0),
                "clip_trouble_severe": self.severe, "clip_calm": self.calm, "clip_release": self.release,
                "clip_rebound": self.rebound}  # fmt: skip


_REBOUND_STEPS = 5  # the median of this many norms is judged for a rebound: one spike is not one


def _fast_growth() -> ExplosionDetector:
    """Growth judged on the last 12 steps alone: a rank trend (Kendall) of 0.8, the norm twice their smallest."""
    return ExplosionDetector(explosion_threshold=math.inf, spike_factor=math.inf, warmup_factor=math.inf,
                             window=12, growth_window=12, growth_trend=0.8, growth_factor=2.0,
                             growth_quantile=0.0)  # fmt: skip


@final
class AdaGC:
    """AdaGC: each tensor clipped against an EMA of its own past clipped norms.

    ``h_i = min(1, lambda_rel * gamma_i / ||g_i||)``, then ``gamma_i = beta * gamma_i + (1 - beta) *
    ||h_i g_i||``. For the first ``warmup`` steps every gradient is clipped globally at ``lambda_abs``
    (norm clipping) and the gammas follow the clipped norms. The gammas live on the device; the
    reported coefficient is the norm of the clipped gradients over the norm before. The state is kept
    for one set of tensors: if the tensors that have gradients change, it starts over.
    """

    name = "adagc"

    def __init__(
        self, lambda_rel: float = 1.05, beta: float = 0.98, lambda_abs: float = 1.0, warmup: int = 100
    ) -> None:
        self.lambda_rel = number("lambda_rel", lambda_rel)
        if number("beta", beta) >= 1:
            raise ValueError(f"beta must be in (0, 1), got {beta!r}")
        self.beta = float(beta)
        self.lambda_abs = number("lambda_abs", lambda_abs)
        self.warmup = count("warmup", warmup)
        self._steps = 0
        self._order: list[int] | None = None
        self._gamma: torch.Tensor | None = None

    def clip_(self, batch: GradBatch) -> torch.Tensor:
        norms = batch.layer_norms
        if self._order != batch.order or self._gamma is None:
            self._order, self._gamma, self._steps = list(batch.order), None, 0
        elif self._gamma.device != norms.device:  # loaded from a checkpoint onto another device
            self._gamma = self._gamma.to(norms.device)
        if self._steps < self.warmup or self._gamma is None:
            factor = torch.clamp(self.lambda_abs / (batch.total_norm + 1e-6), max=1.0)
            factors = factor.expand_as(norms)
            coef = scale_(batch, self.lambda_abs)
        else:
            factors = torch.clamp(self.lambda_rel * self._gamma / (norms + 1e-12), max=1.0)
            factors = torch.nan_to_num(factors, nan=0.0)
            scale_each_(batch, factors)
            clipped = torch.linalg.vector_norm(norms * factors, batch.norm_type)
            coef = clipped / (batch.total_norm + 1e-12)
        clipped_norms = norms * factors
        if self._gamma is None:
            self._gamma = torch.nan_to_num(clipped_norms, nan=0.0, posinf=0.0)
        else:  # a tensor with NaN/Inf this step keeps its gamma
            updated = self.beta * self._gamma + (1 - self.beta) * clipped_norms
            self._gamma = torch.where(torch.isfinite(clipped_norms), updated, self._gamma)
        self._steps += 1
        return coef

    def observe(self, total_norm: float, clip_coef: float) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        """The gammas as a tensor (on their device, like an optimizer's state), with the order they follow."""
        gamma = None if self._gamma is None else self._gamma.detach().clone()
        return {"steps": self._steps, "order": None if self._order is None else list(self._order), "gamma": gamma}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        gamma, order = state.get("gamma"), state.get("order")
        if gamma is not None and not isinstance(gamma, torch.Tensor):
            raise ValueError(f"'gamma' must be a tensor or None, got {type(gamma).__name__}")
        if order is not None and (not isinstance(order, list | tuple) or not all(type(i) is int for i in order)):
            raise ValueError("'order' must be a list of integers or None")
        if gamma is not None and (order is None or gamma.shape != (len(order),)):
            raise ValueError("'gamma' must hold one value for each entry of 'order'")
        self._steps = integer(state, "steps")
        self._order = None if order is None else list(order)
        self._gamma = None if gamma is None else gamma.detach().clone()

    def config(self) -> dict[str, Any]:
        return {"clip": self.name, "clip_lambda_rel": self.lambda_rel, "clip_beta": self.beta,
                "clip_lambda_abs": self.lambda_abs, "clip_warmup": self.warmup}  # fmt: skip


@final
class AGC:
    """Adaptive Gradient Clipping: each unit's gradient norm at most ``clipping`` times its weight norm.

    A unit is an output row of a weight (all dimensions but the first; each element of a vector), as in
    the NFNet reference code: ``||G_i|| <= clipping * max(||W_i||, eps)``, scaling only the units over it.
    The reported coefficient is the smallest factor applied to any unit. Parameters are read, never
    written; with sharded (FSDP2) parameters each rank clips the units of its own shard, which is exact
    for row-sharded weights.
    """

    name = "agc"
    needs_weights = True

    def __init__(self, clipping: float = 0.01, eps: float = 1e-3) -> None:
        self.clipping = number("clipping", clipping)
        self.eps = number("eps", eps)

    def clip_(self, batch: GradBatch) -> torch.Tensor:
        assert batch.weights is not None, "AGC needs the weights: the pipeline passes them (needs_weights)"
        smallest = []
        scale = batch.grad_scale
        for grads, weights in zip(batch.groups, batch.weights, strict=True):
            for grad, weight in zip(grads, weights, strict=True):
                if not grad.numel():
                    continue
                limit = self.clipping * _unitwise_norm(weight.detach()).clamp(min=self.eps)
                norm = _unitwise_norm(grad)
                if scale is not None:  # AMP: the gradients still carry the scale, the weights do not
                    norm = norm / scale.to(norm.device)
                factor = torch.where(norm > limit, limit / norm.clamp(min=1e-6), 1.0)
                grad.mul_(factor.to(grad.dtype))
                smallest.append(factor.min().to(batch.device, torch.float32))
        return torch.stack(smallest).min() if smallest else torch.ones((), device=batch.device)

    def observe(self, total_norm: float, clip_coef: float) -> None:
        pass

    def config(self) -> dict[str, Any]:
        return {"clip": self.name, "clip_clipping": self.clipping, "clip_eps": self.eps}


def _unitwise_norm(tensor: torch.Tensor) -> torch.Tensor:
    """Norms of the units of a tensor, broadcastable against it (NFNet's ``unitwise_norm``)."""
    if tensor.ndim <= 1:
        return tensor.abs().float()
    return torch.linalg.vector_norm(tensor.float(), dim=tuple(range(1, tensor.ndim)), keepdim=True)

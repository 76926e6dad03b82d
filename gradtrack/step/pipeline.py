"""One training step, top to bottom: measure, clip, one transfer, judge, hand over.

Everything up to the transfer runs on the gradients' device without a host synchronisation
(``gradtrack.measure.stats``, the clip policy, and under ``torch.distributed`` one collective). A policy that
scales every gradient by one factor (norm clipping, ``adaptive``, ``zscore``, ``auto``) has it applied
right after the transfer, and only when it is not exactly 1: a step within ``max_norm`` is one pass over
the gradients, where ``clip_grad_norm_`` always makes two. Everything after
it is host arithmetic on the transferred numbers, the same on every rank (``gradtrack.judge.detection.Judge``),
and ends in the hand-over's messages (``gradtrack.handover.messages``), which feed the run's summary and go to the
outbox: the reporter process, and backends kept in this one.

Layouts: the norms of a step come in the order of the gradients grouped by device and dtype. Each
distinct set of parameters with a gradient, in that order, is a *layout*; a new one (the first step, a
parameter unfrozen, added or replaced) is announced once, with the names of parameters never reported
before, before the first step record that uses it.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, final

import numpy as np
import torch
from torch import nn

from gradtrack.events import Divergence, Explosion, ExplosionKind, Instability, LayersAdded, Rollback
from gradtrack.handover.messages import (
    Diagnosed,
    Diverged,
    ExplosionRaised,
    InstabilityRaised,
    LayersAnnounced,
    LayoutAnnounced,
    Message,
    RolledBack,
    StepRecord,
)
from gradtrack.handover.outlet import Discard, Outlet
from gradtrack.judge.detection import Judge, OnNonfinite, offenders
from gradtrack.judge.diagnosis import DeviceDiagnosis, LayerHistory, depth_growth
from gradtrack.judge.overshoot import EDGE, TARGET, OvershootProbe, OvershootRule, ratios
from gradtrack.measure.amp import AmpState
from gradtrack.measure.distributed import Topology, check_symmetric, local_grads
from gradtrack.measure.params import ParameterSet
from gradtrack.measure.stats import GradBatch, HostStats, Reduce, measure, transfer
from gradtrack.policies.policy import ClipPolicy, coefficient_of, multiply_
from gradtrack.state import integer, part, strings

if TYPE_CHECKING:
    from gradtrack.heal.rollback import Healer
from gradtrack.handover.summary import RunSummary

__all__ = [
    "DivergenceError", "NonFiniteGradientError", "OnDivergence", "OnNonfinite", "Outcome", "Settings", "StepPipeline",
]

OnDivergence = Literal["continue", "raise", "rollback"]
KEPT_EVENTS = 256
KEPT_LAYOUTS = 256  # the reporter keeps as many, dropping the oldest alike
ONE_SAMPLE_CUT = 0.1  # a learning-rate cut measured from the blow-up's own sample alone: at most a decade
TROUBLE_WEIGHT_EVERY = 10  # while an explosion is recent: the weights' norms this often, for the divergence rule


class NonFiniteGradientError(FloatingPointError):
    """Raised by ``on_nonfinite="raise"``; names the layers whose gradients hold NaN/Inf."""


class DivergenceError(RuntimeError):
    """Raised by ``on_divergence="raise"`` at the step the run is judged diverged, to stop paying for it.

    It leaves the ``with`` block like any exception: the run is closed there, ``diverged=true`` and
    status FAILED, with its summary, before the exception reaches you.
    """


@final
@dataclass(frozen=True, slots=True, kw_only=True)
class Settings:
    """A tracker's per-step options, checked by ``GradTracker``."""

    norm_type: float
    clip_policy: ClipPolicy | None
    log_every: int
    layer_every: int | None
    top_k: int
    weight_norms: bool
    weight_every: int
    on_divergence: OnDivergence
    overshoot_every: int | None = None  # the overshoot indicator's cadence (None: off)


@final
@dataclass(frozen=True, slots=True)
class Outcome:
    """What a judged step asks of the update, for a caller that applies the clip itself (``defer_clip``)."""

    total_norm: float  # the step's global norm, unscaled
    clip_coef: float  # the clip policy's factor (1.0: none; for clip="value", the factor of the largest element)
    skip: bool  # the update is to be skipped (non-finite gradients, a spike, a rollback)


@final
class _Losses:
    """Losses observed since the last step: tensors stay on their device until the step's transfer."""

    def __init__(self) -> None:
        self._tensors: list[torch.Tensor] = []
        self._numbers: list[float] = []

    def add(self, loss: torch.Tensor | float) -> None:
        if isinstance(loss, torch.Tensor):
            self._tensors.append(loss.detach().reshape(()))
        else:
            self._numbers.append(float(loss))

    def clear(self) -> None:
        self._tensors, self._numbers = [], []

    def __bool__(self) -> bool:
        return bool(self._tensors or self._numbers)

    def device(self) -> torch.device:
        return self._tensors[0].device if self._tensors else torch.device("cpu")

    def take(self, device: torch.device) -> torch.Tensor | None:
        """The mean as a 0-dim fp32 tensor on ``device``; numbers enter by ``torch.full``, never a copy."""
        tensors, numbers = self._tensors, self._numbers
        if not tensors and not numbers:
            return None
        self.clear()
        if len(tensors) == 1 and not numbers and tensors[0].device == device:
            return tensors[0]
        total = torch.full((), math.fsum(numbers), dtype=torch.float32, device=device)
        for loss in tensors:
            total = total + loss.to(device, torch.float32)
        return total / (len(tensors) + len(numbers))


@final
@dataclass(frozen=True, slots=True)
class _Layout:
    """One announced order of layers: the norms' order, the names and model positions in it."""

    key: int
    order: list[int]  # index into the step's list of parameters with a gradient, per norm
    names: list[str]
    positions: list[int]  # each layer's place in the model (for depth growth)


@final
class StepPipeline:
    """The per-step work of one tracker; ``GradTracker`` decides when a step happens, this does it."""

    def __init__(self, params: ParameterSet, settings: Settings, judge: Judge) -> None:
        self.params = params
        self.settings = settings
        self.clip_policy = settings.clip_policy
        self.judge = judge
        self.outbox: Outlet = Discard()  # the tracker's outbox once it enters
        self.topology = Topology("single", 1, 0)
        self.summary = RunSummary()
        self.events: deque[Explosion] = deque(maxlen=KEPT_EVENTS)
        self.step = 0
        self.losses = _Losses()
        self.diagnosis = DeviceDiagnosis()
        self._table: dict[str, int] = {}  # layer name -> its place in the run's name table
        self._layouts: dict[tuple[int, ...], _Layout] = {}
        self._announced = 0
        self._checked: frozenset[str] = frozenset()
        self._history = LayerHistory()
        self.alarm_since: int | None = None  # the first step of the current trouble (an explosion, an alarm)
        self.healer: Healer | None = None  # on_divergence="rollback"
        self._wants_max_abs = bool(getattr(settings.clip_policy, "needs_max_abs", False))
        self._wants_weights = bool(getattr(settings.clip_policy, "needs_weights", False))
        self._coefficient: Callable[[GradBatch], torch.Tensor | None] | None = getattr(
            settings.clip_policy, "clip_coefficient", None
        )
        # The overshoot indicator needs the raw gradient's dot products: one factor for every gradient (or none).
        uniform = settings.clip_policy is None or self._coefficient is not None
        every = settings.overshoot_every
        self.overshoot = OvershootRule(every) if every is not None and uniform else None
        self.probe = OvershootProbe()
        self._armed: tuple[list[nn.Parameter], float] | None = None  # the sampled step's parameters, clip factor
        self.learning_rates: tuple[float, ...] = ()  # the last sampled update's, for the warning's advice
        self._armed_coef = 1.0  # the clip factor of the update whose sample is pending
        self.sees_updates = True  # an optimizer's post-hook follows run() (False for tracker.step())

    def start(self, names: Sequence[str]) -> None:
        """The run's first name table: the layers that train when the tracker starts (checked across ranks)."""
        self._table = {name: position for position, name in enumerate(names)}
        self._checked = frozenset(names)

    # -- state across restarts ----------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The step, the judge's windows and verdict, what the clip policy learnt, the summary, the layer
        history behind ``origin`` and the diagnosis: everything a later process needs to go on alike."""
        overshoot = self.overshoot.state_dict() if self.overshoot is not None else None
        return {"step": self.step, **self.learnt_state(), "summary": self.summary.state_dict(), "overshoot": overshoot}

    def learnt_state(self) -> dict[str, Any]:
        """What the run taught the judge, the clip policy and the layer history (a rollback restores it)."""
        policy = self.clip_policy
        clip = None
        if policy is not None:
            learnt = policy.state_dict() if hasattr(policy, "state_dict") else None
            clip = {"name": policy.name, "state": learnt}
        layers = None
        ema = self._history.ema
        named = next((layout for layout in self._layouts.values() if layout.key == self._history.key), None)
        if ema is not None and named is not None:
            layers = {"names": list(named.names), "ema": torch.from_numpy(ema.copy())}
        return {
            "judge": self.judge.state_dict(),
            "clip": clip,
            "layers": layers,
            "diagnosis": self.diagnosis.state_dict(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> list[str]:
        """Load every part; returns what was left out and why (the clip policy changed, say)."""
        step = integer(state, "step")
        notes = self.load_learnt_state(state)
        self.summary.load_state_dict(part(state, "summary"))
        if self.overshoot is not None and state.get("overshoot") is not None:  # None: saved without it
            self.overshoot.load_state_dict(part(state, "overshoot"))
        self.step = step
        return notes

    def load_learnt_state(self, state: Mapping[str, Any]) -> list[str]:
        notes = []
        self.judge.load_state_dict(part(state, "judge"))
        clip, policy = state.get("clip"), self.clip_policy
        if clip is not None:
            clip = part(state, "clip")
            learnt = clip.get("state")
            if policy is None or clip.get("name") != policy.name:
                notes.append(f"the clip policy changed ({clip.get('name')!r} then, "
                             f"{getattr(policy, 'name', None)!r} now): it starts afresh")  # fmt: skip
            elif learnt is not None and hasattr(policy, "load_state_dict"):
                policy.load_state_dict(part(clip, "state"))
        layers = state.get("layers")
        if layers is not None:
            layers = part(state, "layers")
            names, ema = strings(layers, "names"), layers.get("ema")
            if not isinstance(ema, torch.Tensor) or ema.shape != (len(names),):
                raise ValueError("'layers.ema' must be a tensor of one value per name")
            self._history.load(names, ema.detach().cpu().double().numpy().copy())
        self.diagnosis.load_state_dict(part(state, "diagnosis"))
        return notes

    def emit(self, message: Message) -> None:
        """Hand one message over: the run's summary here, and the outlet (the tracker's outbox)."""
        self.summary.add(message)
        self.outbox.send(message)

    # -- device work --------------------------------------------------------------------------------

    def run(
        self,
        params: Sequence[nn.Parameter],
        amp: AmpState | None = None,
        *,
        grads: Sequence[torch.Tensor] | None = None,
        defer_clip: bool = False,
    ) -> Outcome | None:
        """Measure, clip and judge the gradients of ``params`` (those that have one).

        ``grads``: the gradients to measure instead of ``param.grad``, one per parameter (a DeepSpeed engine's
        local fragments, empty where a parameter has none on this rank). ``defer_clip``: compute the clip but
        leave it to the caller, who applies the returned :class:`Outcome` where the optimizer steps (DeepSpeed's
        flat partitions, after its unscaling). Returns None for a step that was not judged (no gradient, or an
        AMP overflow, which the optimizer skips itself).
        """
        # A caller's own fragments, or no optimizer hook to say when the update is made: no indicator.
        sampling = self.overshoot is not None and grads is None and self.sees_updates
        if grads is None:
            with_grad = [p for p in params if p.grad is not None]
            grads = [p.grad for p in with_grad]  # type: ignore[misc]
        else:
            with_grad = list(params)
        if not with_grad:
            return None
        settings, topology, step = self.settings, self.topology, self.step
        ids = tuple(map(id, with_grad))
        known = self._layouts.get(ids)
        if known is None and topology.reduction is not None:
            self._check_ranks(with_grad)
        if topology.sharded:
            grads = local_grads(grads)
        layer_every = settings.layer_every
        with_layers = layer_every is not None and step % layer_every == 0
        weights_due = (
            settings.weight_norms
            and not topology.sharded
            and (step % settings.weight_every == 0 or (self.judge.troubled and step % TROUBLE_WEIGHT_EVERY == 0))
        )  # sharded: the weights' norms would need a collective of their own
        sums = self._overshoot_dots(grads, ids, amp) if sampling else None
        with torch.no_grad():
            batch = measure(
                grads,
                settings.norm_type,
                loss=self.losses.take(grads[0].device),
                grad_scale=amp.grad_scale if amp is not None else None,
                overflow=amp.found_inf if amp is not None else None,
                reduction=self._reduction(with_grad),
                want_max_abs=self._wants_max_abs and topology.sharded,
                weights=self._weights(with_grad, weights_due),
                weight_norms=weights_due,
                sums=sums,
            )
            deferred = None
            if self._coefficient is not None:  # one factor for every gradient: applied below, unless it is 1
                clip_coef = deferred = self._coefficient(batch)
            elif defer_clip and self.clip_policy is not None:  # the caller applies it: only the coefficient
                clip_coef = coefficient_of(self.clip_policy, batch)
            else:
                clip_coef = self.clip_policy.clip_(batch) if self.clip_policy is not None else None
            host = transfer(batch, clip_coef, self.diagnosis.extras())
            if deferred is not None and host.clip_coef != 1.0 and not defer_clip:  # NaN too: torch multiplies by it
                multiply_(batch, deferred)
        # From here on only host numbers: nothing below touches the device.
        layout = known
        if layout is None or layout.order != batch.order:
            layout = self._new_layout(ids, with_grad, batch.order)
        if host.extras is not None:
            self.diagnosis.finish(host.extras)
            self._diagnosed()
        overflow = host.overflow or (amp is not None and amp.found_inf is None and not math.isfinite(host.total_norm))
        if overflow and (self.healer is None or host.loss is None or math.isfinite(host.loss)):
            self.amp_skipped()  # the optimizer skips its own update; the gradients are no evidence
            return None
        skip = self._judge(with_grad, layout, host, with_layers)
        if sampling and not skip and self.overshoot is not None and self.overshoot.due(step):
            self._arm(with_grad, ids, batch.order, host.clip_coef, amp)
        return Outcome(total_norm=host.total_norm, clip_coef=host.clip_coef, skip=skip)

    # -- the overshoot indicator (gradtrack.judge.overshoot) ------------------------------------------------

    def _overshoot_dots(
        self, grads: Sequence[torch.Tensor], ids: tuple[int, ...], amp: AmpState | None
    ) -> torch.Tensor | None:
        """The second half of a sample armed at the step before: its dot products, to ride this step's transfer."""
        if not self.probe.pending:
            return None
        local = local_grads(grads) if self.topology.sharded else grads
        dots = self.probe.dots(local, ids)
        if dots is not None and amp is not None and amp.grad_scale is not None:
            dots = torch.stack([dots[0], dots[1] / amp.grad_scale.to(dots.device, dots.dtype)])
        return dots

    def _arm(
        self, params: list[nn.Parameter], ids: tuple[int, ...], order: list[int], clip_coef: float,
        amp: AmpState | None,
    ) -> None:  # fmt: skip
        """Before this step's update: the parameters into the indicator's buffer (``after_update`` follows)."""
        if not (clip_coef > 0 and math.isfinite(clip_coef)):
            return
        # Read under no_grad: the parameters themselves (a detach() each costs more than the copy of a small one).
        self.probe.arm(local_grads([p.detach() for p in params]) if self.topology.sharded else params, ids, order)
        self.probe.grad_scale = amp.grad_scale if amp is not None else None
        self._armed = (params, clip_coef)

    def after_update(self, optimizer: torch.optim.Optimizer, closure: bool = False) -> None:
        """The optimizer's update is done (its step's post-hook): the first half of an armed sample. A closure
        optimizer's gradients are a trial point's by then (LBFGS): no sample."""
        armed, self._armed = self._armed, None
        if armed is None:
            return
        if closure:
            self.probe.disarm()
            return
        rates = tuple(float(g["lr"]) for g in optimizer.param_groups if isinstance(g.get("lr"), int | float))
        params, clip_coef = armed
        grads = [p.grad for p in params]
        weights: Sequence[torch.Tensor] = params
        if self.topology.sharded:
            present = [g for g in grads if g is not None]
            if len(present) != len(grads):
                self.probe.disarm()
                return
            grads, weights = local_grads(present), local_grads([p.detach() for p in params])  # type: ignore[assignment]
        self.probe.after_update(weights, grads)
        self._armed_coef = clip_coef
        self.learning_rates = rates or self.learning_rates

    def finish_diagnosis(self) -> None:
        """At the end of the run: a diagnosis still waiting for the next step finishes now (one sync, at exit)."""
        extras = self.diagnosis.extras()
        if extras is not None:
            self.diagnosis.finish(extras.numpy(force=True).astype(np.float64))
            self._diagnosed()

    def _diagnosed(self) -> None:
        diagnosis = self.diagnosis.summary()
        if diagnosis is not None:
            self.emit(Diagnosed(diagnosis=diagnosis))

    def clip_only(self, params: Sequence[nn.Parameter]) -> None:
        """Clip without measuring for the record: a closure optimizer's later gradient evaluations."""
        self.losses.clear()
        with_grad = [p for p in params if p.grad is not None]
        if self.clip_policy is None or not with_grad:
            return
        grads: list[torch.Tensor] = [p.grad for p in with_grad]  # type: ignore[misc]
        if self.topology.sharded:
            grads = local_grads(grads)
        with torch.no_grad():
            batch = measure(grads, self.settings.norm_type, reduction=self._reduction(with_grad),
                            want_max_abs=self._wants_max_abs and self.topology.sharded,
                            weights=self._weights(with_grad, False))  # fmt: skip
            self.clip_policy.clip_(batch)

    def _weights(self, params: list[nn.Parameter], for_norms: bool) -> list[torch.Tensor] | None:
        """The parameters themselves, for their norms or a policy that clips against them (AGC)."""
        if not self._wants_weights and not for_norms:
            return None
        weights = [p.detach() for p in params]
        return local_grads(weights) if self.topology.sharded else weights

    def _check_ranks(self, params: list[nn.Parameter]) -> None:
        """A new set of parameters with a gradient: every rank must have the same (one collective, once)."""
        names = frozenset(self.params.name_list(params))
        if names != self._checked:
            check_symmetric(sorted(names), self.topology.world_size, params[0].device)
            self._checked = names

    def _reduction(self, params: list[nn.Parameter]) -> Reduce | None:
        reduction = self.topology.reduction
        if reduction is None:
            return None
        norm_type = self.settings.norm_type

        def reduce(
            layer_norms: torch.Tensor,
            order: list[int],
            loss: torch.Tensor | None,
            local_max: torch.Tensor | None,
            sums: torch.Tensor | None,
        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
            return reduction.reduce(layer_norms, params, order, norm_type, loss, local_max, sums)

        return reduce

    def _new_layout(self, ids: tuple[int, ...], params: list[nn.Parameter], order: list[int]) -> _Layout:
        """Announce a new order of layers, and first the names of layers never reported before."""
        names = self.params.names
        positions = self.params.positions
        ordered = [params[i] for i in order]
        layer_names = [names[id(p)] for p in ordered]
        in_model_order = sorted(ordered, key=lambda p: positions.get(id(p), 0))
        new = list(dict.fromkeys(names[id(p)] for p in in_model_order if names[id(p)] not in self._table))
        if new:
            first = len(self._table)
            self._table.update((name, first + offset) for offset, name in enumerate(new))
            self.emit(LayersAnnounced(layers=LayersAdded(step=self.step, names=tuple(new)), first=first))
        layout = _Layout(self._announced, list(order), layer_names, [positions.get(id(p), 0) for p in ordered])
        self._history.adopt(layout.key, layer_names)
        self._announced += 1
        self.emit(LayoutAnnounced(key=layout.key, positions=tuple(self._table[name] for name in layer_names)))
        if len(self._layouts) >= KEPT_LAYOUTS:
            del self._layouts[next(iter(self._layouts))]
        self._layouts[ids] = layout
        return layout

    # -- host work ----------------------------------------------------------------------------------

    @property
    def healthy(self) -> bool:
        """No trouble in sight: no explosion or alarm in the judge's window, no clip policy in trouble."""
        return (
            self.alarm_since is None and not self.judge.troubled and not getattr(self.clip_policy, "in_trouble", False)
        )

    def snapshot_due(self) -> bool:
        """A rollback snapshot is due at this step and the run is worth going back to: healthy, and its loss
        not losing what it learnt, unless that has lasted ``LR_WINDOW`` intervals (a loss that settled at a
        new level, new data, is the new normal)."""
        healer, step = self.healer, self.step
        return (
            healer is not None
            and healer.due(step)
            and self.healthy
            and (not self.judge.divergence.loss_regressed or healer.stale(step))
            and (self.overshoot is None or not self.overshoot.overshooting)  # not while the steps overshoot
            and (self.overshoot is None or not self.overshoot.unproven)  # nor a restored state that overshoots
        )

    def amp_skipped(self) -> None:
        """A step the AMP scaler skipped for overflow: counted and reported, never judged (but see below)."""
        rollback, divergence = None, None
        if self.healer is not None and self.losses:
            # With rollback, a non-finite loss is judged: the forward pass made it (no scale does), and it
            # may have corrupted BatchNorm's statistics, which only a rollback puts right. One host sync, on
            # an overflow step only.
            loss = self.losses.take(self.losses.device())
            value = float(loss) if loss is not None else math.nan
            if not math.isfinite(value):
                divergence, rollback = self._judge_loss(value)
        self.losses.clear()  # the skipped step's loss must not leak into the next step's value
        step = self.step
        self.step += 1
        self.emit(StepRecord(step=step, timestamp=time.time(), total_norm=math.nan, amp_overflow=True,
                             diverged=self.judge.divergence.verdict is not None,
                             skipped=rollback is not None))  # fmt: skip
        self._emit_outcome(rollback, divergence)

    def _emit_outcome(self, rollback: Rollback | None, divergence: Divergence | None) -> None:
        if rollback is not None:
            self.emit(RolledBack(event=rollback, snapshot_bytes=self.snapshot_bytes()))
        if divergence is not None:
            self.emit(Diverged(event=divergence))

    def _judge_loss(self, loss: float) -> tuple[Divergence | None, Rollback | None]:
        """An overflow step whose loss is not finite: the divergence rule, then a rollback if one is left."""
        assert self.healer is not None
        step = self.step
        verdict = self.judge.step(step=step, timestamp=time.time(), total_norm=math.nan, nonfinite=0, loss=loss,
                                  clipped=False, param_norm=None)  # fmt: skip
        self.alarm_since = step if self.alarm_since is None else self.alarm_since
        if verdict.divergence is None:
            return None, None
        rollback = self._heal(step, verdict.divergence)
        return (verdict.divergence, None) if rollback is None else (None, rollback)

    def _heal(self, step: int, divergence: Divergence) -> Rollback | None:
        """A rollback to before the trouble began, if one is left; the judgement then starts afresh."""
        assert self.healer is not None
        rollback = self.healer.heal(step, divergence, step if self.alarm_since is None else self.alarm_since,
                                    lr_factor=self._measured_cut(step))  # fmt: skip
        if rollback is not None:
            self._restarted()
        return rollback

    def _measured_cut(self, step: int) -> float | None:
        """The learning-rate scale the overshoot indicator measured for a divergence at ``step``, where the
        learning rate is to blame: the run diverged soon after a restore (the state was good, the rate
        was not) or after its steps overshot persistently. Sized by the typical sample before the blow-up
        (the ratio is about proportional to the rate) when that sample is above the edge, instead of a blind
        halving; None (the divergence rule's own halving) otherwise. The steps before the blow-up count: a
        poisoned batch makes the gradient change of its own step as large as it likes, and one over it could
        freeze the run; a healthy heavy-ball run's samples swing around 2, and their median stays below it.
        A run that blows up at the first step after a restore has only that step's sample: it is used, but
        as one sample, weak evidence, it cuts by at most ``ONE_SAMPLE_CUT``."""
        rule, healer = self.overshoot, self.healer
        if rule is None or healer is None or not (healer.soon(step) or rule.overshooting):
            return None
        typical, alone = rule.typical_before(step)
        if not typical > EDGE:
            return None
        return max(ONE_SAMPLE_CUT, TARGET / typical) if alone else TARGET / typical

    def _restarted(self) -> None:
        """A rollback: the trouble and the indicator's samples belonged to the state thrown away."""
        self.alarm_since = None
        self._armed = None
        self.probe.disarm()
        if self.overshoot is not None:
            self.overshoot.restart()

    def _overshoot_step(
        self, step: int, now: float, layout: _Layout, host: HostStats
    ) -> tuple[float, Instability | None]:
        """The sample completed at this step (NaN: none) and the warning it raises, if any."""
        rule = self.overshoot
        if rule is None or host.sums is None:
            return math.nan, None
        overall, per_layer = ratios(host.sums[0], host.sums[1], self._armed_coef)
        rule.add(step, overall, per_layer)
        return overall, rule.warning(step, now, layout.names, self.settings.top_k, self.learning_rates)

    def _heal_overshoot(self, step: int, now: float) -> Rollback | None:
        """``on_divergence="rollback"``: steps that overshoot persistently while the loss stopped improving are a
        learning-rate problem even where the clip keeps every norm finite: back to before the overshoot began,
        the learning rate scaled by what the ratio measured."""
        rule, healer = self.overshoot, self.healer
        if rule is None or healer is None or not rule.persistent or not self.judge.divergence.loss_stalled:
            return None
        began = rule.episode_since if rule.episode_since is not None else step
        reason = (f"the steps overshoot (lr x curvature {rule.level():.3g}, above 2 on most recent samples since "
                  f"step {began}) and the loss stopped improving")  # fmt: skip
        rollback = healer.heal(step, Divergence(step=step, reason=reason, timestamp=now), began,
                               lr_factor=rule.lr_scale())  # fmt: skip
        if rollback is not None:
            self._restarted()
        return rollback

    def _judge(self, params: Sequence[nn.Parameter], layout: _Layout, host: HostStats, with_layers: bool) -> bool:
        """Judge the step on the host; True when its update is to be skipped."""
        step, now = self.step, time.time()
        self.step += 1
        total_norm, norms, settings = host.total_norm, host.layer_norms, self.settings
        # A finite total means every layer is finite (a NaN or inf layer makes the total NaN or inf).
        nonfinite = 0 if math.isfinite(total_norm) else int(norms.size - np.count_nonzero(np.isfinite(norms)))
        clipped = host.clip_coef < 1.0
        if self.clip_policy is not None:
            self.clip_policy.observe(total_norm, host.clip_coef)
        weights = host.weight_norms
        param_norm = math.sqrt(float(np.dot(weights, weights))) if weights is not None else None
        verdict = self.judge.step(step=step, timestamp=now, total_norm=total_norm, nonfinite=nonfinite,
                                  loss=host.loss, clipped=clipped, param_norm=param_norm)  # fmt: skip
        explosion = None
        if verdict.explosion is not None:
            explosion = self._explosion(step, now, verdict.explosion, nonfinite, layout, host)
        if step % LayerHistory.every == 0:
            self._history.update(layout.key, norms)
        if explosion is not None or nonfinite or self.judge.divergence.alarmed:
            self.alarm_since = step if self.alarm_since is None else self.alarm_since
        else:
            self.alarm_since = None
        overshoot, instability = self._overshoot_step(step, now, layout, host)
        divergence, rollback = verdict.divergence, None
        if divergence is not None and self.healer is not None:
            rollback = self._heal(step, divergence)
            if rollback is not None:  # healed: the state of before the trouble is back
                divergence = None
        elif self.healer is not None and divergence is None:
            rollback = self._heal_overshoot(step, now)
        if verdict.skip or rollback is not None:
            for p in params:  # optimizers skip parameters without a gradient: the update is skipped
                p.grad = None
        reported = (explosion is not None or divergence is not None or nonfinite > 0 or instability is not None
                    or step % settings.log_every == 0)  # fmt: skip
        self.emit(StepRecord(
            step=step, timestamp=now, total_norm=total_norm, clip_coef=host.clip_coef, nonfinite=nonfinite,
            loss=host.loss, clipped=clipped, explosion=explosion is not None,
            diverged=self.judge.divergence.verdict is not None, skipped=verdict.skip or rollback is not None,
            reported=reported or rollback is not None,
            with_layers=reported and with_layers, layout=layout.key if reported else -1,
            layer_norms=norms.tobytes() if reported else None,
            weight_norms=weights.tobytes() if weights is not None and reported else None,
            overshoot=overshoot,
        ))  # fmt: skip
        if instability is not None:
            self.emit(InstabilityRaised(event=instability))
        if explosion is not None:
            self.emit(ExplosionRaised(event=explosion))
            if self.diagnosis.due(step) and not self.topology.sharded:
                by_name = {self.params.names[id(p)]: p for p in params}
                self.diagnosis.start(step, [(o.name, by_name[o.name]) for o in explosion.offenders][: settings.top_k])
        self._emit_outcome(rollback, divergence)
        if nonfinite and self.judge.on_nonfinite == "raise":
            bad = [o.name for o in explosion.offenders if o.nonfinite] if explosion else []
            raise NonFiniteGradientError(f"non-finite gradients at step {step} in: {', '.join(bad)}")
        if divergence is not None and settings.on_divergence == "raise":
            raise DivergenceError(f"gradtrack: the run diverged at step {step}: {divergence.reason}")
        return verdict.skip or rollback is not None

    def snapshot_bytes(self) -> int:
        """The memory (or disk) the rollback snapshots hold."""
        return self.healer.peak_nbytes if self.healer is not None else 0

    def _explosion(
        self, step: int, now: float, found: tuple[ExplosionKind, float], nonfinite: int, layout: _Layout,
        host: HostStats,
    ) -> Explosion:  # fmt: skip
        kind, threshold = found
        norms = host.layer_norms
        picked = offenders(norms, layout.names, threshold, self.settings.top_k)
        origin, jump = None, math.nan
        jumps = self._history.jumps(layout.key, norms)
        if jumps is not None and jumps.size:
            index = int(np.argmax(jumps))
            origin, jump = layout.names[index], float(np.exp(min(jumps[index], 700.0)))
        growth = depth_growth(norms, layout.positions)
        explosion = Explosion(step=step, kind="nonfinite" if nonfinite else kind, total_norm=host.total_norm,
                              threshold=threshold, offenders=picked, timestamp=now, origin=origin, origin_jump=jump,
                              depth_growth=growth)  # fmt: skip
        self.events.append(explosion)
        return explosion

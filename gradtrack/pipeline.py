"""One training step, top to bottom: measure, clip, one transfer, judge, report.

Everything up to the transfer runs on the gradients' device without a host synchronisation
(``gradtrack.stats``, the clip policy, and under ``torch.distributed`` one collective). Everything after
it is host arithmetic on the transferred numbers, the same on every rank, and ends in frozen records
handed to the outbox (``gradtrack.outbox``): the reporter process, and backends kept in this one.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Sequence
from typing import Literal, final

import numpy as np
import torch
from torch import nn

from gradtrack.amp import AmpState
from gradtrack.detection import DivergenceDetector, ExplosionDetector, SpikeSkip, offenders
from gradtrack.diagnosis import DeviceDiagnosis, LayerHistory, depth_growth
from gradtrack.distributed import Topology, local_grads
from gradtrack.events import Explosion
from gradtrack.outbox import Outbox
from gradtrack.policy import ClipPolicy
from gradtrack.records import StepRecord
from gradtrack.stats import HostStats, Reduce, measure, transfer
from gradtrack.summary import RunSummary

__all__ = ["DivergenceError", "NonFiniteGradientError", "OnDivergence", "OnNonfinite", "StepPipeline"]

OnNonfinite = Literal["skip", "raise", "continue"]
OnDivergence = Literal["continue", "raise"]
KEPT_EVENTS = 256


class NonFiniteGradientError(FloatingPointError):
    """Raised by ``on_nonfinite="raise"``; names the layers whose gradients hold NaN/Inf."""


class DivergenceError(RuntimeError):
    """Raised by ``on_divergence="raise"`` at the step the run is judged diverged, to stop paying for it.

    It leaves the ``with`` block like any exception: the run is closed there, ``diverged=true`` and
    status FAILED, with its summary, before the exception reaches you.
    """


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
class StepPipeline:
    """The per-step work of one tracker; ``GradTracker`` decides when a step happens, this does it."""

    def __init__(
        self,
        names: dict[int, str],
        norm_type: float,
        clip_policy: ClipPolicy | None,
        on_nonfinite: OnNonfinite,
        detector: ExplosionDetector,
        divergence: DivergenceDetector,
        log_every: int,
        layer_every: int | None,
        top_k: int,
        on_spike: SpikeSkip | None = None,
        on_divergence: OnDivergence = "continue",
        weight_norms: bool = True,
    ) -> None:
        self.names = names
        self.norm_type = norm_type
        self.clip_policy = clip_policy
        self.on_nonfinite: OnNonfinite = on_nonfinite
        self.detector = detector
        self.divergence = divergence
        self.log_every = log_every
        self.layer_every = layer_every
        self.top_k = top_k
        self.on_spike = on_spike
        self.on_divergence: OnDivergence = on_divergence
        self.weight_norms = weight_norms
        self.outbox = Outbox()
        self.topology = Topology("single", 1, 0)
        self.summary = RunSummary()
        self.events: deque[Explosion] = deque(maxlen=KEPT_EVENTS)
        self.step = 0
        self.losses = _Losses()
        self._positions = {key: position for position, key in enumerate(names)}  # id(param) -> layer index
        self._layouts: dict[object, tuple[list[int], int, list[str]]] = {}
        self._wants_max_abs = bool(getattr(clip_policy, "needs_max_abs", False))
        self._wants_weights = bool(getattr(clip_policy, "needs_weights", False))
        self._history = LayerHistory()
        self.diagnosis = DeviceDiagnosis()

    # -- device work --------------------------------------------------------------------------------

    def run(self, params: Sequence[nn.Parameter], amp: AmpState | None = None) -> None:
        """Measure, clip and judge the gradients of ``params`` (those that have one)."""
        with_grad = [p for p in params if p.grad is not None]
        if not with_grad:
            return
        grads: list[torch.Tensor] = [p.grad for p in with_grad]  # type: ignore[misc]
        topology = self.topology
        if topology.sharded:
            grads = local_grads(grads)
        layer_step = self.layer_every is not None and self.step % self.layer_every == 0
        weight_norms = self.weight_norms and layer_step and not topology.sharded  # sharded: would need a collective
        with torch.no_grad():
            batch = measure(
                grads,
                self.norm_type,
                loss=self.losses.take(grads[0].device),
                grad_scale=amp.grad_scale if amp is not None else None,
                overflow=amp.found_inf if amp is not None else None,
                reduction=self._reduction(with_grad),
                want_max_abs=self._wants_max_abs and topology.sharded,
                weights=self._weights(with_grad, weight_norms),
                weight_norms=weight_norms,
            )
            clip_coef = self.clip_policy.clip_(batch) if self.clip_policy is not None else None
            host = transfer(batch, clip_coef, self.diagnosis.extras())
        # From here on only host numbers: nothing below touches the device.
        if host.extras is not None:
            self.diagnosis.finish(host.extras)
            self.summary.diagnosis = self.diagnosis.summary()
        if host.overflow or (amp is not None and amp.found_inf is None and not math.isfinite(host.total_norm)):
            self.amp_skipped()  # the optimizer skips its own update; the gradients are no evidence
            return
        cache_key = id(params) if len(with_grad) == len(params) else None
        self._judge(with_grad, _LazyNames(self, with_grad, batch.order, cache_key), host)

    def finish_diagnosis(self) -> None:
        """At the end of the run: a diagnosis still waiting for the next step finishes now (one sync, at exit)."""
        extras = self.diagnosis.extras()
        if extras is not None:
            self.diagnosis.finish(extras.numpy(force=True).astype(np.float64))
            self.summary.diagnosis = self.diagnosis.summary()

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
            batch = measure(grads, self.norm_type, reduction=self._reduction(with_grad),
                            want_max_abs=self._wants_max_abs and self.topology.sharded,
                            weights=self._weights(with_grad, False))  # fmt: skip
            self.clip_policy.clip_(batch)

    def _weights(self, params: list[nn.Parameter], for_norms: bool) -> list[torch.Tensor] | None:
        """The parameters themselves, for their norms or a policy that clips against them (AGC)."""
        if not self._wants_weights and not for_norms:
            return None
        weights = [p.detach() for p in params]
        return local_grads(weights) if self.topology.sharded else weights

    def _reduction(self, params: list[nn.Parameter]) -> Reduce | None:
        reduction = self.topology.reduction
        if reduction is None:
            return None
        norm_type = self.norm_type

        def reduce(
            layer_norms: torch.Tensor, order: list[int], loss: torch.Tensor | None, local_max: torch.Tensor | None
        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
            return reduction.reduce(layer_norms, params, order, norm_type, loss, local_max)

        return reduce

    # -- host work ----------------------------------------------------------------------------------

    def amp_skipped(self) -> None:
        """A step the AMP scaler skipped for overflow: counted and reported, never judged."""
        self.losses.clear()  # the skipped step's loss must not leak into the next step's value
        step = self.step
        self.step += 1
        self.summary.add_amp_overflow()
        diverged = self.divergence.verdict is not None
        record = StepRecord(step, time.time(), math.nan, 1.0, False, 0, False, diverged, False, None, True,
                            True, False, -1, None)  # fmt: skip
        self.outbox.step(record, None)

    def _judge(self, params: Sequence[nn.Parameter], names: _LazyNames, host: HostStats) -> None:
        step, now = self.step, time.time()
        self.step += 1
        nonfinite = int(host.layer_norms.size - np.count_nonzero(np.isfinite(host.layer_norms)))
        if self.clip_policy is not None:
            self.clip_policy.observe(host.total_norm, host.clip_coef)
        jumps = self._history.jumps(names.args[2], host.layer_norms)
        explosion = self._check_explosion(step, now, nonfinite, names, host, jumps)
        param_norm = float(np.sqrt(np.square(host.weight_norms).sum())) if host.weight_norms is not None else None
        divergence = self.divergence.update(
            step, nonfinite, host.loss, now, explosion is not None, host.total_norm, self.detector.baseline,
            host.clip_coef < 1.0, param_norm,
        )  # fmt: skip
        if divergence is not None:
            self.summary.divergence = divergence
        skipped = bool(nonfinite) and self.on_nonfinite == "skip"
        skipped = skipped or (self.on_spike is not None and self.on_spike.skips(host.total_norm))
        if skipped:
            for p in params:  # optimizers skip parameters without a gradient: the update is skipped
                p.grad = None
        clipped = host.clip_coef < 1.0
        self.summary.add_step(step, host.total_norm, clipped, skipped, bool(nonfinite), explosion is not None)
        self.summary.add_loss(host.loss)

        reported = explosion is not None or divergence is not None or nonfinite > 0 or step % self.log_every == 0
        with_layers = reported and self.layer_every is not None and step % self.layer_every == 0
        layout, layer_names = self._layout(names) if with_layers else (-1, None)
        weights = host.weight_norms.tobytes() if host.weight_norms is not None and reported else None
        record = StepRecord(
            step, now, host.total_norm, host.clip_coef, clipped, nonfinite, explosion is not None,
            self.divergence.verdict is not None, skipped, host.loss, False, reported, with_layers, layout,
            host.layer_norms.tobytes() if reported else None, weights,
        )  # fmt: skip
        self.outbox.step(record, layer_names)
        if explosion is not None:
            self.outbox.explosion(explosion)
            if self.diagnosis.due(step) and not self.topology.sharded:
                by_name = {self.names[id(p)]: p for p in params}
                self.diagnosis.start(step, [(o.name, by_name[o.name]) for o in explosion.offenders][: self.top_k])
        if divergence is not None:
            self.outbox.divergence(divergence)
        if nonfinite and self.on_nonfinite == "raise":
            bad = [o.name for o in explosion.offenders if o.nonfinite] if explosion else []
            raise NonFiniteGradientError(f"non-finite gradients at step {step} in: {', '.join(bad)}")
        if divergence is not None and self.on_divergence == "raise":
            raise DivergenceError(f"gradtrack: the run diverged at step {step}: {divergence.reason}")

    def _check_explosion(
        self, step: int, now: float, nonfinite: int, names: _LazyNames, host: HostStats, jumps: np.ndarray | None
    ) -> Explosion | None:
        verdict = self.detector.check(host.total_norm)
        if verdict is None and not nonfinite:
            return None
        kind, threshold = verdict or ("nonfinite", self.detector.explosion_threshold)
        layer_names = names.get()
        picked = offenders(host.layer_norms, layer_names, threshold, self.top_k)
        origin, jump = None, math.nan
        if jumps is not None and jumps.size:
            index = int(np.argmax(jumps))
            origin, jump = layer_names[index], float(np.exp(min(jumps[index], 700.0)))
        params, order, _ = names.args
        growth = depth_growth(host.layer_norms, [self._positions[id(params[i])] for i in order])
        explosion = Explosion(step, "nonfinite" if nonfinite else kind, host.total_norm, threshold, picked, now,
                              origin, jump, growth)  # fmt: skip
        self.events.append(explosion)
        self.summary.add_explosion(explosion)
        return explosion

    def names_for(self, params: Sequence[nn.Parameter], order: list[int], cache_key: int | None) -> list[str]:
        """Layer names in the order of the norms; cached while the same parameter list recurs."""
        return self._layout_of(params, order, cache_key)[2]

    def _layout(self, names: _LazyNames) -> tuple[int, list[str]]:
        _, key, layer_names = self._layout_of(*names.args)
        return key, layer_names

    def _layout_of(
        self, params: Sequence[nn.Parameter], order: list[int], cache_key: int | None
    ) -> tuple[list[int], int, list[str]]:
        """(order, layout key, names); a layout seen for the first time is announced to the reporter."""
        key: object = cache_key if cache_key is not None else tuple(id(params[i]) for i in order)
        cached = self._layouts.get(key)
        if cached is not None and cached[0] == order:
            return cached
        ids = [id(params[i]) for i in order]
        layout = (order, len(self._layouts), [self.names[i] for i in ids])
        self._layouts[key] = layout
        self.outbox.layout(layout[1], [self._positions[i] for i in ids])
        return layout


@final
class _LazyNames:
    """Names are only needed on explosion steps and at the per-layer cadence: build them then."""

    __slots__ = ("_names", "_pipeline", "args")

    def __init__(
        self, pipeline: StepPipeline, params: Sequence[nn.Parameter], order: list[int], cache_key: int | None
    ) -> None:
        self._pipeline = pipeline
        self.args = (params, order, cache_key)
        self._names: list[str] | None = None

    def get(self) -> list[str]:
        if self._names is None:
            self._names = self._pipeline.names_for(*self.args)
        return self._names

"""Clip policies: how the gradients are bounded before the optimizer update.

A policy scales or clamps the gradients in place on their device and returns the coefficient it
applied as a tensor, so clipping adds no host synchronisation. Policies that adapt (``adaptive``)
learn from the host-side numbers of previous steps through ``observe``.
"""

from __future__ import annotations

import bisect
import math
from collections import deque
from typing import Any, Protocol, final, runtime_checkable

import torch

from gradtrack.records import sorted_quantile
from gradtrack.stats import GradBatch
from gradtrack.validate import count, number

__all__ = [
    "CLIP_POLICIES",
    "AdaptiveClip",
    "ClipPolicy",
    "NormClip",
    "ValueClip",
    "make_clip_policy",
]


@runtime_checkable
class ClipPolicy(Protocol):
    """What the tracker needs of a clip policy."""

    name: str

    def clip_(self, batch: GradBatch) -> torch.Tensor | None:
        """Clip ``batch.groups`` in place; return the 0-dim coefficient applied, or None if untouched."""
        ...

    def observe(self, total_norm: float, clip_coef: float) -> None:
        """Host-side feedback after the step's transfer (for policies that adapt)."""
        ...

    def config(self) -> dict[str, Any]:
        """Settings to report as run parameters."""
        ...


def _scale_(batch: GradBatch, max_norm: float) -> torch.Tensor:
    # Same ops as torch.nn.utils.clip_grads_with_norm_: no `if coef < 1` so no host sync.
    clip_coef = max_norm / (batch.clip_norm + 1e-6)
    clip_coef_clamped = torch.clamp(clip_coef, max=1.0)
    if batch.clip_norm is not batch.total_norm:  # 16-bit arithmetic: fall back to the wide total where it overflowed
        wide = torch.clamp(max_norm / (batch.total_norm + 1e-6), max=1.0)
        clip_coef_clamped = torch.where(torch.isfinite(batch.clip_norm), clip_coef_clamped, wide)
    for grads in batch.groups:
        torch._foreach_mul_(grads, clip_coef_clamped.to(grads[0].device))
    return clip_coef_clamped


@final
class NormClip:
    """Scale all gradients so the total norm is at most ``max_norm``: keeps the direction."""

    name = "norm"

    def __init__(self, max_norm: float = 1.0) -> None:
        self.max_norm = number("max_norm", max_norm)

    def clip_(self, batch: GradBatch) -> torch.Tensor:
        return _scale_(batch, self.max_norm)

    def observe(self, total_norm: float, clip_coef: float) -> None:
        pass

    def config(self) -> dict[str, Any]:
        return {"clip": self.name, "max_norm": self.max_norm}


@final
class ValueClip:
    """Clamp every gradient element to ``[-clip_value, clip_value]``, like ``clip_grad_value_``.

    The reported coefficient is the factor applied to the largest element,
    ``min(1, clip_value / max|g|)``.
    """

    name = "value"

    def __init__(self, clip_value: float = 1.0) -> None:
        self.clip_value = number("clip_value", clip_value)

    needs_max_abs = True  # sharded gradients: the reduction brings the global max in its one collective

    def clip_(self, batch: GradBatch) -> torch.Tensor:
        max_abs = batch.max_abs
        if max_abs is None and batch.norm_type == math.inf:
            max_abs = batch.total_norm
        elif max_abs is None:
            per_tensor = [n for grads in batch.groups for n in torch._foreach_norm(grads, math.inf)]
            max_abs = torch.stack([n.to(batch.device) for n in per_tensor]).max()
            if batch.grad_scale is not None:
                max_abs = max_abs / batch.grad_scale.to(max_abs.device)
        for grads in batch.groups:
            if batch.grad_scale is None:
                torch._foreach_clamp_min_(grads, -self.clip_value)
                torch._foreach_clamp_max_(grads, self.clip_value)
            else:  # the gradients still carry the AMP scale: clamp them at the scaled bound, no host sync
                bound = (self.clip_value * batch.grad_scale).to(grads[0].device, grads[0].dtype)
                torch._foreach_clamp_min_(grads, [-bound] * len(grads))
                torch._foreach_clamp_max_(grads, [bound] * len(grads))
        return torch.clamp(self.clip_value / max_abs, max=1.0)

    def observe(self, total_norm: float, clip_coef: float) -> None:
        pass

    def config(self) -> dict[str, Any]:
        return {"clip": self.name, "clip_value": self.clip_value}


@final
class AdaptiveClip:
    """Norm clipping at a percentile of the run's own recent healthy norms (AutoClip).

    Until ``warmup`` finite norms are seen it clips at ``max_norm``; afterwards at the
    ``percentile`` of the last ``window`` finite pre-clip norms, never above ``max_norm`` times
    ``ceiling``. The threshold is a host float learnt from earlier steps, so no extra sync.
    """

    name = "adaptive"

    def __init__(
        self,
        max_norm: float = 1.0,
        percentile: float = 95.0,
        window: int = 1000,
        warmup: int = 20,
        ceiling: float = 100.0,
    ) -> None:
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
        return _scale_(batch, self.threshold)

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

    def config(self) -> dict[str, Any]:
        return {
            "clip": self.name,
            "max_norm": self.max_norm,
            "clip_percentile": self.percentile,
            "clip_window": self.window,
            "clip_warmup": self.warmup,
        }


CLIP_POLICIES: dict[str, type] = {"norm": NormClip, "value": ValueClip, "adaptive": AdaptiveClip}


def make_clip_policy(
    clip: str | ClipPolicy | None, max_norm: float = 1.0, clip_value: float | None = None
) -> ClipPolicy | None:
    """The policy for ``GradTracker(clip=...)``: a registry name, a policy object, or None."""
    if clip is None:
        return None
    if isinstance(clip, str):
        if clip not in CLIP_POLICIES:
            raise ValueError(
                f"clip={clip!r} is not a clip policy; accepted: None, {sorted(CLIP_POLICIES)} "
                "or an object implementing gradtrack.ClipPolicy"
            )
        if clip == "value":
            if clip_value is None:
                raise ValueError("clip='value' needs clip_value=<float > 0>")
            return ValueClip(clip_value)
        if clip_value is not None:
            raise ValueError(f"clip_value is only used with clip='value', not clip={clip!r}")
        policy: ClipPolicy = CLIP_POLICIES[clip](max_norm)
        return policy
    if isinstance(clip, ClipPolicy):
        return clip
    raise TypeError(
        f"clip must be None, one of {sorted(CLIP_POLICIES)} or a ClipPolicy object, got {type(clip).__name__}"
    )

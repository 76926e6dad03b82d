"""Clip policies: how the gradients are bounded before the optimizer update, chosen by name.

``norm`` and ``value`` are torch's two clipping functions, to the bit; the policies that learn their
bound from the run (``adaptive``, ``zscore``, ``adagc``, ``agc``, ``auto``) are in ``gradtrack.policies.adaptive``;
the contract every policy meets is ``gradtrack.policies.policy.ClipPolicy``.
"""

from __future__ import annotations

import math
from typing import Any, final

import torch

from gradtrack.measure.stats import GradBatch
from gradtrack.policies.adaptive import AGC, AdaGC, AdaptiveClip, AutoClip, ZClip
from gradtrack.policies.policy import ClipPolicy, clip_coefficient, scale_
from gradtrack.validate import number

__all__ = [
    "AGC",
    "CLIP_POLICIES",
    "AdaGC",
    "AdaptiveClip",
    "AutoClip",
    "ClipPolicy",
    "NormClip",
    "ValueClip",
    "ZClip",
    "make_clip_policy",
]


@final
class NormClip:
    """Scale all gradients so the total norm is at most ``max_norm``: keeps the direction."""

    name = "norm"

    def __init__(self, max_norm: float = 1.0) -> None:
        self.max_norm = number("max_norm", max_norm)

    def clip_(self, batch: GradBatch) -> torch.Tensor:
        return scale_(batch, self.max_norm)

    def clip_coefficient(self, batch: GradBatch) -> torch.Tensor:
        return clip_coefficient(batch, self.max_norm)

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

    def element_coefficient(self, batch: GradBatch) -> torch.Tensor:
        """``min(1, clip_value / max|g|)`` without clamping anything (for a caller that clamps elsewhere)."""
        max_abs = batch.max_abs
        if max_abs is None and batch.norm_type == math.inf:
            max_abs = batch.total_norm
        elif max_abs is None:
            per_tensor = [n for grads in batch.groups for n in torch._foreach_norm(grads, math.inf)]
            max_abs = torch.stack([n.to(batch.device) for n in per_tensor]).max()
            if batch.grad_scale is not None:
                max_abs = max_abs / batch.grad_scale.to(max_abs.device)
        return torch.clamp(self.clip_value / max_abs, max=1.0)

    def clip_(self, batch: GradBatch) -> torch.Tensor:
        clip_coef = self.element_coefficient(batch)
        for grads in batch.groups:
            if batch.grad_scale is None:
                torch._foreach_clamp_min_(grads, -self.clip_value)
                torch._foreach_clamp_max_(grads, self.clip_value)
            else:  # the gradients still carry the AMP scale: clamp them at the scaled bound, no host sync
                bound = (self.clip_value * batch.grad_scale).to(grads[0].device, grads[0].dtype)
                torch._foreach_clamp_min_(grads, [-bound] * len(grads))
                torch._foreach_clamp_max_(grads, [bound] * len(grads))
        return clip_coef

    def observe(self, total_norm: float, clip_coef: float) -> None:
        pass

    def config(self) -> dict[str, Any]:
        return {"clip": self.name, "clip_value": self.clip_value}


CLIP_POLICIES: dict[str, type] = {
    "norm": NormClip,
    "value": ValueClip,
    "adaptive": AdaptiveClip,
    "zscore": ZClip,
    "adagc": AdaGC,
    "agc": AGC,
    "auto": AutoClip,
}
# What max_norm means for each policy; None: the policy has no such bound and refuses one.
_MAX_NORM: dict[str, Any] = {
    "norm": lambda bound: NormClip(1.0 if bound is None else bound),
    "adaptive": lambda bound: AdaptiveClip(1.0 if bound is None else bound),  # the first bound, and the cap's unit
    "auto": lambda bound: AutoClip(1.0 if bound is None else bound),  # the ceiling while in trouble
    "zscore": lambda bound: ZClip(ceiling=bound),  # an optional absolute ceiling
    "adagc": lambda bound: AdaGC(lambda_abs=1.0 if bound is None else bound),  # the warm-up's global bound
    "agc": lambda bound: AGC() if bound is None else None,
    "value": None,
}


def make_clip_policy(
    clip: str | ClipPolicy | None, max_norm: float | None = None, clip_value: float | None = None
) -> ClipPolicy | None:
    """The policy for ``GradTracker(clip=...)``: a registry name, a policy object, or None."""
    if clip is None or not isinstance(clip, str):
        if max_norm is not None or clip_value is not None:
            raise ValueError(f"max_norm and clip_value are settings of a named clip policy, not of clip={clip!r}")
        if clip is None or isinstance(clip, ClipPolicy):
            return clip
        raise TypeError(
            f"clip must be None, one of {sorted(CLIP_POLICIES)} or a ClipPolicy object, got {type(clip).__name__}"
        )
    if clip not in CLIP_POLICIES:
        raise ValueError(
            f"clip={clip!r} is not a clip policy; accepted: None, {sorted(CLIP_POLICIES)} "
            "or an object implementing gradtrack.ClipPolicy"
        )
    if clip == "value":
        if clip_value is None:
            raise ValueError("clip='value' needs clip_value=<float > 0>")
        if max_norm is not None:
            raise ValueError("max_norm is not used by clip='value' (it clamps each element at clip_value)")
        return ValueClip(clip_value)
    if clip_value is not None:
        raise ValueError(f"clip_value is only used with clip='value', not clip={clip!r}")
    policy: ClipPolicy | None = _MAX_NORM[clip](max_norm)
    if policy is None:
        raise ValueError(f"max_norm is not used by clip={clip!r} (see gradtrack.{CLIP_POLICIES[clip].__name__})")
    return policy

"""The contract of a clip policy, and the device operations the policies share.

A policy scales or clamps the gradients in place on their device and returns the coefficient it
applied as a 0-dim tensor, so clipping adds no host synchronisation. A policy that adapts learns from
the host-side numbers of earlier steps through ``observe`` (after the step's one transfer), or keeps
its state on the device.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch

from gradtrack.measure.stats import GradBatch

__all__ = ["ClipPolicy", "clip_coefficient", "coefficient_of", "defers", "multiply_", "scale_", "scale_each_"]


@runtime_checkable
class ClipPolicy(Protocol):
    """What the tracker needs of a clip policy.

    Optional attributes the tracker reads: ``needs_weights`` (True: ``batch.weights`` holds the
    parameters, grouped like the gradients), ``needs_max_abs`` (True: under sharding, the reduction
    brings the largest element in its one collective) and ``clip_coefficient(batch)``: for a policy that
    scales every gradient by one factor, that factor (0-dim, on the device) without applying it. The
    tracker then applies it after the step's transfer, and only when it is not exactly 1: a step that
    needs no clipping costs no pass over the gradients (multiplying by 1 changes no bit, so the result is
    the same). A policy that learns from the run implements ``state_dict()`` (plain values and tensors)
    and ``load_state_dict(state)`` too, so that ``tracker.state_dict()`` carries what it learnt across a
    restart; one without them starts afresh after a resume.
    """

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


def clip_coefficient(batch: GradBatch, max_norm: float | torch.Tensor) -> torch.Tensor:
    """``min(1, max_norm / (norm + 1e-6))`` as ``clip_grads_with_norm_`` computes it, on the device.

    Where 16-bit arithmetic made torch's own total overflow, the wide total is used instead.
    """
    clip_coef = torch.clamp(max_norm / (batch.clip_norm + 1e-6), max=1.0)
    if batch.clip_norm is not batch.total_norm:  # 16-bit arithmetic: the wide total where it overflowed
        wide = torch.clamp(max_norm / (batch.total_norm + 1e-6), max=1.0)
        clip_coef = torch.where(torch.isfinite(batch.clip_norm), clip_coef, wide)
    return clip_coef


def multiply_(batch: GradBatch, clip_coef: torch.Tensor) -> None:
    """Every gradient times ``clip_coef``, no ``if coef < 1``, so no host sync."""
    for grads in batch.groups:
        torch._foreach_mul_(grads, clip_coef.to(grads[0].device))


def scale_(batch: GradBatch, max_norm: float | torch.Tensor) -> torch.Tensor:
    """Scale every gradient by ``min(1, max_norm / (norm + 1e-6))``: the ops of ``clip_grads_with_norm_``."""
    clip_coef = clip_coefficient(batch, max_norm)
    multiply_(batch, clip_coef)
    return clip_coef


def scale_each_(batch: GradBatch, factors: torch.Tensor) -> None:
    """Scale each gradient by its own factor (``factors`` in the order of ``batch.layer_norms``)."""
    start = 0
    for grads in batch.groups:
        own = factors[start : start + len(grads)].to(grads[0].device, grads[0].dtype)
        torch._foreach_mul_(grads, list(own.unbind()))
        start += len(grads)


def defers(policy: ClipPolicy) -> bool:
    """Whether ``policy``'s clipping can be applied away from the measured tensors, after its coefficient is known:
    one factor for every gradient (``clip_coefficient``), or an element bound (``element_coefficient``, with
    ``clip_value``). Per-layer factors (AdaGC) and bounds relative to the weights (AGC) cannot."""
    return callable(getattr(policy, "clip_coefficient", None)) or callable(getattr(policy, "element_coefficient", None))


def coefficient_of(policy: ClipPolicy, batch: GradBatch) -> torch.Tensor | None:
    """The coefficient ``policy`` would report for ``batch``, leaving the gradients untouched (see :func:`defers`)."""
    scale = getattr(policy, "clip_coefficient", None)
    if callable(scale):
        coefficient: torch.Tensor | None = scale(batch)
        return coefficient
    element = getattr(policy, "element_coefficient", None)
    if callable(element):
        bounded: torch.Tensor = element(batch)
        return bounded
    raise TypeError(f"clip policy {policy.name!r} cannot be applied apart from its measurement (see policy.defers)")

"""The hot path: every per-step number from one fused pass and one device-to-host transfer.

The norms are computed exactly as ``torch.nn.utils.get_total_norm`` computes them (``_foreach_norm``
per device and dtype group, then the norm of the stacked per-tensor norms), so the total norm and
the clipped gradients are bitwise those of ``clip_grad_norm_(foreach=True)``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import final

import numpy as np
import torch
from torch.utils._foreach_utils import _group_tensors_by_device_and_dtype

__all__ = ["GradBatch", "HostStats", "group_grads", "measure", "sorted_quantile", "transfer"]


@final
@dataclass(slots=True)
class GradBatch:
    """One step's gradients, grouped once and shared by the norm pass and the clip policy.

    ``order`` maps each position of ``layer_norms`` to the index of its gradient in the caller's
    list, because grouping by device and dtype reorders them.
    """

    groups: list[list[torch.Tensor]]
    order: list[int]
    norm_type: float
    layer_norms: torch.Tensor
    total_norm: torch.Tensor

    @property
    def device(self) -> torch.device:
        return self.total_norm.device


@final
@dataclass(frozen=True, slots=True)
class HostStats:
    """The step's numbers on the host, after the single transfer."""

    layer_norms: np.ndarray  # float64, in GradBatch.order
    total_norm: float
    clip_coef: float
    loss: float | None


def group_grads(grads: Sequence[torch.Tensor]) -> tuple[list[list[torch.Tensor]], list[int]]:
    grouped = _group_tensors_by_device_and_dtype([list(grads)], with_indices=True)
    groups: list[list[torch.Tensor]] = []
    order: list[int] = []
    for [tensors], indices in grouped.values():
        groups.append(tensors)  # type: ignore[arg-type]
        order.extend(indices)
    return groups, order


def _unwrap(tensor: torch.Tensor) -> torch.Tensor:
    # FSDP2 grads are DTensors: their norms are partial per rank until reduced.
    full_tensor = getattr(tensor, "full_tensor", None)
    return full_tensor() if callable(full_tensor) else tensor


def measure(grads: Sequence[torch.Tensor], norm_type: float) -> GradBatch:
    """Per-tensor norms and the total norm, as ``get_total_norm`` computes them; no host sync."""
    groups, order = group_grads(grads)
    first_device = grads[0].device
    norms: list[torch.Tensor] = []
    for tensors in groups:
        norms.extend(torch._foreach_norm(tensors, norm_type))
    if len(groups) > 1 or type(norms[0]) is not torch.Tensor:  # several devices, or DTensors
        norms = [_unwrap(norm).to(first_device) for norm in norms]
    stacked = torch.stack(norms)
    total_norm = torch.linalg.vector_norm(stacked, norm_type)
    return GradBatch(groups, order, norm_type, stacked, total_norm)


def transfer(batch: GradBatch, clip_coef: torch.Tensor | None, loss: torch.Tensor | None) -> HostStats:
    """Pack everything into one vector and bring it to the host in one copy.

    ``torch.cat`` promotes to the widest dtype among the parts, so nothing is rounded before the
    single conversion to float64 on the host side of the copy.
    """
    device = batch.device
    parts = [batch.layer_norms, batch.total_norm.reshape(1)]
    if clip_coef is not None:
        parts.append(clip_coef.reshape(1).to(device))
    if loss is not None:
        parts.append(loss.detach().reshape(1).to(device))
    host = torch.cat(parts).numpy(force=True).astype(np.float64)  # the one device-to-host transfer
    count = len(batch.order)
    tail = host[count:].tolist()
    return HostStats(
        layer_norms=host[:count],
        total_norm=tail[0],
        clip_coef=tail[1] if clip_coef is not None else 1.0,
        loss=tail[-1] if loss is not None else None,
    )


def sorted_quantile(ordered: Sequence[float] | np.ndarray, q: float) -> float:
    """numpy's default (linear) quantile of already sorted values, without numpy's per-call overhead."""
    if not len(ordered):
        return math.nan
    position = q * (len(ordered) - 1)
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return float(ordered[low] + (ordered[high] - ordered[low]) * (position - low))

"""The hot path's device work: every per-step number from one fused pass and one device-to-host transfer.

Norms are computed as ``torch.nn.utils.get_total_norm`` computes them: ``_foreach_norm`` per device
and dtype group, then the norm of the stacked per-tensor norms. Two things differ, both so that the
numbers are right whatever the precision:

* **16-bit gradients** (bf16, fp16) are reduced in fp32 (``_foreach_norm(..., dtype=float32)``), so
  the reported norms never overflow at fp16's 65504 and the host copy never meets a dtype numpy
  lacks. For clipping, ``clip_norm`` rounds those fp32 norms back to the gradients' dtype and combines
  them as torch does, which is exactly what ``_foreach_norm`` returns on 16-bit tensors (its
  accumulator is fp32 too): the clipped gradients stay bitwise those of
  ``clip_grad_norm_(foreach=True)``. Where that 16-bit total overflows, the fp32 total is used, so a
  true norm above 65504 clips to ``max_norm`` instead of zeroing the gradients as torch would.
* **AMP** with an optimizer that unscales inside its own step (fused Adam/AdamW/SGD under
  ``GradScaler``): the gradients carry ``grad_scale``. Every norm is divided by it on the device, so
  reports and clipping see the true gradients; clipping scales the scaled gradients by the true
  coefficient, which commutes with the optimizer's own unscaling.

Sharded gradients (FSDP2 / DTensor) are measured on their local shards and made global with one
collective (``gradtrack.measure.distributed``) before anything is clipped.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple, Protocol, final

import numpy as np
import torch
from torch.utils._foreach_utils import _group_tensors_by_device_and_dtype

__all__ = ["GradBatch", "HostStats", "Reduce", "group_grads", "measure", "transfer"]

_NARROW = (torch.float16, torch.bfloat16)


class Reduce(Protocol):
    """Makes local per-tensor norms, loss, largest element and partial sums global (``measure.distributed``)."""

    def __call__(
        self,
        layer_norms: torch.Tensor,
        order: list[int],
        loss: torch.Tensor | None,
        local_max: torch.Tensor | None,
        sums: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]: ...


@final
@dataclass(slots=True)
class GradBatch:
    """One step's gradients and every number measured from them, still on the device.

    ``groups`` are the tensors clipping works on (the local shards of DTensors), grouped once by
    device and dtype; ``order`` maps each position of ``layer_norms`` to the index of its gradient in
    the caller's list, because grouping reorders them. ``layer_norms`` and ``total_norm`` are fp32 or
    wider, global across ranks and unscaled; ``clip_norm`` is the total that norm clipping divides by
    (see the module docstring). ``loss`` is the mean observed loss, or across ranks ``[sum, ranks that
    observed one]``; ``overflow`` the AMP scaler's found-inf flag for a fused optimizer; ``grad_scale``
    the factor the gradients still carry; ``max_abs`` the largest element magnitude when a reduction
    had to compute it globally; ``sums`` per-tensor sums that ride along (the overshoot indicator's dot
    products, ``gradtrack.judge.overshoot``), global too.
    """

    groups: list[list[torch.Tensor]]
    order: list[int]
    norm_type: float
    layer_norms: torch.Tensor
    total_norm: torch.Tensor
    clip_norm: torch.Tensor
    loss: torch.Tensor | None = None
    overflow: torch.Tensor | None = None
    grad_scale: torch.Tensor | None = None
    max_abs: torch.Tensor | None = None
    weights: list[list[torch.Tensor]] | None = None  # the parameters, grouped like ``groups`` (if asked for)
    weight_norms: torch.Tensor | None = None  # their norms, in the order of ``layer_norms`` (if asked for)
    sums: torch.Tensor | None = None  # rows of per-tensor sums in the order of ``layer_norms`` (if given)

    @property
    def device(self) -> torch.device:
        return self.total_norm.device


class HostStats(NamedTuple):
    """The step's numbers on the host, after the single transfer, widened to float64 there (a tuple: made
    at every step, it costs a tenth of a frozen dataclass)."""

    layer_norms: np.ndarray  # float64, in GradBatch.order
    total_norm: float
    clip_coef: float
    loss: float | None
    overflow: bool
    weight_norms: np.ndarray | None = None  # float64, in GradBatch.order
    extras: np.ndarray | None = None  # the values the caller asked to ride along (diagnosis)
    sums: np.ndarray | None = None  # float64, GradBatch.sums' shape


def group_grads(
    grads: Sequence[torch.Tensor], weights: Sequence[torch.Tensor] | None = None
) -> tuple[list[list[torch.Tensor]], list[int], list[list[torch.Tensor]] | None]:
    """Gradients grouped by device and dtype, their original positions, and ``weights`` grouped alike."""
    lists = [list(grads)] if weights is None else [list(grads), list(weights)]
    grouped = _group_tensors_by_device_and_dtype(lists, with_indices=True)  # type: ignore[arg-type]
    groups: list[list[torch.Tensor]] = []
    weight_groups: list[list[torch.Tensor]] = []
    order: list[int] = []
    for tensor_lists, indices in grouped.values():
        groups.append(tensor_lists[0])  # type: ignore[arg-type]
        if weights is not None:
            weight_groups.append(tensor_lists[1])  # type: ignore[arg-type]
        order.extend(indices)
    return groups, order, weight_groups if weights is not None else None


def measure(
    grads: Sequence[torch.Tensor],
    norm_type: float,
    *,
    loss: torch.Tensor | None = None,
    grad_scale: torch.Tensor | None = None,
    overflow: torch.Tensor | None = None,
    reduction: Reduce | None = None,
    want_max_abs: bool = False,
    weights: Sequence[torch.Tensor] | None = None,
    weight_norms: bool = False,
    sums: torch.Tensor | None = None,
) -> GradBatch:
    """Per-tensor and total norms of ``grads`` with no host synchronisation.

    ``grads`` are plain tensors (DTensors already replaced by their local shards when ``reduction``
    is given); ``loss`` is this rank's mean observed loss, on the device; ``sums``: rows of per-tensor
    partial sums in the order the norms will have (made global by ``reduction`` in the same collective).
    """
    groups, order, weight_groups = group_grads(grads, weights)
    first_device = grads[0].device
    wide: list[torch.Tensor] = []  # fp32 or wider: what is reported
    native: list[torch.Tensor] = []  # in each gradient's dtype: what torch would clip with
    measured: list[torch.Tensor] = []  # the weights' norms, when asked for
    # The weights' norms in the same launch as the gradients' where they share its norm type and dtype.
    together = weight_norms and weight_groups is not None and norm_type == 2.0
    narrow = False
    for position, tensors in enumerate(groups):
        count = len(tensors)
        is_narrow = tensors[0].dtype in _NARROW
        narrow = narrow or is_narrow
        if together:
            assert weight_groups is not None
            both = _foreach_norm(tensors + weight_groups[position], norm_type, _wide(tensors[0].dtype))
            norms, measured_here = both[:count], both[count:]
            measured.extend(measured_here)
        else:
            norms = _foreach_norm(tensors, norm_type, _wide(tensors[0].dtype))
        wide.extend(norms)
        if is_narrow:
            native.extend(norm.to(tensors[0].dtype) for norm in norms)
        else:
            native.extend(norms)
    if len(groups) > 1:
        wide = [norm.to(first_device) for norm in wide]
        native = [norm.to(first_device) for norm in native]
    layer_norms = torch.stack(wide)
    max_abs = None
    local_norms = layer_norms
    if reduction is not None:
        local_max = _max_abs(groups, norm_type, layer_norms) if want_max_abs else None
        layer_norms, loss, max_abs, sums = reduction(layer_norms, order, loss, local_max, sums)
    total_norm = torch.linalg.vector_norm(layer_norms, norm_type)
    if layer_norms is not local_norms:  # combined across ranks: torch's own arithmetic has no equivalent
        clip_norm = total_norm
    elif narrow:
        clip_norm = torch.linalg.vector_norm(torch.stack(native), norm_type)
    else:
        clip_norm = total_norm  # the same stack and vector_norm as get_total_norm: bitwise torch's
    if grad_scale is not None:
        scale = grad_scale.to(first_device)
        unscaled_clip = None if clip_norm is total_norm else clip_norm.to(total_norm.dtype) / scale  # not in fp16
        layer_norms, total_norm = layer_norms / scale, total_norm / scale
        clip_norm = total_norm if unscaled_clip is None else unscaled_clip
        if max_abs is not None:
            max_abs = max_abs / scale
    weight_norm = None
    if weight_norms and weight_groups is not None:  # the parameters' own norms, in fp32 or wider
        if not together:
            measured = [n for group in weight_groups for n in _foreach_norm(group, 2.0, _wide(group[0].dtype))]
        weight_norm = torch.stack([n.to(first_device) for n in measured]) if len(groups) > 1 else torch.stack(measured)
    return GradBatch(
        groups, order, norm_type, layer_norms, total_norm, clip_norm, loss, overflow, grad_scale, max_abs,
        weight_groups, weight_norm, sums,
    )  # fmt: skip


def _wide(dtype: torch.dtype) -> torch.dtype | None:
    return torch.float32 if dtype in _NARROW else None


def _foreach_norm(
    tensors: list[torch.Tensor], norm_type: float, dtype: torch.dtype | None = None
) -> list[torch.Tensor]:
    """``torch._foreach_norm``, except that an empty tensor's inf-norm is 0 instead of an error.

    Empty tensors are ordinary under FSDP2: with uneven shards a rank may hold no rows of a parameter
    (torch's own ``clip_grad_norm_`` raises there with ``norm_type=inf``).
    """
    if norm_type != math.inf or all(t.numel() for t in tensors):
        return list(torch._foreach_norm(tensors, norm_type, dtype=dtype))
    filled = [t if t.numel() else t.new_zeros(1) for t in tensors]
    return list(torch._foreach_norm(filled, norm_type, dtype=dtype))


def _max_abs(groups: list[list[torch.Tensor]], norm_type: float, layer_norms: torch.Tensor) -> torch.Tensor:
    """This rank's largest gradient magnitude (value clipping's coefficient)."""
    if norm_type == math.inf:
        return layer_norms.max()
    device = layer_norms.device
    per_tensor = [n.to(device) for tensors in groups for n in _foreach_norm(tensors, math.inf)]
    return torch.stack(per_tensor).max().to(layer_norms.dtype)


def transfer(batch: GradBatch, clip_coef: torch.Tensor | None, extras: torch.Tensor | None = None) -> HostStats:
    """Pack everything into one vector and bring it to the host in one copy.

    ``torch.cat`` promotes to the widest dtype among the parts (fp32 at least, since the norms are),
    so nothing is rounded before the host widens the copy to float64: no float64 is ever asked of a
    device that lacks it (MPS).
    """
    device = batch.device
    parts = [batch.layer_norms, batch.total_norm.reshape(1)]
    if clip_coef is not None:
        parts.append(clip_coef.reshape(1) if clip_coef.device == device else clip_coef.reshape(1).to(device))
    if batch.loss is not None:
        parts.append(batch.loss.detach().reshape(-1).to(device))  # a mean, or [sum, count] across ranks
    if batch.overflow is not None:
        parts.append(batch.overflow.reshape(1).to(device, parts[0].dtype))
    count = len(batch.order)
    if batch.weight_norms is not None:
        parts.append(batch.weight_norms.to(device))
    if extras is not None:
        parts.append(extras.reshape(-1).to(device))
    if batch.sums is not None:
        parts.append(batch.sums.reshape(-1).to(device))
    host = torch.cat(parts).numpy(force=True).astype(np.float64)  # the one device-to-host transfer
    end = host.size
    sum_values = None
    if batch.sums is not None:
        end -= batch.sums.numel()
        sum_values = host[end:].reshape(batch.sums.shape)
    extra_values = None
    if extras is not None:
        end -= extras.numel()
        extra_values = host[end:]
    weight_values = None
    if batch.weight_norms is not None:
        weight_values = host[end - count : end]
        end -= count
    tail = host[count:end].tolist()
    total_norm, position = tail[0], 1
    coef = 1.0
    if clip_coef is not None:
        coef, position = tail[position], position + 1
    loss = None
    if batch.loss is not None:
        if batch.loss.numel() == 1:
            loss, position = tail[position], position + 1
        else:
            loss_sum, observed = tail[position : position + 2]
            loss, position = (loss_sum / observed if observed else None), position + 2
    overflow = batch.overflow is not None and tail[position] > 0
    return HostStats(layer_norms=host[:count], total_norm=total_norm, clip_coef=coef, loss=loss, overflow=overflow,
                     weight_norms=weight_values, extras=extra_values, sums=sum_values)  # fmt: skip

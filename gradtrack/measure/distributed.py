"""gradtrack inside ``torch.distributed``: which strategy the run uses, and one collective per step.

Every rank measures and clips; only global rank 0 reports. For every rank to take the same
decisions (clip coefficient, skip on non-finite gradients, explosion, divergence) from the same
numbers, whatever each rank holds locally is combined with **one** collective per step:

* **DDP** (or any data-parallel loop whose gradients are already all-reduced): the norms are the same
  on every rank and are not touched; only the observed loss, which differs per rank, is averaged
  (one all-reduce of two numbers).
* **FSDP2 / DTensor**: each rank has norms of its local shards. For norm types 1 and 2 the local
  partial sums (``|g|_p ** p``) of every tensor are stacked and summed; for ``inf`` the local maxima
  are max-reduced with a per-tensor NaN flag beside them (a max may drop NaN). A tensor replicated
  on some mesh dimensions (HSDP, tensor parallel's replicated layers) contributes ``1 / replicas``
  of its partial sum, so a sum over the whole mesh counts it once. The loss, and the largest element
  for ``clip="value"``, travel in the same vector.

DeepSpeed engines hold their gradients in partitions of their own: ``gradtrack.step.deepspeed`` reads them and
builds the same one-collective ``Reduction``.

Refused with a clear error, because their local gradients cannot be combined correctly here: FSDP1
(``FullyShardedDataParallel``; use FSDP2's ``fully_shard``), DTensor gradients with a ``Partial``
placement, parameters on several device meshes, and a multi-dimensional mesh that does not span the
whole world.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, final

import torch
from torch import nn

__all__ = ["Reduction", "Topology", "check_symmetric", "local_grads", "topology"]


@final
@dataclass(frozen=True, slots=True)
class Topology:
    """Where this tracker runs: the run parameters ``strategy`` and ``world_size``, and its reduction."""

    strategy: str  # "single", "ddp", "fsdp2", "dtensor" or "distributed"
    world_size: int
    rank: int
    reduction: Reduction | None = None
    sharded: bool = False  # gradients are DTensors: measure their local shards

    @property
    def reports(self) -> bool:
        """Only global rank 0 starts backends, so a run is logged once."""
        return self.rank == 0


@final
class Reduction:
    """Combines one step's local numbers across ranks with a single collective, on every step.

    ``factors`` maps ``id(parameter)`` to how many ranks hold the same values of it (1 for a shard);
    None when the norms are already global (DDP) and only the loss needs combining. The collective
    runs whether or not this rank observed a loss, so a rank that does not can never leave the
    others waiting.
    """

    def __init__(self, group: Any, size: int, rank: int, factors: dict[int, float] | None) -> None:
        self.group = group  # a ProcessGroup, or None for the default (world) group
        self.size = size
        self.rank = rank
        self.factors = factors
        distinct = set(factors.values()) if factors is not None else set()
        self._uniform = distinct.pop() if len(distinct) == 1 else None
        self._cached: tuple[tuple[int, ...], torch.Tensor] | None = None

    def reduce(
        self,
        layer_norms: torch.Tensor,
        params: Sequence[nn.Parameter],
        order: Sequence[int],
        norm_type: float,
        loss: torch.Tensor | None,
        local_max: torch.Tensor | None,
        sums: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Global per-tensor norms, the loss as ``[sum over ranks, ranks that observed one]``, the largest
        element (None where the caller has it already) and ``sums`` (rows of per-tensor partial sums, in the
        norms' order: summed over the ranks like the squared norms, a replicated tensor counted once; under
        DDP they are global already and stay as they are)."""
        if self.factors is not None and norm_type == math.inf:
            norms, loss_pair, max_abs = self._reduce_max(layer_norms, loss)
            return norms, loss_pair, max_abs, None  # a max-reduce cannot carry sums
        count, dtype, device = layer_norms.numel(), layer_norms.dtype, layer_norms.device
        parts = [_loss_pair(loss, dtype, device)]
        if self.factors is not None:
            partial = layer_norms.square() if norm_type == 2.0 else layer_norms
            divisors = self._divisors(params, order, device, dtype)
            parts.append(partial / divisors)
            if sums is not None:
                parts.append((sums.to(device, dtype) / divisors).reshape(-1))
        if self.factors is not None and local_max is not None:  # a max cannot be summed: one slot per rank
            slots = torch.zeros(self.size, dtype=dtype, device=device)
            slots[self.rank] = local_max
            parts.append(slots)
        packed = torch.cat(parts)
        self._all_reduce(packed, "sum")
        if self.factors is None:  # DDP: the norms are the same on every rank already
            return layer_norms, packed, local_max, sums
        norms = packed[2 : 2 + count]
        end = 2 + count
        if sums is not None:
            sums, end = packed[end : end + sums.numel()].reshape(sums.shape), end + sums.numel()
        max_abs = packed[end:].max() if local_max is not None else None
        return (norms.sqrt() if norm_type == 2.0 else norms), packed[:2], max_abs, sums

    def _reduce_max(
        self, layer_norms: torch.Tensor, loss: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        count, dtype, device = layer_norms.numel(), layer_norms.dtype, layer_norms.device
        values = torch.full((self.size,), -math.inf, dtype=dtype, device=device)  # a sum cannot be max-reduced:
        present = torch.zeros(self.size, dtype=dtype, device=device)  # one slot per rank for the loss
        loss_nan = torch.zeros(1, dtype=dtype, device=device)
        if loss is not None:
            values[self.rank] = torch.nan_to_num(loss.to(dtype), nan=0.0)
            present[self.rank] = 1.0
            loss_nan = torch.isnan(loss).to(dtype).reshape(1)
        nan_flags = torch.isnan(layer_norms).to(dtype)  # a max may drop NaN: carry it as a flag
        maxima = torch.nan_to_num(layer_norms, nan=0.0, posinf=math.inf)
        packed = torch.cat([maxima, nan_flags, values, present, loss_nan])
        self._all_reduce(packed, "max")
        norms = torch.where(packed[count : 2 * count] > 0, math.nan, packed[:count])
        values, present = packed[2 * count : 2 * count + self.size], packed[2 * count + self.size : -1]
        loss_sum = torch.where(packed[-1] > 0, math.nan, torch.where(present > 0, values, 0.0).sum())
        return norms, torch.stack([loss_sum, present.sum()]), None  # the largest element is the inf-norm total

    def _divisors(
        self, params: Sequence[nn.Parameter], order: Sequence[int], device: torch.device, dtype: torch.dtype
    ) -> torch.Tensor | float:
        if self._uniform is not None or self.factors is None:
            return self._uniform or 1.0
        key = tuple(id(params[i]) for i in order)
        if self._cached is None or self._cached[0] != key:
            values = [self.factors.get(id(params[i]), float(self.size)) for i in order]
            self._cached = (key, torch.tensor(values, dtype=dtype, device=device))
        return self._cached[1]

    def _all_reduce(self, tensor: torch.Tensor, op: str) -> None:
        import torch.distributed as dist

        reduce_op = dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX
        dist.all_reduce(tensor, op=reduce_op, group=self.group)


def _loss_pair(loss: torch.Tensor | None, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    if loss is None:
        return torch.zeros(2, dtype=dtype, device=device)
    return torch.stack([loss.to(device, dtype), torch.ones((), dtype=dtype, device=device)])


def local_grads(grads: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """The local shards of DTensor gradients (views: clipping them in place clips the DTensor)."""
    from torch.distributed.tensor import DTensor

    return [g.to_local() if isinstance(g, DTensor) else g for g in grads]


def topology(model: nn.Module, params: Sequence[nn.Parameter], names: Sequence[str]) -> Topology:
    """The strategy of this run, checked once when the tracker enters its context (on every rank)."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return Topology("single", 1, 0)
    _refuse_unsupported(model)
    world, rank = dist.get_world_size(), dist.get_rank()
    from torch.distributed.tensor import DTensor

    factors: dict[int, float] | None = None
    if any(isinstance(p, DTensor) for p in params):
        factors = {id(p): _replicas(p, world) for p in params}
        strategy = "fsdp2" if _is_fsdp2(model) else "dtensor"
        if any(p.device_mesh.ndim > 1 for p in params if isinstance(p, DTensor)):
            strategy += "+tp"
    elif isinstance(model, nn.parallel.DistributedDataParallel):
        strategy = "ddp"
    else:
        strategy = "distributed"
    device = params[0].device if params[0].device.type != "meta" else torch.device("cpu")
    check_symmetric(sorted(names), world, device)
    return Topology(strategy, world, rank, Reduction(None, world, rank, factors), sharded=factors is not None)


def _replicas(param: nn.Parameter, world: int) -> float:
    """How many ranks of the world hold the same values as this rank's local part of ``param``.

    A DTensor's mesh is the world or a sub-mesh of it (FSDP's data-parallel mesh beside tensor
    parallel's 2-D one): the world is then made of ``world / mesh.size()`` copies of that mesh, and
    within the mesh each Replicate dimension repeats the shard. A plain tensor is replicated everywhere.
    """
    from torch.distributed.tensor import DTensor, Partial, Replicate

    if not isinstance(param, DTensor):
        return float(world)
    mesh, placements = param.device_mesh, param.placements
    if any(isinstance(placement, Partial) for placement in placements):
        raise ValueError(
            f"gradtrack: a parameter has a Partial placement {tuple(placements)}: its local values are "
            "pending sums, not shards, so its norm cannot be combined; redistribute it to Shard or Replicate"
        )
    if world % mesh.size():
        raise ValueError(
            f"gradtrack: a parameter lives on a device mesh of {mesh.size()} ranks, which does not tile the "
            f"world of {world} ranks; gradtrack combines norms over the world"
        )
    within = [mesh.size(dim) for dim, placement in enumerate(placements) if isinstance(placement, Replicate)]
    return world / mesh.size() * math.prod(within)


def _is_fsdp2(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(module, FSDPModule) for module in model.modules())


def check_symmetric(names: Sequence[str], world: int, device: torch.device) -> None:
    """Every rank must track the same parameters, or the per-step collective would mix up (or hang).

    Called when the tracker starts and whenever the set of parameters with a gradient changes (all ranks
    change it at the same step, as they run the same program)."""
    import torch.distributed as dist

    digest = int.from_bytes(hashlib.sha1("\n".join(names).encode()).digest()[:6], "big")  # exact in float64
    probe = torch.tensor([len(names), -len(names), digest, -digest], dtype=torch.float64, device=device)
    dist.all_reduce(probe, op=dist.ReduceOp.MAX)
    if probe[0].item() != -probe[1].item() or probe[2].item() != -probe[3].item():
        raise ValueError(
            f"gradtrack: the ranks of this {world}-rank run track different parameters (this rank: "
            f"{len(names)}). Enter a GradTracker on every rank, around the same model, as DDP and FSDP2 "
            "require; pipeline-parallel stages are not supported"
        )


def _refuse_unsupported(model: nn.Module) -> None:
    """Local gradients that are shards but not DTensors would give every rank its own coefficient."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    if any(isinstance(module, FullyShardedDataParallel) for module in model.modules()):
        raise ValueError(
            "gradtrack: FSDP1 (FullyShardedDataParallel) gradients are flat local shards, not DTensors, so "
            "gradtrack cannot combine their norms; use FSDP2 (torch.distributed.fsdp.fully_shard)"
        )

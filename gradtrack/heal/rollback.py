"""Self-healing: ``on_divergence="rollback"`` puts a diverging run back to its last good state and goes on.

Every ``rollback_every`` steps, while the run is healthy (no explosion or alarm in the judge's window, no clip
policy in trouble, the smoothed loss not losing what the run learnt: ``loss_regressed``, waived once the
newest snapshot is ``LR_WINDOW`` intervals old), a *snapshot* of the whole training state is taken at the
start of the optimizer step, before its update: the model's parameters **and buffers** (a NaN batch corrupts
BatchNorm's running statistics in the forward pass, before any gradient exists), the state of every optimizer
gradtrack hooks, the ``GradScaler``'s, the LR schedulers' (``scheduler=``), what gradtrack's judge and clip
policy learnt, and the RNG states (read, never drawn from: a run that never rolls back is bitwise the run
without the option). The newest ``rollback_keep`` snapshots are kept, in host memory (on CUDA: pinned buffers
filled by non-blocking copies, reused from one snapshot to the next, so the training stream never waits), or
in ``rollback_dir`` for a model that does not fit twice in host memory.

When the divergence rule fires, the newest snapshot taken *before the trouble began* (its first explosion or
alarm) comes back, inside the optimizer step that found it, and that step's update is skipped. The loop simply
goes on with its next batch: the batches between the snapshot and the divergence are not seen again, which is
PaLM's recipe (restart ~100 steps before the spike, skip the batches that caused it) with no change to the
loop. A blow-up caused by data is cured by skipping it; one that comes back soon after is a learning-rate
problem: each rollback within ``LR_WINDOW`` snapshots' cadence of the previous one halves every learning rate
(or, where the overshoot indicator measured the steps since the restore overshooting, scales it by the measured
``1 / ratio``, at most 0.5: a run far too hot, Adam at 100x its rate, would otherwise spend its budget on
halvings, each back to the same state, and end still far too hot), and from then on no learning rate may exceed
the one its group trained with when the restored snapshot was taken: a schedule that keeps raising it, or a
warm-up that would climb past the rate that just failed, would otherwise take the run back over the edge a few
dozen steps later (a snapshot taken soon after an earlier rollback vouches for no more than the rate of the state
it grew from). Scale and ceiling are applied inside the optimizer step (and undone right after it), so that loops
and schedulers that set ``param_group["lr"]`` on every iteration cannot undo them. After ``rollback_budget``
rollbacks the run is judged diverged exactly as without the option.
"""

from __future__ import annotations

import copy
import itertools
import math
import random
import weakref
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, final

import numpy as np
import torch
from torch import nn

from gradtrack.events import Divergence, Rollback

__all__ = [
    "LR_WINDOW",
    "Healer",
    "RollbackSettings",
    "check_healer_state",
    "check_rollback_options",
    "check_snapshottable",
    "schedulers_of",
]

LR_WINDOW = 10  # a rollback within this many snapshot intervals of the previous one halves the learning rate
LR_FACTOR = 0.5
MIN_LR_FACTOR = 1e-3  # a measured scale is applied down to this factor at one rollback


def check_rollback_options(
    on_divergence: str,
    every: int | None,
    keep: int | None,
    budget: int | None,
    directory: object,
    scheduler: object,
    on_nonfinite: str,
) -> None:
    """Refuse, when the tracker is made, settings that cannot heal a run."""
    given = {name: value for name, value in (("rollback_every", every), ("rollback_keep", keep),
             ("rollback_budget", budget), ("rollback_dir", directory)) if value is not None}  # fmt: skip
    if on_divergence != "rollback":
        if given:
            raise ValueError(f"{', '.join(given)} are settings of on_divergence='rollback', not of "
                             f"on_divergence={on_divergence!r}")  # fmt: skip
        return
    if on_nonfinite == "raise":
        raise ValueError(
            "on_divergence='rollback' cannot heal a run that on_nonfinite='raise' stops at its first "
            "non-finite gradient: use on_nonfinite='skip' (the default with clipping) or 'continue'"
        )
    for name, value, low, high in (("rollback_every", every, 1, 10**9), ("rollback_keep", keep, 1, 100),
                                   ("rollback_budget", budget, 1, 10**6)):  # fmt: skip
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high):
            raise ValueError(f"{name} must be an int in [{low}, {high}], got {value!r}")
    if directory is not None and not isinstance(directory, str | Path):
        raise ValueError(f"rollback_dir must be a path or None, got {directory!r}")
    for item in schedulers_of(scheduler):
        if not callable(getattr(item, "state_dict", None)) or not callable(getattr(item, "load_state_dict", None)):
            raise ValueError(f"scheduler={type(item).__name__} has no state_dict()/load_state_dict(): rollback "
                             "cannot restore it")  # fmt: skip


def schedulers_of(scheduler: object) -> list[Any]:
    """``scheduler=``: None, one scheduler, or a list of them."""
    if scheduler is None:
        return []
    return list(scheduler) if isinstance(scheduler, list | tuple) else [scheduler]


def check_snapshottable(parts: Sequence[tuple[str, Any]]) -> None:
    """Refuse, at ``__enter__``, an optimizer, scaler or scheduler whose state a snapshot cannot copy."""
    for what, item in parts:
        if item is None:
            continue
        try:  # what a snapshot does, without copying the tensors (an optimizer's may be gigabytes)
            _clone_tree(item.state_dict(), lambda tensor: tensor)
        except Exception as exc:
            raise ValueError(
                f"on_divergence='rollback' cannot snapshot the {what} ({type(item).__name__}): "
                f"its state_dict() fails ({exc!r})"
            ) from exc


def check_healer_state(state: Mapping[str, Any]) -> tuple[int, float, int | None, list[list[float | None]]]:
    """The count, learning-rate scale, last rollback step and learning-rate ceilings a resumed run goes on with."""
    count, scale, last = state.get("count"), state.get("lr_scale"), state.get("last_rollback")
    if type(count) is not int or not isinstance(scale, float | int) or not (last is None or type(last) is int):
        raise ValueError("'rollback' must hold an int 'count', a number 'lr_scale' and 'last_rollback'")
    ceilings = state.get("lr_ceilings", [])  # absent from states saved before the ceilings existed
    if not isinstance(ceilings, list) or not all(
        isinstance(groups, list) and all(c is None or (isinstance(c, float | int) and not isinstance(c, bool))
                                         for c in groups)
        for groups in ceilings
    ):  # fmt: skip
        raise ValueError("'rollback' 'lr_ceilings' must be a list of lists of numbers or None")
    return count, float(scale), last, [[None if c is None else float(c) for c in groups] for groups in ceilings]


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """A DTensor's shard on this rank (each rank snapshots and restores its own)."""
    to_local = getattr(tensor, "to_local", None)
    return to_local() if callable(to_local) else tensor


def _host_copy(tensor: torch.Tensor, into: torch.Tensor | None = None) -> torch.Tensor:
    """A copy off the device: into a pinned buffer by a non-blocking copy on CUDA, reused when it fits."""
    source = _local(tensor).detach()
    if into is None or into.shape != source.shape or into.dtype != source.dtype:
        into = torch.empty(source.shape, dtype=source.dtype, pin_memory=source.is_cuda)
    into.copy_(source, non_blocking=source.is_cuda)
    return into


def _clone_tree(value: Any, device_copy: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """Every tensor in a state dict copied (an optimizer's state dict holds its live tensors)."""
    if isinstance(value, torch.Tensor):
        return device_copy(value)
    if isinstance(value, Mapping):
        return {key: _clone_tree(item, device_copy) for key, item in value.items()}
    if isinstance(value, list):
        return [_clone_tree(item, device_copy) for item in value]
    if isinstance(value, tuple):
        return tuple(_clone_tree(item, device_copy) for item in value)
    return copy.deepcopy(value)


_Layout = tuple[Any, Any, torch.Size, tuple[int, ...], torch.device]  # mesh, placements, shape, stride, device


def _layouts(state: Mapping[str, Any]) -> dict[tuple[Any, str], _Layout]:
    """Which of an optimizer's state tensors are DTensors (FSDP2), and their layout: a snapshot keeps only this
    rank's shard of each, and the restore must hand the optimizer DTensors again, not bare shards."""
    return {
        (index, key): (value.device_mesh, value.placements, value.shape, value.stride(), _local(value).device)
        for index, per_param in state.get("state", {}).items()
        for key, value in per_param.items()
        if getattr(value, "device_mesh", None) is not None  # a DTensor (a plain tensor has no mesh)
    }


def _resharded(state: dict[str, Any], layouts: Mapping[tuple[Any, str], _Layout]) -> dict[str, Any]:
    """``state`` (a restored copy) with each shard that was a DTensor made one again, in its old layout."""
    if not layouts:
        return state
    from torch.distributed.tensor import DTensor

    for (index, key), (mesh, placements, shape, stride, device) in layouts.items():
        local = state["state"][index][key].to(device)
        state["state"][index][key] = DTensor.from_local(local, mesh, placements, run_check=False, shape=shape,
                                                        stride=stride)  # fmt: skip
    return state


def _nbytes(value: Any) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, Mapping):
        return sum(_nbytes(item) for item in value.values())
    if isinstance(value, list | tuple):
        return sum(_nbytes(item) for item in value)
    return 0


@final
@dataclass(frozen=True, slots=True)
class RollbackSettings:
    """``on_divergence="rollback"``'s options, checked by ``check_rollback_options``."""

    every: int
    keep: int
    budget: int
    directory: str | None
    schedulers: tuple[Any, ...]


@dataclass
class _Snapshot:
    step: int
    tensors: list[torch.Tensor]  # the model's parameters then buffers, host copies
    optimizers: list[tuple[weakref.ref[torch.optim.Optimizer], dict[str, Any]]]
    scaler: dict[str, Any] | None
    schedulers: list[dict[str, Any]]
    learnt: dict[str, Any]
    rng: dict[str, Any]
    layouts: list[dict[tuple[Any, str], _Layout]]  # per optimizer: its DTensor states (kept here, never on disk)
    lrs: dict[int, list[_Lr]]  # per optimizer (by position), per group: the learning rate it has proven
    nbytes: int = 0
    path: Path | None = None  # rollback_dir: the tensors live there, not here
    ready: Any = None  # a CUDA event: the non-blocking copies are done


_Lr = float | torch.Tensor | None  # a tensor learning rate stays one (on its device) until a rollback reads it


def _lr_value(lr: object) -> _Lr:
    if isinstance(lr, torch.Tensor) and lr.numel() == 1:
        return lr.detach().clone()  # read at a rollback only: a snapshot never waits for the device
    return float(lr) if isinstance(lr, int | float) and not isinstance(lr, bool) and math.isfinite(lr) else None


def _lower(a: _Lr, b: _Lr) -> _Lr:
    if a is None or b is None:
        return b if a is None else a
    if isinstance(a, torch.Tensor):
        return torch.minimum(a, b.to(a.device)) if isinstance(b, torch.Tensor) else a.clamp(max=b)
    return b.clamp(max=a) if isinstance(b, torch.Tensor) else min(a, b)


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate(),
                             "numpy": np.random.get_state()}  # fmt: skip
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state:
        torch.cuda.set_rng_state_all(state["cuda"])


@final
class Healer:
    """Takes the snapshots and brings one back; ``GradTracker`` calls it, the pipeline asks it to heal."""

    def __init__(
        self,
        model: nn.Module,
        *,
        every: int,
        keep: int,
        budget: int,
        directory: str | Path | None,
        schedulers: Sequence[Any],
        scaler: Any,
        learnt: Callable[[], dict[str, Any]],
        load_learnt: Callable[[Mapping[str, Any]], object],
    ) -> None:
        self.model = model
        self.every, self.keep, self.budget = every, keep, budget
        self.directory = None if directory is None else Path(directory)
        self.schedulers = list(schedulers)
        self.scaler = scaler
        self._learnt, self._load_learnt = learnt, load_learnt
        self._optimizers: list[weakref.ref[torch.optim.Optimizer]] = []  # in the order they first stepped
        self._ring: deque[_Snapshot] = deque()
        self.count = 0
        self.peak_nbytes = 0  # the most the snapshots held at once: what the run needed for them
        self.lr_scale = 1.0
        self._last_rollback: int | None = None
        # Per optimizer (in ``_optimizers``' order), per group: the highest learning rate allowed once a
        # rollback has blamed the learning rate (None: no ceiling).
        self.lr_ceilings: list[list[float | None]] = []
        self._lineage: dict[int, list[_Lr]] | None = None  # the learning rates the last restore proved
        self._serial = itertools.count()
        self._scaled: dict[int, list[Any]] = {}

    @property
    def nbytes(self) -> int:
        """Host memory (or disk, with ``rollback_dir``) the kept snapshots hold."""
        return sum(snapshot.nbytes for snapshot in self._ring)

    def watch(self, optimizer: torch.optim.Optimizer) -> None:
        """An optimizer stepping the model: its state is in the snapshots from the next one on."""
        if self._position(optimizer) is None:
            self._optimizers.append(weakref.ref(optimizer))  # never removed: positions index the ceilings

    def _position(self, optimizer: torch.optim.Optimizer) -> int | None:
        return next((i for i, ref in enumerate(self._optimizers) if ref() is optimizer), None)

    def _watched(self) -> list[tuple[int, torch.optim.Optimizer]]:
        return [(i, o) for i, ref in enumerate(self._optimizers) if (o := ref()) is not None]

    def _tensors(self) -> list[torch.Tensor]:
        return [*self.model.parameters(), *self.model.buffers()]

    # -- snapshots ----------------------------------------------------------------------------------

    def due(self, step: int) -> bool:
        return step % self.every == 0 and (not self._ring or self._ring[-1].step != step)

    def stale(self, step: int) -> bool:
        """The newest snapshot is ``LR_WINDOW`` intervals old or more (or there is none)."""
        return not self._ring or step - self._ring[-1].step >= LR_WINDOW * self.every

    def snapshot(self, step: int) -> None:
        """Copy the training state as it is now, at the start of step ``step``, before its update."""
        reuse = self._ring.popleft() if len(self._ring) >= self.keep else None
        tensors = self._tensors()
        buffers = reuse.tensors if reuse is not None and reuse.path is None else []
        copies = [_host_copy(t, buffers[i] if i < len(buffers) else None) for i, t in enumerate(tensors)]
        host = lambda t: _host_copy(t)  # noqa: E731 (optimizer state: fresh copies)
        watched = self._watched()
        states = [o.state_dict() for _, o in watched]  # the live tensors: read their layouts before copying
        optimizers = [(weakref.ref(o), _clone_tree(state, host)) for (_, o), state in zip(watched, states, strict=True)]
        snapshot = _Snapshot(
            step=step,
            tensors=copies,
            optimizers=optimizers,
            scaler=copy.deepcopy(self.scaler.state_dict()) if self.scaler is not None else None,
            schedulers=[copy.deepcopy(s.state_dict()) for s in self.schedulers],
            learnt=_clone_tree(self._learnt(), host),
            rng=_rng_state(),
            layouts=[_layouts(state) for state in states],
            lrs={i: self._proven(i, [_lr_value(g.get("lr")) for g in o.param_groups], step) for i, o in watched},
        )
        snapshot.nbytes = _nbytes(copies) + _nbytes([state for _, state in optimizers]) + _nbytes(snapshot.learnt)
        if any(t.is_cuda for t in tensors):
            snapshot.ready = torch.cuda.Event()
            snapshot.ready.record()
        if self.directory is not None:
            self._to_disk(snapshot)
            if reuse is not None and reuse.path is not None:
                reuse.path.unlink(missing_ok=True)
        self._ring.append(snapshot)
        self.peak_nbytes = max(self.peak_nbytes, self.nbytes)

    def _to_disk(self, snapshot: _Snapshot) -> None:
        """The tensors to ``rollback_dir`` (one file per snapshot); only the step and the small parts stay here."""
        assert self.directory is not None
        if snapshot.ready is not None:
            snapshot.ready.synchronize()
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.directory / f"gradtrack-snapshot-{id(self):x}-{next(self._serial)}.pt"
        torch.save({"tensors": snapshot.tensors, "optimizers": [state for _, state in snapshot.optimizers]}, path)
        snapshot.path, snapshot.tensors = path, []
        snapshot.optimizers = [(ref, {}) for ref, _ in snapshot.optimizers]

    # -- healing ------------------------------------------------------------------------------------

    def soon(self, step: int) -> bool:
        """The last rollback was within ``LR_WINDOW`` snapshot intervals of ``step``: trouble found now came
        back soon after a restore, so it is the learning rate's, not the data's."""
        return self._last_rollback is not None and step - self._last_rollback <= LR_WINDOW * self.every

    def heal(
        self, step: int, divergence: Divergence, trouble_began: int, lr_factor: float | None = None
    ) -> Rollback | None:
        """Bring back the newest snapshot from before ``trouble_began``; None when none is left or the
        budget is spent (the run is then judged diverged). ``lr_factor``: a learning-rate scale measured
        (the overshoot indicator's), applied at once and held like a halving, instead of halving only when
        the trouble comes back soon."""
        if self.count >= self.budget:
            return None
        usable = [s for s in self._ring if s.step < trouble_began]
        if not usable:
            return None
        snapshot = usable[-1]
        while self._ring and self._ring[-1] is not snapshot:  # later ones saw the trouble coming
            dropped = self._ring.pop()
            if dropped.path is not None:
                dropped.path.unlink(missing_ok=True)
        self._restore(snapshot)
        if lr_factor is not None:  # measured: the learning rate is too high by about this much
            self.lr_scale *= min(LR_FACTOR, max(MIN_LR_FACTOR, lr_factor))
            self._hold_lr_at(snapshot)
        elif self.soon(step):
            self.lr_scale *= LR_FACTOR  # it came back soon: the learning rate, not the data
            self._hold_lr_at(snapshot)
        self._last_rollback = step
        self._lineage = snapshot.lrs
        self.count += 1
        return Rollback(step=step, restored_step=snapshot.step, skipped=step - snapshot.step + 1,
                        lr_scale=self.lr_scale, count=self.count, reason=divergence.reason,
                        timestamp=divergence.timestamp)  # fmt: skip

    def _restore(self, snapshot: _Snapshot) -> None:
        tensors, optimizer_states = snapshot.tensors, [state for _, state in snapshot.optimizers]
        if snapshot.path is not None:
            loaded = torch.load(snapshot.path, weights_only=True)  # gradtrack's own file: tensors and plain values
            tensors, optimizer_states = loaded["tensors"], loaded["optimizers"]
        if snapshot.ready is not None:
            snapshot.ready.synchronize()
        with torch.no_grad():
            for target, saved in zip(self._tensors(), tensors, strict=True):
                _local(target).copy_(saved, non_blocking=saved.is_pinned())
        host = lambda t: t.clone()  # noqa: E731 (load_state_dict may keep what it is given: keep ours intact)
        for (ref, _), state, layouts in zip(snapshot.optimizers, optimizer_states, snapshot.layouts, strict=True):
            optimizer = ref()
            if optimizer is not None:
                optimizer.load_state_dict(_resharded(_clone_tree(state, host), layouts))
        if self.scaler is not None and snapshot.scaler is not None:
            self.scaler.load_state_dict(copy.deepcopy(snapshot.scaler))
        for scheduler, state in zip(self.schedulers, snapshot.schedulers, strict=True):
            scheduler.load_state_dict(copy.deepcopy(state))
        self._load_learnt(_clone_tree(snapshot.learnt, host))
        _set_rng_state(snapshot.rng)

    def state_dict(self) -> dict[str, Any]:
        """What a resumed run must remember (the snapshots themselves stay behind: the checkpoint is one)."""
        return {"count": self.count, "lr_scale": self.lr_scale, "last_rollback": self._last_rollback,
                "lr_ceilings": [list(groups) for groups in self.lr_ceilings]}  # fmt: skip

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.count, self.lr_scale, self._last_rollback, self.lr_ceilings = check_healer_state(state)

    # -- the learning rate --------------------------------------------------------------------------

    def _proven(self, position: int, lrs: list[_Lr], step: int) -> list[_Lr]:
        """The learning rates a snapshot taken now has proven: those in use, but soon after a rollback no more
        than the restored snapshot's (the state it grew from has not yet shown it stands the new ones)."""
        lineage = self._lineage.get(position) if self._lineage is not None else None
        if lineage is None or self._last_rollback is None or step - self._last_rollback > LR_WINDOW * self.every:
            return lrs
        return [_lower(a, b) for a, b in itertools.zip_longest(lrs, lineage[: len(lrs)])]

    def _hold_lr_at(self, snapshot: _Snapshot) -> None:
        """From now on no group's learning rate may exceed the one it had at ``snapshot`` (or a lower ceiling)."""
        for position, then in snapshot.lrs.items():
            while len(self.lr_ceilings) <= position:
                self.lr_ceilings.append([])
            held = self.lr_ceilings[position]
            for i, value in enumerate(then):
                lr = float(value) if isinstance(value, torch.Tensor) else value  # a rollback may wait for the device
                if i == len(held):
                    held.append(lr)
                elif lr is not None:
                    before = held[i]
                    held[i] = lr if before is None else min(before, lr)

    def _ceilings_of(self, optimizer: torch.optim.Optimizer) -> list[float | None]:
        position = self._position(optimizer)
        return self.lr_ceilings[position] if position is not None and position < len(self.lr_ceilings) else []

    def scale_lr(self, optimizer: torch.optim.Optimizer) -> None:
        """Before an update: every learning rate held at its ceiling, times ``lr_scale`` (undone by
        ``unscale_lr`` after it)."""
        if id(optimizer) in self._scaled or (self.lr_scale == 1.0 and not self.lr_ceilings):
            return
        ceilings = self._ceilings_of(optimizer)
        saved: list[Any] = []
        for i, group in enumerate(optimizer.param_groups):
            lr = group.get("lr")
            ceiling = ceilings[i] if i < len(ceilings) else None
            if isinstance(lr, torch.Tensor):
                saved.append(lr.clone())
                if ceiling is not None:
                    lr.clamp_(max=ceiling)
                lr.mul_(self.lr_scale)
            elif isinstance(lr, int | float) and math.isfinite(lr):
                saved.append(lr)
                group["lr"] = (lr if ceiling is None else min(lr, ceiling)) * self.lr_scale
            else:
                saved.append(None)
        self._scaled[id(optimizer)] = saved

    def unscale_lr(self, optimizer: torch.optim.Optimizer) -> None:
        saved = self._scaled.pop(id(optimizer), None)
        if saved is None:
            return
        for group, lr in zip(optimizer.param_groups, saved, strict=False):
            if isinstance(lr, torch.Tensor):
                group["lr"].copy_(lr)
            elif lr is not None:
                group["lr"] = lr

    def close(self) -> None:
        """Free the snapshots (files in ``rollback_dir`` included)."""
        for snapshot in self._ring:
            if snapshot.path is not None:
                snapshot.path.unlink(missing_ok=True)
        self._ring.clear()

"""Why gradients exploded: cheap enough to leave on, because most of it runs only when an event fires.

On the host, from the per-layer norms every step already brings over (numpy, microseconds):

* ``LayerHistory`` keeps an EMA of each layer's log norm, updated every ``LayerHistory.every`` steps (a
  per-step update cost more than the rest of the step's host work on a small model), so an explosion can
  name its *origin*: the layer whose norm jumped most against its own recent history.
* ``depth_growth`` fits how layer norms change from the output towards the input (above 1 per layer:
  gradients grow as they flow back, the classic exploding-gradient signature).

On the device, at the first explosion (then at most every ``every`` steps), for the top offenders:

* the largest singular value of every square weight matrix among them (a recurrent matrix above 1
  grows gradients geometrically through time: Pascanu et al. 2013), by a few power iterations
  warm-started from the previous diagnosis;
* the gradient-to-weight norm ratio, and over the optimizer update that follows, the update-to-weight
  ratio (about 1e-3 is healthy) and the norm of the whole update.

Those values are computed without a host sync and ride along in the next step's one transfer; they end
up in ``Summary.diagnosis`` (the first diagnosis and the latest one).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence
from typing import Any, final

import numpy as np
import torch
from torch import nn

from gradtrack.state import integer

__all__ = ["DeviceDiagnosis", "LayerHistory", "depth_growth"]

_POWER_ITERATIONS = 8


@final
class LayerHistory:
    """An EMA of every layer's log norm, for one ordering of the layers (reset when it changes)."""

    every = 10  # steps between updates; with ``smoothing`` 0.1, about the last 100 steps

    def __init__(self, smoothing: float = 0.1) -> None:
        self.smoothing = smoothing
        self._key: object = None
        self._ema: np.ndarray | None = None

    def update(self, key: object, norms: np.ndarray) -> None:
        """Fold one step's norms in (a non-finite norm leaves its layer's history as it was)."""
        with np.errstate(divide="ignore", invalid="ignore"):
            logs = np.log(norms)
        usable = np.isfinite(logs)
        if self._ema is None or key != self._key or self._ema.size != norms.size:
            self._key, self._ema = key, np.where(usable, logs, 0.0)
            return
        self._ema = np.where(usable, self._ema + self.smoothing * (logs - self._ema), self._ema)

    @property
    def key(self) -> object:
        return self._key

    @property
    def ema(self) -> np.ndarray | None:
        return self._ema

    def load(self, names: Sequence[str], ema: np.ndarray) -> None:
        """A history saved with a checkpoint: it waits for the first layout of these names (``adopt``)."""
        self._key, self._ema = ("names", tuple(names)), ema

    def adopt(self, key: object, names: Sequence[str]) -> None:
        """A new layout: it takes over a loaded history of the same layers."""
        if self._key == ("names", tuple(names)):
            self._key = key

    def jumps(self, key: object, norms: np.ndarray) -> np.ndarray | None:
        """This step's log-norm excess over each layer's history; None without a history of this layout."""
        if self._ema is None or key != self._key or self._ema.size != norms.size:
            return None
        with np.errstate(divide="ignore", invalid="ignore"):
            logs = np.log(norms)
        # A NaN or inf layer jumped most of all; a layer whose gradient is zero did not jump (log 0 = -inf).
        return np.where(np.isfinite(norms), logs - self._ema, np.inf)


def depth_growth(norms: np.ndarray, positions: Sequence[int]) -> float:
    """Per-layer factor by which norms grow from the output (last parameters) towards the input."""
    order = np.asarray(positions, dtype=np.float64)
    usable = np.isfinite(norms) & (norms > 0)
    if usable.sum() < 3:
        return math.nan
    slope = np.polyfit(order[usable], np.log(norms[usable]), 1)[0]
    return float(np.exp(-slope))


@final
class DeviceDiagnosis:
    """Diagnoses an explosion's offenders on the device; finishes over the optimizer update that follows."""

    def __init__(self, every: int = 100) -> None:
        self.every = every
        self.first: dict[str, Any] | None = None
        self.latest: dict[str, Any] | None = None
        self._last_step = -math.inf
        self._vectors: dict[int, torch.Tensor] = {}  # warm starts of the power iterations, by id(parameter)
        self._pending: tuple[int, list[tuple[str, nn.Parameter, torch.Tensor]], list[torch.Tensor]] | None = None

    def due(self, step: int) -> bool:
        return self._pending is None and step - self._last_step >= self.every

    def start(self, step: int, offenders: Sequence[tuple[str, nn.Parameter]]) -> None:
        """Snapshot the offenders and measure what the gradients alone tell (device work, no sync)."""
        self._last_step = step
        snapshots = []
        values: list[torch.Tensor] = []
        with torch.no_grad():
            for name, param in offenders:
                weight = param.detach()
                grad = param.grad.detach() if param.grad is not None else torch.zeros_like(weight)
                weight_norm = torch.linalg.vector_norm(weight.float())
                values += [weight_norm, torch.linalg.vector_norm(grad.float()) / weight_norm.clamp(min=1e-12)]
                square = _square(weight)
                values.append(self._largest_singular_value(param) if square else weight_norm.new_full((), math.nan))
                snapshots.append((name, param, weight.clone()))
        self._pending = (step, snapshots, values)

    def extras(self) -> torch.Tensor | None:
        """The values to bring over in this step's transfer: the pending diagnosis, finished now that the
        optimizer has updated the weights since it started."""
        if self._pending is None:
            return None
        _, snapshots, values = self._pending
        with torch.no_grad():
            update_total = []
            for _, param, before in snapshots:
                update = torch.linalg.vector_norm((param.detach() - before).float())
                values.append(update)
                update_total.append(update.square())
            values.append(torch.stack(update_total).sum().sqrt() if update_total else values[0].new_zeros(()))
            device = values[0].device
            return torch.stack([value.to(device, torch.float32) for value in values])

    def finish(self, numbers: np.ndarray) -> None:
        """The extras came back: the diagnosis, as plain numbers by layer name."""
        assert self._pending is not None
        step, snapshots, _ = self._pending
        self._pending = None
        count = len(snapshots)
        per_layer = numbers[: 3 * count].reshape(count, 3) if count else np.zeros((0, 3))
        updates = numbers[3 * count : 4 * count]
        diagnosis: dict[str, Any] = {"step": step, "layers": {}, "update_norm": float(numbers[4 * count])}
        for (name, _, _), (weight_norm, ratio, sigma), update in zip(snapshots, per_layer, updates, strict=True):
            layer = {"weight_norm": float(weight_norm), "grad_to_weight": float(ratio),
                     "update_to_weight": float(update / weight_norm) if weight_norm > 0 else math.nan}  # fmt: skip
            if math.isfinite(sigma):
                layer["largest_singular_value"] = float(sigma)
            diagnosis["layers"][name] = layer
        self.latest = diagnosis
        if self.first is None:
            self.first = diagnosis

    def abandon(self) -> None:
        """The run ended before the update: what was measured of the gradients is still worth keeping."""
        self._pending = None

    def summary(self) -> dict[str, Any] | None:
        if self.first is None:
            return None
        return {"first": self.first, "latest": self.latest}

    def state_dict(self) -> dict[str, Any]:
        """What was diagnosed, and when last (a diagnosis still waiting for its update is left out)."""
        last = None if math.isinf(self._last_step) else int(self._last_step)
        return {"first": copy.deepcopy(self.first), "latest": copy.deepcopy(self.latest), "last_step": last}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        for key in ("first", "latest"):
            if state.get(key) is not None and not isinstance(state.get(key), Mapping):
                raise ValueError(f"{key!r} must be a dict or None")
        self.first = None if state.get("first") is None else dict(state["first"])
        self.latest = None if state.get("latest") is None else dict(state["latest"])
        last = state.get("last_step")
        self._last_step = -math.inf if last is None else integer(state, "last_step")

    def _largest_singular_value(self, param: nn.Parameter) -> torch.Tensor:
        matrix = param.detach().float()
        vector = self._vectors.get(id(param))
        if vector is None or vector.shape[0] != matrix.shape[1]:
            vector = torch.ones(matrix.shape[1], device=matrix.device) / math.sqrt(matrix.shape[1])
        for _ in range(_POWER_ITERATIONS):
            left = matrix @ vector
            left = left / left.norm().clamp(min=1e-12)
            vector = matrix.T @ left
            vector = vector / vector.norm().clamp(min=1e-12)
        self._vectors[id(param)] = vector
        return torch.linalg.vector_norm(matrix @ vector)


def _square(weight: torch.Tensor) -> bool:
    return weight.ndim == 2 and weight.shape[0] == weight.shape[1] and weight.shape[0] > 1

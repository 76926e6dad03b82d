"""The overshoot indicator: how far the last update overshot the minimum along its own direction.

Along the update the optimizer just made, ``u = theta_t - theta_{t-1}``, the change of the gradient measures
the curvature the step met::

    overshoot_t = u . (g_t - g_{t-1}) / (-g_{t-1} . u)

On a quadratic with plain SGD it is exactly ``lr x curvature along the step`` (the Rayleigh quotient of the
Hessian at ``g_{t-1}``), and 2 is the edge: above it the step lands beyond its own minimum and the iterate
grows along that direction (the edge of stability, Cohen et al. 2021). For Adam and other preconditioned
optimizers the same holds along the step they take: the ratio uses the update actually made, so it needs no
knowledge of the optimizer. ``g_{t-1}`` is the raw gradient (before clipping): the clip shortens ``u``, which
the ratio sees as a smaller effective learning rate.

Cost: no extra forward or backward pass. On a sampled step ``t-1`` the parameters are copied into one
buffer (the parameters' size, at most) before the update (``arm``); after the update the buffer becomes ``-u`` and
``-g_{t-1} . u`` is taken per tensor while the gradients are still there (``after_update``, on the device, no
synchronisation); at the next step's measurement ``-g_t . u`` is taken the same way (``dots``), and both
vectors ride that step's one device-to-host transfer (and, sharded, its one collective as partial sums).
Per-layer ratios come from the same sums. Nothing here touches a gradient, a parameter or an RNG: a run with
the indicator trains bitwise as one without it. A model of more than ``BUDGET`` elements is sampled (every
small tensor, a spread slice of each large one, scaled to stand for it: see ``_Plan``), so that a sample's
passes and its buffer stay about ``BUDGET`` elements whatever the model's size: a copy and a subtraction over
the parameters are memory-bound, and on a 16M-parameter model read whole they cost a third of a CPU step.

The host side (``OvershootRule``) turns the samples into the ``grad/overshoot`` metric, the
:class:`~gradtrack.events.Instability` warning (the steps overshoot persistently) and the learning-rate scale
that would bring the ratio back to ``TARGET``.

What it cannot see: a blow-up with no curvature warning (a poisoned batch, a first update that is already too
large, as Adam's at a far too high learning rate), and steps whose update is no descent direction for the
gradient (heavy momentum right after a turn): those samples are left out (NaN).
"""

from __future__ import annotations

import itertools
import math
import statistics
import warnings
from collections import deque
from collections.abc import Mapping, Sequence
from typing import Any, final

import numpy as np
import torch

from gradtrack.events import OVERSHOOT_EDGE, Instability
from gradtrack.state import floats, integer, optional

__all__ = ["EDGE", "TARGET", "OvershootProbe", "OvershootRule", "ratios"]

EDGE = OVERSHOOT_EDGE  # lr x curvature above it: the step overshoots its own minimum
TARGET = 1.0  # the suggested learning rate brings the ratio here, half the edge
WINDOW = 6  # samples judged together ...
PERSIST = 5  # ... of which this many above the edge: the steps overshoot persistently
LAYER_SHARE = 0.01  # a layer takes part in the per-layer advice with at least this share of -g.u


SMALL = 1 << 16  # tensors with fewer elements share one flat buffer: their dot products in a few launches
BUDGET = 1 << 21  # elements a sample reads of each parameter and gradient: beyond it, a slice of each large tensor
PIECE = 1024  # a large tensor's slice: runs of this many elements (whole cache lines), spread evenly along it
GOLDEN = 0.6180339887498949  # the phases of successive samples: spread evenly, no random generator touched


def _wide(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.float() if tensor.dtype in (torch.float16, torch.bfloat16) else tensor


@final
class _Slice:
    """The part of one large tensor a sample reads: ``pieces`` runs of ``piece`` elements, one every ``stride``
    elements, at a phase that moves from sample to sample; the whole tensor where the budget allows. Many short
    runs rather than a few long ones: neighbouring elements (a row of a weight matrix) move together, and
    spreading the slice over the whole tensor is what makes it stand for it."""

    def __init__(self, numel: int, fraction: float) -> None:
        wanted = numel if fraction >= 1.0 else max(1, math.ceil(numel * fraction))
        self.pieces = max(1, wanted // PIECE) if wanted < numel else 1
        self.stride = numel // self.pieces
        self.piece = min(self.stride, math.ceil(wanted / self.pieces))
        self.whole = self.piece * self.pieces == numel
        self.scale = numel / (self.piece * self.pieces)  # the slice's dot product stands for the tensor's

    def of(self, tensor: torch.Tensor, phase: float) -> torch.Tensor:
        """The slice of ``tensor`` (a view where it is contiguous), shaped ``(pieces, piece)``."""
        if self.whole:
            return tensor.reshape(self.pieces, self.piece)
        flat = tensor.reshape(-1)
        start = int(phase * (self.stride - self.piece + 1))
        return flat.as_strided((self.pieces, self.piece), (self.stride, 1), flat.storage_offset() + start)


@final
class _Plan:
    """Where each tensor's part of the buffer lives, and how its dot products are taken.

    A large tensor has a buffer of its own and its dot product is one reduction. Small tensors of one device and
    dtype share one flat buffer, so that copying into it, subtracting from it and the dot products take a few
    launches whatever their number: the gradients flattened into one transient vector
    (``flatten_dense_tensors``), one multiply, and one row sum per distinct tensor size (the small tensors are
    laid out by size).

    A model of more than ``BUDGET`` elements is sampled, not read whole: every small tensor, and of each large
    one a slice of the same fraction, in runs of ``PIECE`` elements spread along it at a phase that moves from
    sample to sample; each slice's dot products are scaled by the tensor's size over the slice's, so the sums estimate
    the whole tensor's. The ratio is then an estimate (``benchmarks/overshoot_cost.py --agreement`` measures
    it against the whole), at a cost and a buffer bounded by ``BUDGET`` rather than the model's size.
    """

    def __init__(self, ordered: Sequence[torch.Tensor], budget: int) -> None:
        self.buffer: list[torch.Tensor] = [torch.empty(0)] * len(ordered)
        self.large = [i for i, w in enumerate(ordered) if w.numel() >= SMALL and w.is_contiguous()]
        large = set(self.large)
        small_total = sum(w.numel() for i, w in enumerate(ordered) if i not in large)
        large_total = sum(ordered[i].numel() for i in self.large)
        room = max(budget - small_total, budget // 2)  # small tensors past the budget: the large get half of it
        fraction = min(1.0, room / large_total) if large_total else 1.0
        self.slices = {i: _Slice(ordered[i].numel(), fraction) for i in self.large}
        self.sampled = fraction < 1.0
        self.phase = 0.0
        for i in self.large:
            part = self.slices[i]
            self.buffer[i] = torch.empty((part.pieces, part.piece), device=ordered[i].device, dtype=ordered[i].dtype)
        groups: dict[tuple[torch.device, torch.dtype], list[int]] = {}
        for i, w in enumerate(ordered):
            if i not in large:
                groups.setdefault((w.device, w.dtype), []).append(i)
        # positions (by size, so that tensors of one size are one block), flat buffer, (count, size) of each block
        self.small: list[tuple[list[int], torch.Tensor, list[tuple[int, int]]]] = []
        for (device, dtype), positions in groups.items():
            positions = sorted(positions, key=lambda i: ordered[i].numel())
            lengths = [ordered[i].numel() for i in positions]
            flat = torch.empty(sum(lengths), device=device, dtype=dtype)
            for i, view in zip(positions, flat.split(lengths), strict=True):
                self.buffer[i] = view.view(ordered[i].shape)
            blocks = [(len(list(run)), size) for size, run in itertools.groupby(lengths)]
            self.small.append((positions, flat, blocks))
        self.device = ordered[0].device
        self.placed_small = [i for positions, _, _ in self.small for i in positions]
        self.parts = [self.buffer[i] for i in self.large + self.placed_small]  # the buffer, in that order
        placed = self.large + self.placed_small
        self.unpermute = torch.tensor(sorted(range(len(placed)), key=placed.__getitem__), device=self.device)
        scales = [self.slices[i].scale for i in self.large] + [1.0] * (len(placed) - len(self.large))
        # on the device once: a host-to-device copy at every sample would wait for the host on CUDA
        self.scales = torch.tensor(scales, device=self.device)[self.unpermute] if self.sampled else None

    @property
    def nbytes(self) -> int:
        return sum(self.buffer[i].numel() * self.buffer[i].element_size() for i in self.large) + sum(
            flat.numel() * flat.element_size() for _, flat, _ in self.small
        )

    def next_phase(self) -> None:
        """A new sample reads another part of each large tensor."""
        self.phase = (self.phase + GOLDEN) % 1.0

    def _large(self, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        return [self.slices[i].of(tensors[i], self.phase) for i in self.large]

    def copy_from(self, weights: Sequence[torch.Tensor]) -> None:
        """The buffer := the parameters (their slices)."""
        torch._foreach_copy_(self.parts, self._large(weights) + [weights[i] for i in self.placed_small])

    def subtract(self, weights: Sequence[torch.Tensor]) -> None:
        """The buffer -= the parameters: from the parameters before the update to ``-u``."""
        torch._foreach_sub_(self.parts, self._large(weights) + [weights[i] for i in self.placed_small])

    def dots(self, grads: Sequence[torch.Tensor]) -> torch.Tensor:
        """``grads[i] . buffer[i]`` for every tensor, in order, fp32 or wider, on the first device (no sync);
        a sampled tensor's scaled to stand for the whole tensor's."""
        parts = []
        for i, g in zip(self.large, self._large(grads), strict=True):
            if self.slices[i].whole:  # contiguous: one dot product, no transient
                dot = torch.dot(_wide(g).reshape(-1), _wide(self.buffer[i]).reshape(-1))
            else:  # a strided slice, read in place: its product (a transient of the slice's size) summed; gathering
                dot = torch.linalg.vecdot(_wide(g), _wide(self.buffer[i])).sum()  # it first cost a third more
            parts.append(_wide(dot).reshape(1))
        for positions, flat, blocks in self.small:
            values = _wide(torch._C._nn.flatten_dense_tensors([grads[i] for i in positions]))
            if len(positions) > 1 and values.dtype == flat.dtype:  # a copy of the gradients: multiplied in place
                values.mul_(flat)
            else:  # one tensor flattens to a view of its gradient, which must stay as it is
                values = values * _wide(flat)
            start = 0
            for count, size in blocks:  # the tensors of one size: one row each, summed at once
                parts.append(values[start : start + count * size].view(count, size).sum(1))
                start += count * size
        parts = [p.to(self.device) for p in parts] if any(p.device != self.device for p in parts) else parts
        widest = max((p.dtype for p in parts), key=lambda dtype: torch.finfo(dtype).bits)
        stacked = torch.cat([p.to(widest) for p in parts])[self.unpermute]
        if self.scales is not None:  # fp32 scales: the product keeps the sums' own (fp32 or wider) dtype
            stacked = stacked * self.scales
        return stacked


@final
class OvershootProbe:
    """The device side: one buffer for ``u``, and the two dot products per tensor.

    Tensors are handled in the order of the step's norms (``order`` indexes the caller's list), so the
    host's per-layer values follow the layout's names.
    """

    def __init__(self, budget: int | None = None) -> None:
        self.budget = BUDGET if budget is None else budget  # read at construction: settable per probe, for tests
        self._plan: _Plan | None = None
        self._key: tuple[int, ...] | None = None  # id() of each parameter, in norm order, at arm time
        self._order: list[int] = []
        self._armed = False
        self._before: torch.Tensor | None = None  # -g_{t-1} . u per tensor, after the update
        self.grad_scale: torch.Tensor | None = None  # a fused optimizer's scale on the gradients of t-1

    @property
    def nbytes(self) -> int:
        """The buffer's size: the parameters' once, in their own dtypes."""
        return self._plan.nbytes if self._plan is not None else 0

    @property
    def pending(self) -> bool:
        """A sample whose second half the next step's measurement completes."""
        return self._before is not None

    def disarm(self) -> None:
        self._armed, self._before, self.grad_scale = False, None, None

    def release(self) -> None:
        self.disarm()
        self._plan, self._key = None, None

    def arm(self, weights: Sequence[torch.Tensor], key: tuple[int, ...], order: Sequence[int]) -> None:
        """Before the update: the parameters (local tensors, the caller's order) into the buffer."""
        ordered = [weights[i] for i in order]
        if self._key != key or self._plan is None or len(self._plan.buffer) != len(ordered):
            self._plan, self._key = _Plan(ordered, self.budget), key
        self._plan.next_phase()
        with torch.no_grad():
            self._plan.copy_from(ordered)
        self._order = list(order)
        self._armed, self._before = True, None

    def after_update(self, weights: Sequence[torch.Tensor], grads: Sequence[torch.Tensor | None]) -> None:
        """After the optimizer's update, gradients still there: buffer = -u, and -g_{t-1} . u per tensor."""
        if not self._armed:
            return
        self._armed = False
        ordered = [weights[i] for i in self._order]
        ordered_grads = [grads[i] for i in self._order]
        if any(g is None for g in ordered_grads) or self._plan is None:  # the update was skipped: no sample
            return
        with torch.no_grad():
            self._plan.subtract(ordered)
            self._before = self._plan.dots(ordered_grads)  # type: ignore[arg-type]

    def dots(self, grads: Sequence[torch.Tensor], key: tuple[int, ...]) -> torch.Tensor | None:
        """At the next measurement: ``[-g_{t-1} . u, -g_t . u]`` per tensor (2 x n, norm order), or None."""
        before = self._before
        self._before = None
        if before is None or key != self._key or self._plan is None:
            return None
        with torch.no_grad():
            after = self._plan.dots([grads[i] for i in self._order])
            if self.grad_scale is not None:  # the gradients of t-1 carried a fused optimizer's scale
                before = before / self.grad_scale.to(before.device, before.dtype)
            return torch.stack([before, after])


def ratios(before: np.ndarray, after: np.ndarray, clip_coef: float) -> tuple[float, np.ndarray]:
    """The global ratio and each tensor's, from the per-tensor sums ``-g_{t-1} . u`` (of the clipped gradient,
    ``clip_coef`` times the raw one) and ``-g_t . u``. NaN where the update was no descent direction."""
    if not clip_coef > 0 or not math.isfinite(clip_coef):
        return math.nan, np.full(before.shape, math.nan)
    raw = before / clip_coef
    total_before, total_after = float(raw.sum()), float(after.sum())
    overall = 1.0 - total_after / total_before if total_before > 0 and math.isfinite(total_after) else math.nan
    with np.errstate(divide="ignore", invalid="ignore"):
        per_layer = np.where(raw > LAYER_SHARE * max(total_before, 0.0), 1.0 - after / raw, math.nan)
    return overall, per_layer


@final
class OvershootRule:
    """The host side: samples in, the warning out, and what the advice needs.

    Persistent overshoot: ``PERSIST`` of the last ``WINDOW`` samples above ``EDGE``. Samples come every
    ``every`` steps, and every step while one of the last ``WINDOW`` was above the edge, so a persistent
    episode is confirmed within a few steps of its first sign. One warning per episode; the episode ends
    when the window holds no sample above the edge. After a rollback (``restart``) samples come every step
    until the window is full again: a run that blows up again within a few steps of its restore has a
    learning-rate problem, and the samples of those few steps size the cut (at the cadence there would be
    none).
    """

    def __init__(self, every: int) -> None:
        self.every = every
        self._window: deque[float] = deque(maxlen=WINDOW)
        self._layers: deque[np.ndarray] = deque(maxlen=WINDOW)
        self.episode_since: int | None = None  # first step of the current overshoot (a sample above the edge)
        self.warned: Instability | None = None  # this episode's warning
        self.latest = math.nan
        self.recovering = False  # restarted by a rollback: sample every step until the window is full again
        self._added_at: int | None = None  # the step the newest sample completed at

    @property
    def dense(self) -> bool:
        """A recent sample was above the edge, or a rollback restarted the rule: sample every step."""
        return any(value > EDGE for value in self._window) or (self.recovering and len(self._window) < WINDOW)

    @property
    def unproven(self) -> bool:
        """Restored by a rollback, and a sample since then above the edge: the restored state overshoots at its
        rate, and a rollback snapshot taken now would vouch for it (none is taken until the window is full)."""
        return self.recovering and any(value > EDGE for value in self._window)

    def due(self, step: int) -> bool:
        """Arm at ``step`` (the sample completes at ``step + 1``)."""
        return step % self.every == 0 or self.dense

    @property
    def persistent(self) -> bool:
        return sum(value > EDGE for value in self._window) >= PERSIST

    @property
    def overshooting(self) -> bool:
        """Persistent now, or warned in an episode not over yet: no rollback snapshot is taken then."""
        return self.persistent or self.warned is not None

    def level(self) -> float:
        """The median of the window's samples above the edge (the overshoot the advice corrects)."""
        above = [value for value in self._window if value > EDGE]
        return statistics.median(above) if above else math.nan

    def lr_scale(self) -> float:
        """The learning-rate factor that brings the persistent ratio to ``TARGET`` (the ratio is about
        proportional to the learning rate); 1.0 when the steps do not overshoot."""
        level = self.level()
        return min(1.0, TARGET / level) if math.isfinite(level) and level > 0 else 1.0

    def typical_before(self, step: int) -> tuple[float, bool]:
        """The median of the window's samples before ``step``, and False; or, where the sample completed at
        ``step`` is the only one, that sample and True. Where ``step`` blew up, its own gradient change may
        be the data's (a poisoned batch makes it as large as it likes), not the curvature's: the steps before
        it say more, and it is used alone only where nothing else was measured. NaN without a sample."""
        values = list(self._window)
        if self._added_at == step and len(values) > 1:
            values.pop()
            return statistics.median(values), False
        return (statistics.median(values), self._added_at == step) if values else (math.nan, False)

    def add(self, step: int, overall: float, per_layer: np.ndarray) -> None:
        """One completed sample, reported at ``step`` (the update of ``step - 1``)."""
        self.latest = overall
        if not math.isfinite(overall):
            return
        self._added_at = step
        self._window.append(overall)
        self._layers.append(per_layer)
        self.recovering = self.recovering and len(self._window) < WINDOW
        if overall > EDGE and self.episode_since is None:
            self.episode_since = step - 1  # the update that overshot
        elif not self.dense:
            self.episode_since, self.warned = None, None

    def warning(
        self, step: int, timestamp: float, names: Sequence[str], top_k: int, learning_rates: Sequence[float]
    ) -> Instability | None:
        """The episode's warning, the first time the overshoot is persistent (None otherwise)."""
        if self.warned is not None or not self.persistent:
            return None
        scale = self.lr_scale()
        level = self.level()
        layers: list[tuple[str, float]] = []
        if self._layers and len(self._layers[-1]) == len(names):
            stacked = np.vstack([row for row in self._layers if len(row) == len(names)])
            with np.errstate(all="ignore"), warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # a layer without a valid sample: NaN, left out
                typical = np.nanmedian(np.where(np.isfinite(stacked), stacked, np.nan), axis=0)
            ranked = [i for i in np.argsort(-np.nan_to_num(typical, nan=-np.inf)) if np.isfinite(typical[i])]
            layers = [(names[i], float(typical[i])) for i in ranked[:top_k] if typical[i] > EDGE]
        self.warned = Instability(
            step=step,
            overshoot=level,
            steps_above=sum(value > EDGE for value in self._window),
            window=len(self._window),
            since=self.episode_since if self.episode_since is not None else step,
            layers=tuple(layers),
            lr_scale=scale,
            learning_rates=tuple(lr * scale for lr in learning_rates),
            timestamp=timestamp,
        )
        return self.warned

    def restart(self) -> None:
        """After a rollback: the samples of the state that was thrown away say nothing about the restored one."""
        self._window.clear()
        self._layers.clear()
        self.episode_since, self.warned, self.latest = None, None, math.nan
        self.recovering = True

    def state_dict(self) -> dict[str, Any]:
        return {"window": list(self._window), "episode_since": self.episode_since,
                "warned": self.warned.step if self.warned is not None else None,
                "recovering": self.recovering}  # fmt: skip

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._window = deque(floats(state, "window"), maxlen=WINDOW)
        self._layers.clear()
        self.episode_since = optional(state, "episode_since", integer)
        self.recovering = state.get("recovering") is True  # absent from states saved before it existed
        warned = optional(state, "warned", integer)
        self.warned = None if warned is None else Instability(
            step=warned, overshoot=self.level(), steps_above=0, window=0, since=warned, layers=(), lr_scale=1.0,
            learning_rates=(),
        )  # fmt: skip

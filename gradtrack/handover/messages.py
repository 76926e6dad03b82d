"""The hand-over protocol: every message the training process gives its outbox, and how each may be treated.

A message is a small immutable value built by keyword. Each one declares its back-pressure class
(:class:`Keep`), which the reporter channel and every backend queue apply by the same rule
(``gradtrack.delivery.dispatch.drops``):

* ``ALWAYS``: never dropped. What later messages depend on (the run's start, the layer names, a layout,
  the divergence, the diagnosis, a flush, the run's end).
* ``FLAGGED``: kept while a queue is behind, up to a hard bound (an explosion, a step that was flagged).
* ``ROUTINE``: decimated first when a queue falls behind (a healthy step).

:class:`StepRecord` is the one message made at every step, so it is built for speed: a tuple underneath
(0.5 µs to build by keyword where a frozen dataclass takes 4 µs on the development machine) with a fixed
binary layout on the wire (``encode``/``decode``: no pickle). The others are rare and are frozen dataclasses.

No torch here: the reporter process imports this module.
"""

from __future__ import annotations

import enum
import math
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple, final

from gradtrack.events import Divergence, Explosion, Instability, LayersAdded, Rollback, RunEnd, RunStart

__all__ = [
    "Diagnosed",
    "Diverged",
    "ExplosionRaised",
    "FlushRequested",
    "InstabilityRaised",
    "Keep",
    "LayersAnnounced",
    "LayoutAnnounced",
    "Message",
    "RunEnded",
    "RolledBack",
    "RunStarted",
    "StepRecord",
]


class Keep(enum.IntEnum):
    """How a message may be treated when a queue falls behind (module docstring)."""

    ALWAYS = 0
    FLAGGED = 1
    ROUTINE = 2


class _StepFields(NamedTuple):
    step: int
    timestamp: float
    total_norm: float
    clip_coef: float
    nonfinite: int
    loss: float | None
    clipped: bool
    explosion: bool
    diverged: bool
    skipped: bool
    amp_overflow: bool
    reported: bool
    with_layers: bool
    layout: int
    layer_norms: bytes | None
    weight_norms: bytes | None
    overshoot: float


# step, timestamp, total_norm, clip_coef, loss, overshoot, nonfinite, layout, flags, bytes of layer norms, of weights
_HEADER = struct.Struct("<qdddddiiBII")
_FLAGS = ("clipped", "explosion", "diverged", "skipped", "amp_overflow", "reported", "with_layers")
_HAS_LOSS = 1 << len(_FLAGS)


@final
class StepRecord(_StepFields):
    """One optimizer step as the training thread knows it after the step's transfer.

    ``reported``: at the ``log_every`` cadence or flagged, so backends get it (every step is handed over
    all the same: the reporter's summary of a run it may have to end needs them all). ``layer_norms``:
    float64 norms in the order of ``layout`` (reported steps); ``with_layers``: at the ``layer_every``
    cadence, so backends get them by name. ``weight_norms``: the parameters' own norms, same order, on
    the steps they were measured. ``overshoot``: the overshoot indicator's sample completed at this step
    (``gradtrack.judge.overshoot``; NaN on the steps without one).
    """

    __slots__ = ()

    def __new__(
        cls,
        *,
        step: int,
        timestamp: float,
        total_norm: float,
        clip_coef: float = 1.0,
        nonfinite: int = 0,
        loss: float | None = None,
        clipped: bool = False,
        explosion: bool = False,
        diverged: bool = False,
        skipped: bool = False,
        amp_overflow: bool = False,
        reported: bool = True,
        with_layers: bool = False,
        layout: int = -1,
        layer_norms: bytes | None = None,
        weight_norms: bytes | None = None,
        overshoot: float = math.nan,
    ) -> StepRecord:
        return tuple.__new__(cls, (step, timestamp, total_norm, clip_coef, nonfinite, loss, clipped, explosion,
                                   diverged, skipped, amp_overflow, reported, with_layers, layout, layer_norms,
                                   weight_norms, overshoot))  # fmt: skip

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        return (_rebuild, (tuple(self),))  # the constructor takes keywords only

    @property
    def flagged(self) -> bool:
        return self.explosion or self.diverged or self.nonfinite > 0 or self.skipped or self.amp_overflow

    @property
    def keep(self) -> Keep:
        return Keep.FLAGGED if self.flagged else Keep.ROUTINE

    def encode(self) -> bytes:
        """The record's fixed binary layout (65 bytes), then its norms' bytes."""
        flags = (self.clipped | self.explosion << 1 | self.diverged << 2 | self.skipped << 3
                 | self.amp_overflow << 4 | self.reported << 5 | self.with_layers << 6)  # fmt: skip
        loss = self.loss
        if loss is not None:
            flags |= _HAS_LOSS
        layers, weights = self.layer_norms or b"", self.weight_norms or b""
        header = _HEADER.pack(self.step, self.timestamp, self.total_norm, self.clip_coef,
                              0.0 if loss is None else loss, self.overshoot, self.nonfinite, self.layout, flags,
                              len(layers), len(weights))  # fmt: skip
        return header + layers + weights if layers or weights else header

    @classmethod
    def decode(cls, data: bytes | memoryview) -> StepRecord:
        step, timestamp, total_norm, clip_coef, loss, overshoot, nonfinite, layout, flags, n_layers, n_weights = (
            _HEADER.unpack_from(data)
        )
        start = _HEADER.size
        layers = bytes(data[start : start + n_layers]) if n_layers else None
        weights = bytes(data[start + n_layers : start + n_layers + n_weights]) if n_weights else None
        return tuple.__new__(cls, (
            step, timestamp, total_norm, clip_coef, nonfinite, loss if flags & _HAS_LOSS else None,
            bool(flags & 1), bool(flags & 2), bool(flags & 4), bool(flags & 8), bool(flags & 16),
            bool(flags & 32), bool(flags & 64), layout, layers, weights, overshoot,
        ))  # fmt: skip


def _rebuild(values: tuple[Any, ...]) -> StepRecord:
    return tuple.__new__(StepRecord, values)


@final
@dataclass(frozen=True, slots=True, kw_only=True)
class RunStarted:
    """The tracker entered its context; ``summary``: the run's summary so far, when it resumed (plain values)."""

    start: RunStart
    summary: Mapping[str, Any] | None = None
    keep: ClassVar[Keep] = Keep.ALWAYS


@final
@dataclass(frozen=True, slots=True, kw_only=True)
class LayersAnnounced:
    """Layer names appended to the run's name table (at run start, then as parameters appear)."""

    layers: LayersAdded
    first: int  # the table position of ``layers.names[0]``
    keep: ClassVar[Keep] = Keep.ALWAYS


@final
@dataclass(frozen=True, slots=True, kw_only=True)
class LayoutAnnounced:
    """A new order of layers that later step records' norms follow: positions in the name table."""

    key: int
    positions: tuple[int, ...]
    keep: ClassVar[Keep] = Keep.ALWAYS


@final
@dataclass(frozen=True, slots=True, kw_only=True)
class ExplosionRaised:
    event: Explosion
    keep: ClassVar[Keep] = Keep.FLAGGED


@final
@dataclass(frozen=True, slots=True, kw_only=True)
class Diverged:
    event: Divergence
    keep: ClassVar[Keep] = Keep.ALWAYS


@final
@dataclass(frozen=True, slots=True, kw_only=True)
class InstabilityRaised:
    """The overshoot indicator's leading warning (never dropped: it comes before the trouble, alerts follow it)."""

    event: Instability
    keep: ClassVar[Keep] = Keep.ALWAYS


@final
@dataclass(frozen=True, slots=True, kw_only=True)
class RolledBack:
    """``on_divergence="rollback"`` restored an earlier training state (never dropped: alerts follow it)."""

    event: Rollback
    snapshot_bytes: int
    keep: ClassVar[Keep] = Keep.ALWAYS


@final
@dataclass(frozen=True, slots=True, kw_only=True)
class Diagnosed:
    """The device diagnosis of an explosion finished (it enters the run's summary)."""

    diagnosis: Mapping[str, Any]
    keep: ClassVar[Keep] = Keep.ALWAYS


@final
@dataclass(frozen=True, slots=True, kw_only=True)
class FlushRequested:
    """``tracker.flush()``: answered once every backend handled what came before it."""

    seq: int
    timeout: float
    keep: ClassVar[Keep] = Keep.ALWAYS


@final
@dataclass(frozen=True, slots=True, kw_only=True)
class RunEnded:
    end: RunEnd
    keep: ClassVar[Keep] = Keep.ALWAYS


Message = (
    StepRecord | RunStarted | LayersAnnounced | LayoutAnnounced | ExplosionRaised | Diverged | RolledBack
    | InstabilityRaised | Diagnosed | FlushRequested | RunEnded
)  # fmt: skip

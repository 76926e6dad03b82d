"""Choosing ``max_norm`` from the run itself: a few monitor-only steps, then the 95th percentile.

The seed's ``find_gradient_norm_distribution`` in one call: healthy gradient norms are measured without
clipping, explosions are left out, and a threshold near the 95th percentile clips the rare large steps
while leaving the typical ones alone.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, final

import numpy as np
from torch import nn

from gradtrack.events import StepStats
from gradtrack.hookspecs import hookimpl
from gradtrack.validate import count

__all__ = ["Calibration", "calibrate"]


@final
@dataclass(frozen=True, slots=True)
class Calibration:
    """What ``calibrate`` measured: percentiles of the healthy total norms, and the recommendation."""

    steps: int
    healthy_steps: int
    p50: float
    p95: float
    p99: float
    max: float
    recommended_max_norm: float


@final
class _Norms:
    def __init__(self) -> None:
        self.steps: list[StepStats] = []

    @hookimpl
    def gradtrack_step(self, stats: StepStats) -> None:
        self.steps.append(stats)


def calibrate(model: nn.Module, step: Callable[[], Any], steps: int = 100, **tracker: Any) -> Calibration:
    """Run ``step()`` ``steps`` times under a monitor-only tracker and recommend a ``max_norm``.

    ``step`` computes the gradients (forward and backward) and may call ``optimizer.step()`` (then the
    optimizer hook measures, and training goes on as it will in the real run); when it does not, the
    gradients are measured by hand and zeroed afterwards, as the seed's loop does. Steps that exploded
    (non-finite, or a spike) are left out; ``tracker`` options go to ``GradTracker`` (``norm_type``, say).
    """
    from gradtrack.tracker import GradTracker

    steps = count("steps", steps)
    recorder = _Norms()
    with GradTracker(model, backend=recorder, clip=None, **tracker) as watching:
        for _ in range(steps):
            before = watching.steps
            step()
            if watching.steps == before:
                watching.step()
                model.zero_grad(set_to_none=True)
        watching.flush(60.0)
    healthy = np.array([s.total_norm for s in recorder.steps if not s.explosion and math.isfinite(s.total_norm)])
    if not healthy.size:
        raise ValueError(f"no healthy step among {steps}: every gradient norm was non-finite or a spike")
    p50, p95, p99 = (float(value) for value in np.percentile(healthy, [50, 95, 99]))
    return Calibration(steps, int(healthy.size), p50, p95, p99, float(healthy.max()), p95)

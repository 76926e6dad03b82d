"""gradtrack: gradient norms, clipping, explosion and divergence detection for PyTorch training.

The names that need torch (the tracker, the clip policies) are imported when first used, so that the
reporter process and the backends, which import ``gradtrack`` for its hooks and records, never load torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from gradtrack._version import __version__
from gradtrack.delivery.plugins import BackendUnavailableError, UnknownBackendError, available_backends
from gradtrack.events import (
    Divergence,
    Explosion,
    Instability,
    LayerNorms,
    LayersAdded,
    Offender,
    Resumed,
    RunEnd,
    RunStart,
    StepBatch,
    StepStats,
    Summary,
)
from gradtrack.hookspecs import hookimpl, hookspec
from gradtrack.naming import sanitize_names
from gradtrack.state import StateError

if TYPE_CHECKING:
    from gradtrack.calibration import Calibration, calibrate
    from gradtrack.policies.clipping import AGC, AdaGC, AdaptiveClip, AutoClip, ClipPolicy, NormClip, ValueClip, ZClip
    from gradtrack.tracker import DivergenceError, GradTracker, NonFiniteGradientError

__all__ = [
    "AGC",
    "AdaGC",
    "AdaptiveClip",
    "AutoClip",
    "Calibration",
    "BackendUnavailableError",
    "ClipPolicy",
    "Divergence",
    "DivergenceError",
    "Explosion",
    "Instability",
    "GradTracker",
    "LayerNorms",
    "LayersAdded",
    "NonFiniteGradientError",
    "NormClip",
    "Offender",
    "Resumed",
    "RunEnd",
    "RunStart",
    "StepBatch",
    "StateError",
    "StepStats",
    "Summary",
    "UnknownBackendError",
    "ValueClip",
    "ZClip",
    "__version__",
    "available_backends",
    "calibrate",
    "hookimpl",
    "hookspec",
    "sanitize_names",
]

_WITH_TORCH = {
    "AGC": "gradtrack.policies.clipping",
    "AdaGC": "gradtrack.policies.clipping",
    "AutoClip": "gradtrack.policies.clipping",
    "ZClip": "gradtrack.policies.clipping",
    "AdaptiveClip": "gradtrack.policies.clipping",
    "ClipPolicy": "gradtrack.policies.clipping",
    "NormClip": "gradtrack.policies.clipping",
    "ValueClip": "gradtrack.policies.clipping",
    "GradTracker": "gradtrack.tracker",
    "Calibration": "gradtrack.calibration",
    "calibrate": "gradtrack.calibration",
    "DivergenceError": "gradtrack.tracker",
    "NonFiniteGradientError": "gradtrack.tracker",
}


def __getattr__(name: str) -> Any:
    module = _WITH_TORCH.get(name)
    if module is None:
        raise AttributeError(f"module 'gradtrack' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value

"""gradtrack: gradient norms, clipping, explosion and divergence detection for PyTorch training."""

from __future__ import annotations

from gradtrack._version import __version__
from gradtrack.clipping import AdaptiveClip, ClipPolicy, NormClip, ValueClip
from gradtrack.events import Divergence, Explosion, Offender, RunEnd, RunStart, StepStats, Summary
from gradtrack.hookspecs import hookimpl, hookspec
from gradtrack.naming import sanitize_names
from gradtrack.plugins import BackendUnavailableError, UnknownBackendError, available_backends
from gradtrack.tracker import GradTracker, NonFiniteGradientError

__all__ = [
    "AdaptiveClip",
    "BackendUnavailableError",
    "ClipPolicy",
    "Divergence",
    "Explosion",
    "GradTracker",
    "NonFiniteGradientError",
    "NormClip",
    "Offender",
    "RunEnd",
    "RunStart",
    "StepStats",
    "Summary",
    "UnknownBackendError",
    "ValueClip",
    "__version__",
    "available_backends",
    "hookimpl",
    "hookspec",
    "sanitize_names",
]

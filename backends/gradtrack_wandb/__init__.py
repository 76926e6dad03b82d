"""The Weights & Biases backend for gradtrack: entry point ``wandb`` in the ``gradtrack`` group."""

from __future__ import annotations

import importlib.util
from collections.abc import Mapping
from typing import Any

from gradtrack import BackendUnavailableError, hookimpl

__all__ = ["gradtrack_make_backend"]


@hookimpl
def gradtrack_make_backend(name: str, options: Mapping[str, Any]) -> object | None:
    """``backend="wandb"``: a ``WandbBackend`` with ``backend_options["wandb"]``; wandb is imported later."""
    if name != "wandb":
        return None
    if importlib.util.find_spec("wandb") is None:
        raise BackendUnavailableError("backend='wandb' needs the wandb SDK: pip install 'gradtrack[wandb]'")
    from gradtrack_wandb.backend import WandbBackend

    return WandbBackend(**options)

"""The MLflow backend for gradtrack, registered as entry point ``mlflow`` in the ``gradtrack`` group."""

from __future__ import annotations

import importlib.util
from collections.abc import Mapping
from typing import Any

from gradtrack import BackendUnavailableError, hookimpl

__all__ = ["gradtrack_cli_commands", "gradtrack_make_backend"]


@hookimpl
def gradtrack_cli_commands(subparsers: Any) -> None:
    """Add ``runs``, ``report``, ``watch`` and ``replay``: commands that read MLflow, so they live here."""
    from gradtrack_mlflow.cli import add_commands

    add_commands(subparsers)


@hookimpl
def gradtrack_make_backend(name: str, options: Mapping[str, Any]) -> object | None:
    """``backend="mlflow"``: an ``MLflowBackend`` with ``backend_options["mlflow"]``; MLflow is imported later."""
    if name != "mlflow":
        return None
    if importlib.util.find_spec("mlflow") is None:
        raise BackendUnavailableError("backend='mlflow' needs the MLflow SDK: pip install 'gradtrack[mlflow]'")
    from gradtrack_mlflow.backend import MLflowBackend

    return MLflowBackend(**options)

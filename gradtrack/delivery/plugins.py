"""Finding backends: built-in plugins, the ``gradtrack`` entry-point group, and plugin objects.

Discovery is lazy (when a tracker enters its context, never at import) and can be switched off
with ``GRADTRACK_DISABLE_PLUGIN_AUTOLOAD=1``, as pytest does for its own plugins.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import pluggy

from gradtrack import hookspecs
from gradtrack.hookspecs import PROJECT_NAME

__all__ = [
    "AUTOLOAD_ENV",
    "KNOWN_EXTRAS",
    "BackendSpec",
    "BackendUnavailableError",
    "UnknownBackendError",
    "available_backends",
    "call_backend_hook",
    "check_backend_spec",
    "discovery_manager",
    "new_plugin_manager",
    "requested_names",
    "resolve_backends",
]

AUTOLOAD_ENV = "GRADTRACK_DISABLE_PLUGIN_AUTOLOAD"
KNOWN_EXTRAS = {"mlflow": "gradtrack[mlflow]", "wandb": "gradtrack[wandb]"}

BackendSpec = str | object | Sequence[str | object] | None


class UnknownBackendError(ValueError):
    """``backend=`` named something no installed plugin provides."""


class BackendUnavailableError(RuntimeError):
    """A backend is installed but cannot run here, typically because its SDK is missing."""


def new_plugin_manager() -> pluggy.PluginManager:
    """A plugin manager that knows gradtrack's hook specifications."""
    manager = pluggy.PluginManager(PROJECT_NAME)
    manager.add_hookspecs(hookspecs)
    return manager


def discovery_manager() -> pluggy.PluginManager:
    """The built-in plugins and, unless switched off, every entry-point plugin, registered once each."""
    from gradtrack.delivery import console

    manager = new_plugin_manager()
    manager.register(console, name="console")
    if not os.environ.get(AUTOLOAD_ENV):
        manager.load_setuptools_entrypoints(PROJECT_NAME)
    manager.check_pending()
    return manager


def available_backends() -> list[str]:
    """Names ``backend=`` accepts here: the built-ins and every installed entry point."""
    return sorted(name for name, _ in discovery_manager().list_name_plugin() if name)


def check_backend_spec(backend: object) -> BackendSpec:
    """Refuse, when the tracker is created, a ``backend=`` that can never work."""
    if backend is None:
        return None
    requested = list(backend) if isinstance(backend, list | tuple) else [backend]
    for item in requested:
        if isinstance(item, str) and item:
            continue
        if isinstance(item, type):
            raise TypeError(f"backend={item.__name__} is a class; pass an instance, e.g. backend={item.__name__}()")
        if isinstance(item, str | int | float | bool | bytes) or item is None or not _has_hooks(item):
            raise ValueError(
                f"backend={item!r} is not a backend: pass a backend name (see `gradtrack backends`), a list of "
                "names, or an object with @gradtrack.hookimpl methods named after the hooks in gradtrack.hookspecs"
            )
    return backend


def _has_hooks(item: object) -> bool:
    return any(hasattr(getattr(item, name, None), f"{PROJECT_NAME}_impl") for name in dir(item)
               if name.startswith(f"{PROJECT_NAME}_"))  # fmt: skip


def requested_names(backend: BackendSpec) -> set[str]:
    """The backends the user named by string (the others were passed as objects)."""
    requested = list(backend) if isinstance(backend, list | tuple) else [backend]
    return {item for item in requested if isinstance(item, str)}


def resolve_backends(
    backend: BackendSpec, options: Mapping[str, Mapping[str, Any]] | None = None
) -> list[tuple[str, object]]:
    """Turn the user's ``backend=`` into ``(name, backend object)`` pairs, one fresh object per run."""
    if backend is None:
        return []
    requested = list(backend) if isinstance(backend, list | tuple) else [backend]
    options = dict(options or {})
    unknown_options = set(options) - {b for b in requested if isinstance(b, str)}
    if unknown_options:
        raise ValueError(
            f"backend_options has entries for {sorted(unknown_options)}, which are not among the "
            f"requested backends {[b for b in requested if isinstance(b, str)]}"
        )
    manager: pluggy.PluginManager | None = None
    resolved: list[tuple[str, object]] = []
    for item in requested:
        if not isinstance(item, str):
            if isinstance(item, type):
                raise TypeError(f"backend={item.__name__} is a class; pass an instance, e.g. backend={item.__name__}()")
            resolved.append((type(item).__name__, item))
            continue
        manager = manager or discovery_manager()
        made = manager.hook.gradtrack_make_backend(name=item, options=dict(options.get(item, {})))
        if made is None:
            raise UnknownBackendError(_unknown_message(item, manager))
        resolved.append((item, made))
    names = [name for name, _ in resolved]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"backend= lists {duplicates} more than once")
    return resolved


def call_backend_hook(name: str, backend: object, hook: str, **kwargs: Any) -> Any:
    """One hook on one backend object, in this process (the hooks that run before or beside the reporter)."""
    manager = new_plugin_manager()
    manager.register(backend, name=name)
    return getattr(manager.hook, hook)(**kwargs)


def _unknown_message(name: str, manager: pluggy.PluginManager) -> str:
    installed = sorted(n for n, _ in manager.list_name_plugin() if n)
    message = f"backend={name!r} is not installed; installed backends: {installed}"
    if name in KNOWN_EXTRAS:
        message += f". Install it with: pip install '{KNOWN_EXTRAS[name]}'"
    if os.environ.get(AUTOLOAD_ENV):
        message += f" (entry-point plugins are disabled by {AUTOLOAD_ENV})"
    return message

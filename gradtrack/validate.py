"""Checks for user settings: every bad value is refused with an error that names it and says what is accepted.

Shared by the tracker, its policies and detectors, and the backends (no torch here), so the same kind of
setting is checked the same way everywhere. ``what`` is how the setting is named in the message, e.g.
``"max_norm"`` or ``"mlflow option 'exit_timeout'"``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = [
    "count",
    "join_timeout",
    "mapping",
    "number",
    "optional_count",
    "seconds",
    "text",
    "texts",
]


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def number(
    what: str, value: object, *, minimum: float = 0.0, inclusive: bool = False, allow_inf: bool = False
) -> float:
    """A real number above ``minimum`` (or at it when ``inclusive``); NaN never, inf only if allowed."""
    ok = _is_number(value) and not math.isnan(value)  # type: ignore[arg-type]
    if ok:
        as_float = float(value)  # type: ignore[arg-type]
        ok = (as_float >= minimum if inclusive else as_float > minimum) and (allow_inf or math.isfinite(as_float))
    if not ok:
        bound = f">= {minimum:g}" if inclusive else f"> {minimum:g}"
        kind = f"number {bound} (or math.inf)" if allow_inf else f"finite number {bound}"
        raise ValueError(f"{what} must be a {kind}, got {value!r}")
    return float(value)  # type: ignore[arg-type]


def seconds(what: str, value: object, *, minimum: float = 0.0, allow_inf: bool = False) -> float:
    """A duration in seconds, at least ``minimum``."""
    try:
        return number(what, value, minimum=minimum, inclusive=True, allow_inf=allow_inf)
    except ValueError:
        extra = " or math.inf to wait as long as it takes" if allow_inf else ""
        raise ValueError(f"{what} must be a number of seconds >= {minimum:g}{extra}, got {value!r}") from None


def count(what: str, value: object, *, minimum: int = 1) -> int:
    """An int of at least ``minimum`` (never a bool)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{what} must be an int >= {minimum}, got {value!r}")
    return value


def optional_count(what: str, value: object, *, minimum: int = 1) -> int | None:
    """An int of at least ``minimum``, or None where None means "off"."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{what} must be an int >= {minimum} (or None to disable), got {value!r}")
    return value


def text(what: str, value: object, *, allow_none: bool = True) -> str | None:
    """A non-empty string (or None where the setting is optional)."""
    if value is None and allow_none:
        return None
    if not isinstance(value, str) or not value:
        raise ValueError(f"{what} must be a non-empty string{' or None' if allow_none else ''}, got {value!r}")
    return value


def texts(what: str, value: object) -> tuple[str, ...]:
    """A list or tuple of strings (one bare string is refused: it would be read letter by letter)."""
    if isinstance(value, str) or not isinstance(value, Sequence) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"{what} must be a list of strings, got {value!r}")
    return tuple(value)


def mapping(what: str, value: object, *, values: type | tuple[type, ...] | None = None) -> dict[str, Any]:
    """A mapping with string keys (and values of ``values`` when given); None is an empty one."""
    if value is None:
        return {}
    if not isinstance(value, Mapping) or not all(isinstance(key, str) for key in value):
        raise ValueError(f"{what} must be a dict with string keys, got {value!r}")
    if values is not None and not all(isinstance(v, values) for v in value.values()):
        names = values.__name__ if isinstance(values, type) else " or ".join(t.__name__ for t in values)
        raise ValueError(f"{what} must be a dict of str to {names}, got {value!r}")
    return dict(value)


def join_timeout(timeout: float) -> float | None:
    """What ``Thread.join`` and ``Popen.wait`` take for ``timeout`` (they overflow on inf)."""
    return None if math.isinf(timeout) else max(0.0, timeout)

"""A tracker's state, as ``tracker.state_dict()`` gives it: plain values a checkpoint can carry.

The state goes into the user's own checkpoint dict, which ``torch.load`` reads back at its default
``weights_only=True``: so it holds only dicts, lists, tuples, strings, numbers, booleans, None and
tensors, never an object of gradtrack's. Each part is read back by the readers below, which name the key
that is missing or of the wrong type, so a damaged state fails with a :class:`StateError` that says where,
before anything of the run is changed.

No torch here: the reporter process reads the summary's part.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from gradtrack.events import Divergence

__all__ = [
    "FORMAT",
    "VERSION",
    "StateError",
    "check_plain",
    "divergence",
    "flag",
    "flags",
    "floats",
    "integer",
    "optional",
    "part",
    "real",
    "strings",
    "text",
]

FORMAT = "gradtrack.state"
VERSION = 1


class StateError(ValueError):
    """A state given to ``load_state_dict`` that this tracker cannot continue from (it says why)."""


def part(state: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    value = state.get(key) if isinstance(state, Mapping) else None
    if not isinstance(value, Mapping):
        raise ValueError(f"{key!r} must be a dict, got {type(value).__name__}")
    return value


def real(state: Mapping[str, Any], key: str) -> float:
    value = state.get(key)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{key!r} must be a number, got {type(value).__name__}")
    return float(value)


def integer(state: Mapping[str, Any], key: str) -> int:
    value = state.get(key)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{key!r} must be an integer, got {type(value).__name__}")
    return value


def flag(state: Mapping[str, Any], key: str) -> bool:
    value = state.get(key)
    if not isinstance(value, bool):
        raise ValueError(f"{key!r} must be True or False, got {type(value).__name__}")
    return value


def floats(state: Mapping[str, Any], key: str) -> list[float]:
    values = state.get(key)
    if not isinstance(values, list | tuple) or not all(
        isinstance(v, int | float) and not isinstance(v, bool) for v in values
    ):
        raise ValueError(f"{key!r} must be a list of numbers")
    return [float(v) for v in values]


def flags(state: Mapping[str, Any], key: str) -> list[bool]:
    values = state.get(key)
    if not isinstance(values, list | tuple) or not all(isinstance(v, bool) for v in values):
        raise ValueError(f"{key!r} must be a list of booleans")
    return list(values)


_PLAIN = (str, int, float, bool, type(None))


def check_plain(value: object, where: str = "state") -> None:
    """Refuse anything ``torch.load(weights_only=True)`` would not read back (tensors are checked by name,
    so that this module needs no torch)."""
    if isinstance(value, _PLAIN):
        return
    if isinstance(value, Mapping):
        for key, item in value.items():
            if not isinstance(key, str | int):
                raise TypeError(f"{where} has a key of type {type(key).__name__}")
            check_plain(item, f"{where}[{key!r}]")
        return
    if isinstance(value, list | tuple):
        for index, item in enumerate(value):
            check_plain(item, f"{where}[{index}]")
        return
    if type(value).__module__ == "torch" and type(value).__name__ in ("Tensor", "Parameter"):
        return
    raise TypeError(f"{where} is a {type(value).__module__}.{type(value).__name__}, not a plain value or a tensor")


def strings(state: Mapping[str, Any], key: str) -> list[str]:
    values = state.get(key)
    if not isinstance(values, list | tuple) or not all(isinstance(v, str) for v in values):
        raise ValueError(f"{key!r} must be a list of strings")
    return list(values)


def text(state: Mapping[str, Any], key: str) -> str:
    value = state.get(key)
    if not isinstance(value, str):
        raise ValueError(f"{key!r} must be a string, got {type(value).__name__}")
    return value


def divergence(state: Mapping[str, Any], key: str) -> Divergence:
    """A verdict, as the judge and the summary keep it: ``{"step", "reason", "timestamp"}``."""
    value = part(state, key)
    return Divergence(step=integer(value, "step"), reason=text(value, "reason"), timestamp=real(value, "timestamp"))


def optional(state: Mapping[str, Any], key: str, reader: Any) -> Any:
    """``reader(state, key)``, or None where the value is None."""
    return None if state.get(key) is None else reader(state, key)

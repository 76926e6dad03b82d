"""Metric keys that every tracker accepts, made the same way for the same names.

Each backend says which characters it rejects and how long a key may be; ``sanitize_names`` maps
every parameter name to a valid key, deterministically, and never maps two names to one key.
"""

from __future__ import annotations

import hashlib
import re
from collections import defaultdict
from collections.abc import Iterable

__all__ = ["MLFLOW_INVALID", "extend_names", "sanitize_names"]

MLFLOW_INVALID = r"[^/\w.\- :]"


def _digest(name: str, length: int = 8) -> str:
    return hashlib.sha1(name.encode()).hexdigest()[:length]


def _clean(name: str, invalid: re.Pattern[str], budget: int) -> str:
    key = invalid.sub("_", name)
    key = re.sub(r"/{2,}", "/", key).lstrip("/") or "_"
    if len(key) > budget:
        key = f"{key[: budget - 9]}_{_digest(name)}"
    return key


def sanitize_names(
    names: Iterable[str],
    prefix: str = "",
    invalid: str = MLFLOW_INVALID,
    max_length: int = 250,
    fold_case: bool = False,
) -> dict[str, str]:
    """Map each name to ``prefix + key`` where key has no character matching ``invalid``.

    Names that clean to the same key (ignoring case when the tracker does, ``fold_case``) all get a
    short hash of their original name appended, so the result depends only on the set of names, not
    on their order.
    """
    pattern = re.compile(invalid)
    budget = max_length - len(prefix)
    if budget < 16:
        raise ValueError(f"max_length={max_length} leaves too little room after prefix={prefix!r}")
    unique = list(dict.fromkeys(names))
    by_key: dict[str, list[str]] = defaultdict(list)
    cleaned = {name: _clean(name, pattern, budget) for name in unique}
    fold = str.lower if fold_case else str
    for name, key in cleaned.items():
        by_key[fold(key)].append(name)
    result: dict[str, str] = {}
    for originals in by_key.values():
        for name in originals:
            key = cleaned[name]
            result[name] = key if len(originals) == 1 else f"{key[: budget - 9]}_{_digest(name)}"
    taken: set[str] = set()
    for name in unique:  # a hashed key could, in theory, equal another name's plain key
        key, length = result[name], 8
        while fold(key) in taken:
            length += 4
            key = f"{result[name][: budget - length - 1]}_{_digest(name, length)}"
        taken.add(fold(key))
        result[name] = prefix + key
    return result


def extend_names(
    keys: dict[str, str],
    names: Iterable[str],
    prefix: str = "",
    invalid: str = MLFLOW_INVALID,
    max_length: int = 250,
    fold_case: bool = False,
) -> dict[str, str]:
    """``keys`` (a result of ``sanitize_names``) with keys for ``names`` added, the existing ones unchanged.

    For layers that appear during a run: the layers already logged keep their keys. A new name whose
    clean key is taken gets a short hash of its name appended, like a collision in ``sanitize_names``.
    """
    pattern = re.compile(invalid)
    budget = max_length - len(prefix)
    fold = str.lower if fold_case else str
    result = dict(keys)
    taken = {fold(key) for key in result.values()}
    for name in names:
        if name in result:
            continue
        key, length = prefix + _clean(name, pattern, budget), 8
        while fold(key) in taken:
            key = f"{prefix}{_clean(name, pattern, budget)[: budget - length - 1]}_{_digest(name, length)}"
            length += 4
        taken.add(fold(key))
        result[name] = key
    return result

"""Quantiles of already sorted values: the helper judgement, the adaptive clip policies and the records share.

No torch and no numpy call per value: it runs on every step in detection and in the reporter process.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

__all__ = ["sorted_quantile"]


def sorted_quantile(ordered: Sequence[float] | np.ndarray, q: float) -> float:
    """numpy's default (linear) quantile of already sorted values, without numpy's per-call overhead."""
    if not len(ordered):
        return math.nan
    position = q * (len(ordered) - 1)
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return float(ordered[low] + (ordered[high] - ordered[low]) * (position - low))

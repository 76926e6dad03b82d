"""The seed's reference functions, one copy, as the seed wrote them ("Detecting Exploding Gradients").

Why it exists: the benchmarks time gradtrack against the per-parameter check users copy from the seed
(``shared/seeds/000_*.txt``), and the transfer tests prove their counter catches its host reads. Both
used to keep a copy of their own, and the copies had drifted apart; a reference only means something
if it is the seed's own code, so this one is, line for line: three host reads (``.item()``) per
parameter tensor that has a gradient.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

__all__ = ["detect_exploding_gradients"]


def detect_exploding_gradients(model: nn.Module, threshold: float = 10.0) -> dict[str, Any]:
    """Check if any parameter gradients exceed a threshold after backward()."""
    results: dict[str, Any] = {"has_explosion": False, "problematic_layers": []}
    for name, param in model.named_parameters():
        if param.grad is None:
            continue
        grad_norm = param.grad.norm().item()
        has_nan = torch.isnan(param.grad).any().item()
        has_inf = torch.isinf(param.grad).any().item()
        if has_nan or has_inf or grad_norm > threshold:
            results["has_explosion"] = True
            results["problematic_layers"].append(
                {
                    "name": name,
                    "grad_norm": grad_norm,
                    "has_nan": has_nan,
                    "has_inf": has_inf,
                }
            )
    return results

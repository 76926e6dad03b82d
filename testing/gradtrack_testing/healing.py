"""A run that heals itself: a BatchNorm net fed batches with one NaN record, ``on_divergence="rollback"``.

Why it exists: every backend reports rollbacks (console lines, W&B rows, tags and alerts, MLflow metrics),
and each is tested on the same real run, where the divergence rule finds the poisoned step and the
snapshot of before it comes back. ``tests/test_rollback.py`` checks the healing itself on the same recipe.
"""

from __future__ import annotations

import math
from collections.abc import Collection
from typing import Any

import torch
from torch import nn

__all__ = ["healed_run", "healing_net", "poisoned_batches"]


def healing_net(seed: int = 0) -> nn.Module:
    """8 inputs, BatchNorm (whose running statistics a NaN batch corrupts in the forward pass), 1 output."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Dropout(0.1), nn.Linear(32, 1))


def poisoned_batches(poison: Collection[int], steps: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``steps`` batches of a linear regression; at the steps in ``poison`` one record holds a NaN."""
    generator = torch.Generator().manual_seed(1)
    weights = torch.randn(8, 1, generator=generator)
    batches = []
    for step in range(steps):
        x = torch.randn(32, 8, generator=generator)
        y = x @ weights
        if step in poison:
            x = x.clone()
            x[0, 0] = math.nan
        batches.append((x, y))
    return batches


def healed_run(backend: Any, poison: Collection[int] = (57,), steps: int = 70, **options: Any) -> Any:
    """Train ``healing_net`` through ``poison`` with ``GradTracker(backend=backend, on_divergence="rollback",
    rollback_every=10, **options)``, the loss observed; returns the tracker, its context left."""
    from gradtrack import GradTracker

    model = healing_net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    options = {"on_divergence": "rollback", "rollback_every": 10, **options}
    with GradTracker(model, backend=backend, optimizer=optimizer, **options) as tracker:
        for x, y in poisoned_batches(poison, steps):
            optimizer.zero_grad()
            loss = nn.functional.mse_loss(model(x), y)
            tracker.observe(loss)
            loss.backward()
            optimizer.step()
    return tracker

"""The training run the fault tests put faults into: 40 steps through the reporter process to MLflow.

Why it exists: one fault test runs it in a subprocess under a file-size limit (a full disk), which needs
it importable from an installed package rather than from a test module reached through ``sys.path``.
Every run trains the same 40 steps of ``mlp(seed=4)``, the loss observed and an explosion forced at
step ``EXPLODES_AT``, so the server's content can be checked exactly afterwards.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gradtrack import GradTracker
from gradtrack_testing.models import mlp

__all__ = ["EXPLODES_AT", "FAULT", "STEPS", "mlflow_options", "train"]

STEPS, EXPLODES_AT, FAULT = 40, 15, range(10, 25)


def mlflow_options(uri: str, tmp_path: Path, **extra: Any) -> dict[str, Any]:
    """The MLflow backend's options: a fresh experiment, a spool under ``tmp_path``, short timeouts."""
    return {"tracking_uri": uri, "experiment_name": f"fault-{uuid.uuid4().hex[:8]}",
            "spool_dir": str(tmp_path / "spool"), "request_timeout": 1.0, "flush_every_s": 0.2, **extra}  # fmt: skip


def train(options: dict[str, Any], fault: Callable[[int], None] | None = None, backend: Any = "mlflow",
          **tracker: Any) -> tuple[GradTracker, float]:  # fmt: skip
    """The 40 steps; ``fault(step)`` runs before each; returns the tracker and the exit time."""
    model = mlp(seed=4)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    generator = torch.Generator().manual_seed(4)
    opened = GradTracker(model, backend=backend, backend_options={"mlflow": options}, layer_every=5, **tracker)
    with opened as tracked:
        assert tracked.flush(60.0)  # the reporter imported MLflow and sent the run start: faults hit live traffic
        for step in range(STEPS):
            if fault is not None:
                fault(step)
            x = torch.randn(16, 8, generator=generator)
            optimizer.zero_grad()
            loss = nn.functional.mse_loss(model(x).squeeze(-1), x.sum(-1))
            loss.backward()
            if step == EXPLODES_AT:
                model[0].weight.grad.mul_(1e7)  # type: ignore[index]
            tracked.observe(loss)
            optimizer.step()
            time.sleep(0.02)
        leaving = time.monotonic()
    return opened, time.monotonic() - leaving

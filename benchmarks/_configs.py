"""The configurations issue 5 compares, each training its own identical copy of the model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from gradtrack import GradTracker
from gradtrack_testing.seed import detect_exploding_gradients

__all__ = ["CONFIGS", "Config", "backend_problem"]


class Config:
    """Bare step: forward, backward, optimizer step. Subclasses add their gradient handling."""

    title = "bare step (forward, backward, SGD step)"
    has_hook = False  # whether ``hook`` is the configuration's whole per-step gradient handling

    def __init__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, workdir: Path) -> None:
        self.model, self.x, self.y, self.workdir = model, x, y, workdir
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.SGD(self.params, lr=1e-4, foreach=True)
        self.steps = 0

    def open(self) -> None:
        """Set up what the configuration needs (runs, trackers); not timed."""

    def close(self) -> None:
        """Tear it down; not timed."""

    def handle(self, loss: torch.Tensor) -> None:
        """The gradient handling between ``backward()`` and ``optimizer.step()``."""

    def hook(self) -> None:
        """The gradient handling alone, on the gradients already in ``.grad``."""
        raise NotImplementedError

    def settle(self) -> None:
        """After a block of steps: wait for background work this configuration queued."""

    def train_step(self) -> None:
        self.optimizer.zero_grad()
        loss = F.mse_loss(self.model(self.x), self.y)
        loss.backward()
        self.handle(loss)
        self.optimizer.step()
        self.steps += 1


class ClipNorm(Config):
    title = "clip_grad_norm_(params, 1.0, foreach=True)"
    has_hook = True

    def handle(self, loss: torch.Tensor) -> None:
        self.hook()

    def hook(self) -> None:
        torch.nn.utils.clip_grad_norm_(self.params, 1.0, foreach=True)


class SeedLoop(Config):
    title = "seed's detect_exploding_gradients loop"
    has_hook = True

    def handle(self, loss: torch.Tensor) -> None:
        self.hook()

    def hook(self) -> None:
        detect_exploding_gradients(self.model)


class WandbWatch(Config):
    title = 'wandb.watch(log="gradients", log_freq=1), offline'

    def open(self) -> None:
        import wandb

        # A run of its own ("create_new"): the W&B backend's run may be open in this process too.
        self.run = wandb.init(
            mode="offline", dir=str(self.workdir), project="gradtrack-bench", name="wandb-watch",
            reinit="create_new", settings=wandb.Settings(silent=True),
        )  # fmt: skip
        # wandb.watch's hooks log through the global ``wandb.run``, which "create_new" leaves unset.
        wandb.run = self.run
        self.run.watch(self.model, log="gradients", log_freq=1)

    def train_step(self) -> None:
        super().train_step()
        self.run.log({"step": self.steps})  # commits the histograms the hooks queued, as users do

    def close(self) -> None:
        import wandb

        self.run.unwatch(self.model)
        self.run.finish()
        wandb.run = None


class Tracked(Config):
    """gradtrack: norm clipping, per-layer norms at ``layer_every``, loss observed, optional backend."""

    title = "gradtrack, backend=None, layer_every=1"
    has_hook = True
    backend: str | None = None
    layer_every: int | None = 1

    def backend_options(self) -> dict[str, dict[str, Any]] | None:
        return None

    def open(self) -> None:
        self.tracker = GradTracker(
            self.model, self.backend, optimizer=self.optimizer, clip="norm", max_norm=1.0,
            layer_every=self.layer_every, backend_options=self.backend_options(),
        )  # fmt: skip
        self.tracker.__enter__()
        self.loss = torch.zeros(())

    def handle(self, loss: torch.Tensor) -> None:
        self.tracker.observe(loss=loss)  # the step's work itself runs in optimizer.step()

    def hook(self) -> None:
        self.tracker.observe(loss=self.loss)
        self.tracker.step()

    def settle(self) -> None:
        self.tracker.flush(60.0)

    def close(self) -> None:
        self.tracker.__exit__(None, None, None)


class TrackedEvery10(Tracked):
    title = "gradtrack, backend=None, layer_every=10 (default)"
    layer_every = 10


class TrackedMlflowHttp(Tracked):
    title = "gradtrack + MLflow backend, server on loopback, layer_every=1"
    backend = "mlflow"
    uri = ""  # set by the runner once the server is up

    def backend_options(self) -> dict[str, dict[str, Any]]:
        return {
            "mlflow": {
                "tracking_uri": self.uri or f"sqlite:///{self.workdir / 'mlflow.db'}",
                "experiment_name": "gradtrack-bench",
                "spool_dir": str(self.workdir / "spool"),
            }
        }


class TrackedMlflowSqlite(TrackedMlflowHttp):
    title = "gradtrack + MLflow backend, local sqlite, layer_every=1"


class TrackedMlflowSqliteEvery10(TrackedMlflowHttp):
    title = "gradtrack + MLflow backend, local sqlite, layer_every=10 (default)"
    layer_every = 10


class TrackedWandb(Tracked):
    title = "gradtrack + W&B backend (offline), layer_every=1"
    backend = "wandb"

    def backend_options(self) -> dict[str, dict[str, Any]]:
        return {
            "wandb": {
                "mode": "offline", "dir": str(self.workdir), "project": "gradtrack-bench",
                "name": "gradtrack-wandb", "init_kwargs": {"reinit": "create_new"},
            }
        }  # fmt: skip


CONFIGS: dict[str, type[Config]] = {
    "bare": Config,
    "clip": ClipNorm,
    "seed": SeedLoop,
    "watch": WandbWatch,
    "gradtrack": Tracked,
    "gradtrack-l10": TrackedEvery10,
    "mlflow-http": TrackedMlflowHttp,
    "mlflow-sqlite": TrackedMlflowSqlite,
    "mlflow-sqlite-l10": TrackedMlflowSqliteEvery10,
    "wandb": TrackedWandb,
}
BACKEND_OF = {"mlflow-http": "mlflow", "mlflow-sqlite": "mlflow", "mlflow-sqlite-l10": "mlflow", "wandb": "wandb"}


def backend_problem(key: str) -> str | None:
    """Why a configuration cannot run here (its SDK or backend missing), or None."""
    module = {"mlflow": "gradtrack_mlflow.backend", "wandb": "gradtrack_wandb.backend"}.get(BACKEND_OF.get(key, ""))
    sdk = "wandb" if key in ("watch", "wandb") else "mlflow" if key.startswith("mlflow") else None
    try:
        if sdk is not None:
            __import__(sdk)
        if module is not None:
            __import__(module)
            from gradtrack.delivery.plugins import available_backends

            if BACKEND_OF[key] not in available_backends():
                return f"backend {BACKEND_OF[key]!r} is not registered (pip install -e '.[{BACKEND_OF[key]}]')"
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    return None

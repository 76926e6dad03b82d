"""Shared test pieces: tiny real models and a recording plugin registered through pluggy."""

from __future__ import annotations

import os
import threading
from typing import Any, NoReturn

import pytest
import torch
from torch import nn

from gradtrack import hookimpl
from gradtrack.events import Divergence, Explosion, LayersAdded, RunEnd, RunStart, StepStats


def missing_system_dependency(reason: str) -> NoReturn:
    """Skip a test whose system package is absent here, or fail it where CI asks for every test to run.

    ``.ci/run`` sets GRADTRACK_REQUIRE_ALL_TESTS=1: a CI machine that could not install PostgreSQL or
    Chromium must go red, not report a green run with the load and browser tests quietly skipped.
    """
    if os.environ.get("GRADTRACK_REQUIRE_ALL_TESTS") == "1":
        pytest.fail(f"{reason} (GRADTRACK_REQUIRE_ALL_TESTS=1: no test may be skipped)", pytrace=False)
    pytest.skip(reason)


class RecordingBackend:
    """A real gradtrack plugin that keeps every hook call, in order, for contract tests."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []
        self.threads: set[str] = set()

    def _record(self, hook: str, value: Any) -> None:
        self.threads.add(threading.current_thread().name)
        self.calls.append((hook, value))

    @hookimpl
    def gradtrack_run_start(self, start: RunStart) -> None:
        self._record("run_start", start)

    @hookimpl
    def gradtrack_step(self, stats: StepStats) -> None:
        self._record("step", stats)

    @hookimpl
    def gradtrack_layers_added(self, layers: LayersAdded) -> None:
        self._record("layers_added", layers)

    @hookimpl
    def gradtrack_explosion(self, event: Explosion) -> None:
        self._record("explosion", event)

    @hookimpl
    def gradtrack_divergence(self, event: Divergence) -> None:
        self._record("divergence", event)

    @hookimpl
    def gradtrack_run_end(self, end: RunEnd) -> None:
        self._record("run_end", end)

    @hookimpl
    def gradtrack_flush(self, timeout: float) -> None:
        self._record("flush", timeout)

    def of(self, hook: str) -> list[Any]:
        return [value for name, value in self.calls if name == hook]


class VanillaRNN(nn.Module):
    """The seed's SimpleRNN with a readout; ``radius`` sets the recurrent spectral radius."""

    def __init__(self, input_size: int = 4, hidden: int = 32, radius: float = 1.0, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        generator = torch.Generator().manual_seed(seed)
        self.W_x = nn.Linear(input_size, hidden)
        self.W_h = nn.Linear(hidden, hidden, bias=False)
        self.readout = nn.Linear(hidden, 1)
        with torch.no_grad():
            weight = torch.randn(hidden, hidden, generator=generator)
            weight *= radius / torch.linalg.eigvals(weight).abs().max()
            self.W_h.weight.copy_(weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.zeros(x.shape[0], self.W_h.in_features)
        for t in range(x.shape[1]):
            h = torch.tanh(self.W_h(h) + self.W_x(x[:, t]))
        return self.readout(h).squeeze(-1)


def mlp(seed: int = 0, width: int = 16) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh(), nn.Linear(width, 1))


def rnn_batch(length: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """One fixed batch of 16 sequences of 4 features for ``VanillaRNN``, and a target per sequence."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(16, length, 4, generator=generator), torch.randn(16, generator=generator)


def train_steps(tracker: Any, model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
                steps: int) -> None:  # fmt: skip
    """The loop users write, ``steps`` times on one batch, the loss observed."""
    for _ in range(steps):
        optimizer.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        tracker.observe(loss)
        optimizer.step()


def regression_batches(n: int, seed: int = 0, batch: int = 32) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    weights = torch.randn(8, generator=generator)
    batches = []
    for _ in range(n):
        x = torch.randn(batch, 8, generator=generator)
        y = x @ weights + 0.3 * torch.randn(batch, generator=generator)
        batches.append((x, y))
    return batches


@pytest.fixture
def recorder() -> RecordingBackend:
    return RecordingBackend()


# -------------------------------------------------------------------------
# W&B backend tests: an offline wandb confined to a temporary directory.
# -------------------------------------------------------------------------

_WANDB_DIR_VARIABLES = ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR")


@pytest.fixture
def wandb_dir(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> Any:
    """An offline, silent wandb writing only under ``tmp_path/"wandb"``; wandb-core is torn down after."""
    wandb = pytest.importorskip("wandb")
    root = tmp_path / "wandb"
    root.mkdir()
    for variable in _WANDB_DIR_VARIABLES:
        monkeypatch.setenv(variable, str(root))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DISABLE_GIT", "true")
    monkeypatch.setenv("WANDB_DISABLE_CODE", "true")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    yield root
    if wandb.run is not None:
        wandb.run.finish()
    wandb.teardown()


# -------------------------------------------------------------------------
# A third-party plugin installed through its entry point (tests/probe_plugin.py): runs in the reporter.
# -------------------------------------------------------------------------


@pytest.fixture
def probe(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> Any:
    """Installs ``probe_plugin`` as the ``probe`` backend; yields the path its records go to."""
    dist_info = tmp_path / "gradtrack_probe-1.0.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text("Metadata-Version: 2.1\nName: gradtrack-probe\nVersion: 1.0\n")
    (dist_info / "entry_points.txt").write_text("[gradtrack]\nprobe = probe_plugin\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path / "probe.jsonl"


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """One real ``mlflow server`` on loopback for the whole session (it takes seconds to start)."""
    pytest.importorskip("mlflow")
    from mlflow_support import MlflowServer

    running = MlflowServer(tmp_path_factory.mktemp("mlflow-server"))
    running.start()
    yield running
    running.stop()

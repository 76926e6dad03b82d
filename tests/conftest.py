"""Fixtures, and the environment of the test processes: one torch thread, one priority under pytest-xdist."""

from __future__ import annotations

import os
from collections import Counter
from typing import Any

import pytest
import torch

from gradtrack_testing import probe_plugin
from gradtrack_testing.mlflow_server import MlflowServer
from gradtrack_testing.recording import RecordingBackend

# One torch thread in every test process and every process a test starts (trainers, ranks, reporters): the
# models are tiny, and with pytest-xdist workers sharing two cores a second intra-op thread only spins.
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)

if os.environ.get("PYTEST_XDIST_WORKER"):
    # The reporter lowers its own priority to nice 19 so that it never slows training; under pytest-xdist the
    # other worker's training would then starve it, and tests that wait for delivery would wait on the
    # scheduler, not on gradtrack. Each worker (and all it starts) runs at the reporter's priority instead.
    os.nice(19 - os.nice(0))


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Modules with the most ``slow`` tests first, each module's tests in their own order: pytest-xdist hands
    the workers one module at a time in this order, so the long ones start at once rather than end the run
    alone on one worker."""
    module = {item: item.nodeid.split("::", 1)[0] for item in items}
    slow = Counter(module[item] for item in items if item.get_closest_marker("slow") is not None)
    first: dict[str, int] = {}
    for index, item in enumerate(items):
        first.setdefault(module[item], index)
    items.sort(key=lambda item: (-slow[module[item]], first[module[item]]))


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
# A third-party plugin installed through its entry point (gradtrack_testing.probe_plugin): runs in the reporter.
# -------------------------------------------------------------------------


@pytest.fixture
def probe(tmp_path: Any) -> Any:
    """Installs ``gradtrack_testing.probe_plugin`` as the ``probe`` backend; yields the path its records go to."""
    with probe_plugin.installed(tmp_path):
        yield tmp_path / "probe.jsonl"


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """One real ``mlflow server`` on loopback for the whole session (it takes seconds to start)."""
    pytest.importorskip("mlflow")
    with MlflowServer(tmp_path_factory.mktemp("mlflow-server")) as running:
        yield running

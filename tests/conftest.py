"""Fixtures only; the helpers they and the tests use live in ``gradtrack_testing`` (``testing/``)."""

from __future__ import annotations

from typing import Any

import pytest

from gradtrack_testing import probe_plugin
from gradtrack_testing.mlflow_server import MlflowServer
from gradtrack_testing.recording import RecordingBackend


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

"""A run that survives its own restarts, against a real MLflow server: one run, every step, same verdict."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from gradtrack import GradTracker
from gradtrack_testing.fault_server import FaultServer
from gradtrack_testing.mlflow_server import MlflowServer
from gradtrack_testing.models import mlp

mlflow = pytest.importorskip("mlflow")
from gradtrack_mlflow.backend import SpoolLeftWarning  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402

EXAMPLE = Path(__file__).parent.parent / "examples" / "resume.py"


def _runs(client: MlflowClient, experiment: str) -> list[Any]:
    found = client.get_experiment_by_name(experiment)
    return client.search_runs([found.experiment_id]) if found else []


def _until(condition: Any, timeout: float = 60.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := condition():
            return value
        time.sleep(0.25)
    raise AssertionError("timed out")


@pytest.mark.slow
def test_a_job_killed_and_resumed_from_its_checkpoint_logs_every_step_into_one_run(
    server: MlflowServer, tmp_path: Path
) -> None:
    experiment = f"resume-{uuid.uuid4().hex[:8]}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": server.uri}
    command = [sys.executable, str(EXAMPLE), "--steps", "80", "--every", "10", "--experiment", experiment]
    killed = subprocess.run([*command, "--kill-at", "45"], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=120)  # fmt: skip
    assert killed.returncode == -9 and "step 45 " in killed.stdout
    client = MlflowClient(server.uri)
    (run,) = _until(lambda: [r for r in _runs(client, experiment) if r.info.status == "KILLED"])  # the reporter ends it

    resumed = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from step 40" in resumed.stdout and "resumed from [40]" in resumed.stdout

    (run,) = _runs(client, experiment)  # the same run, not a second one
    assert run.info.status == "FINISHED"
    history = client.get_metric_history(run.info.run_id, "grad/total_norm")
    steps = sorted(m.step for m in history)
    assert set(steps) == set(range(80))  # a point for every step
    assert steps.count(40) == steps.count(45) == 2 and steps.count(46) == steps.count(39) == 1  # 40-45: twice
    tags = run.data.tags
    assert tags["gradtrack.resumes"] == "1" and tags["diverged"] == "false"
    assert "| resumed | 1 time(s), from step 40 |" in tags["mlflow.note.content"]
    assert run.data.metrics["gradtrack.summary.steps"] == 80  # 40 before the checkpoint, 40 after
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "gradtrack")}
    assert "gradtrack/norms.png" in artifacts


def _train(model: nn.Module, tracker: GradTracker, steps: int, lr: float) -> None:
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(0)
    for _ in range(steps):
        x = torch.randn(16, 8, generator=generator)
        optimizer.zero_grad()
        loss = (model(x) - x[:, :1]).pow(2).mean()
        tracker.observe(loss)
        loss.backward()
        optimizer.step()


def _options(server_uri: str, experiment: str, tmp_path: Path, **mlflow: Any) -> dict[str, Any]:
    settings = {"tracking_uri": server_uri, "experiment_name": experiment, "spool_dir": str(tmp_path / "spool"),
                "plots": False, **mlflow}  # fmt: skip
    # close_timeout: the exit waits for the reporter (niced) to spool or finish: generous, so a busy machine
    # (pytest-xdist workers on two cores) cannot turn an expected SpoolLeftWarning into a close timeout
    return {"backend": "mlflow", "backend_options": {"mlflow": settings}, "close_timeout": 120.0}


def test_a_diverged_run_stays_diverged_after_a_resume(server: MlflowServer, tmp_path: Path) -> None:
    experiment = f"resume-diverged-{uuid.uuid4().hex[:8]}"
    model = mlp()
    with GradTracker(model, clip=None, **_options(server.uri, experiment, tmp_path)) as first:
        _train(model, first, 30, lr=50.0)  # far too high: the loss blows up
    assert first.diverged
    state = first.state_dict()
    assert set(state["backends"]["mlflow"]) == {"run_key", "owned", "experiment_name", "experiment_id"}
    assert server.uri not in repr(state)  # no URL (which may carry credentials) in a checkpoint

    model = mlp()
    second = GradTracker(model, clip=None, **_options(server.uri, experiment, tmp_path))
    second.load_state_dict(state)
    assert second.diverged and second.steps == 30
    with second:
        _train(model, second, 10, lr=1e-3)  # healthy again: still a run that diverged
    client = MlflowClient(server.uri)
    (run,) = _runs(client, experiment)
    assert run.info.status == "FINISHED"
    assert run.data.tags["diverged"] == "true" and run.data.tags["gradtrack.resumes"] == "1"
    assert run.data.tags["gradtrack.diverged_step"] == str(first.divergence_event.step)  # type: ignore[union-attr]
    assert max(m.step for m in client.get_metric_history(run.info.run_id, "grad/total_norm")) == 39
    assert second.summary().diverged and second.summary().steps == 40


def test_a_run_deleted_since_is_resumed_into_a_new_run_with_a_warning(server: MlflowServer, tmp_path: Path) -> None:
    experiment = f"resume-deleted-{uuid.uuid4().hex[:8]}"
    model = mlp()
    with GradTracker(model, **_options(server.uri, experiment, tmp_path)) as first:
        _train(model, first, 5, lr=1e-3)
    client = MlflowClient(server.uri)
    (gone,) = _runs(client, experiment)
    client.delete_run(gone.info.run_id)

    second = GradTracker(model, **_options(server.uri, experiment, tmp_path))
    second.load_state_dict(first.state_dict())
    with pytest.warns(RuntimeWarning, match="cannot find the MLflow run it is resuming"), second:
        _train(model, second, 5, lr=1e-3)
    (run,) = _runs(client, experiment)
    assert run.info.run_id != gone.info.run_id and run.info.status == "FINISHED"
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "grad/total_norm")) == list(range(5, 10))


@pytest.fixture
def proxy(server: MlflowServer) -> Iterator[FaultServer]:
    running = FaultServer(server.uri)
    yield running
    running.close()


@pytest.mark.slow
def test_a_server_down_at_resume_spools_and_the_replay_finds_the_same_run(proxy: FaultServer, tmp_path: Path) -> None:
    experiment = f"resume-down-{uuid.uuid4().hex[:8]}"
    model = mlp()
    with GradTracker(model, **_options(proxy.uri, experiment, tmp_path)) as first:
        _train(model, first, 10, lr=1e-3)
    state = first.state_dict()
    assert not list((tmp_path / "spool").glob("*/spool.jsonl"))

    proxy.mode = "silent"
    second = GradTracker(model, **_options(proxy.uri, experiment, tmp_path, exit_timeout=2.0))
    second.load_state_dict(state)
    with pytest.warns(SpoolLeftWarning), second:  # the server never answered
        _train(model, second, 10, lr=1e-3)
    proxy.mode = "pass"
    (spool,) = (tmp_path / "spool").glob("*/spool.jsonl")
    replayed = subprocess.run([sys.executable, "-m", "gradtrack_mlflow", "replay", str(spool)],
                              capture_output=True, text=True, timeout=120)  # fmt: skip
    assert replayed.returncode == 0, replayed.stderr
    client = MlflowClient(proxy.uri)
    (run,) = _runs(client, experiment)
    assert run.info.status == "FINISHED" and run.data.tags["gradtrack.resumes"] == "1"
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "grad/total_norm")) == list(range(20))

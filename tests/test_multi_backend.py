"""``backend=["mlflow", "wandb"]``: one training run, reported identically to both trackers."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn

from gradtrack import GradTracker
from gradtrack_testing.models import VanillaRNN
from gradtrack_testing.recording import RecordingBackend

wandb = pytest.importorskip("wandb")
mlflow = pytest.importorskip("mlflow")

from gradtrack_testing.wandb_files import WandbRun, run_files  # noqa: E402


def test_mlflow_and_wandb_log_the_same_run(wandb_dir: Path, tmp_path: Path) -> None:
    tracking_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    options = {
        "mlflow": {"tracking_uri": tracking_uri, "experiment_name": "both", "spool_dir": str(tmp_path / "spool")},
        "wandb": {"project": "both", "dir": str(wandb_dir)},
    }
    recorder = RecordingBackend()
    model = VanillaRNN(radius=3.0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    generator = torch.Generator().manual_seed(1)
    x, y = torch.randn(16, 20, 4, generator=generator), torch.randn(16, generator=generator)
    with GradTracker(
        model,
        backend=["mlflow", "wandb", recorder],
        clip=None,
        layer_every=4,
        backend_options=options,
        close_timeout=120.0,  # the runs are read at once: wait for the niced reporter, even on a busy machine
    ) as tracker:
        for _ in range(16):
            optimizer.zero_grad()
            loss = nn.functional.mse_loss(model(x), y)
            loss.backward()
            tracker.observe(loss=loss)
            optimizer.step()
    summary = tracker.summary()
    assert summary.diverged and summary.explosions > 0
    steps = [stats.step for stats in recorder.of("step")]

    wandb.teardown()  # wandb-core closes the run file
    (path,) = run_files(wandb_dir)
    wandb_run = WandbRun.read(path)
    wandb_norms = {row["gradtrack/step"]: row["grad/total_norm"] for row in wandb_run.rows_with("gradtrack/step")}

    client = mlflow.MlflowClient(tracking_uri=tracking_uri)
    experiment = client.get_experiment_by_name("both")
    (mlflow_run,) = client.search_runs([experiment.experiment_id])
    history = client.get_metric_history(mlflow_run.info.run_id, "grad/total_norm")
    mlflow_norms = {metric.step: metric.value for metric in history}

    assert sorted(wandb_norms) == sorted(mlflow_norms) == steps
    for step in steps:
        w, m = wandb_norms[step], mlflow_norms[step]
        assert (math.isnan(w) and math.isnan(m)) or w == pytest.approx(m, rel=1e-6), step
    assert mlflow_run.data.tags["diverged"] == "true" and "diverged" in wandb_run.tags
    assert mlflow_run.data.tags["gradtrack.diverged_step"] == str(summary.diverged_step)
    assert wandb_run.summary["gradtrack"]["diverged_step"] == summary.diverged_step
    assert mlflow_run.info.status == "FINISHED" and wandb_run.exit_code == 0


def test_amp_overflow_steps_reach_both_backends_without_norms(wandb_dir: Path, tmp_path: Path) -> None:
    tracking_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    options = {
        # a new sqlite store migrates first: on a loaded machine that alone can pass the default exit_timeout (30 s)
        "mlflow": {"tracking_uri": tracking_uri, "experiment_name": "amp", "spool_dir": str(tmp_path / "spool"),
                   "exit_timeout": 120.0},
        "wandb": {"project": "amp", "dir": str(wandb_dir)},
    }
    model = VanillaRNN(radius=0.9)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)  # takes the scale itself
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    generator = torch.Generator().manual_seed(1)
    x, y = torch.randn(8, 10, 4, generator=generator), torch.randn(8, generator=generator)
    with GradTracker(model, backend=["mlflow", "wandb"], backend_options=options, close_timeout=120.0) as tracker:
        for step in range(4):
            optimizer.zero_grad()
            loss = nn.functional.mse_loss(model(x), y)
            scaler.scale(loss).backward()
            if step == 1:
                model.W_h.weight.grad[0, 0] = math.inf  # type: ignore[index]
            tracker.observe(loss=loss)
            scaler.step(optimizer)
            scaler.update()
    assert tracker.summary().amp_overflow_steps == 1

    client = mlflow.MlflowClient(tracking_uri=tracking_uri)
    (run,) = client.search_runs([client.get_experiment_by_name("amp").experiment_id])
    overflow = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "grad/amp_overflow")}
    norms = {m.step for m in client.get_metric_history(run.info.run_id, "grad/total_norm")}
    assert overflow == {0: 0.0, 1: 1.0, 2: 0.0, 3: 0.0} and norms == {0, 2, 3}
    assert run.data.metrics["gradtrack.summary.amp_overflow_steps"] == 1
    assert run.data.tags["diverged"] == "false" and run.data.tags["gradtrack.explosions"] == "0"

    wandb.teardown()
    (path,) = run_files(wandb_dir)
    rows = {row["gradtrack/step"]: row for row in WandbRun.read(path).rows_with("gradtrack/step")}
    assert [rows[step]["grad/amp_overflow"] for step in range(4)] == [0, 1, 0, 0]
    assert "grad/total_norm" not in rows[1] and "grad/total_norm" in rows[2]

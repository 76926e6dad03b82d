"""The reporter process: named backends run there, complete and in order, and it outlives its trainer (issue 9)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import types
import uuid
from pathlib import Path

import pytest
import torch
from torch.optim.optimizer import _global_optimizer_pre_hooks

import gradtrack.handover.channel
from gradtrack import GradTracker
from gradtrack.delivery.reporter import ReporterStartError
from gradtrack_testing import probe_plugin
from gradtrack_testing.models import VanillaRNN, mlp, rnn_batch, train_steps
from gradtrack_testing.recording import RecordingBackend

HERE = Path(__file__).parent


def _explode_and_diverge(backend: object, steps: int = 16, **options: object) -> GradTracker:
    model = VanillaRNN(radius=3.0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    with GradTracker(model, backend=backend, clip=None, layer_every=3, **options) as tracker:  # type: ignore[arg-type]
        train_steps(tracker, model, optimizer, *rnn_batch(20), steps)
    return tracker


def test_records_arrive_complete_and_in_order(probe: Path, recorder: RecordingBackend) -> None:
    tracker = _explode_and_diverge(["probe", recorder], backend_options={"probe": {"path": str(probe)}})
    assert tracker.diverged and tracker.summary().explosions > 0  # the scenario really happened
    delivered = probe_plugin.read(probe)
    assert {line["pid"] for line in delivered} != {os.getpid()} and not any(line["torch"] for line in delivered)
    local = [(hook, getattr(value, "step", None)) for hook, value in recorder.calls]
    remote = [(line["hook"], line.get("step")) for line in delivered]
    assert remote == local  # the same hooks in the same order as a backend in this process got them
    steps = [line for line in delivered if line["hook"] == "step"]
    for line, stats in zip(steps, recorder.of("step"), strict=True):
        assert line["total_norm"] == pytest.approx(stats.total_norm, nan_ok=True)
        assert line["loss"] == pytest.approx(stats.loss, nan_ok=True)
        assert line["layer_p95"] == pytest.approx(stats.layer_p95, nan_ok=True)
        assert line["layer_norms"] == (
            pytest.approx(dict(stats.layer_norms), nan_ok=True) if stats.layer_norms is not None else None
        )
    assert delivered[-1]["summary"] == tracker.summary().to_dict() | {"clip_rate": tracker.summary().clip_rate}


def test_flush_waits_for_the_reporter_and_close_timeout_bounds_the_exit(probe: Path) -> None:
    model = mlp()
    options = {"probe": {"path": str(probe), "delay_s": 0.05}}
    with (
        pytest.warns(RuntimeWarning, match=r"\['probe'\] did not finish within close_timeout=0.3s"),
        GradTracker(model, backend="probe", backend_options=options, close_timeout=0.3) as tracker,
    ):
        for _ in range(4):
            model(torch.randn(2, 8)).sum().backward()
            tracker.step()
        assert tracker.flush(timeout=5.0)  # 4 x 50 ms: done, and the flush hook ran after the steps
        assert [line["hook"] for line in probe_plugin.read(probe)] == ["run_start", *["step"] * 4, "flush"]
        for _ in range(30):
            model(torch.randn(2, 8)).sum().backward()
            tracker.step()
        assert not tracker.flush(timeout=0.2)  # 1.5 s of work left: not done
        started = time.monotonic()
    assert time.monotonic() - started < 2.0
    deadline = time.monotonic() + 20  # the reporter goes on alone and finishes the run
    while time.monotonic() < deadline and "run_end" not in [line["hook"] for line in probe_plugin.read(probe)]:
        time.sleep(0.1)
    assert [line["hook"] for line in probe_plugin.read(probe)].count("step") == 34


def test_backend_warnings_are_raised_again_in_the_training_process(probe: Path) -> None:
    model = mlp()
    options = {"probe": {"path": str(probe), "fail_in": "step"}}
    with (
        pytest.warns(RuntimeWarning, match=r"'probe' failed in gradtrack_step: OSError\('probe fails in step'\)"),
        GradTracker(model, backend="probe", backend_options=options) as tracker,
    ):
        for _ in range(3):
            model(torch.randn(2, 8)).sum().backward()
            tracker.step()
    assert [line["hook"] for line in probe_plugin.read(probe)] == ["run_start", "run_end"]


def test_a_reporter_that_dies_costs_training_nothing_but_a_warning(probe: Path) -> None:
    model = mlp()
    options = {"probe": {"path": str(probe), "crash_at_step": 3}}
    with (
        pytest.warns(RuntimeWarning, match="reporter process ended unexpectedly"),
        GradTracker(model, backend="probe", backend_options=options) as tracker,
    ):
        for _ in range(40):
            model(torch.randn(2, 8)).sum().backward()
            tracker.step()
            time.sleep(0.01)
    assert tracker.steps == 40
    assert tracker.summary().dropped_records > 0


def test_a_reporter_that_cannot_start_fails_on_entry_and_leaves_no_hook(probe: Path) -> None:
    model = mlp()
    hooks = len(_global_optimizer_pre_hooks)
    options = {"probe": {"path": str(probe)}}
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sys, "executable", "/nonexistent/python")
        with pytest.raises(ReporterStartError, match="could not start its reporter process"):
            GradTracker(model, backend="probe", backend_options=options).__enter__()
    with pytest.MonkeyPatch.context() as patch:  # a backend class that exists only in this process
        ghost = types.ModuleType("gradtrack_ghost")
        ghost.Probe = type("Probe", (probe_plugin.Probe,), {"__module__": "gradtrack_ghost"})  # type: ignore[attr-defined]
        patch.setitem(sys.modules, "gradtrack_ghost", ghost)
        patch.setattr(probe_plugin, "Probe", ghost.Probe)  # type: ignore[attr-defined]
        with pytest.raises(ReporterStartError, match="could not create backend 'probe'.*gradtrack_ghost"):
            GradTracker(model, backend="probe", backend_options=options).__enter__()
    assert len(_global_optimizer_pre_hooks) == hooks
    with GradTracker(model) as tracker:  # the model is free to be tracked again
        model(torch.randn(2, 8)).sum().backward()
        tracker.step()


def test_backends_passed_as_objects_stay_in_this_process(recorder: RecordingBackend) -> None:
    model = mlp()
    with GradTracker(model, backend=recorder) as tracker:
        assert tracker._pipeline.outbox.reporter is None  # private: no process was started for it
    assert recorder.of("run_end")


# -- the run outlives its trainer ---------------------------------------------------------------------


def _train_until_killed(backend: str, target: str, name: str, signum: int, tmp_path: Path,
                        **popen: object) -> tuple[int, subprocess.Popen[str]]:  # fmt: skip
    """Start trainer_script.py, let it finish 40 steps, send ``signum``; the steps it finished."""
    progress = tmp_path / "progress.txt"
    trainer = subprocess.Popen([sys.executable, str(HERE / "trainer_script.py"), backend, target, name, str(progress)],
                               cwd=tmp_path, text=True, **popen)  # type: ignore[call-overload]  # fmt: skip
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and len(_lines(progress)) < 40:
        time.sleep(0.05)
    trainer.send_signal(signum)
    trainer.wait(30)
    finished = int(_lines(progress)[-1])
    assert finished >= 40
    return finished, trainer


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_a_killed_trainer_leaves_a_killed_mlflow_run_with_every_step_it_reported(
    signum: int, server: object, tmp_path: Path
) -> None:
    from mlflow.tracking import MlflowClient

    uri = server.uri  # type: ignore[attr-defined]
    experiment = f"killed-{uuid.uuid4().hex[:8]}"
    finished, _ = _train_until_killed("mlflow", uri, experiment, signum, tmp_path)
    client = MlflowClient(uri)
    run = None
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        found = client.get_experiment_by_name(experiment)
        runs = client.search_runs([found.experiment_id]) if found else []
        if runs and runs[0].info.status != "RUNNING":
            run = runs[0]
            break
        time.sleep(0.25)
    assert run is not None, "the run was never ended"
    assert run.info.status == "KILLED"
    steps = {m.step for m in client.get_metric_history(run.info.run_id, "grad/total_norm")}
    assert set(range(finished)) <= steps  # every step handed over before the signal
    assert run.data.tags["diverged"] == "false"
    assert run.data.metrics["gradtrack.summary.steps"] >= finished
    summary = client.download_artifacts(run.info.run_id, "gradtrack/summary.json", str(tmp_path))
    assert '"steps"' in Path(summary).read_text()


@pytest.mark.slow
def test_a_killed_trainer_leaves_a_killed_wandb_run_and_a_console_line(wandb_dir: Path, tmp_path: Path) -> None:
    from gradtrack_testing.wandb_files import WandbRun, run_files

    finished, _ = _train_until_killed("wandb", str(wandb_dir), "killed", signal.SIGKILL, tmp_path)
    deadline = time.monotonic() + 60
    run = None
    while time.monotonic() < deadline and run is None:
        files = run_files(wandb_dir)
        if files and (candidate := WandbRun.read(files[0])).exit_code is not None:
            run = candidate
        time.sleep(0.25)
    assert run is not None, "the W&B run was never finished"
    assert run.exit_code == 255 and run.summary["gradtrack"]["status"] == "killed"
    assert set(range(finished)) <= {row["gradtrack/step"] for row in run.rows_with("gradtrack/step")}

    (tmp_path / "console").mkdir()
    finished, trainer = _train_until_killed("console", "-", "-", signal.SIGKILL, tmp_path / "console",
                                            stdout=subprocess.PIPE)  # fmt: skip
    out, _ = trainer.communicate(timeout=30)  # the reporter shares the trainer's stdout and closes it last
    last = finished - 1  # the index of the last step it finished: the console prints every 10th
    assert "[gradtrack] run killed: " in out and f"Step {last - last % 10:4d}" in out


def _lines(path: Path) -> list[str]:
    try:
        return [line for line in path.read_text().splitlines() if line.strip()]
    except FileNotFoundError:
        return []


def test_a_reader_whose_bytes_another_thread_took_is_not_left_blocked(
    probe: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two threads read the reporter's answers (the pump thread, and a flush waiting for its own). One can take
    the bytes the other's select had seen; the other's read must then come back empty, not block for good (a
    benchmark's flush hung on it once)."""
    model = mlp()
    with GradTracker(model, backend="probe", backend_options={"probe": {"path": str(probe)}}) as tracker:
        reporter = tracker._pipeline.outbox.reporter  # private: the answers' pipe
        assert reporter is not None and not os.get_blocking(reporter._acks.fd)
        with monkeypatch.context() as patch:
            patch.setattr(gradtrack.handover.channel.select, "select", lambda r, w, x, t=None: (list(r), [], []))
            started = time.monotonic()
            assert reporter._acks.read(0.1) == []  # "ready", but empty: nothing to wait for
            assert time.monotonic() - started < 1.0
        assert tracker.flush(timeout=10.0)

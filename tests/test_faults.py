"""Faults between gradtrack and a real MLflow server: nothing lost, nothing doubled, exit bounded (issue 10).

Every case trains the same 40 steps (an explosion forced at step 15, the loss observed) through the
reporter process, with a fault injected between steps 10 and 25, and then checks on the server: one
run (never a second), every step's ``grad/total_norm`` exactly once, the explosion, the final tags and
summary, the status, and the events artifact. Step-time ratios under each fault come from
``benchmarks/faults.py``, not from these tests.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from gradtrack import GradTracker
from gradtrack_testing import probe_plugin
from gradtrack_testing.fault_server import FaultServer
from gradtrack_testing.fault_training import EXPLODES_AT, FAULT, STEPS, mlflow_options, train
from gradtrack_testing.mlflow_server import MlflowServer
from gradtrack_testing.models import mlp

mlflow = pytest.importorskip("mlflow")
from gradtrack_mlflow.backend import SpoolLeftWarning  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402


@pytest.fixture
def proxy(server: MlflowServer) -> Iterator[FaultServer]:
    running = FaultServer(server.uri)
    yield running
    running.close()


def _check_server(uri: str, options: dict[str, Any], tmp_path: Path, status: str = "FINISHED") -> None:
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(options["experiment_name"])
    assert experiment is not None
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1, f"{len(runs)} runs: a retried create_run made another"  # never a second run
    run = runs[0]
    history = client.get_metric_history(run.info.run_id, "grad/total_norm")
    assert sorted(m.step for m in history) == list(range(STEPS))  # every step, exactly once
    explosions = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "grad/explosion")}
    assert [step for step, value in explosions.items() if value == 1.0] == [EXPLODES_AT]
    assert len(client.get_metric_history(run.info.run_id, "loss")) == STEPS
    tags = run.data.tags
    assert tags["diverged"] == "false" and tags["gradtrack.explosions"] == "1"
    assert tags["gradtrack.first_explosion_step"] == str(EXPLODES_AT)
    assert run.data.metrics["gradtrack.summary.steps"] == STEPS
    assert run.info.status == status
    events = Path(client.download_artifacts(run.info.run_id, "gradtrack/events.jsonl", str(tmp_path / "dl")))
    assert [json.loads(line)["step"] for line in events.read_text().splitlines()] == [EXPLODES_AT]


def _during_fault(start: Callable[[], None], stop: Callable[[], None]) -> Callable[[int], None]:
    def fault(step: int) -> None:
        if step == FAULT.start:
            start()
        if step == FAULT.stop:
            stop()

    return fault


# -- the server misbehaves for a while, then recovers: everything arrives, live --------------------------


@pytest.mark.slow
@pytest.mark.parametrize("status", [500, 503])
def test_http_errors_for_a_while(status: int, proxy: FaultServer, tmp_path: Path) -> None:
    def start() -> None:
        proxy.status, proxy.mode = status, "status"

    options = mlflow_options(proxy.uri, tmp_path)
    _, exit_s = train(options, _during_fault(start, lambda: setattr(proxy, "mode", "pass")))
    assert exit_s < 10.0
    _check_server(proxy.uri, options, tmp_path)


@pytest.mark.slow
def test_a_silent_server_for_a_while(proxy: FaultServer, tmp_path: Path) -> None:
    options = mlflow_options(proxy.uri, tmp_path)
    fault = _during_fault(lambda: setattr(proxy, "mode", "silent"), lambda: setattr(proxy, "mode", "pass"))
    _, exit_s = train(options, fault)
    assert exit_s < 10.0
    _check_server(proxy.uri, options, tmp_path)


@pytest.mark.slow
def test_every_request_500_ms_late(proxy: FaultServer, tmp_path: Path) -> None:
    proxy.mode, proxy.delay_s = "delay", 0.5
    options = mlflow_options(proxy.uri, tmp_path, exit_timeout=30.0)
    _, exit_s = train(options, close_timeout=40.0)
    assert exit_s < 40.0
    proxy.mode = "pass"
    _check_server(proxy.uri, options, tmp_path)


@pytest.mark.slow
def test_the_server_killed_mid_run_and_restarted(server: MlflowServer, tmp_path: Path) -> None:
    options = mlflow_options(server.uri, tmp_path, exit_timeout=60.0)
    _, exit_s = train(options, _during_fault(server.stop, server.start), close_timeout=60.0)
    assert exit_s < 60.0
    _check_server(server.uri, options, tmp_path)


# -- answers lost after the server acted: retries never duplicate ---------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("endpoint", ["runs/create", "runs/log-batch"])
def test_a_lost_answer_is_retried_without_duplicates(endpoint: str, proxy: FaultServer, tmp_path: Path) -> None:
    proxy.drop_response(endpoint, times=2)
    options = mlflow_options(proxy.uri, tmp_path)
    train(options)
    if endpoint == "runs/create":  # the retry looked for the run its lost answer had made, and found it
        assert proxy.requests["/api/2.0/mlflow/runs/search"] >= 1
    else:  # the server took the same batch more than once
        assert proxy.requests["/api/2.0/mlflow/runs/log-batch"] >= 3
    _check_server(proxy.uri, options, tmp_path)


# -- the server is gone at the end: the spool, then a replay, deliver everything once -------------------


@pytest.mark.slow
def test_a_server_gone_at_the_end_is_caught_up_by_replay_without_duplicates(proxy: FaultServer, tmp_path: Path) -> None:
    options = mlflow_options(proxy.uri, tmp_path, exit_timeout=2.0)
    with pytest.warns(SpoolLeftWarning, match="Replay it with"):
        _, exit_s = train(options, lambda step: setattr(proxy, "mode", "silent") if step == 30 else None)
    assert exit_s < 10.0
    proxy.mode = "pass"
    (spool,) = (tmp_path / "spool").glob("*/spool.jsonl")
    for _ in range(2):  # a second replay of the same spool sends nothing twice
        replayed = subprocess.run([sys.executable, "-m", "gradtrack_mlflow", "replay", str(spool)],
                                  capture_output=True, text=True, timeout=120)  # fmt: skip
        assert replayed.returncode in (0, 2), replayed.stderr  # 2: nothing left to replay
    _check_server(proxy.uri, options, tmp_path)


# -- trouble on this machine --------------------------------------------------------------------------


@pytest.mark.slow
def test_an_unwritable_spool_directory_costs_a_warning_not_the_run(proxy: FaultServer, tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("a file where the spool directory should be")
    options = mlflow_options(proxy.uri, tmp_path, spool_dir=str(blocker / "spool"))
    fault = _during_fault(lambda: setattr(proxy, "mode", "status"), lambda: setattr(proxy, "mode", "pass"))
    with pytest.warns(RuntimeWarning, match="cannot write its MLflow spool") as warned:
        tracker, _ = train(options, fault)
    assert tracker.steps == STEPS
    assert any("cannot write events.jsonl" in str(w.message) for w in warned)
    client = MlflowClient(proxy.uri)
    (run,) = client.search_runs([client.get_experiment_by_name(options["experiment_name"]).experiment_id])
    history = client.get_metric_history(run.info.run_id, "grad/total_norm")
    assert sorted(m.step for m in history) == list(range(STEPS))  # held in memory while the server was down
    assert run.info.status == "FINISHED" and run.data.tags["gradtrack.explosions"] == "1"


@pytest.mark.slow
def test_a_full_disk_costs_a_warning_not_the_run(server: MlflowServer, tmp_path: Path) -> None:
    """The trainer (and its reporter) may write 8 KiB per file: the spool hits the limit, like a full disk."""
    code = (
        "import sys; from pathlib import Path; from gradtrack_testing.fault_training import mlflow_options, train;"
        "train(mlflow_options(sys.argv[1], Path(sys.argv[2]), exit_timeout=5.0));"
        "print('trained')"
    )

    def small_disk() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (8 * 1024, 8 * 1024))

    proxy = FaultServer(server.uri)
    proxy.mode = "status"  # the server fails throughout: everything goes towards the spool
    try:
        done = subprocess.run([sys.executable, "-c", code, proxy.uri, str(tmp_path)], cwd=tmp_path,
                              capture_output=True, text=True, timeout=240, preexec_fn=small_disk)  # fmt: skip
    finally:
        proxy.close()
    assert done.returncode == 0, done.stderr[-3000:]
    assert "trained" in done.stdout  # all 40 steps, the with block left normally
    assert "cannot write its MLflow spool" in done.stderr and "File too large" in done.stderr


# -- other backends misbehave --------------------------------------------------------------------------


@pytest.mark.slow
def test_a_plugin_raising_in_every_hook_spares_training_and_mlflow(
    probe: Path, server: MlflowServer, tmp_path: Path
) -> None:
    options = mlflow_options(server.uri, tmp_path)
    backend_options = {"mlflow": options, "probe": {"path": str(probe), "fail_in": "*"}}
    with pytest.warns(RuntimeWarning, match="'probe' failed in gradtrack_") as warned:
        model = mlp(seed=4)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
        with GradTracker(model, backend=["mlflow", "probe"], backend_options=backend_options) as tracker:
            for _ in range(STEPS):
                model(torch.randn(4, 8)).sum().backward()
                optimizer.step()
    assert tracker.steps == STEPS and not probe_plugin.read(probe)
    assert len({str(w.message).split(" failed in ")[1].split(":")[0] for w in warned}) >= 3  # once per hook
    client = MlflowClient(server.uri)
    (run,) = client.search_runs([client.get_experiment_by_name(options["experiment_name"]).experiment_id])
    assert len(client.get_metric_history(run.info.run_id, "grad/total_norm")) == STEPS


def test_unexpected_errors_are_retried_a_few_times_then_set_aside(tmp_path: Path) -> None:
    """A local store, and an operation MLflow's own client cannot make sense of (a string metric value)."""
    from gradtrack_mlflow.sender import UNEXPECTED_RETRIES, Sender
    from gradtrack_mlflow.spool import Spool
    from gradtrack_mlflow.transport import Sink

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_id = MlflowClient(uri).create_run("0").info.run_id
    sender = Sender(Sink(uri, 5.0), Spool(tmp_path / "spool"), "key", run_id, flush_every_s=0.0)
    with pytest.warns(RuntimeWarning, match="unexpected error sending a log_batch") as warned:
        sender.put({"op": "fragment", "metrics": [["bad", "not a number", 0, 0]]}, urgent=True)
        deadline = time.monotonic() + 60
        while sender.rejected == 0 and time.monotonic() < deadline:
            sender.flush(1.0)
            time.sleep(0.1)
        sender.put({"op": "fragment", "metrics": [["good", 1.0, 0, 0]]}, urgent=True)
        assert sender.close(30.0)
    assert sender.rejected == 1 and UNEXPECTED_RETRIES >= 1
    rejected = [json.loads(line) for line in (tmp_path / "spool" / "rejected.jsonl").read_text().splitlines()]
    assert rejected[0]["op"]["metrics"][0][0] == "bad" and "ValueError" in rejected[0]["error"]
    assert MlflowClient(uri).get_run(run_id).data.metrics == {"good": 1.0}
    assert sum("unexpected error" in str(w.message) for w in warned) == 1


def test_infinite_timeouts_wait_as_long_as_it_takes(server: MlflowServer, tmp_path: Path) -> None:
    options = mlflow_options(server.uri, tmp_path, exit_timeout=float("inf"))
    with contextlib.ExitStack():
        train(options, close_timeout=float("inf"))
    _check_server(server.uri, options, tmp_path)


def test_spool_files_are_owner_only_json_and_replay_refuses_anything_else(tmp_path: Path) -> None:
    from gradtrack_mlflow.spool import Spool

    spool = Spool(tmp_path / "spool" / "run")
    spool.append([{"op": "terminate", "run_key": "k", "run_id": "r", "tracking_uri": "http://127.0.0.1:1",
                   "status": "FINISHED", "end_time": 0}])  # fmt: skip
    spool.set_offset(1)
    spool.reject({"op": "x"}, ValueError("no"))
    assert (spool.directory.stat().st_mode & 0o777) == 0o700
    for path in (spool.path, spool.rejected_path, spool.directory / "spool.offset"):
        assert (path.stat().st_mode & 0o777) == 0o600, path
    lines = [json.loads(line) for line in spool.path.read_text().splitlines()]  # JSON, line by line
    assert lines[0] == {"gradtrack_spool": 1}
    imposter = tmp_path / "imposter.jsonl"
    imposter.write_text('{"op": "terminate", "run_id": "r", "status": "FINISHED", "end_time": 0}\n')
    for bad in (imposter, tmp_path / "binary.jsonl"):
        if bad.name == "binary.jsonl":
            bad.write_bytes(os.urandom(64))
        replayed = subprocess.run([sys.executable, "-m", "gradtrack_mlflow", "replay", str(bad)],
                                  capture_output=True, text=True, timeout=60)  # fmt: skip
        assert replayed.returncode == 2 and "is not a gradtrack spool" in replayed.stderr

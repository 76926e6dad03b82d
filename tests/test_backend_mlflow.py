"""The MLflow backend against a real ``mlflow server`` on loopback and the local default store."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from gradtrack import GradTracker
from gradtrack_testing.fault_server import FaultServer
from gradtrack_testing.mlflow_server import MlflowServer
from gradtrack_testing.models import mlp, regression_batches

mlflow = pytest.importorskip("mlflow")
from gradtrack_mlflow.backend import MLflowBackend, SpoolLeftWarning  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402

VALID_KEY = r"^[/\w.\- :]*$"


@pytest.fixture(scope="session")
def local_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One working directory for every default-store test: creating the sqlite schema costs seconds."""
    return tmp_path_factory.mktemp("mlflow-local")


def train(tracker_kwargs: dict[str, Any], steps: int = 12, model: nn.Module | None = None) -> GradTracker:
    model = model or mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    # the exit waits for the reporter (niced) to end the run: generous, so a busy machine cannot fail the test
    with GradTracker(model, **{"close_timeout": 120.0, **tracker_kwargs}) as tracker:
        for x, y in regression_batches(steps):
            optimizer.zero_grad()
            loss = nn.functional.mse_loss(model(x).squeeze(-1), y)
            loss.backward()
            tracker.observe(loss=loss)
            optimizer.step()
    return tracker


def only_run(uri: str, experiment: str) -> Any:
    client = MlflowClient(uri)
    found = client.get_experiment_by_name(experiment)
    assert found is not None, f"experiment {experiment} was never created"
    runs = client.search_runs([found.experiment_id])
    assert len(runs) == 1
    return runs[0]


def options(uri: str, tmp_path: Path, **extra: Any) -> dict[str, Any]:
    name = f"exp-{uuid.uuid4().hex[:8]}"
    return {"tracking_uri": uri, "experiment_name": name, "spool_dir": str(tmp_path / "spool"), **extra}


def steps_of(uri: str, run_id: str, key: str) -> list[int]:
    return sorted(m.step for m in MlflowClient(uri).get_metric_history(run_id, key))


def test_options_are_validated_on_the_training_thread() -> None:
    with pytest.raises(ValueError, match="'request_timeout'"):
        MLflowBackend(request_timeout=0)
    with pytest.raises(ValueError, match="'tags'"):
        MLflowBackend(tags={"a": 1})  # type: ignore[dict-item]
    with pytest.raises(TypeError, match="unexpected keyword"):
        GradTracker(mlp(), backend="mlflow", backend_options={"mlflow": {"trackin_uri": "x"}}).__enter__()


def test_end_to_end_metrics_params_tags_artifacts(server: MlflowServer, tmp_path: Path) -> None:
    opts = options(server.uri, tmp_path, run_name="e2e", tags={"team": "grad"})
    tracker = train({"backend": "mlflow", "backend_options": {"mlflow": opts}, "layer_every": 1,
                     "explosion_threshold": 0.5})  # fmt: skip
    run = only_run(server.uri, opts["experiment_name"])
    run_id = run.info.run_id
    assert run.info.status == "FINISHED" and run.info.run_name == "e2e"
    for key in ("grad/total_norm", "grad/clip_coef", "grad/clipped", "grad/explosion", "loss", "grad/layer_p95"):
        assert steps_of(server.uri, run_id, key) == list(range(12)), key
    assert steps_of(server.uri, run_id, "grad_norm/0.weight") == list(range(12))
    summary = tracker.summary()
    assert run.data.tags["diverged"] == "false" and run.data.tags["team"] == "grad"
    assert run.data.tags["gradtrack.explosions"] == str(summary.explosions)
    assert run.data.params["gradtrack.clip"] == "norm" and run.data.params["gradtrack.model_class"] == "Sequential"
    assert run.data.metrics["gradtrack.summary.steps"] == 12
    artifacts = Path(MlflowClient(server.uri).download_artifacts(run_id, "gradtrack", str(tmp_path / "dl")))
    assert json.loads((artifacts / "summary.json").read_text()) == json.loads(json.dumps(summary.to_dict()))
    events = (artifacts / "events.jsonl").read_text().splitlines()
    assert len(events) == summary.explosions > 0
    assert not list((tmp_path / "spool").glob("*/spool.jsonl"))


def test_diverged_tag_flips_while_the_run_is_running(
    server: MlflowServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.uri)  # for mlflow.search_runs, as a user would
    opts = options(server.uri, tmp_path)
    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    with GradTracker(model, backend="mlflow", backend_options={"mlflow": opts}, close_timeout=120.0) as tracker:
        for index, (x, y) in enumerate(regression_batches(6)):
            optimizer.zero_grad()
            nn.functional.mse_loss(model(x).squeeze(-1), y).backward()
            tracker.observe(loss=float("nan") if index == 3 else 1.0)
            optimizer.step()
        assert tracker.flush()
        live = mlflow.search_runs(
            experiment_names=[opts["experiment_name"]],
            filter_string="tags.diverged = 'true'",
            output_format="list",
        )
        assert len(live) == 1 and live[0].info.status == "RUNNING"
        assert live[0].data.tags["gradtrack.diverged_step"] == "3"
        assert "loss is nan" in live[0].data.tags["gradtrack.diverged_reason"]
    assert only_run(server.uri, opts["experiment_name"]).data.metrics["grad/diverged"] == 1.0


def test_active_user_run_is_reused_and_left_open(
    server: MlflowServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.uri)
    experiment = mlflow.set_experiment(f"user-{uuid.uuid4().hex[:8]}")
    with mlflow.start_run() as user_run:
        train({"backend": "mlflow", "backend_options": {"mlflow": {"spool_dir": str(tmp_path)}}}, steps=5)
        assert mlflow.active_run() is not None
    runs = MlflowClient(server.uri).search_runs([experiment.experiment_id])
    assert [r.info.run_id for r in runs] == [user_run.info.run_id]
    assert steps_of(server.uri, user_run.info.run_id, "grad/total_norm") == list(range(5))
    # "loss" stays the user's key on the user's step axis: gradtrack's loss goes beside it
    assert steps_of(server.uri, user_run.info.run_id, "gradtrack/loss") == list(range(5))
    assert "loss" not in MlflowClient(server.uri).get_run(user_run.info.run_id).data.metrics


@pytest.mark.parametrize(("error", "status"), [(ValueError, "FAILED"), (KeyboardInterrupt, "KILLED")])
def test_run_status_follows_the_training_body(
    server: MlflowServer, tmp_path: Path, error: type[BaseException], status: str
) -> None:
    opts = options(server.uri, tmp_path)
    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    with pytest.raises(error), GradTracker(model, backend="mlflow", backend_options={"mlflow": opts},
                                           close_timeout=120.0):  # fmt: skip
        for x, y in regression_batches(3):
            optimizer.zero_grad()
            nn.functional.mse_loss(model(x).squeeze(-1), y).backward()
            optimizer.step()
        raise error("stop")
    assert only_run(server.uri, opts["experiment_name"]).info.status == status


class OddNames(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weights = nn.ParameterDict({k: nn.Parameter(torch.randn(8)) for k in ("a[0]", "x,y", "a//b", "a_0_")})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return sum((x * w).sum(-1, keepdim=True) for w in self.weights.values())  # type: ignore[return-value]


def test_names_mlflow_rejects_are_logged_valid_and_distinct(server: MlflowServer, tmp_path: Path) -> None:
    opts = options(server.uri, tmp_path)
    train({"backend": "mlflow", "backend_options": {"mlflow": opts}, "layer_every": 1}, steps=3, model=OddNames())
    run = only_run(server.uri, opts["experiment_name"])
    keys = [k for k in run.data.metrics if k.startswith("grad_norm/")]
    assert len(keys) == 4
    assert all(re.match(VALID_KEY, k) and "//" not in k for k in keys)


def test_default_local_store_in_the_working_directory(
    local_store: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(local_store)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    experiment = f"local-{uuid.uuid4().hex[:8]}"
    train({"backend": MLflowBackend(experiment_name=experiment, spool_dir=tmp_path)}, steps=4)
    uri = f"sqlite:///{local_store / 'mlflow.db'}"
    run = only_run(uri, experiment)
    assert run.info.status == "FINISHED" and run.data.tags["diverged"] == "false"
    assert steps_of(uri, run.info.run_id, "grad/total_norm") == [0, 1, 2, 3]


@pytest.mark.slow
def test_outage_mid_run_loses_nothing(server: MlflowServer, tmp_path: Path) -> None:
    opts = options(server.uri, tmp_path, flush_every_s=0.2, request_timeout=1.0, exit_timeout=60.0)
    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    with GradTracker(model, backend="mlflow", backend_options={"mlflow": opts}, close_timeout=120.0) as tracker:
        for index, (x, y) in enumerate(regression_batches(30)):
            if index == 10:
                tracker.flush()
                time.sleep(0.5)  # let the sender deliver a batch live before the outage
                server.stop()
            if index == 20:
                server.start()
            optimizer.zero_grad()
            nn.functional.mse_loss(model(x).squeeze(-1), y).backward()
            optimizer.step()
    run = only_run(server.uri, opts["experiment_name"])
    assert steps_of(server.uri, run.info.run_id, "grad/total_norm") == list(range(30))
    assert run.info.status == "FINISHED"


@pytest.mark.slow
def test_silent_server_never_blocks_and_leaves_a_replayable_spool(server: MlflowServer, tmp_path: Path) -> None:
    silent = FaultServer()  # no upstream: accepts, never answers
    opts = options(silent.uri, tmp_path, request_timeout=0.5, exit_timeout=2.0, flush_every_s=0.1)
    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    try:
        started = time.monotonic()
        with pytest.warns(SpoolLeftWarning, match="python.* -m gradtrack_mlflow replay"):
            tracker = GradTracker(model, backend="mlflow", backend_options={"mlflow": opts})
            with tracker:
                for x, y in regression_batches(40):
                    optimizer.zero_grad()
                    nn.functional.mse_loss(model(x).squeeze(-1), y).backward()
                    optimizer.step()
                loop_seconds = time.monotonic() - started
                exit_started = time.monotonic()
        exit_seconds = time.monotonic() - exit_started
    finally:
        silent.close()
    assert loop_seconds < 5.0  # 40 tiny steps; blocking on the server would take 0.5 s per request
    assert exit_seconds < opts["exit_timeout"] + opts["request_timeout"] + 5.0  # a request under way is waited out
    (spool,) = (tmp_path / "spool").glob("*/spool.jsonl")
    replayed = subprocess.run(
        [sys.executable, "-m", "gradtrack_mlflow", "replay", str(spool), "--tracking-uri", server.uri],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert replayed.returncode == 0, replayed.stderr
    run = only_run(server.uri, opts["experiment_name"])
    assert steps_of(server.uri, run.info.run_id, "grad/total_norm") == list(range(40))
    assert run.info.status == "FINISHED" and run.data.tags["diverged"] == "false"
    assert tracker.summary().steps == 40


KIND = "mlflow.experimentKind"  # MLflow 3's UI opens an experiment on the page its kind says


@pytest.mark.parametrize("store", ["server", "local"])
def test_experiments_gradtrack_creates_open_on_their_runs_and_the_users_are_left_alone(
    store: str, server: MlflowServer, local_store: Path
) -> None:
    from gradtrack_mlflow.transport import Sink

    uri = server.uri if store == "server" else f"sqlite:///{local_store / 'mlflow.db'}"
    client = MlflowClient(uri)
    created, users = f"created-{uuid.uuid4().hex[:8]}", f"users-{uuid.uuid4().hex[:8]}"
    client.create_experiment(users, tags={"team": "grad"})
    sink = Sink(uri, 5.0)  # what the sender runs, live or replaying a spool (the demo's run goes through it all)
    for key, experiment in (("a", created), ("b", users)):
        sink.execute({"op": "create_run", "run_key": key, "experiment_name": experiment,
                      "start_time": int(time.time() * 1000), "tags": {}})  # fmt: skip
        assert only_run(uri, experiment).info.run_id == sink.run_ids[key]
    assert client.get_experiment_by_name(created).tags[KIND] == "custom_model_development"
    assert "mlflow.sharedViewState.gradtrack" in client.get_experiment_by_name(created).tags  # the saved view
    assert client.get_experiment_by_name(users).tags == {"team": "grad"}


def test_a_run_that_loses_the_race_to_create_its_experiment_still_starts(server: MlflowServer) -> None:
    from gradtrack_mlflow.transport import Sink

    class LosesTheRace(Sink):
        """Another process creates the experiment between our lookup and our create, as happens when
        several ranks or jobs start at once; the interleaving is forced, the server is real."""

        def _rest(self, method: str, endpoint: str, body: dict[str, Any] | None, api: bool = True) -> Any:
            if endpoint == "experiments/create" and body is not None:
                MlflowClient(server.uri).create_experiment(body["name"])
            return super()._rest(method, endpoint, body, api=api)

    experiment = f"race-{uuid.uuid4().hex[:8]}"
    sink = LosesTheRace(server.uri, 5.0)
    sink.execute({"op": "create_run", "run_key": "k", "experiment_name": experiment,
                  "start_time": int(time.time() * 1000), "tags": {}})  # fmt: skip
    found = MlflowClient(server.uri).get_experiment_by_name(experiment)
    assert found is not None and KIND not in found.tags  # the winner's experiment, not gradtrack's to mark
    assert [r.info.run_id for r in MlflowClient(server.uri).search_runs([found.experiment_id])] == [sink.run_ids["k"]]


def test_a_server_slower_than_training_is_caught_up_from_disk(
    server: MlflowServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from gradtrack_mlflow import sender

    monkeypatch.setattr(sender, "SLICE_S", 0.0)  # every cycle is "too slow" after one request: the disk path
    spooled: list[int] = []
    original = sender.Sender._to_spool

    def counting(self: Any, ops: list[dict[str, Any]]) -> None:
        spooled.append(len(ops))
        original(self, ops)

    monkeypatch.setattr(sender.Sender, "_to_spool", counting)
    opts = options(server.uri, tmp_path, flush_every_s=0.05)
    # 1,200 per-layer metrics a step: every step makes two log_batch requests, so every cycle spools one
    model = nn.Sequential(*[nn.Linear(2, 2) for _ in range(600)])
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    # passed as an object, the backend runs in this process, where the patched sender can count its spooling
    with GradTracker(model, backend=MLflowBackend(**opts), layer_every=1, close_timeout=120.0) as tracker:
        for _ in range(20):
            model(torch.randn(2, 2)).sum().backward()
            optimizer.step()
            time.sleep(0.02)
    assert sum(spooled) >= 10  # log_batch requests went through the spool ...
    run = only_run(server.uri, opts["experiment_name"])
    assert steps_of(server.uri, run.info.run_id, "grad/total_norm") == list(range(20))  # ... and all arrived
    assert steps_of(server.uri, run.info.run_id, "grad_norm/599.bias") == list(range(20))
    assert not list((tmp_path / "spool").glob("*/spool.jsonl")) and tracker.summary().dropped_records == 0


def test_routine_steps_reach_the_server_while_training_runs(server: MlflowServer, tmp_path: Path) -> None:
    opts = options(server.uri, tmp_path, flush_every_s=0.1)
    model = mlp()
    with GradTracker(model, backend="mlflow", backend_options={"mlflow": opts}) as tracker:
        tracker.flush()
        time.sleep(0.5)  # the sender has sent the run's start and is idle
        for _ in range(3):
            model(torch.randn(2, 8)).sum().backward()
            tracker.step()
        tracker.flush()
        deadline, seen = time.monotonic() + 10, []
        while time.monotonic() < deadline and seen != [0, 1, 2]:
            runs = MlflowClient(server.uri).search_experiments(filter_string=f"name = '{opts['experiment_name']}'")
            if runs:
                found = MlflowClient(server.uri).search_runs([runs[0].experiment_id])
                seen = steps_of(server.uri, found[0].info.run_id, "grad/total_norm") if found else []
            time.sleep(0.1)
        assert seen == [0, 1, 2]  # live, not only when the run ends


def test_coalesce_fills_batches_within_mlflows_limits_in_order() -> None:
    from gradtrack_mlflow.sender import MAX_ENTITIES, MAX_PARAMS_OR_TAGS, coalesce

    fragments: list[dict[str, Any]] = [
        {"op": "fragment", "metrics": [[f"m{i}", float(i), 0, i] for i in range(1500)], "tags": {"a": "1"}},
        {"op": "fragment", "params": {f"p{i}": str(i) for i in range(150)}},
        {"op": "log_artifact", "local_path": "x", "artifact_path": "gradtrack"},
        {"op": "fragment", "metrics": [["late", 1.0, 0, 0]] * 999},
    ]
    ops = coalesce(fragments, "key", None, "http://127.0.0.1")
    batches = [op for op in ops if op["op"] == "log_batch"]
    assert all(len(b["metrics"]) + len(b["params"]) + len(b["tags"]) <= MAX_ENTITIES for b in batches)
    assert all(len(b["params"]) <= MAX_PARAMS_OR_TAGS and len(b["tags"]) <= MAX_PARAMS_OR_TAGS for b in batches)
    artifact = [op["op"] for op in ops].index("log_artifact")
    before = [m for b in ops[:artifact] if b["op"] == "log_batch" for m in b["metrics"]]
    assert before == fragments[0]["metrics"]  # every metric once, in order, before the artifact
    assert sum(len(b["params"]) for b in ops[:artifact] if b["op"] == "log_batch") == 150
    assert [m for b in ops[artifact + 1 :] for m in b["metrics"]] == fragments[3]["metrics"]

"""Eight trainers at once against one MLflow server on PostgreSQL: every value arrives, once (issue 10).

The speed side of the same load (each trainer against no backend, metrics per second the server
absorbed, batching) is measured by ``benchmarks/load.py``; this test asserts only what must hold.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

mlflow = pytest.importorskip("mlflow")
from mlflow.tracking import MlflowClient  # noqa: E402

from gradtrack_testing.mlflow_server import MlflowServer  # noqa: E402
from gradtrack_testing.postgres import Postgres  # noqa: E402
from gradtrack_testing.skips import missing_system_dependency  # noqa: E402

HERE = Path(__file__).parent
TRAINERS, STEPS = 8, 150
LAYERS = 16  # tensors of load_trainer.py's model


@pytest.fixture(scope="module")
def postgres_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    try:
        import psycopg2  # noqa: F401
    except ImportError:
        missing_system_dependency("psycopg2-binary is not installed (pip install psycopg2-binary)")
    database, reason = Postgres.find(tmp_path_factory.mktemp("postgres"))
    if database is None:
        missing_system_dependency(reason)
    try:
        database.start()
    except (subprocess.CalledProcessError, OSError) as exc:
        detail = getattr(exc, "stderr", "") or str(exc)
        missing_system_dependency(f"PostgreSQL could not start here: {detail.strip()[-500:]}")
    server = MlflowServer(tmp_path_factory.mktemp("mlflow-postgres"), store=database.uri)
    try:
        server.start(timeout=180.0)
        yield server
    finally:
        server.stop()
        database.stop()


@pytest.mark.slow
def test_eight_trainers_deliver_every_value_to_a_postgres_backed_server(
    postgres_server: MlflowServer, tmp_path: Path
) -> None:
    experiment = "load"
    trainers = [
        subprocess.Popen(
            [
                sys.executable,
                str(HERE / "load_trainer.py"),
                postgres_server.uri,
                experiment,
                f"trainer-{index}",
                str(STEPS),
                str(tmp_path / f"trainer-{index}.json"),
            ],
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for index in range(TRAINERS)
    ]
    outputs = [trainer.communicate(timeout=400)[0] for trainer in trainers]
    for trainer, output in zip(trainers, outputs, strict=True):
        assert trainer.returncode == 0, output[-3000:]
    results = [json.loads((tmp_path / f"trainer-{index}.json").read_text()) for index in range(TRAINERS)]
    assert all(result["steps"] == STEPS and result["dropped"] == 0 for result in results)
    client = MlflowClient(postgres_server.uri)
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id], max_results=100)
    assert sorted(run.info.run_name for run in runs) == sorted(f"trainer-{index}" for index in range(TRAINERS))
    for run in runs:
        assert run.info.status == "FINISHED"
        keys = [key for key in run.data.metrics if key.startswith(("grad/", "grad_norm/", "weight_norm/", "loss"))]
        assert len([key for key in keys if key.startswith("grad_norm/")]) == LAYERS
        assert len([key for key in keys if key.startswith("weight_norm/")]) == LAYERS
        for key in keys:
            steps = [m.step for m in client.get_metric_history(run.info.run_id, key)]
            if key == "grad/overshoot":  # sampled (every 5 steps, every step near the edge), from step 1: once each
                assert steps and len(set(steps)) == len(steps) and set(steps) <= set(range(1, STEPS)), key
                continue
            assert sorted(steps) == list(range(STEPS)), (run.info.run_name, key)  # every value, exactly once

"""Eight trainers at once against one MLflow server on PostgreSQL, per-layer norms every step (issue 10).

Each round starts eight trainers (``tests/load_trainer.py``: 16 tensors, per-layer norms every step)
with no backend, then eight with the MLflow backend, through a counting proxy, to a server whose store
is a real PostgreSQL started here. Rounds alternate; the table compares each configuration's mean step
time, and reports how much the server absorbed: metric values delivered, over the time from the first
step to the last run marked finished, and per ``log-batch`` request.

The tracking server and PostgreSQL run at the lowest CPU priority, standing in for the separate
machine a shared server is: on this 2-core machine they would otherwise take their CPU from the
trainers, which is not gradtrack's cost. Nothing else is niced but what gradtrack itself nices (its
reporter processes).

    .venv/bin/python benchmarks/load.py               # ~5 minutes
    .venv/bin/python benchmarks/load.py --steps 300 --rounds 1
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

from gradtrack_testing.fault_server import FaultServer
from gradtrack_testing.mlflow_server import MlflowServer
from gradtrack_testing.postgres import Postgres

TESTS = Path(__file__).resolve().parent.parent / "tests"  # load_trainer.py, run as a script as the load test does

TRAINERS = 8


def nice_everything(names: tuple[str, ...], pids: list[int]) -> None:
    for process in psutil.process_iter(["name", "pid"]):
        if process.info["name"] in names or process.info["pid"] in pids:
            try:
                process.nice(19)
                for child in process.children(recursive=True):
                    child.nice(19)
            except psutil.Error:
                pass


def round_of(uri: str, experiment: str, steps: int, workdir: Path, tag: str) -> list[dict[str, float]]:
    started, began = time.time(), time.perf_counter()
    trainers = [
        subprocess.Popen(
            [
                sys.executable,
                str(TESTS / "load_trainer.py"),
                uri,
                experiment,
                f"{tag}-{i}",
                str(steps),
                str(workdir / f"{tag}-{i}.json"),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for i in range(TRAINERS)
    ]
    for trainer in trainers:
        trainer.wait(1800)
    results = [json.loads((workdir / f"{tag}-{i}.json").read_text()) for i in range(TRAINERS)]
    for result in results:
        result["started"], result["round_s"] = started, time.perf_counter() - began
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="gradtrack-load-"))
    database, reason = Postgres.find(workdir / "postgres")
    if database is None:
        raise SystemExit(f"cannot run: {reason}")
    database.start()
    server = MlflowServer(workdir / "server", store=database.uri)
    server.start(timeout=180)
    assert server.process is not None
    nice_everything(("postgres",), [server.process.pid])
    proxy = FaultServer(server.uri)  # passes everything through, counting the log-batch requests
    from mlflow.tracking import MlflowClient

    client = MlflowClient(server.uri)
    none: list[dict[str, float]] = []
    mlflow: list[dict[str, float]] = []
    delivery = []
    try:
        for round_index in range(args.rounds):
            none += round_of("none", "-", args.steps, workdir, f"none{round_index}")
            experiment = f"load-{round_index}"
            before = dict(proxy.requests)
            results = round_of(proxy.uri, experiment, args.steps, workdir, f"mlflow{round_index}")
            mlflow += results
            deadline = time.monotonic() + 600
            while time.monotonic() < deadline:
                found = client.get_experiment_by_name(experiment)
                runs = client.search_runs([found.experiment_id]) if found else []
                if len(runs) == TRAINERS and all(run.info.status == "FINISHED" for run in runs):
                    break
                time.sleep(1.0)
            finished_at = max(run.info.end_time for run in runs) / 1000
            values = 0
            for run in runs:
                for key in run.data.metrics:
                    if key.startswith(("grad/", "grad_norm/", "weight_norm/", "loss")):
                        values += len(client.get_metric_history(run.info.run_id, key))
            batches = proxy.requests.get("/api/2.0/mlflow/runs/log-batch", 0) - before.get(
                "/api/2.0/mlflow/runs/log-batch", 0
            )
            delivery.append((values, finished_at - results[0]["started"], batches, len(runs)))
    finally:
        proxy.close()
        server.stop()
        database.stop()
    none_ms = statistics.mean(r["step_ms"] for r in none)
    none_cpu = statistics.mean(r["cpu_ms"] for r in none)
    none_round = statistics.mean(r["round_s"] for r in none)
    print(
        f"load on {platform.machine()}, {os.cpu_count()} CPUs: {TRAINERS} trainers x {args.steps} steps, "
        f"{args.rounds} rounds; MLflow server (1 worker) on PostgreSQL, both niced to 19"
    )
    print(
        "\nstep: wall time, 8 processes sharing 2 cores (scheduling noise included); CPU: what each trainer "
        "process itself spent per step; round: wall time until all 8 trainers exited"
    )
    print(
        f"\n{'configuration':<22} {'step ms':>8} {'vs none':>8} {'CPU ms/step':>12} {'vs none':>8} "
        f"{'slowest CPU':>12} {'vs none':>8} {'round s':>8} {'vs none':>8} {'dropped':>8}"
    )
    for name, results in (("no backend", none), ("MLflow on PostgreSQL", mlflow)):
        mean = statistics.mean(r["step_ms"] for r in results)
        cpu = statistics.mean(r["cpu_ms"] for r in results)
        slowest = max(r["cpu_ms"] for r in results)
        round_s = statistics.mean(r["round_s"] for r in results)
        dropped = sum(int(r["dropped"]) for r in results)
        print(
            f"{name:<22} {mean:8.3f} {mean / none_ms:7.3f}x {cpu:12.3f} {cpu / none_cpu:7.3f}x {slowest:12.3f} "
            f"{slowest / none_cpu:7.3f}x {round_s:8.1f} {round_s / none_round:7.3f}x {dropped:8d}"
        )
    print(
        f"\n{'round':<6} {'values on server':>17} {'runs':>5} {'s to last FINISHED':>19} {'values/s':>9} "
        f"{'log-batch requests':>19} {'values/request':>15}"
    )
    for index, (values, seconds, batches, runs) in enumerate(delivery):
        print(
            f"{index:<6} {values:17,d} {runs:5d} {seconds:19.1f} {values / seconds:9,.0f} {batches:19,d} "
            f"{values / max(batches, 1):15,.0f}"
        )
    # 10 contract metrics, grad/param_norm, loss; 16 grad_norm/ and 16 weight_norm/ (per-layer cadence: every step)
    expected = TRAINERS * args.steps * (10 + 1 + 1 + 16 + 16)
    print(f"\nexpected per round: {expected:,} values (every one of them must be on the server)")


if __name__ == "__main__":
    main()

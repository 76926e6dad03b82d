"""The fast loop: a small MLP well under a millisecond a step, every step logged, each backend against none.

Where threads in the training process hurt most (issue 9): a loop whose Python thread does little but
launch small ops. Torch runs on one thread; every configuration trains its own copy of the model for
``--steps`` steps in one tracker run; configurations take turns (A B C ... A B C ...) for ``--rounds``
rounds; the first ``--warmup`` steps of each run are dropped; the table gives the mean step time over
the rest (so periodic stalls count) and the ratio to no backend, plus the time to enter and to leave
the ``with`` block. A second table times the hand-over alone on the training thread, and the reporter's
start-up.

    .venv/bin/python benchmarks/fast_loop.py             # ~3 minutes
    .venv/bin/python benchmarks/fast_loop.py --quick     # ~1 minute
"""

from __future__ import annotations

import argparse
import contextlib
import os
import pickle
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from _models import fast_mlp, timed_steps

from gradtrack import GradTracker
from gradtrack.console import ConsoleBackend
from gradtrack.events import RunStart
from gradtrack.outbox import Outbox
from gradtrack.records import StepRecord
from gradtrack.reporter import Reporter
from gradtrack_testing.fault_server import FaultServer
from gradtrack_testing.mlflow_server import MlflowServer


def run(backend: Any, options: dict[str, Any] | None, steps: int, warmup: int) -> dict[str, float]:
    """One tracker run; returns the mean step time after warm-up and the enter/exit times, in ms."""
    model, optimizer, x, y = fast_mlp()
    started = time.perf_counter()
    tracker = GradTracker(model, backend=backend, backend_options=options, close_timeout=30.0)
    tracker.__enter__()
    entered = time.perf_counter()
    times, _ = timed_steps(model, optimizer, x, y, tracker, steps)
    leaving = time.perf_counter()
    tracker.__exit__(None, None, None)
    done = time.perf_counter()
    return {
        "step_ms": 1e3 * sum(times[warmup:]) / len(times[warmup:]),
        "first_s_ms": 1e3 * statistics.mean(times[:warmup]),
        "enter_ms": 1e3 * (entered - started),
        "exit_ms": 1e3 * (done - leaving),
    }


@contextlib.contextmanager
def configurations(workdir: Path, quick: bool) -> Iterator[dict[str, tuple[Any, dict[str, Any] | None]]]:
    silent = FaultServer()  # no upstream: accepts, never answers
    spool = str(workdir / "spool")
    with contextlib.ExitStack() as stack:
        configs: dict[str, tuple[Any, dict[str, Any] | None]] = {
            "no backend": (None, None),
            "console": ("console", None),
            "MLflow local store (sqlite:///mlflow.db)": ("mlflow", {"mlflow": {"spool_dir": spool}}),
        }
        if not quick:
            uri = stack.enter_context(MlflowServer(workdir / "mlflow-server")).uri
            configs["MLflow server on loopback"] = ("mlflow", {"mlflow": {"tracking_uri": uri, "spool_dir": spool}})
        configs["MLflow server that never answers"] = ("mlflow", {"mlflow": {
            "tracking_uri": silent.uri, "spool_dir": spool, "exit_timeout": 2.0, "request_timeout": 1.0}})  # fmt: skip
        configs["W&B offline"] = ("wandb", {"wandb": {"mode": "offline", "dir": str(workdir)}})
        try:
            yield configs
        finally:
            silent.close()


def handoff_cost(layers: int, calls: int = 3000) -> tuple[float, float]:
    """Microseconds per step record on the training thread (routine, per-layer), with a live reporter."""
    reporter = Reporter([("console", pickle.dumps(ConsoleBackend()))], max_pending=1000)
    outbox = Outbox(reporter=reporter)
    norms = np.random.default_rng(0).random(layers)
    names = [f"layer{i}.weight" for i in range(layers)]
    outbox.start(RunStart({"clip": "none"}, tuple(names), layers, "Bench", time.time()))
    outbox.layout(0, list(range(layers)))
    results = []
    for with_layers in (False, True):
        spent = []
        for step in range(calls):
            begin = time.perf_counter()
            record = StepRecord(step, time.time(), 1.0, 1.0, False, 0, False, False, False, 0.5, False, True,
                                with_layers, 0 if with_layers else -1, norms.tobytes())  # fmt: skip
            outbox.step(record, names)
            spent.append(time.perf_counter() - begin)
        results.append(1e6 * statistics.median(spent[100:]))
    reporter.end_stream(time.monotonic() + 30)
    reporter.wait(time.monotonic() + 30)
    return results[0], results[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer steps and rounds, no MLflow server")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--rounds", type=int, default=None)
    args = parser.parse_args()
    steps = args.steps or (1500 if args.quick else 3000)
    rounds = args.rounds or (2 if args.quick else 3)
    warmup = 300
    torch.set_num_threads(1)
    os.environ.update(WANDB_SILENT="true", WANDB_DISABLE_GIT="true", WANDB_DISABLE_CODE="true")
    workdir = Path(tempfile.mkdtemp(prefix="gradtrack-fast-loop-"))
    previous = os.getcwd()
    os.chdir(workdir)  # the default local MLflow store is ./mlflow.db: a fresh one, migrated by the first run
    try:
        with configurations(workdir, args.quick) as configs:
            results: dict[str, list[dict[str, float]]] = {name: [] for name in configs}
            for round_ in range(rounds):
                order = list(configs)[round_ % len(configs):] + list(configs)[: round_ % len(configs)]
                for name in order:
                    backend, options = configs[name]
                    if backend == "mlflow" and options is not None:
                        options = {"mlflow": {**options["mlflow"], "experiment_name": f"fast-{uuid.uuid4().hex[:6]}"}}
                    results[name].append(run(backend, options, steps, warmup))
        handoff = {layers: handoff_cost(layers) for layers in (10, 1000)}
    finally:
        os.chdir(previous)
        shutil.rmtree(workdir, ignore_errors=True)
    sdk = {}
    for module in ("mlflow", "wandb"):
        begin = time.perf_counter()
        subprocess.run([sys.executable, "-c", f"import {module}"], check=True)
        sdk[module] = time.perf_counter() - begin
    begin = time.perf_counter()
    subprocess.run([sys.executable, "-c", "pass"], check=True)
    bare = time.perf_counter() - begin

    print(f"fast loop on {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__} (1 thread), "
          f"Python {platform.python_version()}; {steps} steps a run, {rounds} rounds, first {warmup} dropped")
    base = statistics.median(r["step_ms"] for r in results["no backend"])
    print(f"\n{'configuration':<42} {'step ms':>8} {'vs none':>8} {'first 300':>10} {'enter ms':>9} {'exit ms':>8}")
    for name, runs in results.items():
        step = statistics.median(r["step_ms"] for r in runs)
        first = statistics.median(r["first_s_ms"] for r in runs) / base
        enter = statistics.median(r["enter_ms"] for r in runs)
        leave = statistics.median(r["exit_ms"] for r in runs)
        print(f"{name:<42} {step:8.3f} {step / base:7.2f}x {first:9.2f}x {enter:9.0f} {leave:8.0f}")
    print("\nhand-over on the training thread, per step record (median us, a live reporter):")
    for layers, (routine, layered) in handoff.items():
        print(f"  {layers:>5} layers: {routine:6.1f} us routine step, {layered:6.1f} us per-layer step")
    print(f"\nSDK import in a fresh interpreter (now in the reporter, no longer in training): "
          f"mlflow {sdk['mlflow']:.2f} s, wandb {sdk['wandb']:.2f} s; a bare interpreter {bare:.2f} s")


if __name__ == "__main__":
    main()

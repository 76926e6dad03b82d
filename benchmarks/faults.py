"""Step time, exit time and steps lost under each fault between gradtrack and a real MLflow server (issue 10).

Every case trains the fast loop (a small MLP, every step logged, per-layer norms every 10 steps) for
``--steps`` steps through the reporter process, with its fault during the middle third, and is compared
with the same loop and no backend, measured in the same run. After the run the server is asked for
every step's ``grad/total_norm`` (after a replay of the spool where one was left) and for the number of
runs. The MLflow server and the fault proxy (a process of its own, so that its Python work does not take
the training process's interpreter lock) run on this machine's cores too: what they cost is in the
ratios, as it would not be with a remote server.

    .venv/bin/python benchmarks/faults.py            # ~4 minutes
    .venv/bin/python benchmarks/faults.py --steps 600
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from _models import fast_mlp, timed_steps

from gradtrack import GradTracker
from gradtrack_testing import probe_plugin
from gradtrack_testing.fault_server import FaultServer
from gradtrack_testing.mlflow_server import MlflowServer

Fault = Callable[[int], None]


def _serve_proxy(upstream: str, control: Any) -> None:
    proxy = FaultServer(upstream)
    control.send(proxy.uri)
    while (mode := control.recv()) is not None:
        proxy.mode = mode
        control.send(mode)
    proxy.close()


class ProxyProcess:
    """``FaultServer`` in a process of its own; setting ``mode`` returns once the proxy has switched."""

    def __init__(self, upstream: str) -> None:
        context = multiprocessing.get_context("spawn")
        self._control, child = context.Pipe()
        self._process = context.Process(target=_serve_proxy, args=(upstream, child), daemon=True)
        self._process.start()
        self.uri: str = self._control.recv()
        self._mode = "pass"

    @property
    def mode(self) -> str:
        return self._mode

    @mode.setter
    def mode(self, value: str) -> None:
        self._control.send(value)
        self._mode = self._control.recv()

    def close(self) -> None:
        self._control.send(None)
        self._process.join(10)


def train(steps: int, backend: Any, options: dict[str, Any] | None, fault: Fault | None) -> dict[str, float]:
    model, optimizer, x, y = fast_mlp()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tracker = GradTracker(model, backend=backend, backend_options=options, close_timeout=10.0)
        with tracker:
            tracker.flush(60.0)  # the reporter is up and the run exists: the faults hit live traffic
            spent, cpu = timed_steps(model, optimizer, x, y, tracker, steps, before_step=fault)
            leaving = time.monotonic()
        exit_s = time.monotonic() - leaving
    warm, warm_cpu = spent[steps // 10 :], cpu[steps // 10 :]
    return {"step_ms": 1e3 * sum(warm) / len(warm), "cpu_ms": 1e3 * sum(warm_cpu) / len(warm_cpu), "exit_s": exit_s}


def delivered(uri: str, experiment: str, spool_dir: Path) -> tuple[int, int, bool]:
    """(steps on the server, runs in the experiment, whether a spool had to be replayed)."""
    from mlflow.tracking import MlflowClient

    replayed = False
    for spool in spool_dir.glob("*/spool.jsonl"):
        replayed = True
        subprocess.run([sys.executable, "-m", "gradtrack_mlflow", "replay", str(spool), "--tracking-uri", uri],
                       capture_output=True, timeout=600, check=False)  # fmt: skip
    client = MlflowClient(uri)
    found = client.get_experiment_by_name(experiment)
    runs = client.search_runs([found.experiment_id]) if found else []
    if not runs:
        return 0, 0, replayed
    steps = {m.step for m in client.get_metric_history(runs[0].info.run_id, "grad/total_norm")}
    return len(steps), len(runs), replayed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=1500)
    args = parser.parse_args()
    steps = args.steps
    third = range(steps // 3, 2 * steps // 3)
    torch.set_num_threads(1)
    workdir = Path(tempfile.mkdtemp(prefix="gradtrack-faults-"))
    server = MlflowServer(workdir / "server")
    server.start()
    proxy = ProxyProcess(server.uri)

    def during(start: Callable[[], None], stop: Callable[[], None]) -> Fault:
        def fault(step: int) -> None:
            if step == third.start:
                start()
            elif step == third.stop:
                stop()

        return fault

    def mode(name: str) -> Callable[[], None]:
        return lambda: setattr(proxy, "mode", name)

    blocked = workdir / "a-file"
    blocked.write_text("not a directory")
    cases: dict[str, tuple[str, Fault | None, dict[str, Any]]] = {
        "healthy server": (proxy.uri, None, {}),
        "HTTP 503 for a third of the run": (proxy.uri, during(mode("status"), mode("pass")), {}),
        "silent for a third of the run": (proxy.uri, during(mode("silent"), mode("pass")), {}),
        "every request 500 ms late": (proxy.uri, during(mode("delay"), mode("pass")), {}),
        "server killed, restarted a third later": (server.uri, during(server.stop, server.start), {}),
        "gone for the last third (spool, replay)": (
            proxy.uri,
            lambda s: mode("silent")() if s == third.stop else None,
            {"exit_timeout": 3.0},
        ),
        "unwritable spool directory, 503 a third": (
            proxy.uri,
            during(mode("status"), mode("pass")),
            {"spool_dir": str(blocked / "spool")},
        ),
        "a plugin raising in every hook": (proxy.uri, None, {}),
    }
    baseline = [train(steps, None, None, None)]
    rows = []
    with probe_plugin.installed(workdir / "plugins"):  # the last case's failing plugin, found as users' are
        for name, (uri, fault, extra) in cases.items():
            proxy.mode = "pass"
            experiment = f"faults-{uuid.uuid4().hex[:8]}"
            spool_dir = workdir / f"spool-{experiment}"
            mlflow = {"tracking_uri": uri, "experiment_name": experiment, "spool_dir": str(spool_dir)}
            options: dict[str, Any] = {"mlflow": {**mlflow, "request_timeout": 1.0, **extra}}
            backend: Any = "mlflow"
            if name.startswith("a plugin"):
                backend = ["mlflow", "probe"]
                options["probe"] = {"path": str(workdir / "probe.jsonl"), "fail_in": "*"}
            result = train(steps, backend, options, fault)
            baseline.append(train(steps, None, None, None))  # interleaved: the machine drifts
            proxy.mode = "pass"
            time.sleep(1.0)
            on_server, runs, replayed = delivered(server.uri, experiment, Path(options["mlflow"]["spool_dir"]))
            rows.append((name, result, on_server, runs, replayed))
    proxy.close()
    server.stop()
    shutil.rmtree(workdir, ignore_errors=True)
    base = statistics.median(b["step_ms"] for b in baseline)
    base_cpu = statistics.median(b["cpu_ms"] for b in baseline)
    print(
        f"faults on {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__} (1 thread), "
        f"{steps} steps a run, fault during steps {third.start}-{third.stop}; no backend: {base:.3f} ms/step "
        f"(median of {len(baseline)} runs interleaved with the cases), {base_cpu:.3f} CPU ms/step"
    )
    print(
        "step: wall time, with the MLflow server and the reporter on the same 2 cores; CPU: what the training "
        "process itself spent a step (all its threads)"
    )
    print(
        f"\n{'fault':<42} {'step ms':>8} {'vs none':>8} {'CPU ms':>7} {'vs none':>8} {'exit s':>7} "
        f"{'steps lost':>11} {'runs':>5} {'replay':>7}"
    )
    for name, result, on_server, runs, replayed in rows:
        print(
            f"{name:<42} {result['step_ms']:8.3f} {result['step_ms'] / base:7.2f}x {result['cpu_ms']:7.3f} "
            f"{result['cpu_ms'] / base_cpu:7.2f}x {result['exit_s']:7.2f} {steps - on_server:11d} {runs:5d} "
            f"{'yes' if replayed else 'no':>7}"
        )


if __name__ == "__main__":
    main()

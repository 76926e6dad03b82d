"""The fast loop: a small MLP well under a millisecond a step, every step logged, each backend against none.

Where threads in the training process hurt most (issue 9): a loop whose Python thread does little but
launch small ops. Torch runs on one thread; every configuration trains its own copy of the model for
``--steps`` steps in one tracker run; configurations take turns (A B C ... A B C ...) for ``--rounds``
rounds; the first ``--warmup`` steps of each run are dropped; the table gives the mean step time over
the rest (so periodic stalls count) and the ratio to no backend, plus the time to enter and to leave
the ``with`` block, and the reporter process's CPU time per step record it handled: its CPU time over the
run, less that of an empty run of the same backend (start-up, SDK import, closing the run), over the
records. A second table times the hand-over alone on the training thread and gives a record's size on
the wire, beside the pickled tuple records of the first release.

    .venv/bin/python benchmarks/fast_loop.py             # ~5 minutes
    .venv/bin/python benchmarks/fast_loop.py --quick     # ~1 minute
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import pickle
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import psutil
import torch
from _models import fast_mlp, timed_steps

from gradtrack import GradTracker, hookimpl
from gradtrack.delivery import reporter_main
from gradtrack.delivery.console import ConsoleBackend
from gradtrack.delivery.dispatch import Dispatcher
from gradtrack.delivery.outbox import Outbox
from gradtrack.delivery.reporter import Reporter
from gradtrack.events import RunStart
from gradtrack.handover.channel import Incoming, encode, pipe_capacity
from gradtrack.handover.messages import LayoutAnnounced, RunStarted, StepRecord
from gradtrack_testing.fault_server import FaultServer
from gradtrack_testing.mlflow_server import MlflowServer


def run(backend: Any, options: dict[str, Any] | None, steps: int, warmup: int) -> dict[str, float]:
    """One tracker run; returns the mean step time after warm-up and the enter/exit times, in ms, and the
    reporter's CPU seconds and records (NaN without a reporter)."""
    model, optimizer, x, y = fast_mlp()
    started = time.perf_counter()
    tracker = GradTracker(model, backend=backend, backend_options=options, close_timeout=60.0)
    tracker.__enter__()
    reporter = tracker._pipeline.outbox.reporter  # private: the process whose CPU time is read
    process = psutil.Process(reporter.process.pid) if reporter is not None else None
    window: list[float] = []

    def reporter_cpu(step: int) -> None:
        if process is not None and step == warmup:
            tracker.flush(60.0)  # the SDK imported and the run opened: their CPU time is not the records'
            window.append(sum(process.cpu_times()[:2]))  # user + system, every thread of the reporter

    entered = time.perf_counter()
    times, cpu = timed_steps(model, optimizer, x, y, tracker, steps, before_step=reporter_cpu)
    if process is not None:
        window.append(sum(process.cpu_times()[:2]))
    leaving = time.perf_counter()
    tracker.__exit__(None, None, None)
    done = time.perf_counter()
    return {
        "step_ms": 1e3 * sum(times[warmup:]) / len(times[warmup:]),
        "cpu_ms": 1e3 * sum(cpu[warmup:]) / len(cpu[warmup:]),
        "first_s_ms": 1e3 * statistics.mean(times[:warmup]),
        "enter_ms": 1e3 * (entered - started),
        "exit_ms": 1e3 * (done - leaving),
        "reporter_us": 1e6 * (window[1] - window[0]) / (steps - warmup) if len(window) == 2 else math.nan,
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


SETTLE_S = 3.0  # after each run: what a run leaves running (wandb-core, the server's commits) must not slow the next


class _FirstReleaseRecord(NamedTuple):
    """The step record of the first release, as it was pickled into the pipe (for the size and cost columns)."""

    step: int
    timestamp: float
    total_norm: float
    clip_coef: float
    clipped: bool
    nonfinite: int
    explosion: bool
    diverged: bool
    skipped: bool
    loss: float | None
    amp_overflow: bool
    reported: bool
    with_layers: bool
    layout: int
    layer_norms: bytes | None
    weight_norms: bytes | None = None


def handoff_cost(layers: int, calls: int = 3000) -> dict[str, float]:
    """Per step record on the training thread, with a live reporter: the hand-over's median microseconds
    (routine, per-layer step), and a routine record's build-and-encode cost and bytes on the wire now and in
    the first release."""
    reporter = Reporter([("console", pickle.dumps(ConsoleBackend()))], max_pending=1000)
    outbox = Outbox(reporter=reporter)
    norms = np.random.default_rng(0).random(layers).tobytes()
    names = tuple(f"layer{i}.weight" for i in range(layers))
    outbox.send(RunStarted(start=RunStart({"clip": "none"}, names, layers, "Bench", time.time())))
    outbox.send(LayoutAnnounced(key=0, positions=tuple(range(layers))))
    result: dict[str, float] = {}
    for with_layers in (False, True):
        spent = []
        for step in range(calls):
            begin = time.perf_counter()
            outbox.send(StepRecord(step=step, timestamp=time.time(), total_norm=1.0, loss=0.5, layout=0,
                                   with_layers=with_layers, layer_norms=norms))  # fmt: skip
            spent.append(time.perf_counter() - begin)
        result["layered_us" if with_layers else "routine_us"] = 1e6 * statistics.median(spent[100:])
    reporter.end_stream(time.monotonic() + 30)
    reporter.wait(time.monotonic() + 30)

    def now() -> bytes:
        return encode([StepRecord(step=123456, timestamp=time.time(), total_norm=1.0, loss=0.5, layout=0,
                                  layer_norms=norms)])  # fmt: skip

    def first_release() -> bytes:  # its hand-over: a tuple message pickled in a list, behind a 4-byte length
        record = _FirstReleaseRecord(123456, time.time(), 1.0, 1.0, False, 0, False, False, False, 0.5, False, True,
                                     False, 0, norms)  # fmt: skip
        payload = pickle.dumps([("step", record)], protocol=pickle.HIGHEST_PROTOCOL)
        return len(payload).to_bytes(4, "big") + payload

    for label, make in (("now", now), ("first", first_release)):
        result[f"{label}_bytes"] = len(make())
        began = time.perf_counter()
        for _ in range(calls):
            make()
        result[f"{label}_encode_us"] = 1e6 * (time.perf_counter() - began) / calls
    return result


class _BatchedNoOp:
    """A backend that takes steps in batches and does nothing with them: the reporter's own work is left."""

    @hookimpl
    def gradtrack_steps(self, batch: Any) -> None:
        pass


class _PerStepNoOp:
    """The same for a plugin that implements only the per-step hook (a ``StepStats`` per step)."""

    @hookimpl
    def gradtrack_step(self, stats: Any) -> None:
        pass


def reporter_work(layers: int, count: int = 20_000) -> dict[str, float]:
    """The reporter's own CPU microseconds per step record: read and decode, the summary, the dispatch, the
    ``StepBatch`` and a backend that does nothing, as ``reporter_main`` runs them (a writer thread feeds a
    real pipe; its own CPU time is left out). Per-layer norms every 10 steps, as by default."""
    norms = np.random.default_rng(0).random(layers).tobytes()
    names = tuple(f"layer{i}.weight" for i in range(layers))
    head = [RunStarted(start=RunStart({"clip": "none"}, names, layers, "Bench", time.time())),
            LayoutAnnounced(key=0, positions=tuple(range(layers)))]  # fmt: skip
    frames = encode(head) + b"".join(
        encode([StepRecord(step=step, timestamp=time.time(), total_norm=1.0, loss=0.5, layout=0,
                           with_layers=step % 10 == 0, layer_norms=norms)])
        for step in range(count)
    )  # fmt: skip
    result = {}
    for label, backend in (("batched", _BatchedNoOp()), ("per_step", _PerStepNoOp())):
        read_fd, write_fd = os.pipe()
        pipe_capacity(write_fd)  # as the tracker sizes its pipe
        writer_cpu: list[float] = []

        def write(fd: int = write_fd, spent: list[float] = writer_cpu) -> None:
            began = time.thread_time()
            with os.fdopen(fd, "wb") as pipe:
                pipe.write(frames)
            spent.append(time.thread_time() - began)

        # The reporter's backlog bound (BACKLOG_FACTOR x max_pending): nothing decimated.
        run = reporter_main._Run(Dispatcher([(label, backend)], max_pending=1000 * reporter_main.BACKLOG_FACTOR))
        incoming, acks = Incoming(read_fd), reporter_main._Acks(-1)
        began = time.process_time()
        writer = threading.Thread(target=write)
        writer.start()
        while not incoming.closed:  # reporter_main's loop: all the pipe holds, then a pause
            if run.handle(incoming.read(0.5), acks) is False:
                time.sleep(reporter_main.COALESCE_S)
        run.dispatcher.flush(60.0)
        writer.join()
        result[label] = 1e6 * (time.process_time() - began - writer_cpu[0]) / count
        run.dispatcher.close(10.0)
        os.close(read_fd)
    return result


def _named(config: tuple[Any, dict[str, Any] | None]) -> tuple[Any, dict[str, Any] | None]:
    """A configuration with an experiment of its own for each MLflow run."""
    backend, options = config
    if backend == "mlflow" and options is not None:
        options = {"mlflow": {**options["mlflow"], "experiment_name": f"fast-{uuid.uuid4().hex[:6]}"}}
    return backend, options


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer steps and rounds, no MLflow server")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--rounds", type=int, default=None)
    args = parser.parse_args()
    steps = args.steps or (1500 if args.quick else 3000)
    rounds = args.rounds or (2 if args.quick else 5)
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
                order = list(configs)[round_ % len(configs) :] + list(configs)[: round_ % len(configs)]
                for name in order:
                    backend, options = _named(configs[name])
                    results[name].append(run(backend, options, steps, warmup))
                    time.sleep(SETTLE_S)
        handoff = {layers: handoff_cost(layers) for layers in (10, 1000)}
        own = {layers: reporter_work(layers) for layers in (10, 1000)}
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

    print(
        f"fast loop on {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__} (1 thread), "
        f"Python {platform.python_version()}; {steps} steps a run, {rounds} rounds, first {warmup} dropped"
    )
    base = statistics.median(r["step_ms"] for r in results["no backend"])
    base_cpu = statistics.median(r["cpu_ms"] for r in results["no backend"])
    print(
        f"\n{'configuration':<42} {'step ms':>8} {'vs none':>8} {'CPU vs none':>11} {'first 300':>10} "
        f"{'enter ms':>9} {'exit ms':>8} {'reporter us/record':>19}"
    )
    failed = []
    for name, runs in results.items():
        step = statistics.median(r["step_ms"] for r in runs)
        cpu = statistics.median(r["cpu_ms"] for r in runs)
        first = statistics.median(r["first_s_ms"] for r in runs) / base
        enter = statistics.median(r["enter_ms"] for r in runs)
        leave = statistics.median(r["exit_ms"] for r in runs)
        reporter_us = statistics.median(r["reporter_us"] for r in runs)
        per_record = "-" if math.isnan(reporter_us) else f"{reporter_us:.1f}"
        if name != "no backend" and step / base > 1.10:
            failed.append(name)
        print(
            f"{name:<42} {step:8.3f} {step / base:7.2f}x {cpu / base_cpu:10.2f}x {first:9.2f}x {enter:9.0f} "
            f"{leave:8.0f} {per_record:>19}"
        )
    print(
        f"\ntarget (issue 17): every backend <= 1.10x of no backend, median of {rounds} rounds: "
        + (f"FAIL ({', '.join(failed)})" if failed else "PASS")
    )
    print(
        "reporter us/record: the reporter process's CPU time (every thread: gradtrack's and the SDK's) while the "
        "timed steps ran, over those steps (from a flush after the warm-up, once the SDK is imported and the run "
        "open)"
    )
    print("\nhand-over on the training thread, per step record (median us, a live reporter), and a routine record's")
    print("build-and-encode cost and size on the wire, now and as the first release pickled it:")
    for layers, cost in handoff.items():
        print(
            f"  {layers:>5} layers: {cost['routine_us']:6.1f} us routine step, "
            f"{cost['layered_us']:6.1f} us per-layer step; "
            f"encode {cost['now_encode_us']:.1f} us / {cost['now_bytes']:.0f} bytes "
            f"(first release {cost['first_encode_us']:.1f} us / {cost['first_bytes']:.0f} bytes)"
        )
    print(
        "\nthe reporter's own work per step record (CPU us: decode, summary, dispatch, batch, a backend doing nothing):"
    )
    for layers, cost in own.items():
        print(
            f"  {layers:>5} layers: {cost['batched']:6.1f} us with gradtrack_steps, "
            f"{cost['per_step']:6.1f} us with gradtrack_step only"
        )
    print(
        f"\nSDK import in a fresh interpreter (now in the reporter, no longer in training): "
        f"mlflow {sdk['mlflow']:.2f} s, wandb {sdk['wandb']:.2f} s; a bare interpreter {bare:.2f} s"
    )


if __name__ == "__main__":
    main()

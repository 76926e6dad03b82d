"""Step time and backlog bounds when the MLflow tracking server is slow or silent (issue 5).

Issue 5's target: "A tracking server 500 ms slow per request (a loopback proxy that delays), or not
answering at all: step time stays within 1.05x of no backend; the queue stays bounded."

One real ``mlflow server`` runs on 127.0.0.1; in front of it a loopback proxy (``gradtrack_testing``'s
``FaultServer`` in delay mode) holds every piece of a request for ``--delay-ms`` before forwarding it (so
each request is answered that much later), and a second one with no upstream accepts connections and
never answers. Four configurations, each a GradTracker with its own copy of the model and its own
optimizer, all open at once:

* (a) gradtrack, ``backend=None``;
* (b) gradtrack + ``backend="mlflow"`` straight to the server;
* (c) gradtrack + ``backend="mlflow"`` through the delaying proxy;
* (d) gradtrack + ``backend="mlflow"`` to the silent server.

The backend is named by string, as users name it, so it runs where users get it: in gradtrack's
reporter process (``python -m gradtrack.delivery.reporter_main``, niced to 19, one per tracker), which the
training process feeds one pickled message per record through a non-blocking pipe.

Three phases per ``layer_every``:

1. **timing**: the configurations take turns block by block (A B C D, B C D A, ...), warm-up dropped,
   medians compared with (a). Every reporter process runs throughout, as in a real run, so the table
   also gives the CPU time each configuration's reporter process (and its children) spent per step,
   and that of the training process's pump thread (which writes what the pipe did not take at once):
   on a small machine with no idle core that time is taken from training, niced or not.
2. **soak**: (b), (c), (d) each train alone for ``--soak-s`` seconds, the way a real run feeds its
   backend without pauses; the backlog is sampled to see whether it levels off or keeps growing.
3. **exit and delivery**: each ``with`` block is left and timed (bound: ``exit_timeout`` + 2 s); a spool
   left behind (found as ``<spool_dir>/*/spool.jsonl``, or named by the ``SpoolLeftWarning`` the
   reporter raises and the training process raises again) is replayed with
   ``python -m gradtrack_mlflow replay <spool> --tracking-uri <server>``, and the run's
   ``grad/total_norm`` values on the server are counted against the steps taken.

The backlog measured is the one that can grow in the training process: records waiting as records
(``Reporter._messages``, decimated past ``max_pending`` by gradtrack's back-pressure rule) and pickled
bytes waiting for the pipe (``Reporter._out.pending``): private attributes, fine for a benchmark, which
must see inside to measure them. The MLflow sender's inbox now lives in the reporter process, out of
reach; it is bounded there by the sender's own rule (no cycle sends for longer than its ``SLICE_S``;
the rest goes to the spool on disk and is caught up from there), and the reporter's RSS, sampled with
psutil, shows whether it holds: both processes' RSS are in the tables.

    .venv/bin/python benchmarks/slow_server.py --quick     # < 2 minutes
    .venv/bin/python benchmarks/slow_server.py             # more steps, 20 s soak (< 5 minutes)
    .venv/bin/python benchmarks/slow_server.py --quick --layer-every 1   # per-layer metrics every step
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import warnings
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import torch
from _configs import Tracked, backend_problem
from _models import MODELS
from _timing import Clock, Samples, interleave, table
from overhead import machine

from gradtrack_testing.fault_server import FaultServer
from gradtrack_testing.mlflow_server import MlflowServer

EXPERIMENT = "gradtrack-slow-server"
LABELS = {"none": "a", "direct": "b", "slow": "c", "silent": "d"}
EXIT_MARGIN_S = 2.0  # the sender's close allows exit_timeout + 1 s; one more for the reporter to drain and exit
PIPE_BYTES = 1 << 20  # the pipe gradtrack asks Linux for: what the reporter may not have read yet
BYTES_BOUND = 32 << 20  # gradtrack's reporter keeps 16 MiB of frames before records wait as records, plus one frame
REPORTER_RSS_GROWTH_MB = 64.0  # soak: the reporter's RSS in the last third at most this above the first third
SPOOL_IN_WARNING = re.compile(r"kept in (\S+spool\.jsonl)")  # SpoolLeftWarning's text names the spool


def _group_cpu_s(pgid: int) -> float:
    """User + system CPU seconds used so far by the processes of process group ``pgid``."""
    total = 0.0
    for process in psutil.process_iter():
        with contextlib.suppress(psutil.Error, OSError):
            if os.getpgid(process.pid) == pgid:
                total += sum(process.cpu_times()[:2])
    return total


def wait_quiet(server: str, limit_s: float = 60.0, cpu_percent: float = 15.0) -> float:
    """Wait until the server's process group uses under ``cpu_percent`` of a core over a second.

    An MLflow 3 server goes on starting helpers for a while after /health answers; on a small
    machine that work would be timed as training. Returns the seconds waited.
    """
    began = time.monotonic()
    port = int(server.rsplit(":", 1)[1])
    owners = [c.pid for c in psutil.net_connections("tcp") if c.laddr and c.laddr.port == port and c.pid]
    if not owners:
        return 0.0
    pgid = os.getpgid(owners[0])
    while time.monotonic() - began < limit_s:
        before = _group_cpu_s(pgid)
        time.sleep(1.0)
        if (_group_cpu_s(pgid) - before) * 100 < cpu_percent:
            break
    return time.monotonic() - began


def request_ms(url: str, timeout: float) -> float:
    """Wall time of one GET (an error, e.g. a timeout, ends it too)."""
    began = time.perf_counter()
    with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=timeout) as response:
        response.read()
    return (time.perf_counter() - began) * 1e3


# -- configurations -------------------------------------------------------------------------------


@dataclass
class Point:
    """One sample of a configuration, taken while ``Peaks.series`` is on (during its soak)."""

    time: float
    records: int  # records waiting as records in the training process
    pending_bytes: int  # pickled bytes waiting for the pipe in the training process
    rss_mb: float  # the training process
    reporter_rss_mb: float  # the reporter process and its children


@dataclass
class Peaks:
    """Largest values seen by the sampler, plus a time series while ``series`` is on."""

    records: int = 0  # records waiting as records in the training process (Reporter._messages)
    pending_bytes: int = 0  # pickled bytes waiting for the pipe there (Reporter._out.pending)
    spool: int = 0  # bytes in the spool file the reporter's MLflow backend writes
    reporter_rss_mb: float = 0.0  # the reporter process and its children
    series: list[Point] | None = None


def _tree(process: psutil.Process) -> list[psutil.Process]:
    with contextlib.suppress(psutil.Error):
        return [process, *process.children(recursive=True)]
    return []


def tree_cpu_s(process: psutil.Process | None) -> float:
    """User + system CPU seconds of ``process`` and its children (live, and reaped ones); 0 once it is gone."""
    if process is None:
        return 0.0
    total = 0.0
    for member in _tree(process):
        with contextlib.suppress(psutil.Error):
            times = member.cpu_times()
            total += times.user + times.system + times.children_user + times.children_system
    return total


def tree_rss_mb(process: psutil.Process | None) -> float:
    """Resident set size of ``process`` and its children, MB; 0 once it is gone."""
    if process is None:
        return 0.0
    total = 0
    for member in _tree(process):
        with contextlib.suppress(psutil.Error):
            total += member.memory_info().rss
    return total / 2**20


class Case(Tracked):
    """One configuration: a GradTracker on its own model copy, optionally logging to MLflow at ``uri``."""

    def __init__(
        self, key: str, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, workdir: Path,
        uri: str, title: str, layer_every: int, args: argparse.Namespace,
    ) -> None:  # fmt: skip
        super().__init__(model, x, y, workdir)
        self.key, self.uri, self.title, self.layer_every, self.args = key, uri, title, layer_every, args
        self.backend = "mlflow" if uri else None  # by name: the backend runs in the reporter process
        self.run_name = f"{key}-layer_every-{layer_every}-{os.getpid()}"
        self.peaks = Peaks()
        self.exit_s: float | None = None
        self.reporter: Any = None  # the tracker's gradtrack.delivery.reporter.Reporter (None for backend=None)
        self.process: psutil.Process | None = None  # the reporter process
        self.warned_spool: Path | None = None  # the spool a SpoolLeftWarning named
        self.dropped = 0  # records dropped in the training process, read at exit

    def backend_options(self) -> dict[str, dict[str, Any]] | None:
        if not self.uri:
            return None
        return {
            "mlflow": {
                "tracking_uri": self.uri, "experiment_name": EXPERIMENT, "run_name": self.run_name,
                "spool_dir": str(self.spool_dir), "exit_timeout": self.args.exit_timeout,
                "request_timeout": self.args.request_timeout,
            }
        }  # fmt: skip

    @property
    def spool_dir(self) -> Path:
        return self.workdir / "spool"

    def spool_path(self) -> Path | None:
        """The spool the MLflow backend writes in the reporter: ``<spool_dir>/<run_key>/spool.jsonl``."""
        found = sorted(self.spool_dir.glob("*/spool.jsonl"))
        return found[0] if found else None

    def open(self) -> None:
        super().open()
        self.tracker.flush(30.0)  # the reporter is up and run_start handled: the MLflow backend has its sender
        self.reporter = self.tracker._pipeline.outbox.reporter
        if self.reporter is not None:
            self.process = psutil.Process(self.reporter.process.pid)

    def reporter_cpu_s(self) -> float:
        """CPU seconds of this configuration's reporter process (and its children) so far."""
        return tree_cpu_s(self.process)

    def pump_cpu_s(self) -> float:
        """CPU seconds of the reporter's pump thread in the training process so far."""
        return cpu_seconds([self.reporter._pump]) if self.reporter is not None else 0.0

    def sample(self) -> None:
        """Read the training-side backlog (private attributes, see the module docstring) into ``peaks``."""
        if not getattr(self, "tracker", None) or not self.tracker._active or self.reporter is None:
            return
        peaks = self.peaks
        with self.reporter._lock:  # between two sends, as the training thread leaves it
            records, pending = len(self.reporter._messages), self.reporter._out.pending
        spool = 0
        with contextlib.suppress(OSError):  # the backend may remove it under our feet
            spool = path.stat().st_size if (path := self.spool_path()) is not None else 0
        reporter_rss = tree_rss_mb(self.process)
        peaks.records = max(peaks.records, records)
        peaks.pending_bytes = max(peaks.pending_bytes, pending)
        peaks.spool = max(peaks.spool, spool)
        peaks.reporter_rss_mb = max(peaks.reporter_rss_mb, reporter_rss)
        if peaks.series is not None:
            rss = psutil.Process().memory_info().rss / 2**20
            peaks.series.append(Point(time.monotonic(), records, pending, rss, reporter_rss))

    def close(self) -> None:
        began = time.monotonic()
        super().close()
        self.exit_s = time.monotonic() - began
        self.dropped = self.tracker._pipeline.outbox.dropped


def cpu_seconds(threads: Sequence[threading.Thread]) -> float:
    """User + system CPU seconds the threads used so far (Linux /proc; 0 elsewhere or once gone)."""
    tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    total = 0
    for thread in threads:
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = Path(f"/proc/self/task/{thread.native_id}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
    return total / tick


class Sampler:
    """Samples every case's backlog every ``period`` seconds on its own thread."""

    def __init__(self, cases: Sequence[Case], period: float = 0.05) -> None:
        self.cases, self.period = cases, period
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="backlog-sampler", daemon=True)

    def __enter__(self) -> Sampler:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self.thread.join(5)

    def _run(self) -> None:
        while not self._stop.wait(self.period):
            for case in self.cases:
                with contextlib.suppress(Exception):  # a case closing under our feet
                    case.sample()


# -- one round: one layer_every -------------------------------------------------------------------


@dataclass
class Soak:
    seconds: float
    steps: int
    step_ms: float
    reporter_cpu_ms: float  # the reporter process's CPU per step during the soak
    records_first: int  # largest training-side record backlog in the first third of the soak
    records_last: int  # ... and in the last third
    bytes_first: int  # largest training-side byte backlog in the first third
    bytes_last: int  # ... and in the last third
    rss_growth_mb: float  # the training process, first sample to last
    reporter_rss_first_mb: float  # largest reporter RSS in the first third
    reporter_rss_last_mb: float  # ... and in the last third

    @property
    def bounded(self) -> bool:
        return (
            self.records_last <= 1.5 * self.records_first + 100
            and self.bytes_last <= 1.5 * self.bytes_first + PIPE_BYTES
            and self.reporter_rss_last_mb <= self.reporter_rss_first_mb + REPORTER_RSS_GROWTH_MB
        )


@dataclass
class Delivery:
    steps: int
    dropped: int  # in the training process
    dropped_total: int | None  # gradtrack.summary.dropped_records on the server: both processes
    spool: Path | None
    replay_s: float | None
    replay_note: str
    on_server: int | None


@dataclass
class Round:
    layer_every: int
    cases: dict[str, Case]
    samples: dict[str, Samples]
    reporter_cpu_ms: dict[str, float]
    pump_cpu_ms: dict[str, float]
    soaks: dict[str, Soak] = field(default_factory=dict)
    deliveries: dict[str, Delivery] = field(default_factory=dict)
    warnings: Counter[str] = field(default_factory=Counter)

    def ratio(self, key: str) -> float:
        return self.samples[key].median_ms / self.samples["none"].median_ms


def soak(case: Case, seconds: float) -> Soak:
    """Train ``case`` alone for ``seconds`` while the sampler records its backlog and both processes' RSS."""
    case.peaks.series = []
    cpu_before = case.reporter_cpu_s()
    began, times = time.monotonic(), []
    while time.monotonic() - began < seconds:
        start = time.perf_counter()
        case.train_step()
        times.append(time.perf_counter() - start)
    cpu = case.reporter_cpu_s() - cpu_before
    case.sample()
    series, case.peaks.series = case.peaks.series, None
    third = (time.monotonic() - began) / 3
    first = [p for p in series if p.time < began + third]
    last = [p for p in series if p.time >= began + 2 * third]
    return Soak(
        seconds=time.monotonic() - began,
        steps=len(times),
        step_ms=statistics.median(times) * 1e3,
        reporter_cpu_ms=cpu * 1e3 / max(1, len(times)),
        records_first=max((p.records for p in first), default=0),
        records_last=max((p.records for p in last), default=0),
        bytes_first=max((p.pending_bytes for p in first), default=0),
        bytes_last=max((p.pending_bytes for p in last), default=0),
        rss_growth_mb=(series[-1].rss_mb - series[0].rss_mb) if len(series) > 1 else 0.0,
        reporter_rss_first_mb=max((p.reporter_rss_mb for p in first), default=0.0),
        reporter_rss_last_mb=max((p.reporter_rss_mb for p in last), default=0.0),
    )


def spools_warned(records: Sequence[warnings.WarningMessage], cases: Sequence[Case]) -> None:
    """Give each case the spool a ``SpoolLeftWarning`` (raised again here from the reporter) names."""
    for record in records:
        if record.category.__name__ != "SpoolLeftWarning":
            continue
        match = SPOOL_IN_WARNING.search(str(record.message))
        if match is None:
            continue
        path = Path(match.group(1))
        for case in cases:
            if case.spool_dir.resolve() in path.resolve().parents:
                case.warned_spool = path


def replay_and_count(case: Case, server: str) -> Delivery:
    """Replay the spool ``case`` left (if any) to ``server``; count its run's ``grad/total_norm`` there."""
    from mlflow.tracking import MlflowClient

    found = case.spool_path()
    spool = found or (case.warned_spool if case.warned_spool and case.warned_spool.exists() else None)
    notes = []
    if found is not None and case.warned_spool is None:
        notes.append("spool left without a SpoolLeftWarning")
    elif case.warned_spool is not None and found != case.warned_spool:
        notes.append(f"SpoolLeftWarning names {case.warned_spool}, found {found}")
    replay_s = None
    if spool is not None:
        began = time.monotonic()
        command = [sys.executable, "-m", "gradtrack_mlflow", "replay", str(spool), "--tracking-uri", server]
        done = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)
        replay_s = time.monotonic() - began
        lines = (done.stdout + done.stderr).strip().splitlines()
        notes.insert(0, f"replay exit {done.returncode}: " if done.returncode else "")
        notes[0] += lines[-1] if lines else ""
        with contextlib.suppress(OSError, ValueError, IndexError):  # the temporary directory goes: say why here
            refused = json.loads((spool.parent / "rejected.jsonl").read_text().splitlines()[0])
            notes.append(f"first refused: {refused['op'].get('op')} {str(refused.get('error'))[:200]}")
    client = MlflowClient(server)
    experiment = client.get_experiment_by_name(EXPERIMENT)
    runs = (
        client.search_runs([experiment.experiment_id], filter_string=f"attributes.run_name = '{case.run_name}'")
        if experiment is not None
        else []
    )
    on_server = len(client.get_metric_history(runs[0].info.run_id, "grad/total_norm")) if runs else None
    total = runs[0].data.metrics.get("gradtrack.summary.dropped_records") if runs else None
    if len(runs) > 1:
        notes.append(f"{len(runs)} runs named {case.run_name}!")
    dropped_total = None if total is None else int(total)
    return Delivery(case.tracker.steps, case.dropped, dropped_total, spool, replay_s, "; ".join(notes), on_server)


def run_round(layer_every: int, uris: dict[str, str], server: str, args: argparse.Namespace, workdir: Path) -> Round:
    spec = MODELS[args.model]
    device = torch.device("cpu")
    base, x, y = spec.make(args.small, device)
    titles = {
        "none": "gradtrack, backend=None",
        "direct": "+ MLflow, server direct",
        "slow": f"+ MLflow, via {args.delay_ms:g} ms proxy",
        "silent": "+ MLflow, silent server",
    }
    cases = {
        key: Case(key, copy.deepcopy(base), x, y, workdir / f"l{layer_every}" / key, uri, title, layer_every, args)
        for key, uri, title in ((k, uris.get(k, ""), t) for k, t in titles.items())
    }
    caught: Counter[str] = Counter()
    with warnings.catch_warnings(record=True) as records:
        warnings.simplefilter("always")
        opened: list[Case] = []
        try:
            for case in cases.values():
                case.workdir.mkdir(parents=True, exist_ok=True)
                case.open()
                opened.append(case)
            with Sampler(list(cases.values())):
                before = {k: (c.reporter_cpu_s(), c.pump_cpu_s()) for k, c in cases.items()}
                samples = interleave(
                    {k: c.train_step for k, c in cases.items()}, Clock(device), args.steps, args.warmup, args.block,
                    settle={k: c.settle for k, c in cases.items()},
                )  # fmt: skip
                calls = args.steps + args.warmup
                reporter_cpu = {k: (c.reporter_cpu_s() - before[k][0]) * 1e3 / calls for k, c in cases.items()}
                pump_cpu = {k: (c.pump_cpu_s() - before[k][1]) * 1e3 / calls for k, c in cases.items()}
                result = Round(layer_every, cases, samples, reporter_cpu, pump_cpu)
                for key in ("direct", "slow", "silent"):
                    result.soaks[key] = soak(cases[key], args.soak_s)
                for case in reversed(opened):
                    opened.remove(case)
                    case.close()
        finally:
            for case in opened:
                case.close()
        spools_warned(records, list(cases.values()))
        for record in records:
            caught[f"{record.category.__name__}: {str(record.message)[:160]}"] += 1
    result.warnings = caught
    for key in ("direct", "slow", "silent"):
        result.deliveries[key] = replay_and_count(cases[key], server)
    return result


# -- report ---------------------------------------------------------------------------------------


def _kb(value: int) -> str:
    return f"{value / 1024:,.0f}"


def round_tables(r: Round, args: argparse.Namespace) -> str:
    rows = []
    for key, case in r.cases.items():
        delivery, has = r.deliveries.get(key), case.reporter is not None
        rows.append(
            [
                f"({LABELS[key]}) {case.title}",
                f"{r.samples[key].median_ms:.2f}",
                f"{r.ratio(key):.3f}x",
                f"{r.reporter_cpu_ms[key]:.2f}" if has else "-",
                f"{r.pump_cpu_ms[key]:.3f}" if has else "-",
                f"{case.peaks.records:,}" if has else "-",
                _kb(case.peaks.pending_bytes) if has else "-",
                f"{case.peaks.reporter_rss_mb:,.0f}" if has else "-",
                _kb(case.peaks.spool) if has else "-",
                "-" if case.exit_s is None else f"{case.exit_s:.2f}",
                "-" if delivery is None else ("yes" if delivery.spool else "no"),
            ]
        )
    out = [table(
        ["configuration", "step ms", "vs (a)", "reporter CPU ms/step", "pump CPU ms/step", "records max",
         "bytes max KB", "reporter RSS max MB", "spool max KB", "exit s", "spool left"],
        rows, args.markdown,
    )]  # fmt: skip
    out.append(
        "\nrecords / bytes: the backlog in the training process (records waiting as records, pickled bytes waiting\n"
        "for the pipe); reporter CPU: the reporter process and its children; pump: its thread in the training process\n"
    )
    rows = [
        [
            f"({LABELS[key]}) {r.cases[key].title}", f"{s.seconds:.1f}", f"{s.steps:,}", f"{s.step_ms:.2f}",
            f"{s.reporter_cpu_ms:.2f}", f"{s.records_first:,} -> {s.records_last:,}",
            f"{_kb(s.bytes_first)} -> {_kb(s.bytes_last)}", f"{s.rss_growth_mb:+.1f}",
            f"{s.reporter_rss_first_mb:,.0f} -> {s.reporter_rss_last_mb:,.0f}",
        ]
        for key, s in r.soaks.items()
    ]  # fmt: skip
    out.append(
        f"soak: each configuration trains alone for {args.soak_s:g} s; backlog and reporter RSS: largest in the\n"
        "first third -> largest in the last third\n"
    )
    out.append(table(
        ["configuration", "s", "steps", "step ms", "reporter CPU ms/step", "records max", "bytes max KB",
         "RSS growth MB", "reporter RSS MB"], rows, args.markdown,
    ))  # fmt: skip
    rows = [
        [
            f"({LABELS[key]}) {r.cases[key].title}", f"{d.steps:,}", f"{d.dropped:,}",
            "-" if d.dropped_total is None else f"{d.dropped_total:,}", "yes" if d.spool else "no",
            "-" if d.replay_s is None else f"{d.replay_s:.1f}", "-" if d.on_server is None else f"{d.on_server:,}",
            "yes" if d.on_server == d.steps else "NO",
        ]
        for key, d in r.deliveries.items()
    ]  # fmt: skip
    out.append(
        "\ndelivery: steps taken vs grad/total_norm values on the real server (after replaying any spool); dropped\n"
        "here: in the training process; dropped_records: the run's summary on the server (both processes)\n"
    )
    out.append(table(
        ["configuration", "steps", "dropped here", "dropped_records", "spool left", "replay s", "on server",
         "all there"], rows, args.markdown,
    ))  # fmt: skip
    for key, d in r.deliveries.items():
        if d.replay_note:
            out.append(f"  ({LABELS[key]}) {d.replay_note}")
    for message, count in r.warnings.items():
        out.append(f"  warning x{count}: {message}")
    return "\n".join(out)


def targets(rounds: Sequence[Round], args: argparse.Namespace) -> list[str]:
    lines = []

    def line(ok: bool, text: str) -> None:
        lines.append(f"[{'PASS' if ok else 'FAIL'}] {text}")

    bound = args.max_pending
    for r in rounds:
        tag = f"layer_every={r.layer_every}"
        for key in ("direct", "slow", "silent"):
            ratio = r.ratio(key)
            line(ratio <= 1.05, f"{tag}: step ({LABELS[key]}) / step (a) = {ratio:.3f}x; target <= 1.05x")
        for key in ("direct", "slow", "silent"):
            case, s = r.cases[key], r.soaks[key]
            records = max(case.peaks.records, s.records_first, s.records_last)
            pending = max(case.peaks.pending_bytes, s.bytes_first, s.bytes_last)
            line(
                records <= bound and pending <= BYTES_BOUND,
                f"{tag}: ({LABELS[key]}) training-side backlog max {records:,} records (bound {bound:,}), "
                f"{_kb(pending)} KB waiting for the pipe (bound {_kb(BYTES_BOUND)} KB)",
            )
            line(
                s.bounded,
                f"{tag}: ({LABELS[key]}) soak records {s.records_first:,} -> {s.records_last:,}, "
                f"bytes {_kb(s.bytes_first)} -> {_kb(s.bytes_last)} KB, reporter RSS "
                f"{s.reporter_rss_first_mb:,.0f} -> {s.reporter_rss_last_mb:,.0f} MB (bounded: last third <= 1.5x "
                f"first third + 100 records / + {_kb(PIPE_BYTES)} KB; reporter RSS + {REPORTER_RSS_GROWTH_MB:g} MB)",
            )
        for key in ("none", "direct", "slow", "silent"):
            exit_s = r.cases[key].exit_s or 0.0
            limit = args.exit_timeout + EXIT_MARGIN_S
            line(exit_s <= limit, f"{tag}: ({LABELS[key]}) exit {exit_s:.2f} s; bound exit_timeout + 2 = {limit:g} s")
        for key, d in r.deliveries.items():
            line(
                d.on_server == d.steps,
                f"{tag}: ({LABELS[key]}) grad/total_norm on server {d.on_server} = steps {d.steps} "
                f"(dropped here {d.dropped}, dropped_records {d.dropped_total}, "
                f"spool {'replayed' if d.spool else 'none'})",
            )
    return lines


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="layer_every=10 only, short soak (< 2 minutes)")
    parser.add_argument("--model", default="many", choices=list(MODELS), help="benchmarks/_models.py model")
    parser.add_argument("--small", action="store_true", help="the model's small variant (200 tensors for 'many')")
    parser.add_argument("--layer-every", default=None, help="comma-separated, e.g. 10,1 (default 10)")
    parser.add_argument("--delay-ms", type=float, default=500.0, help="the proxy's delay per request")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per configuration")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps per configuration first")
    parser.add_argument("--block", type=int, default=None, help="consecutive steps of one configuration")
    parser.add_argument("--soak-s", type=float, default=None, help="seconds each MLflow configuration trains alone")
    parser.add_argument("--request-timeout", type=float, default=2.0, help="mlflow option request_timeout")
    parser.add_argument("--exit-timeout", type=float, default=5.0, help="mlflow option exit_timeout")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--markdown", action="store_true", help="print GitHub markdown tables")
    args = parser.parse_args(argv)
    quick = args.quick
    args.steps = args.steps or (60 if quick else 150)
    args.warmup = args.warmup if args.warmup is not None else (10 if quick else 20)
    args.block = args.block or 10
    args.soak_s = args.soak_s if args.soak_s is not None else (8.0 if quick else 20.0)
    args.layer_every = [int(v) for v in (args.layer_every or "10").split(",") if v]
    args.max_pending = 1000  # GradTracker's default, which the cases use
    return args


def create_experiment(server: str) -> None:
    """Create the experiment before the runs start: two backends creating it at once race (see README)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(server)
    if client.get_experiment_by_name(EXPERIMENT) is None:
        client.create_experiment(EXPERIMENT)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    if args.threads:
        torch.set_num_threads(args.threads)
    problem = backend_problem("mlflow-http")
    if problem is not None:
        print(f"cannot run: {problem}")
        return 2
    began = time.monotonic()
    print(f"gradtrack with a slow / silent MLflow server: {machine(torch.device('cpu'))}")
    base, _, _ = MODELS[args.model].make(args.small, torch.device("cpu"))
    tensors, numel = len(list(base.parameters())), sum(p.numel() for p in base.parameters())
    print(
        f"model {args.model}{' (small)' if args.small else ''}: {tensors:,} tensors, {numel / 1e6:.2f}M parameters; "
        f"{args.steps} timed steps per configuration, {args.warmup} warm-up, blocks of {args.block}, medians; "
        f"request_timeout={args.request_timeout:g}s exit_timeout={args.exit_timeout:g}s\n"
    )
    rounds: list[Round] = []
    with tempfile.TemporaryDirectory(prefix="gradtrack-slow-") as tmp:
        workdir = Path(tmp)
        with MlflowServer(workdir / "mlflow-server") as running:  # its job runner off (see MlflowServer)
            server = running.uri
            quiet_s = wait_quiet(server)
            create_experiment(server)
            with FaultServer(server, mode="delay", delay_s=args.delay_ms / 1e3) as proxy, FaultServer() as hung:
                slow, silent = proxy.uri, hung.uri
                direct_ms = statistics.median(request_ms(f"{server}/health", 5) for _ in range(3))
                slow_ms = statistics.median(request_ms(f"{slow}/health", 5) for _ in range(3))
                silent_ms = request_ms(f"{silent}/health", args.request_timeout)
                print(
                    f"server up and quiet after {time.monotonic() - began:.0f} s (waited {quiet_s:.0f} s for "
                    f"its CPU to settle); GET /health: direct {direct_ms:.0f} ms, "
                    f"via proxy {slow_ms:.0f} ms, silent server {silent_ms:.0f} ms (gives up after "
                    f"{args.request_timeout:g} s)\n"
                )
                uris = {"direct": server, "slow": slow, "silent": silent}
                for layer_every in args.layer_every:
                    start = time.monotonic()
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore", DeprecationWarning)
                        result = run_round(layer_every, uris, server, args, workdir)
                    rounds.append(result)
                    print(f"## layer_every={layer_every} ({time.monotonic() - start:.0f} s)\n")
                    print(round_tables(result, args) + "\n", flush=True)
                print(f"proxy connections {proxy.accepted}, silent connections {hung.accepted}")
    print("\n## Targets (issue 5: slow or silent server)\n")
    for line in targets(rounds, args):
        print(line)
    print(f"\ntotal {time.monotonic() - began:.0f} s; load average at the end: "
          f"{' '.join(f'{v:.2f}' for v in os.getloadavg())}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())

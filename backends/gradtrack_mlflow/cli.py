"""The MLflow plugin's commands: ``gradtrack runs``, ``gradtrack report``, ``gradtrack replay``, ``gradtrack watch``,
``gradtrack view``.

They read the tracking server (``--tracking-uri``, else MLflow's own configuration: ``MLFLOW_TRACKING_URI``,
else ``sqlite:///mlflow.db`` here) with MLflow's client, imported when a command runs.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
from pathlib import Path
from typing import Any

from gradtrack.delivery.history import RunHistory
from gradtrack.delivery.secrets import redact
from gradtrack_mlflow.links import diverged_link, view_link
from gradtrack_mlflow.view import VIEW_TAG
from gradtrack_mlflow.watch_reader import newest

__all__ = ["add_commands"]

LAYER_FETCH_LIMIT = 200  # per-layer histories fetched for a report; past it, the layers largest at the end


def add_commands(commands: Any) -> None:
    runs = commands.add_parser(
        "runs",
        help="a table of the runs gradtrack logged, with their gradient health",
        description="A table of the runs gradtrack logged to MLflow, then, for each experiment in it, the links "
        "that open the MLflow UI on its diverged runs and on its gradtrack view. Exit code 0; 2 when the server "
        "cannot be read or an experiment does not exist.",
    )
    runs.add_argument("--experiment", action="append", help="an experiment name (repeatable; default: all)")
    runs.add_argument("--diverged", action="store_true", help="only the runs tagged diverged=true")
    runs.add_argument("--tracking-uri", help="the MLflow tracking URI (default: MLflow's own configuration)")
    runs.add_argument("--json", action="store_true", help="print a JSON list of objects instead of a table")
    runs.add_argument("--limit", type=int, default=1000, help="at most this many runs (default 1000)")
    runs.set_defaults(handler=_runs)

    report = commands.add_parser("report", help="plots and a summary of one run",
                                 description="From a run's logged metrics: the total norm over steps (log scale, "
                                             "explosion threshold, explosions, rollbacks, the divergence point) and a "
                                             "heatmap of per-layer norms; prints the summary and the top offenders. "
                                             "Exit code 0; 2 when the run cannot be read.")  # fmt: skip
    report.add_argument("run_id", help="the MLflow run id")
    report.add_argument("-o", "--output", help="FILE.png or FILE.html (default: gradtrack-report-<run>.png)")
    report.add_argument("--tracking-uri", help="the MLflow tracking URI (default: MLflow's own configuration)")
    report.set_defaults(handler=_report)

    replay = commands.add_parser("replay", help="send a spool a run left behind to MLflow",
                                 description="Send a spool left by a run (see the SpoolLeftWarning) to MLflow; the "
                                             "same as `python -m gradtrack_mlflow replay`. Exit code 0 when "
                                             "everything was sent, 1 when the server refused or stopped answering "
                                             "(run it again), 2 for a file that is not a gradtrack spool.")  # fmt: skip
    replay.add_argument("spool", help="the spool.jsonl file (or its directory) named in the warning")
    replay.add_argument("--tracking-uri", help="send to this tracking URI instead of the recorded one")
    replay.add_argument("--request-timeout", type=float, default=30.0, help="seconds per request")
    replay.set_defaults(handler=_replay)

    from gradtrack_mlflow.view_command import add_parser as add_view

    add_view(commands)
    try:
        from gradtrack_mlflow.watch import add_parser as add_watch
    except ImportError:
        return
    add_watch(commands)


def _client(uri: str | None) -> Any:
    from mlflow.tracking import MlflowClient

    return MlflowClient(uri) if uri else MlflowClient()


def _runs(args: argparse.Namespace) -> int:
    try:
        client = _client(args.tracking_uri)
        if args.experiment:
            experiments = [client.get_experiment_by_name(name) for name in args.experiment]
            missing = [name for name, found in zip(args.experiment, experiments, strict=True) if found is None]
            if missing:
                print(f"no such experiment: {', '.join(missing)}", file=sys.stderr)
                return 2
        else:
            experiments = client.search_experiments()
        wanted = "tags.diverged = 'true'" if args.diverged else ""
        found = client.search_runs([e.experiment_id for e in experiments], wanted, max_results=args.limit)
    except Exception as exc:
        print(f"cannot read the runs: {redact(str(exc), [args.tracking_uri or ''])}", file=sys.stderr)
        return 2
    names = {e.experiment_id: e.name for e in experiments}
    rows = [_row(run, names) for run in found if "diverged" in run.data.tags]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    headers = ("run", "name", "experiment", "status", "diverged", "explosions", "first expl.", "clip rate",
               "p95 norm", "max_norm")  # fmt: skip
    table = [headers] + [
        (r["run_id"][:8], r["run_name"] or "", r["experiment"], r["status"], r["diverged"], _text(r["explosions"]),
         _text(r["first_explosion_step"]), _rate(r["clip_rate"]), _number(r["norm_p95"]),
         _number(r["recommended_max_norm"]))
        for r in rows
    ]  # fmt: skip
    widths = [max(len(str(row[i])) for row in table) for i in range(len(headers))]
    for row in table:
        print("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())
    shown = {row["experiment"] for row in rows}
    _print_links(args.tracking_uri or client.tracking_uri, [e for e in experiments if e.name in shown])
    return 0


def _print_links(uri: str, experiments: list[Any]) -> None:
    """Per experiment of the table: the MLflow UI on its diverged runs, and on its gradtrack view."""
    for experiment in experiments:
        print(f"\n{experiment.name}: diverged runs {diverged_link(uri, experiment.experiment_id)}")
        if VIEW_TAG in experiment.tags:
            print(f"{experiment.name}: gradtrack view {view_link(uri, experiment.experiment_id)}")
        else:
            print(f"{experiment.name}: no gradtrack view; add it with: gradtrack view {experiment.experiment_id}")


def _row(run: Any, experiments: dict[str, str]) -> dict[str, Any]:
    tags, metrics = run.data.tags, run.data.metrics

    def tag_int(key: str) -> int | None:
        return int(tags[key]) if tags.get(key, "").lstrip("-").isdigit() else None

    return {
        "run_id": run.info.run_id,
        "run_name": run.info.run_name,
        "experiment": experiments.get(run.info.experiment_id, run.info.experiment_id),
        "status": run.info.status,
        "diverged": tags.get("diverged") == "true",
        "diverged_step": tag_int("gradtrack.diverged_step"),
        "diverged_reason": tags.get("gradtrack.diverged_reason"),
        "explosions": tag_int("gradtrack.explosions"),
        "first_explosion_step": tag_int("gradtrack.first_explosion_step"),
        "clip_rate": metrics.get("gradtrack.summary.clip_rate"),
        "norm_p95": metrics.get("gradtrack.summary.norm_p95"),
        "recommended_max_norm": metrics.get("gradtrack.summary.recommended_max_norm"),
        "top_offenders": tags.get("gradtrack.summary.top_offenders"),
    }


def _text(value: Any) -> str:
    return "-" if value is None else str(value)


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"


def _rate(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"


def history_of(client: Any, run: Any, before: int | None = None) -> RunHistory:
    """A run's history rebuilt from its logged metrics (``gradtrack report`` draws it); with ``before``,
    the steps before that one only (a resumed run's earlier processes)."""
    history = RunHistory()
    threshold = run.data.params.get("gradtrack.explosion_threshold")
    history.threshold = float(threshold) if threshold else None
    run_id = run.info.run_id
    norms = newest(client.get_metric_history(run_id, "grad/total_norm"), before)
    for step, value in norms.items():
        history.add_step(step, value)
    flags = newest(client.get_metric_history(run_id, "grad/explosion"), before)
    explosions = [step for step, value in flags.items() if value >= 1]
    for step in explosions:
        history.add_explosion(step, norms.get(step, math.nan))
    # grad/rollback is logged (=1) at rollback steps only; which step's state came back is not a metric
    for step, value in newest(client.get_metric_history(run_id, "grad/rollback"), before).items():
        if value >= 1:
            history.add_rollback(step, None)
    if run.data.tags.get("gradtrack.diverged_step", "").isdigit():
        history.diverged_step = int(run.data.tags["gradtrack.diverged_step"])
        history.diverged_reason = run.data.tags.get("gradtrack.diverged_reason")
    layers = [key for key in run.data.metrics if key.startswith("grad_norm/")]
    if len(layers) > LAYER_FETCH_LIMIT:
        layers = sorted(layers, key=lambda key: run.data.metrics[key], reverse=True)[:LAYER_FETCH_LIMIT]
    for key in sorted(layers):
        for step, value in newest(client.get_metric_history(run_id, key), before).items():
            history.add_step_layer(step, key.removeprefix("grad_norm/"), value)
    return history


def _report(args: argparse.Namespace) -> int:
    from gradtrack.delivery.plots import draw_layers, draw_norms, report_html

    try:
        client = _client(args.tracking_uri)
        run = client.get_run(args.run_id)
        history = history_of(client, run)
    except Exception as exc:
        print(f"cannot read run {args.run_id}: {redact(str(exc), [args.tracking_uri or ''])}", file=sys.stderr)
        return 2
    row = _row(run, {})
    output = Path(args.output or f"gradtrack-report-{args.run_id[:8]}.png")
    title = f"{run.info.run_name or args.run_id} ({run.info.status})"
    with tempfile.TemporaryDirectory(prefix="gradtrack-report-") as folder:
        norms = draw_norms(history, Path(folder, "norms.png"), title)
        layers = draw_layers(history, Path(folder, "layers.png"))
        if output.suffix.lower() == ".html":
            summary = {k: v for k, v in row.items() if k not in ("experiment",)}
            output.write_text(report_html(f"gradtrack report: {title}", summary, [norms, layers]))
        else:
            _stack([norms, layers], output)
    print(f"run {row['run_id']} ({row['run_name']}): {row['status']}, diverged {row['diverged']}"
          + (f" at step {row['diverged_step']}: {row['diverged_reason']}" if row["diverged"] else ""))  # fmt: skip
    print(
        f"explosions {_text(row['explosions'])}, first at step {_text(row['first_explosion_step'])}; "
        f"clip rate {_rate(row['clip_rate'])}; p95 norm {_number(row['norm_p95'])}; "
        f"recommended max_norm {_number(row['recommended_max_norm'])}"
    )
    print(f"top offenders: {row['top_offenders'] or 'none'}")
    print(f"written: {output}")
    return 0


def _stack(images: list[Path], output: Path) -> None:
    """One PNG of the pictures one above the other (white padding to the widest)."""
    import matplotlib.image as image
    import numpy as np

    pictures = [image.imread(str(path)) for path in images]
    width = max(picture.shape[1] for picture in pictures)
    padded = [np.pad(p, ((0, 0), (0, width - p.shape[1]), (0, 0)), constant_values=1.0) for p in pictures]
    image.imsave(str(output), np.concatenate(padded, axis=0))


def _replay(args: argparse.Namespace) -> int:
    from gradtrack_mlflow.__main__ import main as replay_main

    argv = ["replay", args.spool, "--request-timeout", str(args.request_timeout)]
    if args.tracking_uri:
        argv += ["--tracking-uri", args.tracking_uri]
    return replay_main(argv)

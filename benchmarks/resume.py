"""What resuming costs: the state's size in a checkpoint, and the time to save it, load it and enter.

For each model and clip policy: train ``--steps`` steps (so every window is full), then measure
``tracker.state_dict()``, the ``torch.save`` size of the state alone, ``load_state_dict`` (which checks
the state on a copy first) and entering the resumed tracker, with no backend and with the MLflow backend
on a local store (entering starts the reporter process; the run is found again in the reporter, after
entering). Median of ``--repeats``.

    python benchmarks/resume.py
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from _models import MODELS

from gradtrack import GradTracker


def _train(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int, **options: Any) -> GradTracker:
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4)
    with GradTracker(model, **options) as tracker:
        for _ in range(steps):
            optimizer.zero_grad()
            torch.nn.functional.mse_loss(model(x), y).backward()
            optimizer.step()
    return tracker


def _median_ms(samples: list[float]) -> str:
    return f"{statistics.median(samples) * 1000:.1f}"


def measure(model_key: str, clip: str, backend: str | None, args: argparse.Namespace, store: str) -> list[str]:
    model, x, y = MODELS[model_key].make(quick=model_key != "many", device=torch.device("cpu"))  # 1,000 tensors
    options: dict[str, Any] = {"clip": clip, "layer_every": 10}
    if clip in ("adaptive", "adagc"):
        options["max_norm"] = 5.0
    if backend == "mlflow":
        options.update(backend="mlflow", backend_options={"mlflow": {"tracking_uri": store, "plots": False,
                                                                      "experiment_name": "resume-bench"}})  # fmt: skip
    tracker = _train(model, x, y, args.steps, **options)
    saves, loads, enters = [], [], []
    for _ in range(args.repeats):
        started = time.perf_counter()
        state = tracker.state_dict()
        saves.append(time.perf_counter() - started)
        fresh = GradTracker(model, **options)
        started = time.perf_counter()
        fresh.load_state_dict(state)
        loads.append(time.perf_counter() - started)
        started = time.perf_counter()
        fresh.__enter__()
        enters.append(time.perf_counter() - started)
        fresh.__exit__(None, None, None)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    tensors = sum(1 for _ in model.parameters())
    return [MODELS[model_key].key, str(tensors), clip, backend or "none", f"{buffer.tell() / 1024:.1f}",
            _median_ms(saves), _median_ms(loads), _median_ms(enters)]  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1100, help="steps before the state is taken (windows full)")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = [["model", "tensors", "clip", "backend", "state KiB", "state_dict ms", "load_state_dict ms", "enter ms"]]
    with tempfile.TemporaryDirectory(prefix="gradtrack-resume-bench-") as folder:
        os.chdir(folder)
        store = f"sqlite:///{Path(folder, 'mlflow.db')}"
        for model_key, clip, backend in (
            ("rnn", "norm", None),
            ("rnn", "auto", None),
            ("many", "norm", None),
            ("many", "auto", None),
            ("many", "adagc", None),
            ("many", "auto", "mlflow"),
        ):
            rows.append(measure(model_key, clip, backend, args, store))
            print(" | ".join(rows[-1]), file=sys.stderr, flush=True)
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    print(
        f"resume costs, {args.steps} steps before the state is taken, median of {args.repeats}; torch "
        f"{torch.__version__}, {os.cpu_count()} CPUs"
    )
    for row in rows:
        print("  ".join(cell.rjust(width) for cell, width in zip(row, widths, strict=True)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

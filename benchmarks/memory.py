"""Bounded memory (issue 5): many tracked steps with per-layer metrics every step must not grow RSS.

Runs ``--steps`` tracked steps (default 20,000) on ``--tensors`` parameter tensors (default 1,000),
with ``layer_every=1``, and samples the resident set size. Only gradtrack's own work runs per step
(``tracker.step()`` on fixed gradients), so the growth measured is gradtrack's and its backend's.

    .venv/bin/python benchmarks/memory.py                    # backend=None
    .venv/bin/python benchmarks/memory.py --backend mlflow   # local sqlite, in a temporary folder
    .venv/bin/python benchmarks/memory.py --backend wandb    # offline, in a temporary folder
"""

from __future__ import annotations

import argparse
import gc
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import psutil
import torch
from _models import tensor_list

from gradtrack import GradTracker


def backend_options(backend: str, workdir: Path) -> dict[str, dict[str, Any]] | None:
    if backend == "mlflow":
        return {"mlflow": {"tracking_uri": f"sqlite:///{workdir / 'mlflow.db'}", "spool_dir": str(workdir / "spool")}}
    if backend == "wandb":
        return {"wandb": {"mode": "offline", "dir": str(workdir), "project": "gradtrack-memory"}}
    return None


def rss_mb() -> float:
    gc.collect()
    return float(psutil.Process().memory_info().rss) / 2**20


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20_000)
    parser.add_argument("--tensors", type=int, default=1_000)
    parser.add_argument("--numel", type=int, default=64, help="elements per tensor")
    parser.add_argument("--backend", choices=("none", "mlflow", "wandb"), default="none")
    parser.add_argument("--warmup", type=int, default=500, help="steps before the baseline sample")
    parser.add_argument("--limit-mb", type=float, default=50.0)
    args = parser.parse_args(argv)
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("WANDB_SILENT", "true")
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    workdir = Path(tempfile.mkdtemp(prefix="gradtrack-memory-"))
    params = tensor_list(args.tensors, args.numel, torch.device("cpu"))
    backend = None if args.backend == "none" else args.backend
    # max_norm far above the norm: the clip multiplies by 1.0, so the gradients stay as they are.
    options = backend_options(backend or "", workdir)
    tracker = GradTracker(params, backend, clip="norm", max_norm=1e12, layer_every=1, backend_options=options)
    every = max(1, args.steps // 10)
    samples: list[tuple[int, float, float]] = []
    began = time.monotonic()
    try:
        with tracker:
            for step in range(args.warmup + args.steps):
                tracker.observe(loss=torch.tensor(1.0))
                tracker.step()
                done = step + 1 - args.warmup
                if done == 0 or (done > 0 and done % every == 0):
                    tracker.flush(120.0)
                    samples.append((done, rss_mb(), time.monotonic() - began))
            tracker.flush(300.0)
            if samples[-1][0] != args.steps:
                samples.append((args.steps, rss_mb(), time.monotonic() - began))
    finally:
        if "wandb" in sys.modules:
            sys.modules["wandb"].teardown()
        shutil.rmtree(workdir, ignore_errors=True)
    baseline = samples[0][1]
    print(f"gradtrack memory: {args.steps:,} steps, {args.tensors:,} tensors, layer_every=1, backend={args.backend}")
    print(f"{'step':>8}  {'RSS MB':>8}  {'growth MB':>9}  {'elapsed s':>9}")
    for step, rss, elapsed in samples:
        print(f"{step:>8,}  {rss:>8.1f}  {rss - baseline:>9.1f}  {elapsed:>9.1f}")
    growth = max(rss for _, rss, _ in samples) - baseline
    verdict = "PASS" if growth <= args.limit_mb else "FAIL"
    print(f"[{verdict}] peak growth {growth:.1f} MB after warm-up; target <= {args.limit_mb:g} MB")
    print(f"dropped records (back-pressure): {tracker.summary().dropped_records}")
    return 0 if verdict == "PASS" else 1


if __name__ == "__main__":
    sys.exit(main())

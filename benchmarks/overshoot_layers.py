"""Does the per-layer overshoot ratio separate runs too hot to learn from healthy ones, where the global one does not?

A study for issue 25, on the scenarios the healing rules were designed on (the original and issue-19 ones, never
the held-out too-hot group) and the stable ones: each seed trained under ``clip="norm"`` at 1.0 with the indicator
sampling every step (``overshoot_every=1``), monitor only, every sample's global and per-layer ratios recorded
(``gradtrack.step.pipeline.ratios`` wrapped). For each run, over every window of 20 samples with at least 10
valid values: the largest share of the global ratio above 2, the largest share of any one layer's ratio above 2,
and the largest median of any one layer's. Diverging runs are split into those the clip alone rescued (issue 19's
rule: at least half the twin's progress from L0 kept) and those it lost.

    .venv/bin/python benchmarks/overshoot_layers.py            # 130 runs, under a minute on 2 workers
"""

from __future__ import annotations

import argparse
import collections
import math
import multiprocessing
import time
from typing import Any

import numpy as np

SCENARIOS = ["deep-mlp", "rnn-r3", "lstm-hot", "gru-hot", "gru-ramp", "lr-ramp", "rnn", "lsq-momentum", "lsq-1.05",
             "rnn-r1.5", "transformer-sgd", "tiny-noisy", "heavy-tail", "lr-switch", "data-switch"]  # fmt: skip
WINDOW, ENOUGH, EDGE = 20, 10, 2.0


def _run(job: tuple[str, int, bool]) -> dict[str, Any]:
    key, seed, twin = job
    import torch

    torch.set_num_threads(1)
    import detection
    from _scenarios import SCENARIOS as ALL

    import gradtrack.step.pipeline as pipeline

    samples: list[tuple[float, list[float]]] = []
    ratios = pipeline.ratios

    def recorded(before: np.ndarray, after: np.ndarray, clip_coef: float) -> tuple[float, np.ndarray]:
        overall, per_layer = ratios(before, after, clip_coef)
        samples.append((overall, per_layer.tolist()))
        return overall, per_layer

    pipeline.ratios = recorded  # type: ignore[assignment]
    try:
        run = detection.train(ALL[key], seed, twin, "gt:study",
                              {"clip": "norm", "max_norm": 1.0, "overshoot_every": 1})  # fmt: skip
    finally:
        pipeline.ratios = ratios  # type: ignore[assignment]
    return {"key": key, "seed": seed, "twin": twin, "diverging": ALL[key].diverging and not twin,
            "initial": run.initial, "final": run.final, "samples": samples}  # fmt: skip


def _windows(samples: list[tuple[float, list[float]]]) -> tuple[float, float, float]:
    overall = np.array([value for value, _ in samples], float)
    layers = np.array([per for _, per in samples], float)
    share = layer_share = layer_median = 0.0
    for end in range(WINDOW, len(samples) + 1):
        window = overall[end - WINDOW : end]
        valid = window[np.isfinite(window)]
        if valid.size >= ENOUGH:
            share = max(share, float((valid > EDGE).mean()))
        for column in layers[end - WINDOW : end].T:
            valid = column[np.isfinite(column)]
            if valid.size >= ENOUGH:
                layer_share = max(layer_share, float((valid > EDGE).mean()))
                layer_median = max(layer_median, float(np.median(valid)))
    return share, layer_share, layer_median


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=2)
    args = parser.parse_args()
    from _scenarios import SCENARIOS as ALL

    jobs = [(key, seed, twin) for key in SCENARIOS for seed in range(5)
            for twin in ((False, True) if ALL[key].diverging else (False,))]  # fmt: skip
    began = time.perf_counter()
    with multiprocessing.get_context("spawn").Pool(args.jobs) as pool:
        runs = pool.map(_run, jobs)
    twins = {(r["key"], r["seed"]): r["final"] for r in runs if r["twin"]}
    rows: dict[tuple[str, str], list[tuple[float, float, float]]] = collections.defaultdict(list)
    for r in runs:
        if r["diverging"]:
            twin, initial, final = twins[(r["key"], r["seed"])], r["initial"], r["final"]
            kept = math.isfinite(final) and initial - final >= (initial - twin) / 2
            kind = "diverging, rescued by the clip" if kept else "diverging, LOST under the clip"
        else:
            kind = "healthy twin" if r["twin"] else "stable"
        rows[(r["key"], kind)].append(_windows(r["samples"]))
    print(f"{time.strftime('%Y-%m-%d')}, `python benchmarks/overshoot_layers.py`, {len(runs)} runs in "
          f"{time.perf_counter() - began:.0f} s; per seed, the largest over windows of {WINDOW} samples\n")  # fmt: skip
    print("| scenario | runs | global: share above 2 | worst layer: share above 2 | worst layer: median |")
    print("|:---|:---|:---|:---|:---|")
    for (key, kind), values in sorted(rows.items()):
        cells = [" ".join(f"{v[i]:.2f}" for v in values) for i in range(3)]
        print(f"| {key} | {kind} | {cells[0]} | {cells[1]} | {cells[2]} |")


if __name__ == "__main__":
    main()

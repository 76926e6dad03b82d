"""docs/overshoot.png: the loss and grad/overshoot of lsq-edge (seed 0) and its healthy twin, with the warning.

.venv/bin/python scripts/overshoot_figure.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import matplotlib
import torch

matplotlib.use("Agg")
import matplotlib.pyplot as plt

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import detection  # noqa: E402
from _scenarios import SCENARIOS  # noqa: E402


def main() -> None:
    torch.set_num_threads(1)
    scenario = SCENARIOS["lsq-edge"]
    truth = detection.train(scenario, 0, False, "untracked", None)
    onset = detection.blowup_step(truth.losses, truth.initial)
    run = detection.train(scenario, 0, False, "gt:monitor+loss", {"clip": None})  # the defaults otherwise
    twin = detection.train(scenario, 0, True, "gt:monitor+loss", {"clip": None})
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 5.2), sharex=True, gridspec_kw={"height_ratios": [1, 1.3]})
    top.semilogy(run.losses, color="#444", lw=1.2, label="loss, lr = 1.01 x 2/lambda_max")
    top.semilogy(twin.losses, color="#9bb", lw=1.0, label="healthy twin, lr = 1/lambda_max")
    top.axvline(onset, color="#c33", ls="--", lw=1)
    top.set_ylabel("training loss")
    top.legend(loc="upper left", fontsize=8)
    for trace, color, label in ((run, "#2a6", "grad/overshoot"), (twin, "#9bb", "healthy twin")):
        steps = sorted(trace.overshoot)
        bottom.plot(steps, [trace.overshoot[s] for s in steps], ".", ms=3, color=color, label=label)
    bottom.axhline(2.0, color="#888", lw=0.8)
    bottom.text(2, 2.05, "edge: 2", fontsize=8, color="#666")
    if run.instability_steps:
        warned = run.instability_steps[0]
        bottom.axvline(warned, color="#e90", lw=1.2)
        bottom.text(warned + 2, 0.3, f"warning, step {warned}", fontsize=8, color="#a60")
    bottom.axvline(onset, color="#c33", ls="--", lw=1)
    bottom.text(onset + 2, 0.6, f"blow-up, step {onset}", fontsize=8, color="#c33")
    bottom.set_ylim(0, 2.6)
    bottom.set_ylabel("lr x curvature along the step")
    bottom.set_xlabel("step")
    bottom.legend(loc="lower right", fontsize=8)
    fig.suptitle("lsq-edge, seed 0: the steps overshoot long before the loss blows up", fontsize=10)
    fig.tight_layout()
    fig.savefig(ROOT / "docs" / "overshoot.png", dpi=110)
    print(f"blow-up {onset}, warnings {run.instability_steps}, first explosion {run.explosion_steps[:1]}, "
          f"diverged {run.diverged_step}")  # fmt: skip


if __name__ == "__main__":
    main()

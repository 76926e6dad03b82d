"""A job that is stopped and resumed from its checkpoint, logging into one MLflow run throughout.

The training state gradtrack keeps (the step, the detectors' windows, what the clip policy learnt, the run's
summary and the identity of its MLflow run) goes into the script's own checkpoint beside the model's and the
optimizer's, and comes back with ``torch.load`` at its default ``weights_only=True``. Try it:

    python examples/resume.py --kill-at 130   # checkpoints every 50 steps, then dies at step 130 (SIGKILL)
    python examples/resume.py                  # goes on from step 100, in the same run, to step 300

The MLflow run (``sqlite:///mlflow.db`` unless ``MLFLOW_TRACKING_URI`` says otherwise) ends ``FINISHED`` with
a point for every step, the tag ``gradtrack.resumes`` = 1, and a description saying where it resumed. Steps
100 to 130 were trained twice: MLflow keeps both values of those steps, and gradtrack's report and plots use
the newest. Delete the checkpoint to start a new run.
"""

from __future__ import annotations

import argparse
import os
import signal
from pathlib import Path

import torch
from torch import nn

from gradtrack import GradTracker


class Tagger(nn.Module):
    """A small GRU that reads a sequence and predicts a sum of its early inputs."""

    def __init__(self) -> None:
        super().__init__()
        self.gru = nn.GRU(input_size=8, hidden_size=32, batch_first=True)
        self.readout = nn.Linear(32, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, hidden = self.gru(x)
        return self.readout(hidden[-1]).squeeze(-1)


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch of a step, the same in every process: a resumed job sees the data it would have seen."""
    generator = torch.Generator().manual_seed(step)
    x = torch.randn(16, 40, 8, generator=generator)
    return x, x[:, :4, 0].sum(1)


def save(path: Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer, tracker: GradTracker) -> None:
    """Write, then rename: a job killed while saving keeps its previous checkpoint."""
    state = {"step": step, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
             "gradtrack": tracker.state_dict()}  # fmt: skip
    partial = path.with_suffix(".partial")
    torch.save(state, partial)
    os.replace(partial, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, default=Path("resume-checkpoint.pt"))
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--every", type=int, default=50, help="steps between checkpoints")
    parser.add_argument("--kill-at", type=int, default=None, help="die (SIGKILL) after this step, as a preempted job")
    parser.add_argument("--experiment", default="gradtrack-resume-example")
    args = parser.parse_args()

    torch.manual_seed(0)
    model = Tagger()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    tracker = GradTracker(model, backend="mlflow", max_norm=1.0,
                          backend_options={"mlflow": {"experiment_name": args.experiment}})  # fmt: skip
    start = 0
    if args.checkpoint.exists():
        checkpoint = torch.load(args.checkpoint)  # weights_only=True: plain values and tensors only
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        tracker.load_state_dict(checkpoint["gradtrack"])  # before entering: the same run, from this step
        start = checkpoint["step"]
        print(f"resuming from step {start}", flush=True)
    with tracker:
        for step in range(start, args.steps):
            x, y = batch(step)
            optimizer.zero_grad()
            loss = nn.functional.mse_loss(model(x), y)
            tracker.observe(loss)
            loss.backward()
            optimizer.step()  # gradtrack measured and clipped the gradients just before the update
            if (step + 1) % args.every == 0:
                save(args.checkpoint, step + 1, model, optimizer, tracker)
            print(f"step {step} loss {loss.item():.4f}", flush=True)
            if step == args.kill_at:
                os.kill(os.getpid(), signal.SIGKILL)  # no cleanup at all, as a preempted machine
    summary = tracker.summary()
    print(f"done: {summary.steps} steps, resumed from {list(summary.resumed_from)}, diverged {summary.diverged}")


if __name__ == "__main__":
    main()

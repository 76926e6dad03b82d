"""A training process for tests that kill it: ``python trainer_script.py BACKEND TARGET NAME PROGRESS``.

It trains a small MLP with one backend (``mlflow``: TARGET is the tracking URI and NAME the experiment;
``wandb``: TARGET is the offline run directory and NAME the project; ``console``) until it is killed,
appending the number of finished optimizer steps to PROGRESS after each one, so the test knows what
was handed over before the signal.
"""

from __future__ import annotations

import sys
import time

import torch
from torch import nn

from gradtrack import GradTracker


def main(backend: str, target: str, name: str, progress: str) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    options = {
        "mlflow": {"mlflow": {"tracking_uri": target, "experiment_name": name, "spool_dir": progress + ".spool"}},
        "wandb": {"wandb": {"dir": target, "project": name, "mode": "offline"}},
        "console": {"console": {"every": 10}},
    }[backend]
    with (
        GradTracker(model, backend=backend, backend_options=options, layer_every=5) as tracker,
        open(progress, "a", buffering=1) as out,
    ):
        for step in range(100_000):
            x = torch.randn(32, 8)
            loss = nn.functional.mse_loss(model(x).squeeze(-1), x.sum(-1))
            optimizer.zero_grad()
            loss.backward()
            tracker.observe(loss)
            optimizer.step()  # the step's record is in the reporter's pipe when this returns
            out.write(f"{step + 1}\n")
            time.sleep(0.01)


if __name__ == "__main__":
    main(*sys.argv[1:5])

"""One trainer of the load test: ``python load_trainer.py URI EXPERIMENT RUN_NAME STEPS OUT`` (URI "none": no backend).

A 16-tensor MLP, per-layer norms every step, a fixed batch; writes to OUT (JSON) the mean step time
and the mean CPU time this process spent per step, after warm-up, and what the tracker's summary says
was dropped.
"""

from __future__ import annotations

import json
import sys
import time

import torch
from torch import nn

from gradtrack import GradTracker


def main(uri: str, experiment: str, run_name: str, steps: int, out: str) -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Sequential(nn.Linear(32, 32), nn.Tanh()) for _ in range(8)])
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    x, y = torch.randn(64, 32), torch.randn(64, 32)
    options = {"mlflow": {"tracking_uri": uri, "experiment_name": experiment, "run_name": run_name,
                          "exit_timeout": 120.0}}  # fmt: skip
    backend = None if uri == "none" else "mlflow"
    times = []
    cpu = []
    # Per-layer norms and the weights' norms every step: the heaviest load a trainer can put on the server.
    with GradTracker(model, backend=backend, backend_options=options if backend else None, layer_every=1,
                     weight_every=1, close_timeout=180.0) as tracker:  # fmt: skip
        for _ in range(steps):
            began, began_cpu = time.perf_counter(), time.process_time()
            optimizer.zero_grad()
            loss = nn.functional.mse_loss(model(x), y)
            loss.backward()
            tracker.observe(loss)
            optimizer.step()
            times.append(time.perf_counter() - began)
            cpu.append(time.process_time() - began_cpu)
        left_at = time.time()
    warm, warm_cpu = times[len(times) // 10 :], cpu[len(cpu) // 10 :]
    result = {"step_ms": 1e3 * sum(warm) / len(warm), "cpu_ms": 1e3 * sum(warm_cpu) / len(warm_cpu),
              "dropped": tracker.summary().dropped_records,
              "steps": tracker.steps, "left_at": left_at, "finished_at": time.time()}  # fmt: skip
    with open(out, "w") as file:
        json.dump(result, file)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5])

"""The built-in console backend prints what a hand-written loop would."""

from __future__ import annotations

import io

import torch

from gradtrack import GradTracker
from gradtrack_testing.healing import healed_run
from gradtrack_testing.models import mlp
from gradtrack_testing.recording import RecordingBackend


def test_console_lines() -> None:
    stream = io.StringIO()
    model = mlp()
    options = {"console": {"every": 2, "stream": stream}}
    with GradTracker(model, backend="console", backend_options=options, clip=None, explosion_threshold=50) as tracker:
        for step in range(4):
            model(torch.randn(4, 8)).sum().backward()
            if step == 3:
                model[0].weight.grad.mul_(1e4)  # type: ignore[index, union-attr]
            tracker.observe(torch.tensor(0.5))
            tracker.step()
    lines = stream.getvalue().splitlines()
    assert lines[0] == "[gradtrack] tracking 6 tensors of Sequential; clip=none"
    assert lines[1].startswith("[gradtrack] Step    0: loss=0.5000, grad_norm=") and lines[1].endswith("[OK]")
    assert lines[2].startswith("[gradtrack] Step    2: ")
    assert lines[3].startswith("[gradtrack] EXPLOSION step 3: threshold explosion, total_norm=")
    assert "offenders: 0.weight (" in lines[3]
    assert lines[4].startswith("[gradtrack] run finished: 4 steps") and "explosions 1" in lines[4]


def test_console_prints_each_rollback_and_counts_them_at_the_end() -> None:
    stream, recorder = io.StringIO(), RecordingBackend()
    healed_run(["console", recorder], poison=(27, 57), backend_options={"console": {"stream": stream}})
    events = recorder.of("rollback")
    assert [(event.step, event.restored_step, event.lr_scale) for event in events] == [(27, 20, 1.0), (57, 50, 0.5)]
    lines = stream.getvalue().splitlines()
    rollbacks = [line for line in lines if "ROLLBACK" in line]
    assert rollbacks == [f"[gradtrack] ROLLBACK {event.describe()}" for event in events]
    assert "rolled back to step 20" in rollbacks[0] and "learning rate x0.5 (rollback 2)" in rollbacks[1]
    assert lines.index(rollbacks[0]) > lines.index(next(line for line in lines if "EXPLOSION step 27" in line))
    assert not any("DIVERGED" in line for line in lines)  # healed, not diverged
    assert "rollbacks 2 (learning rate x0.5), diverged False" in lines[-1]

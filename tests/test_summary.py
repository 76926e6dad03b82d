"""Run-long statistics in bounded memory, built the same way from the hand-over in both processes."""

from __future__ import annotations

import math
import os
import time
from pathlib import Path

import numpy as np
import pytest

from gradtrack.events import Explosion, Offender
from gradtrack.handover.messages import ExplosionRaised, StepRecord
from gradtrack.handover.summary import CHUNK, NormHistogram, RunSummary, SpikeScore


def _record(step: int, total_norm: float, **fields: object) -> StepRecord:
    return StepRecord(step=step, timestamp=time.time(), total_norm=total_norm, **fields)  # type: ignore[arg-type]


def test_histogram_quantiles_are_within_its_resolution() -> None:
    values = np.random.default_rng(0).lognormal(0.0, 2.0, 20_000)
    histogram = NormHistogram()
    for chunk in np.array_split(values, 7):
        histogram.add(chunk)
    histogram.add(np.array([math.nan, math.inf]))
    for q in (0.5, 0.95, 0.99):
        assert histogram.quantile(q) == pytest.approx(np.quantile(values, q), rel=0.015)
    assert histogram.max == values.max() and histogram.count == values.size
    assert NormHistogram().quantile(0.5) is None


def test_recommended_max_norm_ignores_exploded_steps() -> None:
    summary = RunSummary()
    for step in range(100):
        summary.add(_record(step, float(step % 10 + 1)))
    summary.add(_record(100, 1e9, explosion=True))
    frozen = summary.freeze()
    assert frozen.recommended_max_norm == pytest.approx(10.0, rel=0.02)
    assert frozen.norm_max == 1e9 and frozen.steps == 101


def test_spike_score_counts_seven_sigma_values_against_the_window_before_each() -> None:
    rng = np.random.default_rng(1)
    values = rng.normal(10.0, 1.0, 3000)
    values[[500, 1700, 2999]] = 100.0  # three spikes, far above 7 sigma
    batched, reference = SpikeScore(), []
    for chunk in np.array_split(values, 11):
        batched.add(chunk)
    for index in range(values.size):  # the definition, value by value
        window = values[max(0, index - 1000) : index]
        if window.size >= 20:
            reference.append(abs(values[index] - window.mean()) >= 7 * window.std())
    assert batched.values == len(reference) and batched.spikes == sum(reference) == 3


def test_steps_fold_at_the_same_counts_whatever_the_freezes_in_between() -> None:
    """The training process freezes its summary whenever the user asks; folds stay where the reporter's are."""
    rng = np.random.default_rng(2)
    norms = rng.lognormal(0.0, 1.0, 3 * CHUNK + 17).tolist()
    asked, untouched = RunSummary(), RunSummary()
    for step, norm in enumerate(norms):
        record = _record(step, norm, loss=norm / 2, clipped=norm > 1.0)
        asked.add(record)
        untouched.add(record)
        if step % 97 == 0:
            asked.freeze()
    assert asked.freeze() == untouched.freeze()


def test_amp_overflow_steps_are_counted_and_explosions_name_offenders() -> None:
    summary = RunSummary()
    summary.add(_record(0, 1.0, loss=2.0))
    summary.add(_record(1, math.nan, amp_overflow=True))
    event = Explosion(step=2, kind="spike", total_norm=50.0, threshold=10.0, timestamp=0.0,
                      offenders=(Offender("layer.weight", 40.0, False),))  # fmt: skip
    summary.add(_record(2, 50.0, explosion=True))
    summary.add(ExplosionRaised(event=event))
    frozen = summary.freeze()
    assert (frozen.steps, frozen.amp_overflow_steps, frozen.explosions) == (3, 1, 1)
    assert frozen.first_explosion_step == 2 and frozen.top_offenders == (("layer.weight", 1),)
    assert frozen.norm_max == 50.0 and frozen.recommended_max_norm == pytest.approx(1.0, rel=0.02)


_TRAINER = """
import os, signal, sys
import torch
from torch import nn
from gradtrack import GradTracker

probe, kill = sys.argv[1], sys.argv[2] == "kill"
torch.manual_seed(0)
model = nn.RNN(4, 16, batch_first=True)
head = nn.Linear(16, 1)
with torch.no_grad():
    model.weight_hh_l0.mul_(4.0)  # a hot recurrent matrix: explosions, and a device diagnosis of them
net = nn.ModuleDict({"rnn": model, "head": head})
optimizer = torch.optim.SGD(net.parameters(), lr=1e-3)
generator = torch.Generator().manual_seed(1)
tracker = GradTracker(net, backend="probe", backend_options={"probe": {"path": probe}}, layer_every=5)
tracker.__enter__()
for step in range(60):
    x = torch.randn(8, 12, 4, generator=generator)
    loss = head(model(x)[0][:, -1]).square().mean()
    optimizer.zero_grad()
    loss.backward()
    tracker.observe(loss)
    optimizer.step()
if kill:
    os.kill(os.getpid(), signal.SIGKILL)  # every record is in the reporter's pipe already
tracker.__exit__(None, None, None)
"""


@pytest.mark.slow
def test_a_killed_runs_summary_equals_a_finished_runs(probe: Path, tmp_path: Path) -> None:
    """The reporter ends a run whose trainer died with the summary the trainer would have sent: loss spike
    score and diagnosis included (issue 17: its own summary used to lack both)."""
    import subprocess
    import sys

    from gradtrack_testing import probe_plugin

    script = tmp_path / "trainer.py"
    script.write_text(_TRAINER)
    environment = {**os.environ, "PYTHONPATH": str(tmp_path)}  # where the probe plugin's entry point is
    ends = {}
    for mode in ("finish", "kill"):
        path = tmp_path / f"{mode}.jsonl"
        subprocess.run([sys.executable, str(script), str(path), mode], env=environment, timeout=120, check=False)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not any(line["hook"] == "run_end" for line in probe_plugin.read(path)):
            time.sleep(0.1)
        (ends[mode],) = [line for line in probe_plugin.read(path) if line["hook"] == "run_end"]
    finished, killed = ends["finish"], ends["kill"]
    assert (finished["status"], killed["status"]) == ("finished", "killed")
    assert killed["summary"]["steps"] == 60 and killed["summary"]["explosions"] > 0
    assert killed["summary"]["loss_spike_score"] is not None and killed["summary"]["diagnosis"] is not None
    assert killed["summary"] == finished["summary"]

"""Skipping spikes, stopping on divergence, diagnosing explosions, weight norms, calibration (issue 11)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from gradtrack import DivergenceError, GradTracker, calibrate
from gradtrack.judge.detection import SpikeSkip
from gradtrack.judge.diagnosis import LayerHistory, depth_growth
from gradtrack_testing.models import VanillaRNN, mlp, regression_batches, rnn_batch, train_steps
from gradtrack_testing.recording import RecordingBackend


def _rnn_steps(tracker: GradTracker, model: nn.Module, steps: int, lr: float = 0.5) -> None:
    train_steps(tracker, model, torch.optim.SGD(model.parameters(), lr=lr), *rnn_batch(30), steps)


def test_explosions_name_where_they_start_and_the_summary_diagnoses_the_recurrent_matrix(
    recorder: RecordingBackend,
) -> None:
    model = VanillaRNN(radius=3.0)
    true_sigma = torch.linalg.matrix_norm(model.W_h.weight.detach(), 2).item()
    with GradTracker(model, backend=recorder, clip=None, layer_every=1) as tracker:
        _rnn_steps(tracker, model, 12)
    events = recorder.of("explosion")
    first = events[0]
    later = [e for e in events if e.step > 0]  # the first step has no history to jump from
    names = {name for name, _ in model.named_parameters()}
    assert later and all(e.origin in names for e in later)
    assert first.depth_growth > 1  # norms grow from the readout back into the recurrence
    diagnosis = tracker.summary().diagnosis
    assert diagnosis is not None and diagnosis["first"]["step"] == first.step
    layers = diagnosis["first"]["layers"]
    assert "W_h.weight" in layers
    recurrent = layers["W_h.weight"]
    assert recurrent["largest_singular_value"] == pytest.approx(true_sigma, rel=0.05)  # power iteration, warm
    assert recurrent["largest_singular_value"] > 1  # geometric growth through time
    assert recurrent["grad_to_weight"] > 0 and recurrent["update_to_weight"] > 0
    assert diagnosis["first"]["update_norm"] > 0


def test_layer_history_and_depth_growth_on_hand_made_norms() -> None:
    history = LayerHistory(smoothing=0.5)
    assert history.jumps(1, np.array([1.0, 1.0, 1.0])) is None  # no history yet
    history.update(1, np.array([1.0, 1.0, 1.0]))
    jumps = history.jumps(1, np.array([1.0, 8.0, 2.0]))
    assert jumps is not None and int(np.argmax(jumps)) == 1 and math.exp(jumps[1]) == pytest.approx(8.0)
    assert np.isinf(history.jumps(1, np.array([1.0, math.nan, 1.0]))[1])  # non-finite: the largest jump
    assert np.isneginf(history.jumps(1, np.array([1.0, 0.0, 1.0]))[1])  # a zero gradient did not jump
    assert history.jumps(2, np.array([1.0, 8.0, 2.0])) is None  # another layout: no history of it
    history.update(1, np.array([4.0, 4.0, 4.0]))  # the EMA moves half way (in log space)
    assert math.exp(history.jumps(1, np.array([2.0, 2.0, 2.0]))[0]) == pytest.approx(1.0)
    norms = np.array([8.0, 4.0, 2.0, 1.0])  # halving at each layer towards the output
    assert depth_growth(norms, [0, 1, 2, 3]) == pytest.approx(2.0)


def test_on_spike_skip_drops_the_update_of_a_spike(recorder: RecordingBackend) -> None:
    model = mlp(seed=2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    before: list[torch.Tensor] = []
    with GradTracker(model, backend=recorder, clip=None, on_spike="skip") as tracker:
        for step, (x, y) in enumerate(regression_batches(40, seed=2)):
            optimizer.zero_grad()
            loss = nn.functional.mse_loss(model(x).squeeze(-1), y)
            if step == 30:
                loss = loss * 1e4  # one poisoned batch
                before = [p.detach().clone() for p in model.parameters()]
            loss.backward()
            optimizer.step()
            if step == 30:
                assert all(torch.equal(a, p) for a, p in zip(before, model.parameters(), strict=True))
    skipped = [s.step for s in recorder.of("step") if s.skipped]
    assert skipped == [30] and tracker.summary().skipped_steps == 1
    assert tracker.config()["on_spike"] == "skip"


def test_on_spike_skip_resumes_after_a_lasting_change_of_scale() -> None:
    rule = SpikeSkip()
    rng = np.random.default_rng(0)
    norms = np.concatenate([1.0 + 0.05 * rng.standard_normal(100), 10.0 + 0.5 * rng.standard_normal(200)])
    skipped = [step for step, norm in enumerate(norms.tolist()) if rule.skips(norm)]
    assert skipped and skipped[0] == 100 and skipped[-1] < 100 + 128  # new data: skipped for less than a window


def test_on_divergence_raise_stops_training_after_closing_the_run(recorder: RecordingBackend) -> None:
    model = VanillaRNN(radius=3.0)
    tracker = GradTracker(model, backend=recorder, clip=None, on_divergence="raise")
    with pytest.raises(DivergenceError, match="diverged at step"), tracker:
        _rnn_steps(tracker, model, 200)
    assert tracker.diverged and tracker.steps < 200  # stopped there, not 200 steps later
    end = recorder.of("run_end")[0]
    assert end.status == "failed" and end.summary.diverged
    assert recorder.of("divergence")[0].step == tracker.divergence_event.step  # type: ignore[union-attr]


def test_diverging_without_the_loss_is_seen_from_the_gradients() -> None:
    model = VanillaRNN(radius=3.0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    generator = torch.Generator().manual_seed(1)
    x, y = torch.randn(16, 30, 4, generator=generator), torch.randn(16, generator=generator)
    with GradTracker(model, clip=None) as tracker:  # no observe(loss=...)
        for _ in range(40):
            optimizer.zero_grad()
            nn.functional.mse_loss(model(x), y).backward()
            optimizer.step()
    assert tracker.diverged


def test_weight_norms_come_at_their_cadence_and_more_often_in_trouble(recorder: RecordingBackend) -> None:
    model = mlp()
    with GradTracker(model, backend=recorder, layer_every=5) as tracker:  # default weight_every=100
        for step, (x, y) in enumerate(regression_batches(60)):
            model.zero_grad()
            (nn.functional.mse_loss(model(x).squeeze(-1), y) * (1e4 if step == 30 else 1.0)).backward()
            tracker.step()
    measured = [s.step for s in recorder.of("step") if s.param_norm is not None]
    assert measured == [0, 40]  # the run's start, then every 10 steps while an explosion is recent (step 30)
    by_name = [s.step for s in recorder.of("step") if s.weight_norms is not None]
    assert by_name == [0, 40]  # by name: those that are per-layer steps too


def test_weight_norms_by_name_at_the_per_layer_cadence_and_the_spike_score_in_the_summary(
    recorder: RecordingBackend,
) -> None:
    model = mlp()
    with GradTracker(model, backend=recorder, layer_every=5, weight_every=5) as tracker:
        for step, (x, y) in enumerate(regression_batches(60)):
            model.zero_grad()
            scale = 1e4 if step == 50 else 1.0
            (nn.functional.mse_loss(model(x).squeeze(-1), y) * scale).backward()
            tracker.observe(torch.tensor(1.0 + 0.01 * step))
            tracker.step()
    steps = recorder.of("step")
    with_weights = [s for s in steps if s.weight_norms is not None]
    assert [s.step for s in with_weights] == list(range(0, 60, 5))
    expected = {name: torch.linalg.vector_norm(p.detach()).item() for name, p in model.named_parameters()}
    assert with_weights[-1].weight_norms == pytest.approx(expected, rel=1e-5)  # SGD-free: weights unchanged
    assert with_weights[0].param_norm == pytest.approx(math.sqrt(sum(v * v for v in expected.values())), rel=1e-5)
    assert "grad/param_norm" in with_weights[0].metrics()
    summary = tracker.summary()
    assert summary.spike_score is not None and 0 < summary.spike_score <= 1 / 40  # the one 1e4 spike
    assert summary.loss_spike_score == 0.0


def test_calibrate_recommends_the_95th_percentile_of_healthy_norms() -> None:
    model = mlp()
    batches = iter(regression_batches(100, seed=5))
    norms: list[float] = []

    def step() -> None:
        x, y = next(batches)
        nn.functional.mse_loss(model(x).squeeze(-1), y).backward()
        norms.append(torch.nn.utils.get_total_norm([p.grad for p in model.parameters()]).item())

    result = calibrate(model, step, steps=100)
    assert result.steps == 100 and result.healthy_steps == 100
    assert result.recommended_max_norm == pytest.approx(float(np.percentile(norms, 95)), rel=1e-5)
    assert result.p50 <= result.p95 <= result.p99 <= result.max
    assert all(p.grad is None for p in model.parameters())  # measured by hand, then zeroed

"""GradTracker on tiny real models: contract, clipping, explosions, divergence, lifecycle."""

from __future__ import annotations

import math
import threading
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from gradtrack import GradTracker, NonFiniteGradientError, hookimpl
from gradtrack.events import StepStats
from gradtrack.tracker import clean_name
from gradtrack_testing.models import VanillaRNN, mlp, regression_batches
from gradtrack_testing.recording import CONTRACT_METRICS, RecordingBackend


def train(
    model: nn.Module,
    tracker: GradTracker | None,
    steps: int = 20,
    lr: float = 0.05,
    seed: int = 0,
    observe: bool = True,
) -> list[float]:
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    losses = []
    for x, y in regression_batches(steps, seed=seed):
        optimizer.zero_grad()
        loss = nn.functional.mse_loss(model(x).squeeze(-1), y)
        loss.backward()
        if tracker is not None and observe:
            tracker.observe(loss)
        optimizer.step()
        losses.append(loss.item())
    return losses


def test_every_hook_in_order_off_the_training_thread(recorder: RecordingBackend) -> None:
    model = mlp()
    with GradTracker(model, backend=recorder, layer_every=5) as tracker:
        train(model, tracker, steps=12)
    names = [name for name, _ in recorder.calls]
    assert names[0] == "run_start" and names[-1] == "run_end"
    steps = recorder.of("step")
    assert [s.step for s in steps] == list(range(12))
    assert threading.current_thread().name not in recorder.threads
    start = recorder.of("run_start")[0]
    assert start.layer_names == tuple(n for n, _ in model.named_parameters())
    assert start.config["clip"] == "norm" and start.config["max_norm"] == 1.0
    assert [s.step for s in steps if s.layer_norms is not None] == [0, 5, 10]
    first = steps[0]
    assert isinstance(first, StepStats) and first.loss is not None and first.loss > 0
    assert set(first.layer_norms or {}) == set(start.layer_names)
    norms = list((first.layer_norms or {}).values())
    assert first.layer_max == pytest.approx(max(norms))
    assert first.layer_p50 == pytest.approx(float(np.percentile(norms, 50)))
    assert first.layer_p95 == pytest.approx(float(np.percentile(norms, 95)))
    assert first.total_norm == pytest.approx(math.sqrt(sum(n * n for n in norms)))
    assert set(first.metrics()) >= {*CONTRACT_METRICS, "loss"}
    end = recorder.of("run_end")[0]
    assert end.status == "finished" and end.summary.steps == 12


def test_log_every_thins_routine_steps(recorder: RecordingBackend) -> None:
    model = mlp()
    with GradTracker(model, backend=recorder, log_every=4, layer_every=None) as tracker:
        train(model, tracker, steps=10)
    assert [s.step for s in recorder.of("step")] == [0, 4, 8]
    assert all(s.layer_norms is None for s in recorder.of("step"))
    assert tracker.summary().steps == 10


def test_monitor_only_leaves_training_bitwise_identical() -> None:
    untracked = train(mlp(seed=3), None, steps=30, lr=0.3)
    model = mlp(seed=3)
    with GradTracker(model, clip=None) as tracker:
        tracked = train(model, tracker, steps=30, lr=0.3)
    assert tracked == untracked
    assert tracker.summary().clipped_steps == 0


def test_norm_clipping_trains_exactly_like_clip_grad_norm() -> None:
    reference, model = mlp(seed=4), mlp(seed=4)
    optimizer = torch.optim.SGD(reference.parameters(), lr=0.1)
    for x, y in regression_batches(15, seed=1):
        optimizer.zero_grad()
        nn.functional.mse_loss(reference(x).squeeze(-1), y).backward()
        torch.nn.utils.clip_grad_norm_(reference.parameters(), 0.5, foreach=True)
        optimizer.step()
    with GradTracker(model, clip="norm", max_norm=0.5) as tracker:
        train(model, tracker, steps=15, lr=0.1, seed=1)
    for mine, theirs in zip(model.parameters(), reference.parameters(), strict=True):
        assert torch.equal(mine, theirs)
    assert tracker.summary().clipped_steps > 0


def rnn_run(
    radius: float, steps: int, recorder: RecordingBackend, clip: str | None = None, lr: float = 0.05, seed: int = 0
) -> GradTracker:
    model = VanillaRNN(radius=radius, seed=seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    with GradTracker(model, backend=recorder, clip=clip, max_norm=5.0 if clip else None) as tracker:
        for _ in range(steps):
            x = torch.randn(16, 100, 4, generator=generator)
            y = x[:, :10, 0].sum(1)
            optimizer.zero_grad()
            loss = nn.functional.mse_loss(model(x), y)
            loss.backward()
            tracker.observe(loss)
            optimizer.step()
    return tracker


def test_vanilla_rnn_with_spectral_radius_3_explodes(recorder: RecordingBackend) -> None:
    tracker = rnn_run(radius=3.0, steps=8, recorder=recorder)
    events = recorder.of("explosion")
    assert events, "a radius-3 recurrent matrix must explode"
    assert events[0].kind in {"threshold", "nonfinite"}
    assert events[0].total_norm > 1e3 or not math.isfinite(events[0].total_norm)
    assert "W_h.weight" in [o.name for o in events[0].offenders]
    steps = {s.step: s for s in recorder.of("step")}
    assert all(steps[e.step].explosion for e in events)
    summary = tracker.summary()
    assert summary.explosions == len(events) and summary.first_explosion_step == events[0].step
    assert "W_h.weight" in dict(summary.top_offenders)


def test_stable_rnn_does_not_explode(recorder: RecordingBackend) -> None:
    rnn_run(radius=0.5, steps=8, recorder=recorder)
    assert recorder.of("explosion") == []


def test_high_learning_rate_explodes_and_diverges(recorder: RecordingBackend) -> None:
    model = mlp(seed=5)
    with GradTracker(model, backend=recorder, clip=None) as tracker:
        train(model, tracker, steps=40, lr=3.0)
    assert tracker.explosions and tracker.diverged
    divergence = recorder.of("divergence")
    assert len(divergence) == 1 and tracker.divergence_event == divergence[0]
    after = [s for s in recorder.of("step") if s.step >= divergence[0].step]
    assert after and all(s.diverged for s in after)
    assert not any(s.diverged for s in recorder.of("step") if s.step < divergence[0].step)
    assert tracker.summary().diverged_step == divergence[0].step


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4])
def test_stable_noisy_runs_are_never_judged_diverged(seed: int) -> None:
    recorder = RecordingBackend()
    model = mlp(seed=seed)
    with GradTracker(model, backend=recorder, clip="norm", max_norm=1.0) as tracker:
        train(model, tracker, steps=150, lr=0.05, seed=seed)
    assert not tracker.diverged and recorder.of("divergence") == []
    assert tracker.summary().recommended_max_norm is not None


def _poison(model: nn.Module, at_steps: set[int]) -> list[int]:
    calls = [0]

    def hook(grad: torch.Tensor) -> torch.Tensor:
        step = calls[0]
        calls[0] += 1
        return grad * math.nan if step in at_steps else grad

    model[2].weight.register_hook(hook)  # type: ignore[index, union-attr]
    return calls


def test_skip_drops_the_update_of_a_nonfinite_step(recorder: RecordingBackend) -> None:
    model = mlp()
    _poison(model, {3})
    snapshots = []
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    with GradTracker(model, backend=recorder, max_norm=1.0) as tracker:
        assert tracker.on_nonfinite == "skip"
        for x, y in regression_batches(6):
            optimizer.zero_grad()
            nn.functional.mse_loss(model(x).squeeze(-1), y).backward()
            optimizer.step()
            snapshots.append([p.detach().clone() for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(snapshots[2], snapshots[3], strict=True))
    assert all(torch.isfinite(p).all() for p in model.parameters())
    step3 = next(s for s in recorder.of("step") if s.step == 3)
    assert step3.skipped and step3.nonfinite == 1 and math.isinf(step3.layer_max)
    event = next(e for e in recorder.of("explosion") if e.step == 3)
    assert event.kind == "nonfinite" and [o.name for o in event.offenders if o.nonfinite] == ["2.weight"]
    assert tracker.summary().skipped_steps == 1 and not tracker.diverged


def test_raise_names_the_offending_layer(recorder: RecordingBackend) -> None:
    model = mlp()
    _poison(model, {1})
    with (
        pytest.raises(NonFiniteGradientError, match=r"step 1 in: 2\.weight"),
        GradTracker(model, backend=recorder, on_nonfinite="raise") as tracker,
    ):
        train(model, tracker, steps=4)
    assert recorder.of("run_end")[0].status == "failed"
    assert [e.step for e in recorder.of("explosion")] == [1]


def test_continue_lets_nan_reach_the_weights_and_persisting_nan_diverges(recorder: RecordingBackend) -> None:
    model = mlp()
    _poison(model, {1, 2, 3, 4})
    with GradTracker(model, backend=recorder, clip=None) as tracker:
        assert tracker.on_nonfinite == "continue"
        train(model, tracker, steps=6, observe=False)
    assert not torch.isfinite(model[2].weight).all()  # type: ignore[index]
    assert tracker.diverged
    assert "non-finite gradients on 3 consecutive steps" in (tracker.summary().diverged_reason or "")


@pytest.mark.parametrize(("error", "status"), [(ValueError, "failed"), (KeyboardInterrupt, "killed")])
def test_status_and_hook_removal_when_the_body_raises(
    recorder: RecordingBackend, error: type[BaseException], status: str
) -> None:
    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    raised = error("boom")
    with pytest.raises(error) as caught, GradTracker(model, backend=recorder) as tracker:
        train(model, tracker, steps=2)
        raise raised
    assert caught.value is raised
    assert recorder.of("run_end")[0].status == status
    model(torch.randn(2, 8)).sum().backward()
    optimizer.step()  # the hook is gone: nothing more is measured
    assert tracker.summary().steps == 2
    with GradTracker(model):  # and the model can be tracked again
        pass


def test_a_failing_backend_warns_once_and_spares_training_and_siblings(recorder: RecordingBackend) -> None:
    class Broken:
        @hookimpl
        def gradtrack_step(self, stats: StepStats) -> None:
            raise OSError("tracker down")

    model = mlp()
    with (
        pytest.warns(RuntimeWarning, match="'Broken' failed in gradtrack_step") as warned,
        GradTracker(model, backend=[Broken(), recorder]) as tracker,
    ):
        train(model, tracker, steps=5)
    assert len([w for w in warned if "Broken" in str(w.message)]) == 1
    assert len(recorder.of("step")) == 5 and recorder.of("run_end")


def test_manual_step_is_not_processed_again_by_the_optimizer_hook(recorder: RecordingBackend) -> None:
    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with GradTracker(model, backend=recorder) as tracker:
        for x, y in regression_batches(3):
            optimizer.zero_grad()
            nn.functional.mse_loss(model(x).squeeze(-1), y).backward()
            tracker.step()
            optimizer.step()
        model(torch.randn(2, 8)).sum().backward()
        tracker.step()  # a loop with no optimizer at all
        tracker.step()
    assert tracker.summary().steps == 5


def test_only_the_given_optimizer_and_only_this_models_parameters() -> None:
    model, other = mlp(), mlp(seed=1)
    mine = torch.optim.SGD(model.parameters(), lr=0.1)
    theirs = torch.optim.SGD(other.parameters(), lr=0.1)
    second = torch.optim.SGD(model.parameters(), lr=0.1)
    with GradTracker(model, optimizer=mine) as tracker:
        for m in (model, other):
            m(torch.randn(2, 8)).sum().backward()
        theirs.step()
        second.step()
        mine.step()
    assert tracker.summary().steps == 1
    with GradTracker(model) as tracker:
        for m in (model, other):
            m(torch.randn(2, 8)).sum().backward()
        theirs.step()  # updates another model: not ours
        second.step()
    assert tracker.summary().steps == 1


def test_accumulated_losses_are_averaged(recorder: RecordingBackend) -> None:
    model = mlp()
    with GradTracker(model, backend=recorder) as tracker:
        model(torch.randn(2, 8)).sum().backward()
        tracker.observe(torch.tensor(1.0))
        tracker.observe(torch.tensor(3.0))
        tracker.observe(5.0)
        tracker.step()
    assert recorder.of("step")[0].loss == pytest.approx(3.0)


def test_wrapper_prefixes_are_removed_from_layer_names(recorder: RecordingBackend) -> None:
    class Wrapper(nn.Module):
        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self.module = inner

    model = Wrapper(mlp())
    with GradTracker(model, backend=recorder):
        pass
    assert recorder.of("run_start")[0].layer_names[0] == "0.weight"
    assert clean_name("_orig_mod.module.encoder._fsdp_wrapped_module.layer.weight") == "encoder.layer.weight"
    assert clean_name("encoder.module.weight") == "encoder.module.weight"
    assert clean_name("encoder._orig_mod.layer.weight") == "encoder.layer.weight"  # a compiled submodule


def test_frozen_and_unused_parameters_are_skipped(recorder: RecordingBackend) -> None:
    model = nn.ModuleDict({"used": nn.Linear(3, 1), "unused": nn.Linear(3, 1), "frozen": nn.Linear(3, 3)})
    model["frozen"].requires_grad_(False)
    with GradTracker(model, backend=recorder, layer_every=1) as tracker:
        model["used"](model["frozen"](torch.randn(2, 3))).sum().backward()
        tracker.step()
    assert set(recorder.of("run_start")[0].layer_names) == {"used.weight", "used.bias", "unused.weight", "unused.bias"}
    assert set(recorder.of("step")[0].layer_norms or {}) == {"used.weight", "used.bias"}


def test_bad_input_gets_errors_that_name_the_argument() -> None:
    model = mlp()
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        GradTracker("model")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="no trainable parameters"):
        GradTracker(nn.ReLU())
    for bad in (0, -1, math.nan, math.inf):
        with pytest.raises(ValueError, match="max_norm must be a finite number > 0"):
            GradTracker(model, max_norm=bad)
    with pytest.raises(ValueError, match=r"clip='l2'.*accepted"):
        GradTracker(model, clip="l2")
    with pytest.raises(ValueError, match="norm_type must be 1, 2 or inf"):
        GradTracker(model, norm_type=3)
    with pytest.raises(ValueError, match=r"on_nonfinite must be one of \['skip', 'raise', 'continue'\]"):
        GradTracker(model, on_nonfinite="ignore")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="log_every must be an int >= 1"):
        GradTracker(model, log_every=0)
    with pytest.raises(TypeError, match="optimizer must be a torch.optim.Optimizer"):
        GradTracker(model, optimizer="adam")  # type: ignore[arg-type]
    assert GradTracker(model, norm_type="inf").norm_type == math.inf
    tracker = GradTracker(model)
    with pytest.raises(RuntimeError, match=r"tracker.step\(\) must be called inside"):
        tracker.step()
    with tracker, pytest.raises(RuntimeError, match="already tracked by another active GradTracker"):
        GradTracker(model).__enter__()


def test_memory_of_events_is_bounded() -> None:
    model = mlp()
    with GradTracker(model, clip=None, explosion_threshold=1e-9) as tracker:
        for _ in range(300):
            model(torch.randn(2, 8)).sum().backward()
            tracker.step()
    assert len(tracker.explosions) == 256 and tracker.summary().explosions == 300
    assert tracker.explosions[-1].step == 299


def test_amp_grad_scaler_steps_are_measured_after_unscaling(recorder: RecordingBackend) -> None:
    reference, model = mlp(seed=7), mlp(seed=7)
    x, y = regression_batches(1, seed=7)[0]
    nn.functional.mse_loss(reference(x).squeeze(-1), y).backward()
    expected = torch.nn.utils.get_total_norm([p.grad for p in reference.parameters()]).item()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    with GradTracker(model, backend=recorder, clip=None) as tracker:
        scaler.scale(nn.functional.mse_loss(model(x).squeeze(-1), y)).backward()
        scaler.step(optimizer)
        scaler.update()
    assert tracker.summary().steps == 1
    assert recorder.of("step")[0].total_norm == pytest.approx(expected, rel=1e-5)


def test_flush_reaches_every_backend_after_what_was_reported(recorder: RecordingBackend) -> None:
    model = mlp()
    with GradTracker(model, backend=recorder) as tracker:
        train(model, tracker, steps=3)
        assert tracker.flush(timeout=5.0)
        names = [name for name, _ in recorder.calls]
        assert names == ["run_start", "step", "step", "step", "flush"] and recorder.of("flush") == [5.0]


def _split_optimizers(model: nn.Module) -> list[torch.optim.Optimizer]:
    """Muon-style: matrices to one optimizer, vectors to another."""
    matrices = [p for p in model.parameters() if p.ndim == 2]
    vectors = [p for p in model.parameters() if p.ndim < 2]
    return [torch.optim.SGD(matrices, lr=0.05, momentum=0.9), torch.optim.AdamW(vectors, lr=1e-2)]


@pytest.mark.parametrize("order", ["matrices first", "vectors first"])
def test_several_optimizers_make_one_step_clipped_over_the_whole_model(order: str, recorder: RecordingBackend) -> None:
    ours, theirs = mlp(seed=5), mlp(seed=5)
    mine, reference = _split_optimizers(ours), _split_optimizers(theirs)
    if order == "vectors first":
        mine.reverse()
        reference.reverse()
    batches = regression_batches(6, seed=5)
    expected = []
    for x, y in batches:  # the reference: one clip_grad_norm_ over all parameters before the steps
        for optimizer in reference:
            optimizer.zero_grad()
        (nn.functional.mse_loss(theirs(x).squeeze(-1), y) * 10).backward()
        expected.append(torch.nn.utils.clip_grad_norm_(theirs.parameters(), 1.0, foreach=True).item())
        for optimizer in reference:
            optimizer.step()
    with GradTracker(ours, backend=recorder) as tracker:
        for x, y in batches:
            for optimizer in mine:
                optimizer.zero_grad()
            (nn.functional.mse_loss(ours(x).squeeze(-1), y) * 10).backward()
            for optimizer in mine:
                optimizer.step()
    assert tracker.steps == len(batches)
    assert [s.total_norm for s in recorder.of("step")] == pytest.approx(expected, rel=1e-6)
    for a, b in zip(ours.parameters(), theirs.parameters(), strict=True):
        assert torch.equal(a, b)


def test_an_optimizer_that_steps_every_other_iteration_still_makes_one_step_each() -> None:
    model = mlp(seed=5)
    every, sometimes = _split_optimizers(model)
    with GradTracker(model) as tracker:
        for step, (x, y) in enumerate(regression_batches(6, seed=5)):
            every.zero_grad()
            sometimes.zero_grad()
            nn.functional.mse_loss(model(x).squeeze(-1), y).backward()
            if step % 2:
                sometimes.step()  # first in this iteration: its gradients changed since the last measurement
            every.step()
    assert tracker.steps == 6


def test_closure_optimizers_are_measured_on_the_gradients_the_closure_makes(recorder: RecordingBackend) -> None:
    ours, theirs = mlp(seed=9), mlp(seed=9)
    x, y = regression_batches(1, seed=9)[0]

    def make_closure(model: nn.Module, optimizer: torch.optim.Optimizer, clip: bool) -> Any:
        def closure() -> torch.Tensor:
            optimizer.zero_grad()
            loss = nn.functional.mse_loss(model(x).squeeze(-1), y) * 10
            loss.backward()
            if clip:  # the reference: what a user would write by hand inside the closure
                norms.append(torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0, foreach=True).item())
            return loss

        return closure

    norms: list[float] = []
    reference = torch.optim.LBFGS(theirs.parameters(), lr=0.5, max_iter=4)
    firsts = []
    for _ in range(3):
        before = len(norms)
        reference.step(make_closure(theirs, reference, clip=True))
        firsts.append(norms[before])  # the gradient at the point each step starts from
    optimizer = torch.optim.LBFGS(ours.parameters(), lr=0.5, max_iter=4)
    with GradTracker(ours, backend=recorder) as tracker:
        for _ in range(3):
            optimizer.step(make_closure(ours, optimizer, clip=False))
    steps = recorder.of("step")
    assert tracker.steps == 3 and len(steps) == 3  # one gradtrack step per optimizer step, not per evaluation
    assert [s.total_norm for s in steps] == pytest.approx(firsts, rel=1e-6)  # fresh gradients, never stale
    assert all(s.loss is not None for s in steps)  # the closure's loss, observed for you
    for a, b in zip(ours.parameters(), theirs.parameters(), strict=True):
        torch.testing.assert_close(a, b)  # every evaluation clipped as by hand


@pytest.mark.parametrize("clip", ["norm", "adaptive", "zscore", "auto"])
def test_a_step_within_the_bound_is_one_pass_over_the_gradients(clip: str) -> None:
    """Multiplying by exactly 1 changes no bit: gradtrack leaves such gradients unwritten (their version stays)."""
    model = mlp()
    with GradTracker(model, clip=clip, max_norm=1e6 if clip != "zscore" else None) as tracker:
        model(torch.randn(4, 8)).sum().backward()
        versions = [p.grad._version for p in model.parameters()]  # type: ignore[union-attr]
        tracker.step()
        assert [p.grad._version for p in model.parameters()] == versions  # type: ignore[union-attr]
    with GradTracker(model, clip="norm", max_norm=1e-6) as tracker:
        model.zero_grad()
        model(torch.randn(4, 8)).sum().backward()
        tracker.step()
        total = torch.nn.utils.get_total_norm([p.grad for p in model.parameters()])  # type: ignore[misc]
        assert total.item() == pytest.approx(1e-6, rel=1e-3)  # clipped: scaled to the bound

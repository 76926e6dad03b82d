"""Self-healing (``on_divergence="rollback"``): a diverging run goes back to its last good state and on.

Real training of tiny models: a poisoned batch is skipped and the run recovers, parameters and BatchNorm's
buffers included; a run that never rolls back is bitwise the run without the option; repeated blow-ups
halve the learning rate inside the optimizer step, whatever the loop sets; the budget ends in a verdict.
"""

from __future__ import annotations

import math
from collections.abc import Collection
from typing import Any

import pytest
import torch
from torch import nn

from gradtrack import GradTracker, StateError
from gradtrack_testing.healing import healing_net, poisoned_batches
from gradtrack_testing.recording import RecordingBackend

STEPS = 120


def _batches(poison: Collection[int] = (), steps: int = STEPS) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return poisoned_batches(poison, steps)


def _train(model: nn.Module, tracker: GradTracker, optimizer: torch.optim.Optimizer, batches: list[Any],
           lr: float | None = None, seen: list[float] | None = None) -> list[float]:  # fmt: skip
    losses = []
    for x, y in batches:
        if lr is not None:  # as most loops and schedulers do: set the learning rate at every iteration
            for group in optimizer.param_groups:
                group["lr"] = lr
        optimizer.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        tracker.observe(loss)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())  # NaN on the poisoned step: the loop goes on all the same
    return losses


def test_a_poisoned_batch_is_rolled_back_skipped_and_the_run_recovers() -> None:
    model, recorder = healing_net(), RecordingBackend()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    tracker = GradTracker(model, backend=recorder, optimizer=optimizer, on_divergence="rollback", rollback_every=10)
    with tracker:
        losses = _train(model, tracker, optimizer, _batches(poison={57}))
    (event,) = recorder.of("rollback")
    assert (event.step, event.restored_step, event.skipped, event.lr_scale, event.count) == (57, 50, 8, 1.0, 1)
    assert "loss is nan" in event.reason
    assert not tracker.diverged and not recorder.of("divergence")
    assert all(torch.isfinite(t).all() for t in [*model.parameters(), *model.buffers()])  # BatchNorm's too
    assert math.isnan(losses[57]) and all(math.isfinite(loss) for loss in losses[58:])
    assert losses[-1] < 0.2 * losses[0]  # and it goes on learning
    summary = tracker.summary()
    assert summary.rollbacks == ((57, 50),) and not summary.diverged and summary.snapshot_bytes > 0
    (record,) = [s for s in recorder.of("step") if s.step == 57]
    assert record.skipped and not record.diverged
    assert tracker.steps == STEPS  # the step axis counts iterations and keeps increasing


def test_a_run_that_never_rolls_back_is_bitwise_the_run_without_the_option() -> None:
    results = []
    for option in ("continue", "rollback"):
        model = healing_net()
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
        torch.manual_seed(5)  # dropout draws from the global generator: snapshots must not
        with GradTracker(model, on_divergence=option, rollback_every=3 if option == "rollback" else None) as tracker:
            _train(model, tracker, optimizer, _batches())
        results.append([p.detach().clone() for p in [*model.parameters(), *model.buffers()]])
        assert not tracker.summary().rollbacks
    assert all(torch.equal(a, b) for a, b in zip(*results, strict=True))


def test_blow_ups_that_come_back_halve_the_learning_rate_inside_the_step() -> None:
    model, recorder = healing_net(), RecordingBackend()
    optimizer = torch.optim.SGD(model.parameters(), lr=3.0)  # far too high: it blows up, again and again
    used: list[float] = []
    optimizer.register_step_pre_hook(lambda opt, args, kwargs: used.append(opt.param_groups[0]["lr"]))
    # No overshoot indicator: the blind halving (with it, see the next test).
    tracker = GradTracker(model, backend=recorder, clip=None, on_divergence="rollback", rollback_every=5,
                          rollback_budget=6, overshoot_every=None)  # fmt: skip
    with tracker:
        _train(model, tracker, optimizer, _batches(), lr=3.0)  # the loop sets lr=3.0 at every iteration
    events = recorder.of("rollback")
    assert len(events) >= 2
    assert events[0].lr_scale == 1.0 and events[1].lr_scale == 0.5  # the first keeps it; a second soon after halves
    scales = sorted({round(lr / 3.0, 6) for lr in used})
    assert min(scales) == events[-1].lr_scale  # what the optimizer used, though the loop set 3.0 each time
    assert optimizer.param_groups[0]["lr"] == 3.0  # undone after each step: the loop's own value stays
    assert tracker.summary().lr_scale == events[-1].lr_scale


def test_a_blow_up_soon_after_a_restore_cuts_the_learning_rate_by_the_measured_overshoot() -> None:
    """The same run with the overshoot indicator: after the first restore it samples every step, and the blow-up
    that comes back within a few steps is cut by 1 / the ratio it measured, not halved: one cut instead of
    four halvings."""
    model, recorder = healing_net(), RecordingBackend()
    optimizer = torch.optim.SGD(model.parameters(), lr=3.0)
    tracker = GradTracker(model, backend=recorder, clip=None, on_divergence="rollback", rollback_every=5,
                          rollback_budget=6)  # fmt: skip
    with tracker:
        losses = _train(model, tracker, optimizer, _batches(), lr=3.0)
    events = recorder.of("rollback")
    samples = [s.overshoot for s in recorder.of("step") if s.overshoot is not None and math.isfinite(s.overshoot)]
    after_restore = [s.overshoot for s in recorder.of("step") if events[0].step < s.step < events[1].step
                     and s.overshoot is not None and math.isfinite(s.overshoot)]  # fmt: skip
    assert samples and after_restore  # sampled on every step after the restore
    assert events[0].lr_scale == 1.0  # the first rollback keeps the rate: it may have been the data
    assert events[1].lr_scale < 0.5 / 4  # measured: far more than a halving
    assert len(events) == 2 and not tracker.diverged
    assert all(math.isfinite(loss) for loss in losses[events[1].step + 1 :])


@pytest.mark.parametrize("kind", ["float", "tensor"])
def test_once_the_learning_rate_is_blamed_a_growing_schedule_is_held_below_the_rate_that_failed(kind: str) -> None:
    model, recorder = healing_net(), RecordingBackend()
    tensor = kind == "tensor"  # a tensor learning rate (compiled or capturable optimizers) is held the same way
    optimizer = torch.optim.SGD(model.parameters(), lr=torch.tensor(0.05) if tensor else 0.05, foreach=not tensor)
    used: list[float] = []
    optimizer.register_step_pre_hook(lambda opt, args, kwargs: used.append(float(opt.param_groups[0]["lr"])))
    tracker = GradTracker(model, backend=recorder, clip=None, on_divergence="rollback", rollback_every=5)
    losses = []
    with tracker:
        for step, (x, y) in enumerate(_batches(steps=160)):
            for group in optimizer.param_groups:  # a schedule that never stops growing: x1.06 a step
                if tensor:
                    group["lr"].fill_(0.05 * 1.06**step)
                else:
                    group["lr"] = 0.05 * 1.06**step
            optimizer.zero_grad()
            loss = nn.functional.mse_loss(model(x), y)
            tracker.observe(loss)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
    events = recorder.of("rollback")
    # The second rollback blames the learning rate: halved, or cut by the overshoot measured since the restore.
    assert len(events) >= 2 and events[1].lr_scale <= 0.5, [e.describe() for e in events]
    blamed = events[1]
    (ceiling,), *_ = tracker.state_dict()["rollback"]["lr_ceilings"]
    slack = 1 + (1e-6 if tensor else 1e-9)  # a tensor rate is float32
    assert ceiling <= 0.05 * 1.06**blamed.restored_step * slack  # no more than the restored state trained with
    after = used[blamed.step + 1 :]
    assert after and max(after) <= ceiling * blamed.lr_scale * slack  # held, though the loop kept raising it
    assert used[-1] == pytest.approx(ceiling * events[-1].lr_scale)
    assert float(optimizer.param_groups[0]["lr"]) == pytest.approx(0.05 * 1.06**159)  # the loop's own value
    assert not tracker.diverged and math.isfinite(losses[-1]) and losses[-1] < losses[0]
    state = tracker.state_dict()["rollback"]
    again = GradTracker(healing_net(), on_divergence="rollback", rollback_every=5, clip=None)
    again.load_state_dict(tracker.state_dict())  # the ceiling goes on across a resume
    assert again.state_dict()["rollback"]["lr_ceilings"] == state["lr_ceilings"]
    damaged = tracker.state_dict()
    damaged["rollback"]["lr_ceilings"] = [["fast"]]
    with pytest.raises(StateError, match="'lr_ceilings' must be a list of lists of numbers or None"):
        GradTracker(healing_net(), on_divergence="rollback", rollback_every=5, clip=None).load_state_dict(damaged)


def test_a_spent_budget_ends_in_the_usual_verdict() -> None:
    model, recorder = healing_net(), RecordingBackend()
    optimizer = torch.optim.SGD(model.parameters(), lr=50.0)  # hopeless by halvings (the indicator's cut heals it)
    tracker = GradTracker(model, backend=recorder, clip=None, on_divergence="rollback", rollback_every=5,
                          rollback_budget=2, overshoot_every=None)  # fmt: skip
    with tracker:
        _train(model, tracker, optimizer, _batches(steps=80), lr=50.0)
    assert len(recorder.of("rollback")) == 2
    assert tracker.diverged and len(recorder.of("divergence")) == 1


def test_snapshots_on_disk_restore_the_scheduler_and_the_scaler_too(tmp_path: Any) -> None:
    model, recorder = healing_net(), RecordingBackend()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.99)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    tracker = GradTracker(model, backend=recorder, optimizer=optimizer, scaler=scaler, scheduler=scheduler,
                          on_divergence="rollback", rollback_every=10, rollback_dir=tmp_path)  # fmt: skip
    epochs, scales = [], []
    with tracker:
        for x, y in _batches(poison={33}):  # a NaN loss: the scaler skips the step, the rollback heals it
            optimizer.zero_grad()
            loss = nn.functional.mse_loss(model(x), y)
            tracker.observe(loss)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            epochs.append(scheduler.last_epoch)
            scales.append(scaler.get_scale())
        files = list(tmp_path.glob("*.pt"))
    (event,) = recorder.of("rollback")
    assert (event.step, event.restored_step) == (33, 30)
    assert epochs[32:35] == [33, 31, 32]  # the scheduler went back to its state of step 30, then stepped on
    assert scales[33] == scales[29] / 2  # the scaler's state of step 30, then backed off for this step's NaN
    assert 1 <= len(files) <= 2 and not list(tmp_path.glob("*.pt"))  # the ring on disk, removed at the end
    assert all(torch.isfinite(t).all() for t in [*model.parameters(), *model.buffers()])


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"on_divergence": "rollback", "rollback_every": 0}, r"rollback_every must be an int in \[1, "),
        ({"on_divergence": "rollback", "rollback_keep": "2"}, r"rollback_keep must be an int in \[1, 100\], got '2'"),
        ({"on_divergence": "rollback", "rollback_budget": -1}, "rollback_budget must be an int"),
        ({"rollback_every": 10}, "rollback_every are settings of on_divergence='rollback', not of"),
        ({"on_divergence": "rollback", "on_nonfinite": "raise"}, "cannot heal a run that on_nonfinite='raise'"),
        ({"on_divergence": "rollback", "scheduler": object()}, "scheduler=object has no state_dict"),
        ({"scheduler": object()}, "scheduler= is used by on_divergence='rollback'"),
        ({"on_divergence": "heal"}, "on_divergence must be 'continue', 'raise' or 'rollback', got 'heal'"),
    ],
)
def test_rollback_settings_that_cannot_work_are_refused(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        GradTracker(healing_net(), **options)


def test_an_optimizer_whose_state_cannot_be_snapshotted_is_refused_at_enter() -> None:
    class Opaque(torch.optim.SGD):
        def state_dict(self) -> dict[str, Any]:
            raise RuntimeError("no state here")

    model = healing_net()
    tracker = GradTracker(model, optimizer=Opaque(model.parameters(), lr=0.1), on_divergence="rollback")
    with pytest.raises(ValueError, match=r"cannot snapshot the optimizer \(Opaque\): its state_dict\(\) fails"):
        tracker.__enter__()
    with GradTracker(model):  # nothing left behind
        pass


def test_a_rollback_is_in_the_mlflow_run_and_its_count_survives_a_resume(server: Any, tmp_path: Any) -> None:
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    experiment = f"rollback-{tmp_path.name}"
    options = {"backend": "mlflow", "backend_options": {"mlflow": {"tracking_uri": server.uri, "plots": False,
               "experiment_name": experiment, "spool_dir": str(tmp_path / "spool")}}}  # fmt: skip
    model = healing_net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    tracker = GradTracker(model, on_divergence="rollback", rollback_every=10, **options)
    with tracker:
        _train(model, tracker, optimizer, _batches(poison={57}, steps=80))
    client = MlflowClient(server.uri)
    (run,) = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    rollbacks = client.get_metric_history(run.info.run_id, "grad/rollback")
    assert [(m.step, m.value) for m in rollbacks] == [(57, 1.0)]
    assert [m.value for m in client.get_metric_history(run.info.run_id, "grad/lr_scale")] == [1.0]
    tags = run.data.tags
    assert tags["gradtrack.rollbacks"] == "1" and tags["diverged"] == "false" and run.info.status == "FINISHED"
    assert "healed by 1 rollback(s)" in tags["mlflow.note.content"]
    assert "| rollbacks | 1: step 57 -> 50; learning rate x1 |" in tags["mlflow.note.content"]

    state = tracker.state_dict()
    assert state["rollback"] == {"count": 1, "lr_scale": 1.0, "last_rollback": 57, "lr_ceilings": []}
    again = GradTracker(model, on_divergence="rollback", rollback_every=10, rollback_budget=1, **options)
    again.load_state_dict(state)
    with pytest.warns(RuntimeWarning, match=r"settings changed \(gradtrack.rollback_budget: 5 -> 1\)"), again:
        _train(model, again, optimizer, _batches(poison={5}, steps=20))  # a budget of one, spent already: the verdict
    assert again.diverged and again.summary().rollbacks == ((57, 50),)


def test_no_snapshot_is_taken_while_the_loss_loses_what_the_run_learnt_until_it_settles() -> None:
    model, recorder = healing_net(), RecordingBackend()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    tracker = GradTracker(model, backend=recorder, optimizer=optimizer, on_divergence="rollback", rollback_every=5)
    kept: list[int] = []
    first = math.nan
    with tracker:
        for step, (x, y) in enumerate(_batches(poison={139}, steps=150)):
            optimizer.zero_grad()
            loss = nn.functional.mse_loss(model(x), y)
            # From step 40 the loss the loop reports climbs by 5% of the first a step, the gradients healthy:
            # what a learning rate creeping past the edge under a clip looks like before any rule judges it.
            first = loss.item() if step == 0 else first
            tracker.observe(loss.detach() + 0.05 * first * max(0, step - 40))
            loss.backward()
            optimizer.step()
            healer = tracker._healer
            assert healer is not None
            kept = sorted({*kept, *(s.step for s in healer._ring)})
    # The climb is seen some 10 steps in (the loss is smoothed): none taken from 55 to 95, ten intervals, and
    # then the level it settled at (the loss keeps a constant slope here) is taken as the new normal.
    assert [s for s in kept if s > 40] == [45, 50, 100]
    (event,) = recorder.of("rollback")
    assert (event.step, event.restored_step) == (139, 100) and not tracker.diverged

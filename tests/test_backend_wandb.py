"""The W&B backend against real wandb in offline mode, checked through the run's own ``.wandb`` file."""

from __future__ import annotations

import math
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from torch import nn

from gradtrack import GradTracker
from gradtrack.events import StepStats, format_norm
from gradtrack_testing.healing import healed_run
from gradtrack_testing.models import VanillaRNN, mlp, regression_batches
from gradtrack_testing.recording import CONTRACT_METRICS, RecordingBackend

wandb = pytest.importorskip("wandb")

from gradtrack_wandb.backend import (  # noqa: E402  (after the importorskip)
    DIVERGED_TAG,
    EXPLODED_TAG,
    HISTOGRAM_EXCLUDED_KEY,
    HISTOGRAM_KEY,
    INSTABILITY_TITLE,
    OVERSHOOT_TAG,
    ROLLBACK_TITLE,
    ROLLED_BACK_TAG,
    STEP_KEY,
    WandbBackend,
    _wandb_keys,
)
from gradtrack_wandb.live import Throttle  # noqa: E402

from gradtrack_testing.wandb_files import WandbRun, read_records, run_files  # noqa: E402


@pytest.fixture
def no_backend_failures() -> Iterator[list[warnings.WarningMessage]]:
    """Backend exceptions become warnings on the worker thread; any such warning fails the test."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield caught
    failures = [str(w.message) for w in caught if "gradtrack backend" in str(w.message)]
    assert not failures


def train_rnn(
    tracker_kwargs: dict[str, object],
    steps: int = 24,
    until: Callable[[GradTracker], bool] | None = None,
) -> tuple[GradTracker, RecordingBackend]:
    """The exploding RNN (spectral radius 3) trained with plain SGD: explodes, then diverges."""
    recorder = RecordingBackend()
    model = VanillaRNN(radius=3.0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    generator = torch.Generator().manual_seed(1)
    x, y = torch.randn(16, 20, 4, generator=generator), torch.randn(16, generator=generator)
    with GradTracker(model, backend=["wandb", recorder], clip=None, **tracker_kwargs) as tracker:  # type: ignore[arg-type]
        for _ in range(steps):
            optimizer.zero_grad()
            loss = nn.functional.mse_loss(model(x), y)
            loss.backward()
            tracker.observe(loss=loss)
            optimizer.step()
            if until is not None and until(tracker):
                break
    return tracker, recorder


def train_mlp(tracker: GradTracker, model: nn.Module, steps: int, each: Callable[[int], None] | None = None) -> None:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    for step, (x, y) in enumerate(regression_batches(steps)):
        optimizer.zero_grad()
        loss = nn.functional.mse_loss(model(x).squeeze(-1), y)
        loss.backward()
        tracker.observe(loss=loss)
        optimizer.step()
        if each is not None:
            each(step)


def only_run(root: Path) -> WandbRun:
    """The one run written under ``root``, read once wandb-core has exited (it closes the file then)."""
    wandb.teardown()
    files = run_files(root)
    assert len(files) == 1, files
    return WandbRun.read(files[0])


def test_offline_run_records_contract_histograms_tags_alerts(wandb_dir: Path, no_backend_failures: list) -> None:
    options = {"project": "gradtrack-tests", "dir": str(wandb_dir), "layer_scalars": 2, "config": {"lr": 0.5}}
    tracker, recorder = train_rnn({"layer_every": 4, "backend_options": {"wandb": options}})
    summary = tracker.summary()
    assert summary.explosions > 1 and summary.diverged  # the scenario under test really happened
    run = only_run(wandb_dir)
    sent: list[StepStats] = recorder.of("step")

    # config: the tracker's settings plus the user's, exit code 0
    assert run.config["explosion_threshold"] == tracker.config()["explosion_threshold"]
    assert run.config["clip"] == "none" and run.config["lr"] == 0.5
    assert run.exit_code == 0

    # custom x-axis, never step=: one row per reported step, in order, with the contract metrics
    assert run.metric("grad/*").step_metric == STEP_KEY
    assert run.metric("grad_norm/*").step_metric == STEP_KEY
    assert run.metric("loss").step_metric == STEP_KEY  # gradtrack's own run: the contract's name
    assert run.metric("grad/total_norm").summary.max
    rows = run.rows_with(STEP_KEY)
    assert [row[STEP_KEY] for row in rows] == [stats.step for stats in sent]
    assert [row["_step"] for row in rows] == list(range(len(rows)))
    for row, stats in zip(rows, sent, strict=True):
        expected = stats.metrics()
        for key in CONTRACT_METRICS:
            assert row[key] == pytest.approx(expected[key], nan_ok=True), (stats.step, key)
        assert row["loss"] == pytest.approx(stats.loss, nan_ok=True)
        assert "gradtrack/loss" not in row

    # histogram and top-2 per-layer scalars on the per-layer cadence only
    keys = _wandb_keys(recorder.of("run_start")[0].layer_names)
    for row, stats in zip(rows, sent, strict=True):
        scalars = {k for k in row if k.startswith("grad_norm/")}
        if stats.layer_norms is None:
            assert HISTOGRAM_KEY not in row and not scalars
            continue
        norms = stats.layer_norms
        usable = [v for v in norms.values() if math.isfinite(v) and v > 0]
        assert row[HISTOGRAM_EXCLUDED_KEY] == len(norms) - len(usable)
        if usable:
            histogram = row[HISTOGRAM_KEY]
            assert histogram["_type"] == "histogram" and sum(histogram["values"]) == len(usable)
            logs = [math.log10(v) for v in usable]
            assert histogram["bins"][0] <= min(logs) <= max(logs) <= histogram["bins"][-1]
        top = sorted(norms, key=lambda n: math.inf if math.isnan(norms[n]) else norms[n], reverse=True)[:2]
        assert scalars == {keys[name] for name in top}
    assert any(HISTOGRAM_KEY in row for row in rows)

    # live tags: exploded at the first explosion, then diverged, while rows were still being written
    assert run.tag_updates[0][1] == ()
    assert run.tags == (EXPLODED_TAG, DIVERGED_TAG, OVERSHOOT_TAG)  # the hot RNN's steps overshoot, too
    assert run.first_tagged(EXPLODED_TAG) < run.first_tagged(DIVERGED_TAG)
    assert run.first_tagged(DIVERGED_TAG) < max(i for i, kind in enumerate(run.order) if kind == "history")

    # alerts: one WARN (rate limited), one ERROR, with the step, norm, threshold and offenders
    (warned,) = [alert for alert in run.alerts if alert.title == INSTABILITY_TITLE]  # the overshoot warning
    (instability,) = recorder.of("instability")
    assert warned.text == instability.describe() and warned.level == "WARN"
    assert run.summary["gradtrack"]["instability_step"] == instability.step
    warn, error = [alert for alert in run.alerts if alert.title != INSTABILITY_TITLE]
    assert (warn.level, error.level) == ("WARN", "ERROR")
    assert len(warn.title) < 64 and len(error.title) < 64
    first = recorder.of("explosion")[0]
    assert f"step {first.step}: {first.kind} explosion" in warn.text
    assert f"(threshold {format_norm(first.threshold)})" in warn.text
    assert first.offenders[0].name in warn.text
    divergence = recorder.of("divergence")[0]
    assert f"step {divergence.step}:" in error.text and divergence.reason in error.text
    assert warn.wait_duration == 600_000

    # summary: the runs-table columns gradtrack.explosions, gradtrack.diverged..., total_norm max
    state = run.summary["gradtrack"]
    assert state["explosions"] == summary.explosions
    assert state["first_explosion_step"] == summary.first_explosion_step
    assert (state["diverged"], state["diverged_step"]) == (True, summary.diverged_step)
    assert state["diverged_reason"] == summary.diverged_reason and state["status"] == "finished"
    finite = [s.total_norm for s in sent if math.isfinite(s.total_norm)]
    assert state["norm_max"] == pytest.approx(max(finite))  # the finite maximum, whatever NaN steps did
    wandb_max = run.summary["grad/total_norm"]["max"]  # W&B's own max summary propagates NaN
    assert math.isnan(wandb_max) if len(finite) < len(sent) else wandb_max == pytest.approx(max(finite))


def test_diverged_tag_is_live_before_the_run_ends(wandb_dir: Path, no_backend_failures: list) -> None:
    seen: list[tuple[str, ...]] = []

    def diverged_on_disk(tracker: GradTracker) -> bool:
        if not tracker.diverged:
            return False
        assert tracker.flush()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and DIVERGED_TAG not in (seen[-1] if seen else ()):
            files = run_files(wandb_dir)
            if files:
                seen.append(WandbRun.read(files[0]).tags)
            time.sleep(0.1)
        return True

    tracker, _ = train_rnn({"backend_options": {"wandb": {"dir": str(wandb_dir)}}}, until=diverged_on_disk)
    assert tracker.diverged
    assert seen and DIVERGED_TAG in seen[-1]
    assert only_run(wandb_dir).exit_code == 0


def test_alert_every_zero_alerts_on_every_explosion(wandb_dir: Path, no_backend_failures: list) -> None:
    options = {"dir": str(wandb_dir), "alert_every": 0, "histogram": False, "loss_key": None}
    tracker, recorder = train_rnn({"layer_every": None, "backend_options": {"wandb": options}}, steps=12)
    run = only_run(wandb_dir)
    levels = [alert.level for alert in run.alerts]
    assert levels.count("WARN") == tracker.summary().explosions == len(recorder.of("explosion"))
    assert all("gradtrack/loss" not in row and HISTOGRAM_KEY not in row for row in run.history)


def _notes(run: WandbRun) -> list[str]:
    """The run's notes, each time gradtrack wrote them, in order."""
    return [record.run.notes for record in read_records(run.path) if record.WhichOneof("record_type") == "run"]


def test_a_healed_run_logs_its_rollbacks_tags_alerts_and_stays_undiverged(
    wandb_dir: Path, no_backend_failures: list
) -> None:
    recorder = RecordingBackend()
    options = {"wandb": {"dir": str(wandb_dir)}}  # with the plots, which mark the rollbacks (the end may take a while)
    tracker = healed_run(["wandb", recorder], poison=(27, 57), backend_options=options, close_timeout=120)
    first, second = events = recorder.of("rollback")
    assert [(e.step, e.restored_step, e.lr_scale) for e in events] == [(27, 20, 1.0), (57, 50, 0.5)]
    run = only_run(wandb_dir)

    # grad/rollback = 1 and grad/lr_scale at each rollback's step, right after that step's own row
    rows = run.rows_with("grad/rollback")
    assert [(row[STEP_KEY], row["grad/rollback"], row["grad/lr_scale"]) for row in rows] == [(27, 1, 1.0), (57, 1, 0.5)]
    steps = [row[STEP_KEY] for row in run.rows_with(STEP_KEY)]
    assert steps == sorted(steps) and steps[-1] == 69  # the axis counts iterations: never goes back
    for row in rows:
        position = run.history.index(row)
        assert run.history[position - 1][STEP_KEY] == row[STEP_KEY] and "grad/total_norm" in run.history[position - 1]
    assert not any("grad/rollback" in row for row in run.history if row not in rows)

    # tags: exploded and rolled-back, never diverged; one rollback alert (rate limited), WARN
    assert run.tags == (EXPLODED_TAG, ROLLED_BACK_TAG)
    (alert,) = [alert for alert in run.alerts if alert.title == ROLLBACK_TITLE]
    assert alert.level == "WARN" and alert.text == first.describe() and "rolled back to step 20" in alert.text
    assert not [alert for alert in run.alerts if alert.level == "ERROR"]

    # the summary: counted live, and at the end from the run's summary
    state = run.summary["gradtrack"]
    assert (state["rollbacks"], state["rollback_steps"], state["lr_scale"]) == (2, [[27, 20], [57, 50]], 0.5)
    assert state["diverged"] is False and not tracker.diverged and state["explosions"] == 2

    # the notes say it while the run goes
    live = [note for note in _notes(run) if "rolled back" in note]
    assert "### gradtrack: rolled back 1 time(s), not diverged" in live[0]
    assert "- step 27: rolled back to step 20" in live[0] and "step 57" not in live[0]
    assert "rolled back 2 time(s)" in live[1] and "- step 57: rolled back to step 50" in live[1]
    assert "Learning rate now x0.5." in live[1] and second.lr_scale == 0.5
    assert run.rows_with("gradtrack/norms_plot")  # drawn from the history, which marks the rollbacks


def test_a_spent_rollback_budget_diverges_with_the_rollbacks_in_the_notes(
    wandb_dir: Path, no_backend_failures: list
) -> None:
    options = {"dir": str(wandb_dir), "alert_every": 0, "plots": False}
    tracker = healed_run("wandb", poison=(27, 57), rollback_budget=1, backend_options={"wandb": options},
                         close_timeout=120)  # fmt: skip
    assert tracker.diverged and tracker.summary().rollbacks == ((27, 20),)
    run = only_run(wandb_dir)
    assert run.tags == (EXPLODED_TAG, ROLLED_BACK_TAG, DIVERGED_TAG)
    assert [alert.level for alert in run.alerts if alert.title == ROLLBACK_TITLE] == ["WARN"]
    assert [row[STEP_KEY] for row in run.rows_with("grad/rollback")] == [27]
    divergence = next(note for note in _notes(run) if "diverged at step" in note)  # written live, at the verdict
    assert "- step 27: rolled back to step 20" in divergence and "not diverged" not in divergence
    state = run.summary["gradtrack"]
    assert (state["rollbacks"], state["diverged"]) == (1, True)


def test_throttle_sends_the_first_at_once_then_one_per_interval_counting_the_rest() -> None:
    slow, fast = Throttle(600.0), Throttle(0.0)
    assert [slow.due(first=True), slow.due(first=False), slow.due(first=False)] == [1, 0, 0]
    slow.every = 0.0
    assert slow.due(first=False) == 3  # stands for the two held back, and itself
    assert [fast.due(first=True), fast.due(first=False)] == [1, 1]


def test_active_user_run_is_reused_left_open_and_user_logs_interleave(
    wandb_dir: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str], no_backend_failures: list
) -> None:
    monkeypatch.setenv("WANDB_SILENT", "false")  # wandb's own warnings must reach stderr to be checked
    user_run = wandb.init(project="mine", dir=str(wandb_dir), config={"clip": "mine", "lr": 0.05}, tags=["user"])
    model = mlp()
    with GradTracker(
        model, backend="wandb", layer_every=5, backend_options={"wandb": {"layer_scalars": "all", "tags": ["gt"]}}
    ) as tracker:
        train_mlp(tracker, model, 20, each=lambda step: wandb.log({"acc": step / 20}))
    assert wandb.run is user_run  # still open: gradtrack did not finish it
    user_run.log({"acc": 1.0})
    user_run.finish()
    err = capfd.readouterr().err
    assert "wandb:" in err  # the stream is really captured (wandb prints its run summary there)
    assert "WARNING" not in err and "less than the current step" not in err

    run = only_run(wandb_dir)
    assert run.exit_code == 0
    assert run.config["clip"] == "mine" and run.config["gradtrack"]["clip"] == "norm"
    assert run.tags == ("user", "gt")
    assert [row["acc"] for row in run.rows_with("acc")] == [*(step / 20 for step in range(20)), 1.0]
    assert all(STEP_KEY not in row for row in run.rows_with("acc"))
    assert run.metric("gradtrack/loss").step_metric == STEP_KEY  # the user's run: "loss" stays theirs
    assert not run.rows_with("loss") and len(run.rows_with("gradtrack/loss")) == 20
    grad_rows = run.rows_with(STEP_KEY)
    assert [row[STEP_KEY] for row in grad_rows] == list(range(20))
    names = [name for name, _ in model.named_parameters()]
    layer_rows = [row for row in grad_rows if row[STEP_KEY] % 5 == 0]
    assert all({k for k in row if k.startswith("grad_norm/")} == set(_wandb_keys(names).values()) for row in layer_rows)
    assert "grad_norm/0_weight" in layer_rows[0]


def test_failed_body_finishes_own_run_with_nonzero_exit_code(wandb_dir: Path, no_backend_failures: list) -> None:
    model = mlp()
    with pytest.raises(RuntimeError, match="boom"), GradTracker(model, backend="wandb") as tracker:
        train_mlp(tracker, model, 3)
        raise RuntimeError("boom")
    run = only_run(wandb_dir)
    assert run.exit_code == 1 and run.summary["gradtrack"]["status"] == "failed"
    assert wandb.run is None


def test_disabled_mode_trains_and_writes_nothing(
    wandb_dir: Path, monkeypatch: pytest.MonkeyPatch, no_backend_failures: list
) -> None:
    monkeypatch.setenv("WANDB_MODE", "disabled")
    tracker, recorder = train_rnn({"backend_options": {"wandb": {"dir": str(wandb_dir)}}}, steps=12)
    assert tracker.summary().explosions > 0 and len(recorder.of("step")) == 12
    assert list(wandb_dir.rglob("*")) == []


def test_names_are_valid_and_distinct_for_wandb() -> None:
    keys = _wandb_keys(["0.weight", "layer-1.bias", "Block.w", "block.w", "héad.w"])
    assert keys["0.weight"] == "grad_norm/0_weight" and keys["layer-1.bias"] == "grad_norm/layer_1_bias"
    assert len({key.lower() for key in keys.values()}) == len(keys)
    assert all(part.replace("_", "").isalnum() and part.isascii() for k in keys.values() for part in k.split("/"))


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"layer_scalars": -1}, "layer_scalars"),
        ({"layer_scalars": "some"}, "layer_scalars"),
        ({"tags": "diverged"}, "tags"),
        ({"alert_every": -5}, "alert_every"),
        ({"loss_key": "grad/loss"}, "loss_key"),
    ],
)
def test_bad_options_fail_fast_on_entry(options: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        WandbBackend(**options)  # type: ignore[arg-type]
    with (
        pytest.raises(ValueError, match=match),
        GradTracker(mlp(), backend="wandb", backend_options={"wandb": options}),
    ):
        pass


def test_core_plugin_and_factory_do_not_import_wandb() -> None:
    """The factory and ``gradtrack_backend_state`` run in the training process: the run id is chosen there."""
    code = ("import sys, gradtrack, gradtrack_wandb; backend = gradtrack_wandb.gradtrack_make_backend('wandb', {}); "
            "assert backend.gradtrack_backend_state()['run_id']; sys.exit('wandb' in sys.modules)")  # fmt: skip
    assert subprocess.run([sys.executable, "-c", code], timeout=120).returncode == 0

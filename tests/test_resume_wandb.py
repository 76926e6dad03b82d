"""A W&B run that survives restarts: ``tracker.state_dict()`` names the run, a later process logs into it again.

Real wandb in offline mode, read back from each process's ``.wandb`` file: an offline resume writes a new
file for the same run id (``wandb sync`` appends them in order of start time).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch

from gradtrack import GradTracker, StateError
from gradtrack_testing.models import VanillaRNN, rnn_batch, train_steps

wandb = pytest.importorskip("wandb")

from gradtrack_wandb.backend import DIVERGED_TAG, EXPLODED_TAG, STEP_KEY, WandbBackend  # noqa: E402
from gradtrack_wandb.resume import identity_to_resume  # noqa: E402

from gradtrack_testing.wandb_files import WandbRun, read_records, run_files  # noqa: E402

SAVED, LOST, MORE = 12, 3, 8  # steps before the checkpoint, trained after it and lost, trained after the restart

# The first process: trains, saves a checkpoint, trains a few steps more and ends (as if killed, but cleanly).
FIRST_PROCESS = f"""
import sys, torch
from gradtrack import GradTracker
from gradtrack_testing.models import VanillaRNN, rnn_batch, train_steps
directory, checkpoint = sys.argv[1:]
model = VanillaRNN()
optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
x, y = rnn_batch(10)
options = {{"wandb": {{"dir": directory, "project": "resumed", "plots": False}}}}
with GradTracker(model, backend="wandb", backend_options=options, layer_every=5) as tracker:
    train_steps(tracker, model, optimizer, x, y, {SAVED})
    torch.save({{"model": model.state_dict(), "optimizer": optimizer.state_dict(), "gradtrack": tracker.state_dict()}},
               checkpoint)
    train_steps(tracker, model, optimizer, x, y, {LOST})
"""


def read_run(root: Path) -> WandbRun:
    """The one run written under ``root`` (wandb-core torn down first: it closes the file then)."""
    wandb.teardown()
    files = run_files(root)
    assert len(files) == 1, files
    return WandbRun.read(files[0])


def run_records(run: WandbRun) -> list[Any]:
    """The run's ``run`` records (project, notes), in order."""
    return [record.run for record in read_records(run.path) if record.WhichOneof("record_type") == "run"]


def published_states(run: WandbRun) -> list[dict[str, Any]]:
    """Every value of the run's ``gradtrack`` summary entry, in the order they were written."""
    summaries = [record.summary for record in read_records(run.path) if record.WhichOneof("record_type") == "summary"]
    return [json.loads(item.value_json) for summary in summaries for item in summary.update
            if (list(item.nested_key) or [item.key]) == ["gradtrack"]]  # fmt: skip


def steps_of(run: WandbRun) -> list[int]:
    return [row[STEP_KEY] for row in run.rows_with(STEP_KEY)]


def test_a_restarted_process_logs_into_the_same_run_and_its_step_axis_goes_on(wandb_dir: Path) -> None:
    checkpoint_path = wandb_dir / "checkpoint.pt"
    first_dir, second_dir = wandb_dir / "first", wandb_dir / "second"
    subprocess.run([sys.executable, "-c", FIRST_PROCESS, str(first_dir), str(checkpoint_path)], check=True, timeout=120)

    checkpoint = torch.load(checkpoint_path)  # weights_only: the state is plain values and tensors
    saved = checkpoint["gradtrack"]["backends"]["wandb"]
    assert re.fullmatch(r"[a-z0-9]{8}", saved["run_id"]) and saved["project"] == "resumed"
    model = VanillaRNN()
    model.load_state_dict(checkpoint["model"])
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    optimizer.load_state_dict(checkpoint["optimizer"])
    x, y = rnn_batch(10)
    # No project given: the saved one is where the run lives.
    tracker = GradTracker(model, backend="wandb", layer_every=5,
                          backend_options={"wandb": {"dir": str(second_dir), "plots": False}})  # fmt: skip
    tracker.load_state_dict(checkpoint["gradtrack"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no backend failure, no resume complaint
        with tracker:
            train_steps(tracker, model, optimizer, x, y, MORE)

    first, second = read_run(first_dir), read_run(second_dir)
    assert first.run_id == second.run_id == saved["run_id"]
    assert run_records(second)[0].project == "resumed"
    assert (run_records(first)[0].resume, run_records(second)[0].resume) == (False, True)  # resume="allow"
    assert steps_of(first) == list(range(SAVED + LOST))
    assert steps_of(second) == list(range(SAVED, SAVED + MORE))  # from the checkpoint's step on
    assert first.summary["gradtrack"]["resumes"] == 0 and first.summary["gradtrack"]["resumed_from"] == []
    assert second.summary["gradtrack"]["resumes"] == 1 and second.summary["gradtrack"]["resumed_from"] == [SAVED]
    assert second.summary["gradtrack"]["steps"] == SAVED + MORE  # counts cover both processes
    assert f"| resumed | 1 time(s), from step {SAVED} |" in run_records(second)[-1].notes  # the end's summary
    assert "resumed" not in run_records(first)[-1].notes
    assert second.exit_code == 0 and not second.tags


def test_a_diverged_run_stays_diverged_after_a_restart(wandb_dir: Path) -> None:
    model = VanillaRNN(radius=3.0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)  # explodes, then diverges
    x, y = rnn_batch(20)
    options = {"wandb": {"dir": str(wandb_dir / "first"), "project": "diverging", "plots": False}}
    with GradTracker(model, backend="wandb", backend_options=options, clip=None) as first_tracker:
        for _ in range(30):
            train_steps(first_tracker, model, optimizer, x, y, 1)
            if first_tracker.diverged:
                break
        assert first_tracker.diverged
        state, before = first_tracker.state_dict(), first_tracker.summary()
        train_steps(first_tracker, model, optimizer, x, y, 2)  # lost

    options = {"wandb": {"dir": str(wandb_dir / "second"), "plots": False}}
    second_tracker = GradTracker(model, backend="wandb", backend_options=options, clip=None)
    second_tracker.load_state_dict(state)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no backend failure
        with second_tracker:
            train_steps(second_tracker, model, optimizer, x, y, 4)
    assert second_tracker.diverged

    first, second = read_run(wandb_dir / "first"), read_run(wandb_dir / "second")
    assert second.run_id == first.run_id
    # Tagged before the first row of the restarted process: the run never shows as healthy.
    assert second.tags == (EXPLODED_TAG, DIVERGED_TAG)
    assert second.first_tagged(DIVERGED_TAG) < second.order.index("history")
    assert steps_of(second) == list(range(before.steps, before.steps + 4))
    published = second.summary["gradtrack"]
    assert (published["diverged"], published["diverged_step"]) == (True, before.diverged_step)
    assert published["diverged_reason"] == before.diverged_reason
    assert published["first_explosion_step"] == before.first_explosion_step
    assert published["explosions"] >= before.explosions > 0 and published["resumes"] == 1
    live = published_states(second)  # from the start, not only once the run ends
    assert live[0]["explosions"] == before.explosions and live[0]["resumes"] == 1
    assert all(state["diverged"] and state["first_explosion_step"] == before.first_explosion_step for state in live)
    assert [alert.level for alert in second.alerts].count("ERROR") == 0  # diverged once, alerted once
    divergence_line = f"### gradtrack: diverged at step {before.diverged_step}"
    resume_line = f"resumed from a checkpoint at step {before.steps}\n"
    positions = [position for position, kind in enumerate(second.order) if kind == "run"]
    notes = {position: record.notes for position, record in zip(positions, run_records(second), strict=True)}
    at_first_row = notes[max(p for p in positions if p < second.order.index("history"))]
    assert divergence_line in at_first_row and resume_line in at_first_row
    assert divergence_line in notes[positions[-1]] and f"from step {before.steps} |" in notes[positions[-1]]


def test_in_the_users_own_run_gradtrack_saves_no_identity_and_the_step_axis_goes_on(wandb_dir: Path) -> None:
    model = VanillaRNN()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    x, y = rnn_batch(10)
    user_run = wandb.init(project="mine", dir=str(wandb_dir / "first"))
    with GradTracker(model, backend="wandb", backend_options={"wandb": {"plots": False}}) as tracker:
        train_steps(tracker, model, optimizer, x, y, SAVED)
        state = tracker.state_dict()
    user_run.finish()
    assert state["backends"]["wandb"] == {"owned": False}

    user_run = wandb.init(project="mine", dir=str(wandb_dir / "second"), id=user_run.id, resume="allow")
    second_tracker = GradTracker(model, backend="wandb", backend_options={"wandb": {"plots": False}})
    second_tracker.load_state_dict(state)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with second_tracker:
            train_steps(second_tracker, model, optimizer, x, y, MORE)
    user_run.finish()
    second = read_run(wandb_dir / "second")
    assert steps_of(second) == list(range(SAVED, SAVED + MORE))
    assert second.summary["gradtrack"]["resumes"] == 1


def test_the_run_id_is_chosen_up_front(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WANDB_RUN_ID", raising=False)
    monkeypatch.delenv("WANDB_PROJECT", raising=False)
    monkeypatch.delenv("WANDB_ENTITY", raising=False)
    one, other = WandbBackend().gradtrack_backend_state(), WandbBackend().gradtrack_backend_state()
    assert re.fullmatch(r"[a-z0-9]{8}", one["run_id"]) and one["run_id"] != other["run_id"]
    assert one == {"owned": True, "run_id": one["run_id"], "project": None, "entity": None}
    chosen = WandbBackend(project="p", init_kwargs={"id": "mine", "entity": "team"}).gradtrack_backend_state()
    assert chosen == {"owned": True, "run_id": "mine", "project": "p", "entity": "team"}
    monkeypatch.setenv("WANDB_RUN_ID", "fromenv")
    monkeypatch.setenv("WANDB_PROJECT", "envproject")
    assert WandbBackend().gradtrack_backend_state() == {"owned": True, "run_id": "fromenv", "project": "envproject",
                                                       "entity": None}  # fmt: skip


def test_a_loaded_state_names_the_run_to_open_again() -> None:
    saved = {"owned": True, "run_id": "saved123", "project": "p", "entity": "e"}
    for option in ("project", "entity"):  # the saved project and entity, unless the options name others
        backend = WandbBackend(**{option: "moved"})
        backend.gradtrack_load_backend_state(state=saved)
        assert backend.gradtrack_backend_state() == {**saved, option: "moved"}

    # Not gradtrack's run to open: the user's active one, with a warning when it is not the saved run.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert identity_to_resume(saved, init={}, user_run_id="saved123") is None
    with pytest.warns(RuntimeWarning, match="resumes W&B run 'saved123' in your active run 'other'"):
        assert identity_to_resume(saved, init={}, user_run_id="other") is None
    with pytest.warns(RuntimeWarning, match="no W&B run is active"):  # the user forgot to open theirs again
        assert identity_to_resume({"owned": False}, init={}, user_run_id=None) is None


@pytest.mark.parametrize(
    ("saved", "options", "key"),
    [
        ({"run_id": 5}, {}, "run_id"),
        ({"run_id": ""}, {}, "run_id"),
        ({"run_id": "abc", "project": 3}, {}, "project"),
        ({"run_id": "abc", "entity": ["team"]}, {}, "entity"),
        ({"owned": "yes", "run_id": "abc"}, {}, "owned"),
        ({"run_id": "abc"}, {"init_kwargs": {"id": "other"}}, "run_id"),
    ],
)
def test_a_bad_saved_state_is_refused_naming_the_key(saved: dict[str, Any], options: dict[str, Any], key: str) -> None:
    model = VanillaRNN()
    with GradTracker(model) as tracker:  # a real state, then the wandb part damaged
        train_steps(tracker, model, torch.optim.SGD(model.parameters(), lr=0.05), *rnn_batch(5), 2)
    state = tracker.state_dict()
    state["backends"]["wandb"] = saved
    resumed = GradTracker(model, backend="wandb", backend_options={"wandb": options})
    resumed.load_state_dict(state)
    with pytest.raises(StateError, match=f"backend 'wandb' cannot resume.*'{key}'"), resumed:
        pass

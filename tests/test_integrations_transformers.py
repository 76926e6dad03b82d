"""gradtrack.integrations.transformers: a real ``transformers.Trainer`` on a 2-layer GPT-2 built from a config."""

from __future__ import annotations

import math
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from transformers import GPT2LMHeadModel, Trainer, TrainerCallback, TrainingArguments

from gradtrack import GradTracker
from gradtrack.integrations.transformers import STATE_FILE, GradTrackerCallback
from gradtrack_testing.hf import tiny_gpt2, token_data
from gradtrack_testing.recording import RecordingBackend, check_resumed_run

pytestmark = [
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
    pytest.mark.filterwarnings("ignore::FutureWarning"),
]

STEPS = 4  # optimizer steps per train()
ACCUMULATE = 2


class Probe(TrainerCallback):
    """Placed before gradtrack's callback: what the Trainer logs each step (logging_steps=1), the gradient norm at
    ``on_pre_optimizer_step`` (before gradtrack's clipping), and the one the optimizer steps with."""

    def __init__(self) -> None:
        self.logs: list[dict[str, float]] = []
        self.before: list[float] = []
        self.stepped: list[float] = []
        self.model: Any = None

    def norm(self, *_: Any) -> float:
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        return float(torch.nn.utils.get_total_norm(grads))

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        self.model = model
        kwargs["optimizer"].optimizer.register_step_pre_hook(lambda *_: self.stepped.append(self.norm()))

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.before.append(self.norm())

    def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kwargs: Any) -> None:
        if "loss" in logs:
            self.logs.append(dict(logs))

    def column(self, key: str) -> list[float]:
        return [float(log[key]) for log in self.logs]


def train(
    tmp_path: Path, callbacks: list[TrainerCallback], model: Any = None, **arguments: Any
) -> tuple[Trainer, GPT2LMHeadModel]:
    model = model if model is not None else tiny_gpt2()
    options: dict[str, Any] = {
        "max_steps": STEPS, "per_device_train_batch_size": 4, "gradient_accumulation_steps": ACCUMULATE,
        "learning_rate": 1e-3, "logging_steps": 1, "save_strategy": "no", "report_to": [], "use_cpu": True,
        "disable_tqdm": True, **arguments,
    }  # fmt: skip
    resume = options.pop("resume_from_checkpoint", None)
    args = TrainingArguments(output_dir=str(tmp_path / "out"), **options)
    trainer = Trainer(model=model, args=args, train_dataset=token_data(), callbacks=callbacks)
    trainer.train(resume_from_checkpoint=resume)
    return trainer, model


@pytest.mark.slow
def test_report_to_mlflow_one_run_monitor_only_at_the_trainers_pre_clip_norm(
    tmp_path: Path, tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    mlflow = pytest.importorskip("mlflow")
    from mlflow import MlflowClient

    root = tmp_path_factory.getbasetemp() / "integrations-mlflow"  # shared with the Lightning tests: the schema
    root.mkdir(exist_ok=True)  # of a new sqlite store costs seconds
    uri = f"sqlite:///{root / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "hf-trainer")
    # MLflowCallback sets MLflow's process-wide tracking URI and experiment (and MLFLOW_EXPERIMENT_ID, which
    # gradtrack's own runs would follow): all undone after the test.
    monkeypatch.setattr(mlflow.tracking._tracking_service.utils, "_tracking_uri", None)
    monkeypatch.setattr(mlflow.tracking.fluent, "_active_experiment_id", None)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_ID", "0")  # recorded, so that teardown removes what MLflow sets
    monkeypatch.delenv("MLFLOW_EXPERIMENT_ID")
    probe = Probe()
    callback = GradTrackerCallback(layer_every=2, close_timeout=120)
    train(tmp_path, [probe, callback], report_to=["mlflow"])  # max_grad_norm: the default 1.0

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("hf-trainer")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1  # MLflowCallback's run, nothing more
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.data.tags["diverged"] == "false"
    assert run.data.params["gradtrack.clip"] == "none"

    def history(key: str) -> list[float]:
        return [m.value for m in sorted(client.get_metric_history(run.info.run_id, key), key=lambda m: m.step)]

    norms = history("grad/total_norm")
    assert len(norms) == STEPS
    assert norms == pytest.approx(history("grad_norm"), rel=1e-5)  # the Trainer's own, pre-clip, in the same run
    assert norms == pytest.approx(probe.column("grad_norm"), rel=1e-6)
    assert max(norms) > 1.0  # ... so the Trainer clipped some steps, after gradtrack measured them
    assert all(norm <= 1.0 + 1e-5 for norm in probe.stepped)
    assert history("grad/clip_coef") == [1.0] * STEPS
    # gradtrack's loss (the optimizer step's) goes beside the Trainer's "loss", not into it
    assert history("gradtrack/loss") == pytest.approx(probe.column("loss"), rel=1e-4)
    assert history("loss") == pytest.approx(probe.column("loss"), rel=1e-4)  # the Trainer's (logging_steps=1)
    assert len(history("grad_norm/transformer.h.0.attn.c_attn.weight")) == STEPS // 2
    assert run.data.metrics["gradtrack.summary.steps"] == STEPS


def test_max_grad_norm_zero_gradtrack_clips(tmp_path: Path, recorder: RecordingBackend) -> None:
    probe = Probe()
    callback = GradTrackerCallback(backend=recorder, max_norm=0.5)
    train(tmp_path, [probe, callback], max_grad_norm=0.0)

    assert recorder.of("run_start")[0].config["clip"] == "norm"
    steps = recorder.of("step")
    assert [s.step for s in steps] == list(range(STEPS))  # one gradtrack step per optimizer step
    assert [s.total_norm for s in steps] == pytest.approx(probe.before, rel=1e-6)
    assert all(s.clipped for s in steps) and all(norm <= 0.5 + 1e-5 for norm in probe.stepped)
    assert [s.loss for s in steps] == pytest.approx(probe.column("loss"), rel=1e-4)
    assert recorder.of("run_end")[0].status == "finished"


@pytest.mark.parametrize("options", [{"clip": "adaptive"}, {"max_norm": 2.0}])
def test_gradtrack_clipping_beside_the_trainers_is_refused(tmp_path: Path, options: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match=r"max_grad_norm=1.0\) would clip the gradients twice"):
        train(tmp_path, [GradTrackerCallback(**options)])


@pytest.mark.slow
def test_a_failed_train_is_closed_failed_by_the_next(tmp_path: Path, recorder: RecordingBackend) -> None:
    class Boom(TrainerCallback):
        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if state.global_step == 2:
                raise RuntimeError("boom")

    callback = GradTrackerCallback(backend=recorder)
    model = tiny_gpt2()
    with pytest.raises(RuntimeError, match="boom"):
        train(tmp_path, [callback, Boom()], model)
    assert not recorder.of("run_end")  # transformers has no exception event
    trainer, _ = train(tmp_path, [callback], model, max_steps=1)
    assert [end.status for end in recorder.of("run_end")] == ["failed", "finished"]
    assert "training_step" not in vars(trainer) and "clip_grad_norm_" not in vars(trainer.accelerator)
    with GradTracker(model):  # the model is free again
        pass


def test_amp_state_before_and_after_the_scaler_unscaled(recorder: RecordingBackend) -> None:
    """The Trainer's clip is wrapped before accelerate unscales fp16 gradients; on_pre_optimizer_step may come after:
    gradtrack reports the true norm either way, and an overflow as grad/amp_overflow."""
    from types import SimpleNamespace

    from gradtrack.integrations import HandDriven, amp_state

    torch.manual_seed(0)
    model = torch.nn.Linear(8, 4)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    wrapped = SimpleNamespace(optimizer=optimizer, scaler=None)  # as accelerate's AcceleratedOptimizer
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    driven = HandDriven.start(model, {"backend": recorder, "clip": None})
    try:
        true_norms = []
        for unscale_first in (False, True, False):
            optimizer.zero_grad()
            scaler.scale(model(torch.randn(16, 8)).pow(2).mean()).backward()
            true_norms.append(float(torch.nn.utils.get_total_norm([p.grad for p in model.parameters()])) / 1024.0)
            if unscale_first:
                scaler.unscale_(optimizer)
            if len(true_norms) == 3:
                model.weight.grad[0, 0] = math.inf  # an overflow the scaler will skip
            driven.step(amp_state(scaler, wrapped))
            scaler.step(optimizer)
            scaler.update()
    finally:
        driven.close()
    steps = recorder.of("step")
    assert [s.amp_overflow for s in steps] == [False, False, True]
    assert [s.total_norm for s in steps[:2]] == pytest.approx(true_norms[:2], rel=1e-5)
    assert driven.tracker.summary().explosions == 0


# -- resuming from the Trainer's checkpoints ----------------------------------------------------------

# A constant learning rate: the schedule of a run of STEPS steps is then that of the first STEPS of a longer one.
RESUMABLE: dict[str, Any] = {"lr_scheduler_type": "constant", "save_strategy": "steps", "save_steps": STEPS}


@pytest.mark.parametrize("resume", ["last", "moved"])
def test_resume_from_checkpoint_resumes_gradtracks_run(tmp_path: Path, resume: str) -> None:
    uninterrupted, first, second = RecordingBackend(), RecordingBackend(), RecordingBackend()
    train(tmp_path / "whole", [GradTrackerCallback(backend=uninterrupted, max_norm=1.0)], max_steps=2 * STEPS,
          max_grad_norm=0.0, **RESUMABLE)  # fmt: skip

    train(tmp_path, [GradTrackerCallback(backend=first, max_norm=1.0)], max_grad_norm=0.0, **RESUMABLE)
    checkpoint = tmp_path / "out" / f"checkpoint-{STEPS}"
    assert torch.load(checkpoint / STATE_FILE, weights_only=True)["step"] == STEPS
    location: bool | str = True
    if resume == "moved":  # the folder the Trainer is given, not the output_dir's checkpoint-N, holds the state
        moved = tmp_path / "elsewhere" / "resume-here"
        shutil.copytree(checkpoint, moved)
        shutil.rmtree(tmp_path / "out")
        location = str(moved)
    callback = GradTrackerCallback(backend=second, max_norm=1.0)
    train(tmp_path, [callback], max_steps=2 * STEPS, max_grad_norm=0.0, resume_from_checkpoint=location,
          **RESUMABLE)  # fmt: skip

    assert callback.tracker is not None
    check_resumed_run(first, second, uninterrupted, callback.tracker.summary(), STEPS, rel=1e-4)  # both train()s
    assert (tmp_path / "out" / f"checkpoint-{2 * STEPS}" / STATE_FILE).is_file()


def test_resume_from_a_checkpoint_without_gradtracks_state_goes_on_from_the_global_step(tmp_path: Path) -> None:
    train(tmp_path, [], **RESUMABLE)  # trained without gradtrack
    assert not (tmp_path / "out" / f"checkpoint-{STEPS}" / STATE_FILE).exists()
    recorder = RecordingBackend()
    train(tmp_path, [GradTrackerCallback(backend=recorder)], max_steps=2 * STEPS, resume_from_checkpoint=True,
          **RESUMABLE)  # fmt: skip
    assert recorder.of("run_start")[0].resumed is None
    assert [s.step for s in recorder.of("step")] == list(range(STEPS, 2 * STEPS))


# -- self-healing -------------------------------------------------------------------------------------


class Embedded(torch.utils.data.IterableDataset):
    """Records in a fixed order (an iterable dataset is never shuffled by the Trainer), given as embeddings so that
    some can be poisoned: a NaN in each record of ``poison``."""

    def __init__(self, poison: set[int], n: int = 64, length: int = 16) -> None:
        generator = torch.Generator().manual_seed(0)
        table = torch.randn(64, 32, generator=generator)
        self.rows = []
        for index in range(n):
            ids = torch.randint(0, 64, (length,), generator=generator)
            embeds = table[ids].clone()
            if index in poison:
                embeds[0, 0] = math.nan
            self.rows.append({"inputs_embeds": embeds, "labels": ids})

    def __iter__(self) -> Any:
        return iter(self.rows)


class Restored(TrainerCallback):
    """After each optimizer step, before the Trainer steps its scheduler: the parameters, AdamW's step count and
    the scheduler's count; and the learning rate each update used, against the scheduler's."""

    def __init__(self) -> None:
        self.params: list[torch.Tensor] = []
        self.adam_steps: list[int] = []
        self.epochs: list[int] = []
        self.lr_ratios: list[float] = []

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        scheduler = kwargs["lr_scheduler"]

        def used(optimizer: torch.optim.Optimizer, *_: Any) -> None:  # runs before gradtrack's (global) post-hook
            self.lr_ratios.append(optimizer.param_groups[0]["lr"] / scheduler.get_last_lr()[0])

        kwargs["optimizer"].optimizer.register_step_post_hook(used)

    def on_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        model, optimizer = kwargs["model"], kwargs["optimizer"]
        self.params.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
        self.adam_steps.append(int(next(iter(optimizer.state.values()))["step"]))
        self.epochs.append(kwargs["lr_scheduler"].last_epoch)


def test_rollback_restores_the_model_optimizer_and_scheduler_the_trainer_owns(
    tmp_path: Path, recorder: RecordingBackend
) -> None:
    restored = Restored()
    callback = GradTrackerCallback(backend=recorder, on_divergence="rollback", rollback_every=3)
    model = tiny_gpt2()
    # max_grad_norm: the default 1.0 (the Trainer clips, gradtrack watches and heals)
    args = TrainingArguments(output_dir=str(tmp_path / "out"), max_steps=12, per_device_train_batch_size=4,
                             learning_rate=1e-3, save_strategy="no", report_to=[], use_cpu=True,
                             disable_tqdm=True)  # fmt: skip
    poisoned = Embedded(poison={4 * 7 + 1, 4 * 10 + 2})  # 4 records a step: steps 7 and 10
    trainer = Trainer(model=model, args=args, train_dataset=poisoned, callbacks=[restored, callback])
    trainer.train()

    first, second = recorder.of("rollback")
    assert (first.step, first.restored_step, first.skipped, first.lr_scale) == (7, 6, 2, 1.0)
    assert (second.step, second.lr_scale) == (10, 0.5)  # soon after the first: the learning rate halves
    assert callback.tracker is not None and not callback.tracker.diverged and trainer.state.global_step == 12
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert [math.isnan(s.loss) for s in recorder.of("step")] == [step in (7, 10) for step in range(12)]  # it goes on
    assert torch.equal(restored.params[7], restored.params[5])  # step 6's start came back; step 7's update skipped
    assert not torch.equal(restored.params[8], restored.params[7])
    assert restored.adam_steps[5:9] == [6, 7, 6, 7]  # AdamW's state came back with it
    assert restored.epochs[5:9] == [5, 6, 6, 7]  # and the scheduler's
    # The halved rate is used inside the Trainer's optimizer.step(), and undone before its scheduler steps.
    assert restored.lr_ratios == pytest.approx([1.0] * 10 + [0.5] * 2)

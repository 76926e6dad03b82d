"""gradtrack.integrations.lightning: a real Lightning ``Trainer.fit`` on CPU, with MLflow and W&B loggers."""

from __future__ import annotations

import math
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

pytest.importorskip("lightning")

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import MLFlowLogger, WandbLogger
from lightning.pytorch.plugins.precision import MixedPrecision
from lightning.pytorch.strategies import SingleDeviceStrategy

from gradtrack import GradTracker
from gradtrack.integrations.lightning import GradTrackerCallback
from gradtrack_testing.recording import RecordingBackend, check_resumed_run

pytestmark = [
    pytest.mark.filterwarnings("ignore:Be aware that when using `ckpt_path`:UserWarning"),
    pytest.mark.filterwarnings("ignore:.*does not have many workers:UserWarning"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:.*LeafSpec.*"),
]

STEPS = 4  # optimizer steps per fit
ACCUMULATE = 2


class Regression(pl.LightningModule):
    """A small MLP on a fixed regression set; keeps every training-step loss."""

    def __init__(self, fail_at: int | None = None, lr: float = 0.05, log: bool = True) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))
        self.fail_at = fail_at
        self.lr = lr
        self.log_loss = log
        self.losses: list[float] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).squeeze(-1)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        if batch_idx == self.fail_at:
            raise RuntimeError("boom")
        x, y = batch
        loss = nn.functional.mse_loss(self(x).float(), y)
        if self.log_loss:  # not under torch.compile(fullgraph=True): Lightning compiles training_step
            self.losses.append(loss.item())
            self.log("train_loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr)


class Probe(pl.Callback):
    """Placed before gradtrack's callback: the gradient norm gradtrack should see, and the one the optimizer
    steps with (after any clipping)."""

    def __init__(self) -> None:
        self.before: list[float] = []
        self.stepped: list[float] = []

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # A post-hook: Lightning's optimizer.step(closure) makes the gradients inside the step.
        trainer.optimizers[0].register_step_post_hook(lambda *_: self.stepped.append(grad_norm(pl_module)))

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        self.before.append(grad_norm(pl_module))


def grad_norm(module: nn.Module) -> float:
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    return float(torch.nn.utils.get_total_norm(grads)) if grads else math.nan


def loader() -> torch.utils.data.DataLoader:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(64, 8, generator=generator)
    y = 3.0 * x.sum(-1) + torch.randn(64, generator=generator)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)


def fit(tmp_path: Path, callbacks: list[pl.Callback], module: Any = None, **trainer_options: Any) -> pl.Trainer:
    options: dict[str, Any] = {
        "logger": False, "accumulate_grad_batches": ACCUMULATE, "log_every_n_steps": 1, "max_steps": STEPS,
        "enable_checkpointing": False,
    }  # fmt: skip
    options.update(trainer_options)
    ckpt_path = options.pop("ckpt_path", None)
    trainer = pl.Trainer(
        accelerator="cpu", enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
        callbacks=callbacks, **options,
    )  # fmt: skip
    trainer.fit(module if module is not None else Regression(), loader(), ckpt_path=ckpt_path)
    return trainer


def step_means(losses: list[float], per_step: int = ACCUMULATE) -> list[float]:
    return [sum(losses[i : i + per_step]) / per_step for i in range(0, len(losses), per_step)]


@pytest.fixture
def mlflow_uri(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> str:
    """A sqlite store (one per module: its schema costs seconds); MLFlowLogger's global set_tracking_uri undone."""
    mlflow = pytest.importorskip("mlflow")
    monkeypatch.setattr(mlflow.tracking._tracking_service.utils, "_tracking_uri", None)
    root = tmp_path_factory.getbasetemp() / "integrations-mlflow"  # shared with the transformers tests
    root.mkdir(exist_ok=True)
    return f"sqlite:///{root / 'mlflow.db'}"


@pytest.mark.slow
def test_mlflow_logger_run_holds_gradtrack_one_point_per_optimizer_step(tmp_path: Path, mlflow_uri: str) -> None:
    from mlflow import MlflowClient

    logger = MLFlowLogger(experiment_name="lightning-mlflow", tracking_uri=mlflow_uri)
    probe = Probe()
    callback = GradTrackerCallback(layer_every=1, close_timeout=120)
    module = Regression()
    fit(tmp_path, [probe, callback], module, logger=logger)

    client = MlflowClient(mlflow_uri)
    experiment = client.get_experiment_by_name("lightning-mlflow")
    runs = client.search_runs([experiment.experiment_id])
    assert [run.info.run_id for run in runs] == [logger.run_id]  # one run: the logger's
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.data.tags["diverged"] == "false"
    assert run.data.params["gradtrack.clip"] == "norm"
    assert "train_loss" in run.data.metrics  # Lightning's own metrics in the same run
    history = sorted(client.get_metric_history(run.info.run_id, "grad/total_norm"), key=lambda m: m.step)
    assert [m.step for m in history] == list(range(STEPS))
    assert [m.value for m in history] == pytest.approx(probe.before, rel=1e-6)
    losses = sorted(client.get_metric_history(run.info.run_id, "gradtrack/loss"), key=lambda m: m.step)
    assert [m.value for m in losses] == pytest.approx(step_means(module.losses), rel=1e-6)
    assert len(client.get_metric_history(run.info.run_id, "grad_norm/net.0.weight")) == STEPS
    assert run.data.metrics["gradtrack.summary.steps"] == STEPS
    assert callback.tracker is not None and callback.tracker.steps == STEPS


@pytest.mark.slow
def test_wandb_logger_run_holds_gradtrack(tmp_path: Path, wandb_dir: Path) -> None:
    import wandb

    from gradtrack_testing.wandb_files import WandbRun, run_files

    logger = WandbLogger(project="gradtrack-lightning", save_dir=str(wandb_dir), offline=True)
    probe = Probe()
    fit(tmp_path, [probe, GradTrackerCallback(close_timeout=120)], logger=logger)
    logger.experiment.finish()
    wandb.teardown()

    files = run_files(wandb_dir)
    assert len(files) == 1, files  # one run: the logger's
    run = WandbRun.read(files[0])
    rows = run.rows_with("grad/total_norm")
    assert [row["gradtrack/step"] for row in rows] == list(range(STEPS))
    assert [row["grad/total_norm"] for row in rows] == pytest.approx(probe.before, rel=1e-6)
    assert len(run.rows_with("gradtrack/loss")) == STEPS  # gradtrack's loss key in the user's (the logger's) run
    assert run.rows_with("train_loss")  # Lightning's own rows
    assert run.config["gradtrack"]["clip"] == "norm"
    assert run.summary["gradtrack"]["diverged"] is False and run.summary["gradtrack"]["steps"] == STEPS


def test_gradtrack_clips_once_per_optimizer_step(tmp_path: Path, recorder: RecordingBackend) -> None:
    probe = Probe()
    module = Regression()
    fit(tmp_path, [probe, GradTrackerCallback(backend=recorder, max_norm=0.5)], module)

    steps = recorder.of("step")
    assert [s.step for s in steps] == list(range(STEPS))  # the closure's optimizer.step() is not measured again
    assert [s.total_norm for s in steps] == pytest.approx(probe.before, rel=1e-6)
    assert all(s.clipped for s in steps) and all(norm <= 0.5 + 1e-5 for norm in probe.stepped)
    assert [s.loss for s in steps] == pytest.approx(step_means(module.losses), rel=1e-6)
    assert recorder.of("run_end")[0].status == "finished"


def test_gradient_clip_val_makes_gradtrack_watch_the_norm_lightning_clips(
    tmp_path: Path, recorder: RecordingBackend
) -> None:
    probe = Probe()
    with pytest.warns(RuntimeWarning, match=r"gradient_clip_val=0.1\) clips the gradients: gradtrack only monitors"):
        fit(tmp_path, [probe, GradTrackerCallback(backend=recorder)], gradient_clip_val=0.1)

    assert recorder.of("run_start")[0].config["clip"] == "none"
    steps = recorder.of("step")
    assert len(steps) == STEPS
    assert [s.total_norm for s in steps] == pytest.approx(probe.before, rel=1e-6)  # before Lightning's clipping
    assert min(probe.before) > 0.1 and not any(s.clipped for s in steps)
    assert all(norm <= 0.1 + 1e-5 for norm in probe.stepped)  # ... which still happened


@pytest.mark.parametrize("options", [{"clip": "norm"}, {"max_norm": 2.0}])
def test_gradtrack_clipping_beside_gradient_clip_val_is_refused(tmp_path: Path, options: dict[str, Any]) -> None:
    callback = GradTrackerCallback(**options)
    with pytest.raises(ValueError, match="clip the gradients twice"):
        fit(tmp_path, [callback], gradient_clip_val=0.1)
    assert callback.tracker is None


def test_exception_ends_the_tracker_failed_and_frees_the_model(tmp_path: Path, recorder: RecordingBackend) -> None:
    module = Regression(fail_at=5)
    with pytest.raises(RuntimeError, match="boom"):
        fit(tmp_path, [GradTrackerCallback(backend=recorder)], module)
    assert recorder.of("run_end")[0].status == "failed"
    assert len(recorder.of("step")) == 2  # batches 0-3 made two optimizer steps
    with GradTracker(module):  # no tracker left active on the module
        pass


def test_amp_overflow_steps_are_counted_not_exploded(tmp_path: Path, recorder: RecordingBackend) -> None:
    """16-mixed with a GradScaler (on CPU here): gradtrack reads the scaler's overflow flag after Lightning
    unscaled, so the steps the scaler skips are grad/amp_overflow, and the loss is observed unscaled."""
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**40, backoff_factor=2.0**-10)
    module = Regression()
    callback = GradTrackerCallback(backend=recorder)
    fit(tmp_path, [callback], module, accumulate_grad_batches=1, plugins=[MixedPrecision("16-mixed", "cpu", scaler)])

    steps = recorder.of("step")
    overflow = [s.amp_overflow for s in steps]
    assert overflow == [True, True, True, False]  # 2**40 -> 2**30 -> 2**20 -> 2**10
    assert callback.tracker is not None
    summary = callback.tracker.summary()
    assert summary.amp_overflow_steps == 3 and summary.explosions == 0 and not callback.tracker.diverged
    assert steps[-1].loss == pytest.approx(module.losses[-1], rel=1e-3)


@pytest.mark.slow
def test_compiled_module_clean_names_and_no_graph_break(tmp_path: Path, recorder: RecordingBackend) -> None:
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    module = Regression(log=False)
    compiled = torch.compile(module, backend="aot_eager", fullgraph=True)  # fullgraph: a graph break would raise
    fit(tmp_path, [GradTrackerCallback(backend=recorder)], compiled)
    assert recorder.of("run_start")[0].layer_names == ("net.0.weight", "net.0.bias", "net.2.weight", "net.2.bias")
    assert len(recorder.of("step")) == STEPS

    # The same model compiled in a plain loop: the tracker sees the OptimizedModule's _orig_mod. names.
    recorder.calls.clear()
    plain = torch.compile(Regression().net, backend="aot_eager", fullgraph=True)
    optimizer = torch.optim.SGD(plain.parameters(), lr=0.05)
    with GradTracker(plain, backend=recorder):
        for x, y in list(loader())[:3]:
            optimizer.zero_grad()
            nn.functional.mse_loss(plain(x).squeeze(-1), y).backward()
            optimizer.step()
    assert recorder.of("run_start")[0].layer_names == ("0.weight", "0.bias", "2.weight", "2.bias")
    assert len(recorder.of("step")) == 3
    assert not counters["graph_break"]


def test_options_are_checked_when_the_callback_is_created() -> None:
    with pytest.raises(ValueError, match="norm_type"):
        GradTrackerCallback(norm_type=3)
    with pytest.raises(TypeError, match="optimizer="):
        GradTrackerCallback(optimizer=None)
    with pytest.raises(TypeError, match="takes no scheduler= option: it uses the scheduler of the trainer"):
        GradTrackerCallback(on_divergence="rollback", scheduler=None)
    with pytest.raises(ValueError, match=r"rollback_every must be an int in \[1, "):
        GradTrackerCallback(on_divergence="rollback", rollback_every=0)


def test_importing_gradtrack_imports_no_framework() -> None:
    code = textwrap.dedent(
        """
        import sys
        import gradtrack, gradtrack.integrations
        frameworks = ("lightning", "pytorch_lightning", "transformers", "accelerate")
        assert not [m for m in sys.modules if m.split(".")[0] in frameworks], sorted(sys.modules)
        """
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


class Finetuned(Regression):
    """A backbone that Lightning's ``BackboneFinetuning`` freezes at setup and unfreezes at epoch 1."""

    def __init__(self) -> None:
        super().__init__(lr=0.01)
        self.backbone = self.net[:2]
        self.head = self.net[2:]

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=self.lr)


def test_backbone_finetuning_unfreezes_layers_that_gradtrack_measures_and_clips(tmp_path: Path) -> None:
    from lightning.pytorch.callbacks import BackboneFinetuning

    probe, recorder = Probe(), RecordingBackend()
    trainer = pl.Trainer(
        max_epochs=2, accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
        enable_checkpointing=False, default_root_dir=tmp_path, accumulate_grad_batches=ACCUMULATE,
        callbacks=[BackboneFinetuning(unfreeze_backbone_at_epoch=1, backbone_initial_ratio_lr=1.0, verbose=False),
                   probe, GradTrackerCallback(backend=recorder, max_norm=1.0, layer_every=1)],
    )  # fmt: skip
    trainer.fit(Finetuned(), loader())
    steps = recorder.of("step")
    per_epoch = len(steps) // 2
    assert len(steps) == 8 and [s.total_norm for s in steps] == pytest.approx(probe.before, rel=1e-6)
    assert all(norm <= 1.0 + 1e-5 for norm in probe.stepped)  # clipped, the unfrozen backbone included
    backbone = {"net.0.weight", "net.0.bias"}
    assert all(not backbone & set(s.layer_norms or {}) for s in steps[:per_epoch])  # frozen: no gradient
    assert all(backbone <= set(s.layer_norms or {}) for s in steps[per_epoch:])
    assert set(recorder.of("run_start")[0].layer_names) == {"net.2.weight", "net.2.bias"}
    (added,) = recorder.of("layers_added")
    assert set(added.names) == backbone and added.step == per_epoch


# -- resuming from Lightning's checkpoints ----------------------------------------------------------


class LateRestore(SingleDeviceStrategy):
    """Restores the checkpoint after ``on_fit_start``, as Lightning's FSDP, DeepSpeed and ModelParallel do."""

    @property
    def restore_checkpoint_after_setup(self) -> bool:
        return True


def checkpointed(tmp_path: Path, callbacks: list[pl.Callback], **trainer_options: Any) -> Path:
    """A first fit of ``STEPS`` steps whose ``ModelCheckpoint`` saves at its last step; the checkpoint's path."""
    saver = ModelCheckpoint(dirpath=tmp_path / "checkpoints", every_n_train_steps=STEPS, save_top_k=-1)
    fit(tmp_path, [*callbacks, saver], enable_checkpointing=True, **trainer_options)
    (path,) = (tmp_path / "checkpoints").iterdir()
    return path


@pytest.mark.parametrize("strategy", ["default", "late-restore"])
def test_fit_from_a_checkpoint_resumes_gradtracks_run(tmp_path: Path, strategy: str) -> None:
    uninterrupted, first, second = RecordingBackend(), RecordingBackend(), RecordingBackend()
    fit(tmp_path / "whole", [GradTrackerCallback(backend=uninterrupted, max_norm=1.0)], max_steps=2 * STEPS)

    before = GradTrackerCallback(backend=first, max_norm=1.0)
    path = checkpointed(tmp_path, [before])
    saved = torch.load(path, weights_only=True)["callbacks"]["GradTrackerCallback"]["gradtrack"]
    assert saved["step"] == STEPS and saved["format"] == "gradtrack.state"

    options: dict[str, Any] = {} if strategy == "default" else {"strategy": LateRestore(torch.device("cpu"))}
    after = GradTrackerCallback(backend=second, max_norm=1.0)
    fit(tmp_path, [after], max_steps=2 * STEPS, ckpt_path=path, **options)

    assert after.tracker is not None
    check_resumed_run(first, second, uninterrupted, after.tracker.summary(), STEPS, rel=1e-5)  # both fits


def test_fit_from_a_checkpoint_without_gradtracks_state_goes_on_from_the_global_step(tmp_path: Path) -> None:
    path = checkpointed(tmp_path, [])  # trained without gradtrack
    recorder = RecordingBackend()
    fit(tmp_path, [GradTrackerCallback(backend=recorder)], max_steps=2 * STEPS, ckpt_path=path)
    assert recorder.of("run_start")[0].resumed is None
    assert [s.step for s in recorder.of("step")] == list(range(STEPS, 2 * STEPS))


def test_a_later_fit_without_a_checkpoint_starts_afresh(tmp_path: Path) -> None:
    """The state a fit(ckpt_path=...) loaded is used once: the next fit of the same callback is a new run."""
    path = checkpointed(tmp_path, [GradTrackerCallback(backend=RecordingBackend())])
    recorder = RecordingBackend()
    callback = GradTrackerCallback(backend=recorder)
    fit(tmp_path, [callback], max_steps=2 * STEPS, ckpt_path=path)
    fit(tmp_path, [callback])
    resumed, fresh = recorder.of("run_start")
    assert resumed.resumed is not None and fresh.resumed is None
    assert [s.step for s in recorder.of("step")] == [*range(STEPS, 2 * STEPS), *range(STEPS)]


def test_mlflow_logger_run_resumed_by_id_continues_gradtracks_step_axis(tmp_path: Path, mlflow_uri: str) -> None:
    from mlflow import MlflowClient

    logger = MLFlowLogger(experiment_name="lightning-resume", tracking_uri=mlflow_uri)
    probe = Probe()
    path = checkpointed(tmp_path, [probe, GradTrackerCallback(close_timeout=120)], logger=logger)
    run_id = logger.run_id
    again = MLFlowLogger(experiment_name="lightning-resume", tracking_uri=mlflow_uri, run_id=run_id)
    callback = GradTrackerCallback(close_timeout=120)
    fit(tmp_path, [probe, callback], logger=again, max_steps=2 * STEPS, ckpt_path=path)

    client = MlflowClient(mlflow_uri)
    experiment = client.get_experiment_by_name("lightning-resume")
    assert [run.info.run_id for run in client.search_runs([experiment.experiment_id])] == [run_id]
    history = sorted(client.get_metric_history(run_id, "grad/total_norm"), key=lambda m: m.step)
    assert [m.step for m in history] == list(range(2 * STEPS))  # no second step 0: the axis went on
    assert [m.value for m in history] == pytest.approx(probe.before, rel=1e-6)
    assert client.get_run(run_id).data.metrics["gradtrack.summary.steps"] == 2 * STEPS


# -- self-healing -------------------------------------------------------------------------------------


class Healing(Regression):
    """BatchNorm (a NaN batch corrupts its running statistics), SGD with momentum, a per-step StepLR."""

    def __init__(self) -> None:
        super().__init__(lr=0.05)
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.Tanh(), nn.Linear(16, 1))

    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.5)
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.95)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


class StepProbe(pl.Callback):
    """After each optimizer step (before Lightning steps the scheduler): the learning rate the update used and
    the scheduler's count."""

    def __init__(self) -> None:
        self.used: list[float] = []
        self.epochs: list[int] = []

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        scheduler = trainer.lr_scheduler_configs[0].scheduler

        def after(optimizer: torch.optim.Optimizer, *_: Any) -> None:  # before gradtrack's (global) post-hook
            self.used.append(optimizer.param_groups[0]["lr"])
            self.epochs.append(scheduler.last_epoch)

        trainer.optimizers[0].register_step_post_hook(after)


def poisoned_loader() -> torch.utils.data.DataLoader:
    """``loader()``'s kind of data with one bad record, in the 8th batch of each epoch (steps 7, 15, ...)."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(64, 8, generator=generator)
    y = 3.0 * x.sum(-1)
    x[60, 0] = math.nan
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)


def heal(tmp_path: Path, callbacks: list[pl.Callback], module: Healing, steps: int, **options: Any) -> pl.Trainer:
    trainer = pl.Trainer(
        accelerator="cpu", enable_progress_bar=False, enable_model_summary=False, logger=False,
        enable_checkpointing=False, default_root_dir=tmp_path, max_steps=steps, callbacks=callbacks, **options,
    )  # fmt: skip
    trainer.fit(module, poisoned_loader())
    return trainer


def test_rollback_restores_the_module_optimizer_and_scheduler_lightning_owns(
    tmp_path: Path, recorder: RecordingBackend
) -> None:
    probe, module = StepProbe(), Healing()
    callback = GradTrackerCallback(backend=recorder, max_norm=10.0, on_divergence="rollback", rollback_every=3)
    trainer = heal(tmp_path, [probe, callback], module, 20)

    first, second = recorder.of("rollback")
    assert (first.step, first.restored_step, first.lr_scale) == (7, 6, 1.0)
    assert (second.step, second.restored_step, second.lr_scale) == (15, 12, 0.5)  # soon after: the lr halves
    assert callback.tracker is not None and not callback.tracker.diverged and callback.tracker.steps == 20
    assert all(torch.isfinite(t).all() for t in [*module.parameters(), *module.buffers()])  # BatchNorm's too
    assert [math.isnan(loss) for loss in module.losses] == [step in (7, 15) for step in range(20)]
    assert sum(module.losses[16:]) < 0.3 * sum(module.losses[:4])  # and it goes on learning (the same batches)
    # The scheduler came back with the rest: its count is that of the updates the model kept.
    assert probe.epochs[5:9] == [5, 6, 6, 7]  # step 7 back to step 6's count; then one behind the steps
    assert probe.epochs[14:17] == [13, 11, 12]  # step 15 back to step 12's (11); then three behind
    # The halved rate is used inside Lightning's optimizer.step(closure), and undone after it.
    expected = [0.05 * 0.95**epoch * (0.5 if step >= 15 else 1.0) for step, epoch in enumerate(probe.epochs)]
    assert probe.used == pytest.approx(expected, rel=1e-6)
    last_epoch = trainer.lr_scheduler_configs[0].scheduler.last_epoch
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.05 * 0.95**last_epoch)


def test_rollback_restores_the_scaler_of_lightnings_precision_plugin(
    tmp_path: Path, recorder: RecordingBackend
) -> None:
    """16-mixed: the NaN loss is judged though the scaler skips that step (no closure: the optimizer steps
    after Lightning's hooks), and the scaler comes back with the rest, then backs off for the bad step."""
    scaler = torch.amp.GradScaler("cpu", init_scale=1.0, growth_interval=1)  # doubles at every good step
    scales: list[float] = []

    class Scales(pl.Callback):
        def on_train_batch_end(self, *_: Any) -> None:
            scales.append(scaler.get_scale())

    module = Healing()
    callback = GradTrackerCallback(backend=recorder, max_norm=10.0, on_divergence="rollback", rollback_every=3)
    heal(tmp_path, [Scales(), callback], module, 10, plugins=[MixedPrecision("16-mixed", "cpu", scaler)])

    (event,) = recorder.of("rollback")
    assert (event.step, event.restored_step) == (7, 6)
    assert scales[:6] == [2.0**k for k in range(1, 7)]
    assert scales[7] == scales[5] / 2  # step 6's scale (after step 5), halved for step 7's overflow
    assert all(torch.isfinite(t).all() for t in [*module.parameters(), *module.buffers()])
    assert all(math.isfinite(loss) for loss in module.losses[8:])


def test_an_optimizer_a_rollback_cannot_snapshot_is_refused_before_training(tmp_path: Path) -> None:
    class Opaque(torch.optim.SGD):
        def state_dict(self) -> dict[str, Any]:
            raise RuntimeError("no state here")

    class Module(Regression):
        def configure_optimizers(self) -> torch.optim.Optimizer:
            return Opaque(self.parameters(), lr=0.1)

    module = Module()
    callback = GradTrackerCallback(on_divergence="rollback")
    with pytest.raises(ValueError, match=r"cannot snapshot the trainer's optimizer \(Opaque\): its state_dict"):
        fit(tmp_path, [callback], module)
    assert callback.tracker is None
    with GradTracker(module):  # nothing left behind
        pass


def test_deepspeed_strategy_is_refused_with_what_works_instead() -> None:
    pytest.importorskip("deepspeed")
    from lightning.pytorch.strategies import DeepSpeedStrategy

    # Lightning runs this strategy on CUDA GPUs only (its own check comes later, when fit sets it up)
    trainer = pl.Trainer(strategy=DeepSpeedStrategy(stage=2), accelerator="cpu", devices=1, logger=False,
                         enable_checkpointing=False)  # fmt: skip
    callback = GradTrackerCallback()
    with pytest.raises(ValueError, match="does not support Lightning's DeepSpeedStrategy") as raised:
        callback.on_fit_start(trainer, Regression())
    assert "GradTracker(engine)" in str(raised.value) and "deepspeed=" in str(raised.value)

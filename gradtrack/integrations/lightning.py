"""gradtrack as a Lightning callback: ``Trainer(callbacks=[GradTrackerCallback()])``.

Where each piece of work happens, in the order Lightning runs its hooks for one optimizer step:

* ``on_fit_start``: the options are settled (after the strategy set up the model and the optimizers):
  reporting into the run of the trainer's ``MLFlowLogger`` / ``WandbLogger``, clipping left to Lightning
  under ``gradient_clip_val``.
* ``on_train_start``: a ``GradTracker`` on the LightningModule is entered. Not at ``on_fit_start``: for
  ``fit(ckpt_path=...)`` Lightning restores the loops (``trainer.global_step``) after ``on_fit_start``, and
  under FSDP, DeepSpeed and ModelParallel strategies it calls ``load_state_dict`` after it too; both are
  done by ``on_train_start``, and a tracker resumes only before it is entered.
* ``on_before_backward`` (each micro-batch): the loss is observed. It is the loss Lightning is about to
  differentiate, so it belongs to the optimizer step being accumulated, and gradtrack sees it before that
  step is judged. Lightning hands it divided by ``accumulate_grad_batches`` (and multiplied by the AMP
  scale under ``16-mixed``): both are undone, so gradtrack's ``loss`` is the mean training-step loss of the
  micro-batches of that optimizer step. (``on_train_batch_end`` runs after the optimizer step, so its
  ``outputs["loss"]`` would reach gradtrack one step late; ``callback_metrics`` holds only what the model
  ``self.log``-s, under names gradtrack cannot know.)
* ``on_before_optimizer_step``: after the closure ran the last micro-batch's backward and after Lightning
  unscaled AMP gradients, before Lightning's own clipping (``gradient_clip_val``, run right after this
  hook) and before ``optimizer.step()``: gradtrack measures, clips and reports here, one step per optimizer
  step whatever ``accumulate_grad_batches`` is. The tracker's own optimizer hook is removed, so the
  following ``optimizer.step()`` (often with a closure) is not measured again.
* ``on_fit_end`` closes the tracker (``finished``), ``on_exception`` closes it ``failed`` (``killed`` on
  Ctrl-C), ``teardown`` closes it if neither ran.

Self-healing: ``GradTrackerCallback(on_divergence="rollback", ...)`` snapshots, beside the LightningModule, the
trainer's optimizers, its LR schedulers (``trainer.lr_scheduler_configs``) and the precision plugin's GradScaler,
at ``on_before_optimizer_step``; a rollback there restores them all and skips that update. A halved learning rate
is applied inside each ``optimizer.step``: after its closure (where this hook runs), or before the step itself
under ``16-mixed``, where Lightning runs the closure first and the scaler may skip the step.

Resuming: Lightning's checkpoints hold the callback's ``state_dict()`` (``{"gradtrack": tracker.state_dict()}``),
and ``fit(ckpt_path=...)`` hands it to ``load_state_dict`` before ``on_train_start``, where the tracker loads it
before it is entered: the same tracking run goes on, with its step, detectors, clip policy and summary. From a
checkpoint without it, gradtrack's steps go on from ``trainer.global_step``.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback

from gradtrack.integrations import (
    HandDriven,
    Owned,
    amp_state,
    auto_backend,
    backend_options,
    check_options,
    loss_scale,
    monitor_only,
    names_in,
    warn_once,
)
from gradtrack.tracker import GradTracker

__all__ = ["GradTrackerCallback"]


class GradTrackerCallback(Callback):
    """Tracks the LightningModule's gradients with a ``GradTracker`` for the duration of each ``fit``.

    ``GradTrackerCallback(**options)`` takes the keyword options of :class:`gradtrack.GradTracker`
    (``clip``, ``max_norm``, ``backend``, ``backend_options``, ``layer_every``, ``on_divergence``, ...), except
    ``optimizer``, ``scaler`` and ``scheduler``, which come from the trainer.

    * ``backend`` not given: the trainer's loggers decide. An ``MLFlowLogger`` makes it ``"mlflow"`` into
      that logger's run (``run_id`` and ``tracking_uri`` from the logger), a ``WandbLogger`` ``"wandb"`` into
      that logger's run (``logger.experiment`` is created first); both: both; neither: no backend.
      ``backend`` given: it is used as given, and an ``"mlflow"`` / ``"wandb"`` named there still logs into the
      logger's run unless ``backend_options`` say otherwise (``run_id``, ...).
    * ``on_divergence="rollback"`` restores the module, the trainer's optimizers, LR schedulers and AMP scaler.
    * ``fit(ckpt_path=...)`` resumes gradtrack's run from Lightning's checkpoint (see ``state_dict``).
    * ``Trainer(gradient_clip_val=...)``: Lightning clips, so gradtrack only watches (``clip=None``), with a
      warning; it measures before Lightning's clipping, so ``grad/total_norm`` is the norm Lightning clipped.
      ``clip=`` (other than None), ``max_norm=`` or ``clip_value=`` beside ``gradient_clip_val`` are refused (the
      gradients would be clipped twice).
    """

    def __init__(self, **tracker_options: Any) -> None:
        super().__init__()
        self._options = check_options("GradTrackerCallback", tracker_options)
        self._driven: HandDriven | None = None
        self._fit_options: dict[str, Any] | None = None  # settled at on_fit_start, used at on_train_start
        self._resumed: Mapping[str, Any] | None = None  # gradtrack's state from the checkpoint fit() resumes
        self._scaler: Any = None
        self._loss_factor = 1
        self._warned: set[str] = set()

    @property
    def tracker(self) -> GradTracker | None:
        """The tracker of the current (or last) ``fit``: ``summary()``, ``diverged``, ``explosions``."""
        return self._driven.tracker if self._driven is not None else None

    # -- lifecycle ----------------------------------------------------------------------------------

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._close(None)
        self._driven, self._fit_options = None, None
        if type(trainer.strategy).__name__ == "DeepSpeedStrategy":
            raise ValueError(
                "GradTrackerCallback does not support Lightning's DeepSpeedStrategy: Lightning runs it on CUDA GPUs "
                "only, where gradtrack's DeepSpeed support has not been tested. gradtrack works inside a DeepSpeed "
                "engine you build (GradTracker(engine)), the Hugging Face Trainer with deepspeed=, and Lightning's "
                "DDP and FSDP strategies"
            )
        options = dict(self._options)
        clip_val = trainer.gradient_clip_val
        if clip_val is not None and clip_val > 0:
            explicit = "clip" in options
            options = monitor_only(
                options,
                "GradTrackerCallback",
                f"Trainer(gradient_clip_val={clip_val})",
                "remove gradient_clip_val to let gradtrack clip, or pass clip=None to let Lightning clip while "
                "gradtrack watches",
            )
            if not explicit:
                warn_once(
                    self._warned,
                    "clip",
                    f"Trainer(gradient_clip_val={clip_val}) clips the gradients: gradtrack only monitors (clip=None); "
                    "its grad/total_norm is measured before Lightning's clipping. Remove gradient_clip_val and pass "
                    "max_norm= (or clip='adaptive', ...) to GradTrackerCallback to let gradtrack clip",
                )
        options.update(self._backends(trainer, options))
        self._scaler = getattr(trainer.precision_plugin, "scaler", None)
        # Lightning divides the loss it differentiates by accumulate_grad_batches in automatic optimization.
        self._loss_factor = trainer.accumulate_grad_batches if pl_module.automatic_optimization else 1
        if len(trainer.optimizers) > 1:
            warn_once(
                self._warned,
                "optimizers",
                f"{len(trainer.optimizers)} optimizers: GradTrackerCallback makes one gradtrack step over the whole "
                "LightningModule at each optimizer step. For separate sub-models (a GAN), use one GradTracker per "
                "sub-model in the module instead",
            )
        self._fit_options = options

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        options, self._fit_options = self._fit_options, None
        if options is None:
            return
        resumed, self._resumed = self._resumed, None
        owned = Owned(optimizers=tuple(trainer.optimizers), scaler=self._scaler,
                      schedulers=tuple(config.scheduler for config in trainer.lr_scheduler_configs))  # fmt: skip
        self._driven = HandDriven.start(pl_module, options, state=resumed, step=trainer.global_step, owned=owned)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._close(None)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._close(exception)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._close(None)
        self._resumed = None  # loaded by a validate(ckpt_path=...), or by a fit that never trained

    # -- checkpoints --------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Lightning saves this in each checkpoint: the tracker's ``state_dict()``, under ``"gradtrack"``.

        Before the tracker of this ``fit`` is entered, the state loaded from a checkpoint is handed on
        unchanged, so a checkpoint saved then still resumes the same run.
        """
        if self._driven is not None:
            return {"gradtrack": self._driven.tracker.state_dict()}
        if self._resumed is not None:
            return {"gradtrack": copy.deepcopy(dict(self._resumed))}
        return {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Keeps the state from ``fit(ckpt_path=...)``'s checkpoint for the tracker entered at ``on_train_start``."""
        saved = state_dict.get("gradtrack")
        if saved is not None:
            self._resumed = saved

    # -- per step -----------------------------------------------------------------------------------

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: Any) -> None:
        driven = self._driven
        if driven is None or not driven.open or not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            return
        loss = loss.detach()
        if self._loss_factor != 1:
            loss = loss * self._loss_factor
        scale = loss_scale(self._scaler)
        if scale is not None:  # 16-mixed: Lightning multiplied the loss by the scale before this hook
            loss = loss / scale.to(loss.device)
        driven.observe(loss)

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        driven = self._driven
        if driven is not None:
            driven.step(amp_state(self._scaler, optimizer))

    # -- helpers ------------------------------------------------------------------------------------

    def _close(self, exc: BaseException | None) -> None:
        self._fit_options = None
        if self._driven is not None:
            self._driven.close(exc)

    def _backends(self, trainer: pl.Trainer, options: dict[str, Any]) -> dict[str, Any]:
        """``backend`` and ``backend_options`` that log into the trainer's own MLflow / W&B run."""
        from lightning.pytorch.loggers import MLFlowLogger, WandbLogger

        mlflow_logger = next((lg for lg in trainer.loggers if isinstance(lg, MLFlowLogger)), None)
        wandb_logger = next((lg for lg in trainer.loggers if isinstance(lg, WandbLogger)), None)
        if "backend" in options:
            spec = options["backend"]
        else:
            found = [name for name, lg in (("mlflow", mlflow_logger), ("wandb", wandb_logger)) if lg is not None]
            spec = auto_backend(found)
        names = names_in(spec)
        settings = backend_options(options)
        if trainer.global_rank == 0:  # the other ranks never report, and their loggers have no run
            if "mlflow" in names and mlflow_logger is not None:
                run = {"run_id": mlflow_logger.run_id, "tracking_uri": _tracking_uri(mlflow_logger)}
                settings["mlflow"] = {**{k: v for k, v in run.items() if v}, **settings.get("mlflow", {})}
            if "wandb" in names and wandb_logger is not None:
                _ = wandb_logger.experiment  # creates the logger's run: W&B's backend logs into the active run
        result: dict[str, Any] = {"backend": spec}
        if settings:
            result["backend_options"] = settings
        return result


def _tracking_uri(logger: Any) -> str | None:
    """The logger's tracking URI; its default ``file:./mlruns`` made absolute, as a spool replay runs elsewhere."""
    uri = getattr(logger, "_tracking_uri", None)
    if not uri:
        uri = getattr(getattr(logger.experiment, "_tracking_client", None), "tracking_uri", None)
    if not uri:
        return None
    uri = str(uri)
    if uri.startswith("file:") and not uri.startswith("file:/"):
        uri = Path(uri.removeprefix("file:")).absolute().as_uri()
    return uri

"""gradtrack as a Hugging Face ``transformers.Trainer`` callback: ``Trainer(..., callbacks=[GradTrackerCallback()])``.

What the Trainer does for one optimizer step (``Trainer._run_epoch`` in transformers 5; the same order in 4.4x)::

    on_step_begin                                   first micro-batch of the step
    training_step(model, inputs, ...)  x N          forward, loss / N (or / items), accelerator.backward
    if max_grad_norm > 0:
        accelerator.clip_grad_norm_(params, max_grad_norm)   unscales AMP gradients, clips, returns the norm
    else: accelerator.clip_grad_norm_(params, inf)           (transformers 5: the norm it logs, no clipping)
    on_pre_optimizer_step
    optimizer.step()
    on_optimizer_step ... on_step_end ... on_log (grad_norm: the pre-clip norm)

``on_pre_optimizer_step`` comes after the Trainer's clipping, and no event comes between the last
backward and that clipping. So:

* ``max_grad_norm > 0`` (the Trainer clips; its default is 1.0): gradtrack only watches (``clip=None``) and
  measures just before the Trainer clips, by wrapping this Trainer's ``accelerator.clip_grad_norm_`` for the
  duration of ``train()``: ``grad/total_norm`` is the norm the Trainer clipped (its own logged ``grad_norm``),
  ``grad/clip_coef`` is 1 and ``grad/clipped`` 0 (the clipping is the Trainer's). Where the Trainer clips
  without that call (DTensor gradients on several meshes, SageMaker MP), gradtrack measures at
  ``on_pre_optimizer_step``, after the clipping, and warns once.
* ``max_grad_norm=0``: gradtrack clips, at ``on_pre_optimizer_step`` (with ``clip``/``max_norm`` as given, default
  ``"norm"`` at 1.0); the Trainer's logged ``grad_norm``, computed before that event, stays the pre-clip norm.
* ``clip=`` (other than None), ``max_norm=`` or ``clip_value=`` beside ``max_grad_norm > 0`` are refused: two
  clippings.

AMP (``fp16=True``): gradients still scaled are measured with the scaler's scale divided out; once unscaled,
the scaler's overflow flag rides along, so a step the scaler skips is ``grad/amp_overflow``, never an explosion.

The loss of each micro-batch is what ``training_step`` returns (this Trainer's ``training_step`` is wrapped for
the duration of ``train()``): the Trainer normalizes it for gradient accumulation, so their sum is the loss of
the optimizer step, observed when gradtrack measures.

The Trainer is found from the callback: callbacks receive the model and the optimizer but not the Trainer,
so ``on_train_begin`` looks for the ``Trainer`` up the call stack (``Trainer.train`` calls it). Without one
(a loop that calls the callback handler itself), gradtrack measures at ``on_pre_optimizer_step`` and observes
no loss.

Reporting: ``report_to=["mlflow"]`` makes the backend ``"mlflow"``, logging into the run ``MLflowCallback`` opened
(the active MLflow run; it runs first, as the Trainer puts the reporting callbacks before yours);
``report_to=["wandb"]`` makes it ``"wandb"``, logging into ``WandbCallback``'s ``wandb.run``. An explicit
``backend=`` is used as given.

Resuming: at each checkpoint the Trainer saves (``on_save``, right after it wrote ``checkpoint-N``), the
tracker's ``state_dict()`` is written beside it as ``checkpoint-N/gradtrack_state.pt``, by the processes that
write checkpoints (``args.should_save``). ``train(resume_from_checkpoint=...)`` loads the Trainer's state before
``on_train_begin``, where the tracker loads that file (from the folder the Trainer resumes from, found as the
Trainer is) before it is entered: the same tracking run goes on, with its step, detectors, clip policy and summary.
From a checkpoint without the file, gradtrack's steps go on from ``state.global_step``.

Self-healing: ``GradTrackerCallback(on_divergence="rollback", ...)`` snapshots, beside the model, the Trainer's
optimizer, LR scheduler and accelerate's GradScaler where gradtrack measures (before the update); a rollback there
restores them all and the Trainer's ``optimizer.step()`` then skips that update. A halved learning rate is applied
inside that ``optimizer.step()`` and undone after it, before the Trainer steps its scheduler.

DeepSpeed (``TrainingArguments(deepspeed=...)``, accelerate's DeepSpeed plugin): the Trainer builds its engine after
``on_train_begin``, so the tracker starts at the first ``on_step_begin``, on the engine (``GradTracker(engine)``, see
``gradtrack.step.deepspeed``): it measures inside the engine's step, before DeepSpeed's clipping, and observes the loss
``engine.backward`` receives. The Trainer's ``max_grad_norm`` becomes DeepSpeed's ``gradient_clipping`` (``"auto"``):
DeepSpeed clips and gradtrack reports its coefficient; with ``max_grad_norm=0`` gradtrack clips the partitions
DeepSpeed steps on. ``on_divergence="rollback"`` is refused there.

transformers has no exception event: when ``train()`` raises, the tracker stays open until the next
``train()`` with this callback (which closes it ``failed``) or the end of the process (the reporter then ends
gradtrack's own run ``killed``).
"""

from __future__ import annotations

import functools
import math
import os
import sys
from typing import Any

import torch
from transformers import Trainer, TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from gradtrack.integrations import (
    HandDriven,
    Owned,
    amp_state,
    auto_backend,
    check_options,
    monitor_only,
    warn_once,
)
from gradtrack.step.deepspeed import is_engine
from gradtrack.tracker import GradTracker

__all__ = ["GradTrackerCallback"]

_REPORTERS = ("mlflow", "wandb")
STATE_FILE = "gradtrack_state.pt"  # in each checkpoint-N folder: the tracker's state_dict()


class GradTrackerCallback(TrainerCallback):
    """Tracks the Trainer's model with a ``GradTracker`` for the duration of each ``train()``.

    ``GradTrackerCallback(**options)`` takes the keyword options of :class:`gradtrack.GradTracker` (``clip``,
    ``max_norm``, ``backend``, ``backend_options``, ``layer_every``, ``on_divergence``, ...), except ``optimizer``,
    ``scaler`` and ``scheduler``: ``on_divergence="rollback"`` restores the Trainer's own, with the model.
    ``train(resume_from_checkpoint=...)`` resumes gradtrack's run from the ``gradtrack_state.pt`` that this
    callback wrote into the checkpoint folder.
    """

    def __init__(self, **tracker_options: Any) -> None:
        self._options = check_options("GradTrackerCallback", tracker_options)
        self._driven: HandDriven | None = None
        self._pending = False
        self._loss: Any = None
        self._patches: list[_Patch] = []
        self._trainer: Trainer | None = None
        self._warned: set[str] = set()
        self._engine_start: tuple[dict[str, Any], dict[str, Any] | None, int] | None = None  # DeepSpeed, until step 1
        self._on_engine = False  # the tracker is a DeepSpeed engine's

    @property
    def tracker(self) -> GradTracker | None:
        """The tracker of the current (or last) ``train()``: ``summary()``, ``diverged``, ``explosions``."""
        return self._driven.tracker if self._driven is not None else None

    # -- lifecycle ----------------------------------------------------------------------------------

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if self._driven is not None and self._driven.open:  # the previous train() raised
            self._finish(RuntimeError("the previous Trainer.train() ended without on_train_end"))
        model = kwargs["model"]
        trainer, checkpoint = _find_trainer()
        deepspeed = bool(getattr(args, "deepspeed", None)) or bool(getattr(trainer, "is_deepspeed_enabled", False))
        options = dict(self._options)
        trainer_clips = bool(args.max_grad_norm) and args.max_grad_norm > 0
        if trainer_clips:
            options = monitor_only(
                options,
                "GradTrackerCallback",
                f"TrainingArguments(max_grad_norm={args.max_grad_norm})",
                "pass max_grad_norm=0 to let gradtrack clip, or clip=None to let the Trainer clip while gradtrack "
                "watches",
            )
        if "backend" not in options:
            report_to = list(args.report_to or [])
            options["backend"] = auto_backend([name for name in _REPORTERS if name in report_to])
        if deepspeed:  # the engine does not exist yet: the tracker starts with the first step (_start_engine)
            if options.get("on_divergence") == "rollback":
                raise ValueError("GradTrackerCallback(on_divergence='rollback') is not supported with DeepSpeed: a "
                                 "rollback would have to restore the engine's partitions, optimizer and loss scaler")
            if trainer is None:
                raise ValueError("GradTrackerCallback with DeepSpeed needs the transformers.Trainer that calls it (to "
                                 "find the DeepSpeed engine it builds), and found none up the call stack")
            self._engine_start = (options, _saved_state(checkpoint), state.global_step)
            self._trainer = trainer
            self._pending, self._loss = False, None
            return
        optimizer, scheduler = kwargs.get("optimizer"), kwargs.get("lr_scheduler")
        owned = Owned(
            optimizers=(optimizer,) if optimizer is not None else (),
            schedulers=(scheduler,) if scheduler is not None else (),
            scaler=getattr(optimizer, "scaler", None),  # accelerate's GradScaler, kept on its optimizer
        )
        self._driven = HandDriven.start(model, options, state=_saved_state(checkpoint), step=state.global_step,
                                        owned=owned)  # fmt: skip
        self._pending, self._loss = False, None
        if trainer is None:
            warn_once(
                self._warned,
                "trainer",
                "GradTrackerCallback found no transformers.Trainer calling it: gradtrack measures at "
                "on_pre_optimizer_step (after any clipping by the Trainer) and observes no loss",
            )
            return
        self._trainer = trainer
        self._patches.append(_Patch(trainer, "training_step", self._wrap_training_step))
        if trainer_clips:
            self._patches.append(_Patch(trainer.accelerator, "clip_grad_norm_", self._wrap_clip))

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self._finish(None)

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        """The tracker's state into the checkpoint folder the Trainer has just written."""
        driven = self._driven
        if driven is None or not driven.open or not args.should_save:
            return
        folder = os.path.join(str(args.output_dir), f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        if not os.path.isdir(folder):  # a hyperparameter search saves into a folder per trial
            warn_once(
                self._warned,
                "save",
                f"no checkpoint folder {folder}: gradtrack's state is not saved with the Trainer's checkpoint, so "
                "resuming from it starts a new gradtrack run at the Trainer's global step",
            )
            return
        torch.save(driven.tracker.state_dict(), os.path.join(folder, STATE_FILE))

    # -- per step -----------------------------------------------------------------------------------

    def on_step_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if self._engine_start is not None:
            self._start_engine()
        if self._on_engine:
            return  # the engine's own step measures, and observes the loss engine.backward receives
        self._pending = True

    def on_pre_optimizer_step(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if not self._pending:
            return
        if args.max_grad_norm and args.max_grad_norm > 0 and self._patches:
            warn_once(
                self._warned,
                "late",
                "the Trainer clipped the gradients without accelerator.clip_grad_norm_: gradtrack measured them "
                "after its clipping (grad/total_norm is then at most max_grad_norm); pass max_grad_norm=0 to let "
                "gradtrack clip",
            )
        self._measure(kwargs.get("optimizer"))

    # -- helpers ------------------------------------------------------------------------------------

    def _measure(self, optimizer: Any) -> None:
        self._pending = False
        driven = self._driven
        if driven is None:
            return
        if self._loss is not None:
            driven.observe(self._loss)
            self._loss = None
        driven.step(amp_state(getattr(optimizer, "scaler", None), optimizer))

    def _wrap_training_step(self, original: Any) -> Any:
        @functools.wraps(original)
        def training_step(*args: Any, **kwargs: Any) -> Any:
            loss = original(*args, **kwargs)
            if self._driven is not None and self._driven.open and _is_scalar(loss):
                loss = loss.detach()
                self._loss = loss if self._loss is None else self._loss + loss.to(self._loss.device)
            return loss

        return training_step

    def _wrap_clip(self, original: Any) -> Any:
        @functools.wraps(original)
        def clip_grad_norm_(parameters: Any, max_norm: float, *args: Any, **kwargs: Any) -> Any:
            if self._pending and math.isfinite(max_norm) and max_norm > 0:  # the Trainer's clip, not its norm-only call
                trainer = self._trainer
                self._measure(getattr(trainer, "optimizer", None))
            return original(parameters, max_norm, *args, **kwargs)

        return clip_grad_norm_

    def _start_engine(self) -> None:
        """DeepSpeed: the Trainer built its engine after ``on_train_begin``; the tracker is the engine's (see
        ``gradtrack.step.deepspeed``), measuring inside the engine's step, so no Trainer method is wrapped."""
        assert self._engine_start is not None
        options, saved, step = self._engine_start
        self._engine_start = None
        engine: Any = getattr(self._trainer, "model_wrapped", None)
        if not is_engine(engine):
            raise RuntimeError(f"GradTrackerCallback found no DeepSpeed engine on the Trainer with DeepSpeed enabled "
                               f"(its model_wrapped is a {type(engine).__name__})")  # fmt: skip
        self._driven = HandDriven.start(engine, options, state=saved, step=step)
        self._on_engine = True

    def _finish(self, exc: BaseException | None) -> None:
        while self._patches:
            self._patches.pop().remove()
        self._pending, self._loss, self._trainer = False, None, None
        self._engine_start, self._on_engine = None, False
        if self._driven is not None:
            self._driven.close(exc)


class _Patch:
    """An attribute of one object replaced by a wrapper of it, put back by ``remove``."""

    def __init__(self, owner: Any, name: str, wrap: Any) -> None:
        self.owner, self.name = owner, name
        self.had = name in vars(owner)
        self.previous = getattr(owner, name)
        self.wrapper = wrap(self.previous)
        setattr(owner, name, self.wrapper)

    def remove(self) -> None:
        if vars(self.owner).get(self.name) is not self.wrapper:
            return  # wrapped again over us since: leave the chain as it is
        if self.had:
            setattr(self.owner, self.name, self.previous)
        else:
            delattr(self.owner, self.name)


def _find_trainer() -> tuple[Trainer | None, str | None]:
    """The ``Trainer`` whose ``train()`` is running this callback (the nearest ``self`` up the stack that is one),
    and the checkpoint folder it resumes from.

    Callbacks are never told that folder: it is the ``resume_from_checkpoint`` of that Trainer's training loop
    (``_inner_training_loop``, or ``train``, where ``True`` has become the last checkpoint's path by then).
    """
    frame = sys._getframe(1)
    trainer = None
    while frame is not None:
        candidate = frame.f_locals.get("self")
        if isinstance(candidate, Trainer) and (trainer is None or candidate is trainer):
            trainer = candidate
            if "resume_from_checkpoint" in frame.f_locals:
                checkpoint = frame.f_locals["resume_from_checkpoint"]
                return trainer, os.fspath(checkpoint) if isinstance(checkpoint, str | os.PathLike) else None
        frame = frame.f_back  # type: ignore[assignment]
    return trainer, None


def _saved_state(checkpoint: str | None) -> dict[str, Any] | None:
    """The tracker state this callback saved in ``checkpoint`` (None: no folder, or saved without gradtrack)."""
    if checkpoint is None:
        return None
    path = os.path.join(checkpoint, STATE_FILE)
    if not os.path.isfile(path):
        return None
    state: dict[str, Any] = torch.load(path, map_location="cpu", weights_only=True)
    return state


def _is_scalar(value: Any) -> bool:
    import torch

    return isinstance(value, torch.Tensor) and value.numel() == 1

"""GradTracker: the context manager users write, and the hooks that decide when a step happens.

The step itself (measure, clip, one transfer, judge, report) is ``gradtrack.step.pipeline``.
"""

from __future__ import annotations

import copy
import math
import os
import time
import warnings
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from types import TracebackType
from typing import Any, Literal, final

import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook
from torch.utils.hooks import RemovableHandle

from gradtrack._version import __version__
from gradtrack.delivery.outbox import Outbox
from gradtrack.delivery.plugins import (
    BackendSpec,
    call_backend_hook,
    check_backend_spec,
    requested_names,
    resolve_backends,
)
from gradtrack.events import Divergence, Explosion, Resumed, RunEnd, RunStart, RunStatus, Summary
from gradtrack.handover.messages import RunEnded, RunStarted
from gradtrack.heal.rollback import (
    Healer,
    RollbackSettings,
    check_healer_state,
    check_rollback_options,
    check_snapshottable,
    schedulers_of,
)
from gradtrack.judge.detection import DivergenceDetector, ExplosionDetector, Judge, SpikeSkip
from gradtrack.measure.amp import AmpState, ScalerWatch, amp_state, check_scaler
from gradtrack.measure.distributed import topology
from gradtrack.measure.params import ParameterSet, clean_name, registrations
from gradtrack.policies.clipping import ClipPolicy, make_clip_policy
from gradtrack.state import FORMAT, VERSION, StateError, check_plain, integer, part
from gradtrack.step.deepspeed import EngineDriver, check_engine, clip_rule, engine_of, is_engine, value_bound
from gradtrack.step.iteration import Iteration
from gradtrack.step.pipeline import (
    DivergenceError,
    NonFiniteGradientError,
    OnDivergence,
    OnNonfinite,
    Settings,
    StepPipeline,
)
from gradtrack.step.silence import Silence
from gradtrack.validate import count, mapping, optional_count, seconds

__all__ = ["DivergenceError", "GradTracker", "NonFiniteGradientError", "clean_name"]

_ON_NONFINITE = ("skip", "raise", "continue")
DEFAULT_ROLLBACK_EVERY = 100
DEFAULT_ROLLBACK_KEEP = 2
DEFAULT_ROLLBACK_BUDGET = 5
_NORM_TYPES = (1.0, 2.0, math.inf)

_tracked_models: weakref.WeakSet[nn.Module] = weakref.WeakSet()


def _norm_type(value: float | str) -> float:
    try:
        norm_type = float(value)
    except (TypeError, ValueError):
        norm_type = math.nan
    if norm_type not in _NORM_TYPES:
        raise ValueError(f"norm_type must be 1, 2 or inf ('inf' or math.inf), got {value!r}")
    return norm_type


@final
class GradTracker:
    """Measures, clips and reports the gradients of ``model`` once per training iteration.

    Use it as a context manager around an unchanged training loop; every option is described in the
    documentation's options reference (``docs/reference/options.md``). ``model`` may be a DeepSpeed engine
    (what ``deepspeed.initialize`` returns): see ``gradtrack.step.deepspeed``.
    """

    def __init__(
        self,
        model: nn.Module,
        backend: BackendSpec = None,
        *,
        optimizer: torch.optim.Optimizer | None = None,
        scaler: torch.amp.GradScaler | None = None,
        scheduler: Any = None,
        clip: str | ClipPolicy | None = "norm",
        max_norm: float | None = None,
        norm_type: float | str = 2.0,
        clip_value: float | None = None,
        on_nonfinite: OnNonfinite | None = None,
        on_spike: Literal["skip"] | None = None,
        on_divergence: OnDivergence = "continue",
        rollback_every: int | None = None,
        rollback_keep: int | None = None,
        rollback_budget: int | None = None,
        rollback_dir: str | os.PathLike[str] | None = None,
        explosion_threshold: float = 1e3,
        spike_factor: float = 10.0,
        nonfinite_patience: int = 3,
        loss_blowup: float = 10.0,
        loss_patience: int = 5,
        log_every: int = 1,
        layer_every: int | None = 10,
        top_k: int = 5,
        weight_norms: bool = True,
        weight_every: int = 100,
        overshoot_every: int | None = 5,
        backend_options: Mapping[str, Mapping[str, Any]] | None = None,
        close_timeout: float = 10.0,
        max_pending: int = 1000,
    ) -> None:
        engine: Any = model if is_engine(model) else None
        if engine is not None:
            check_engine(engine)
            if optimizer is not None or scaler is not None:
                raise TypeError("GradTracker(engine) takes no optimizer= or scaler=: it uses the engine's own")
            if on_divergence == "rollback":
                raise ValueError(
                    "on_divergence='rollback' is not supported inside a DeepSpeed engine (a rollback would have to "
                    "restore its partitions, optimizer and loss scaler): use 'continue' or 'raise' and DeepSpeed's "
                    "own checkpoints (engine.save_checkpoint / load_checkpoint)"
                )
            model = engine.module
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer or None, got {type(optimizer).__name__}")
        parameters = ParameterSet(model)
        if not parameters.trainable():
            raise ValueError(f"model ({type(model).__name__}) has no trainable parameters to track")
        on_nonfinite = on_nonfinite or ("continue" if clip is None else "skip")
        if on_nonfinite not in _ON_NONFINITE:
            raise ValueError(f"on_nonfinite must be one of {list(_ON_NONFINITE)}, got {on_nonfinite!r}")
        if on_spike not in (None, "skip"):
            raise ValueError(f"on_spike must be None or 'skip', got {on_spike!r}")
        if on_divergence not in ("continue", "raise", "rollback"):
            raise ValueError(f"on_divergence must be 'continue', 'raise' or 'rollback', got {on_divergence!r}")
        if isinstance(rollback_dir, os.PathLike):
            rollback_dir = os.fspath(rollback_dir)
        check_rollback_options(on_divergence, rollback_every, rollback_keep, rollback_budget, rollback_dir, scheduler,
                               on_nonfinite)  # fmt: skip
        if scheduler is not None and on_divergence != "rollback":
            raise ValueError("scheduler= is used by on_divergence='rollback' (its state is snapshotted); pass it "
                             "with that option or not at all")  # fmt: skip
        if not isinstance(weight_norms, bool):
            raise ValueError(f"weight_norms must be True or False, got {weight_norms!r}")
        self.model = model
        self.optimizer = optimizer
        self.scaler = check_scaler(scaler)
        self.close_timeout = seconds("close_timeout", close_timeout, allow_inf=True)
        clip_policy = make_clip_policy(clip, max_norm, clip_value)
        self._engine: EngineDriver | None = None
        if engine is not None:
            clip_policy, applies = clip_rule(engine, clip, max_norm, clip_value, clip_policy)
            if _norm_type(norm_type) != 2.0:
                raise ValueError(f"norm_type must be 2 inside a DeepSpeed engine (the norm it clips and reports), "
                                 f"got {norm_type!r}")  # fmt: skip
            self._engine = EngineDriver(engine, applies, value_bound(clip_policy) if applies else None)
        settings = Settings(
            norm_type=_norm_type(norm_type),
            clip_policy=clip_policy,
            log_every=count("log_every", log_every),
            layer_every=optional_count("layer_every", layer_every),
            top_k=count("top_k", top_k),
            weight_norms=weight_norms,
            weight_every=count("weight_every", weight_every),
            on_divergence=on_divergence,
            overshoot_every=optional_count("overshoot_every", overshoot_every),
        )
        judge = Judge(
            explosions=ExplosionDetector(explosion_threshold, spike_factor),
            divergence=DivergenceDetector(nonfinite_patience, loss_blowup, loss_patience),
            on_nonfinite=on_nonfinite,
            on_spike=SpikeSkip() if on_spike == "skip" else None,
        )
        self._parameters = parameters
        self._pipeline = StepPipeline(parameters, settings, judge)
        self._backend_spec = check_backend_spec(backend)
        self._backend_options = {
            name: mapping(f"backend_options[{name!r}]", options)
            for name, options in mapping("backend_options", backend_options).items()
        }
        self._max_pending = count("max_pending", max_pending)
        self._iteration = Iteration(parameters)
        self._backends: list[tuple[str, object]] = []
        self._loaded: Mapping[str, Any] | None = None  # a state to resume from, checked, waiting for __enter__
        self._entered = False
        self._handle: RemovableHandle | None = None
        self._post_handle: RemovableHandle | None = None
        self._rollback = (
            RollbackSettings(
                every=rollback_every or DEFAULT_ROLLBACK_EVERY,
                keep=rollback_keep or DEFAULT_ROLLBACK_KEEP,
                budget=rollback_budget or DEFAULT_ROLLBACK_BUDGET,
                directory=rollback_dir,
                schedulers=tuple(schedulers_of(scheduler)),
            )
            if on_divergence == "rollback"
            else None
        )
        self._healer: Healer | None = None
        self._scaler_watch: ScalerWatch | None = None
        self._stepped_since_update = False
        self._active = False
        self._watching = False
        self._silence = Silence(type(model).__name__)
        self._unmeasured: str | None = None  # why nothing was measured, once the run ended without a step

    # -- public state -----------------------------------------------------------------------------

    @property
    def norm_type(self) -> float:
        """The norm measured and clipped: 1, 2 or ``math.inf``."""
        return self._pipeline.settings.norm_type

    @property
    def clip_policy(self) -> ClipPolicy | None:
        """The policy ``clip=`` chose (None: monitor only); adaptive ones carry what they learnt."""
        return self._pipeline.clip_policy

    @property
    def on_nonfinite(self) -> OnNonfinite:
        """What a step with NaN/Inf gradients does: ``"skip"``, ``"raise"`` or ``"continue"``."""
        return self._pipeline.judge.on_nonfinite

    @property
    def diverged(self) -> bool:
        """True once the run is judged diverged; never undone."""
        return self._pipeline.judge.divergence.verdict is not None

    @property
    def divergence_event(self) -> Divergence | None:
        """When and why the run diverged, or None."""
        return self._pipeline.judge.divergence.verdict

    @property
    def explosions(self) -> tuple[Explosion, ...]:
        """The most recent explosion events (at most 256 kept; the summary counts them all)."""
        return tuple(self._pipeline.events)

    @property
    def steps(self) -> int:
        """Optimizer steps measured so far."""
        return self._pipeline.step

    def summary(self) -> Summary:
        """The run at a glance so far (also after the ``with`` block): what backends store at the end."""
        frozen = self._pipeline.summary.freeze(self._pipeline.outbox.dropped)
        if self._healer is not None:  # held now, whether or not a rollback happened
            frozen = replace(frozen, snapshot_bytes=self._healer.peak_nbytes)
        if self._unmeasured is not None:
            frozen = replace(frozen, unmeasured=self._unmeasured)
        return frozen

    def config(self) -> dict[str, Any]:
        """The settings reported to backends at run start."""
        pipeline = self._pipeline
        settings = pipeline.settings
        config: dict[str, Any] = {"gradtrack_version": __version__, "clip": "none"}
        if pipeline.clip_policy is not None:
            config.update(pipeline.clip_policy.config())
            if self._engine is not None and not self._engine.applies_clip:
                config.update(clipped_by="deepspeed")  # gradtrack reports DeepSpeed's coefficient, never applies it
        config.update(
            norm_type=settings.norm_type,
            on_nonfinite=pipeline.judge.on_nonfinite,
            log_every=settings.log_every,
            layer_every=settings.layer_every or 0,
            top_k=settings.top_k,
            weight_every=settings.weight_every if settings.weight_norms else 0,
            overshoot_every=(settings.overshoot_every or 0) if pipeline.overshoot and not self._engine else 0,
        )
        config.update(pipeline.judge.config())
        config.update(on_divergence=settings.on_divergence)
        if self._rollback is not None:
            config.update(rollback_every=self._rollback.every, rollback_keep=self._rollback.keep,
                          rollback_budget=self._rollback.budget,
                          rollback_storage="disk" if self._rollback.directory else "memory")  # fmt: skip
        config.update(strategy=pipeline.topology.strategy, world_size=pipeline.topology.world_size)
        return config

    # -- state across restarts ----------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Everything a later process needs to continue this run: put it in your checkpoint.

        Plain values and tensors only (``torch.load(path)`` reads it back at its default
        ``weights_only=True``), never credentials: the step, each backend's run identity, the detectors'
        windows and verdict, what the clip policy and ``on_spike`` learnt, the summary, the layer history.
        Call it where you save your checkpoint; it costs a few milliseconds (a copy of the windows).
        """
        if not self._entered and self._loaded is not None:
            return copy.deepcopy(dict(self._loaded))
        topology = self._pipeline.topology
        backends = {}
        for name, backend in self._backends:
            saved = call_backend_hook(name, backend, "gradtrack_backend_state")
            if saved is not None:
                backends[name] = dict(saved)
        state = {
            "format": FORMAT,
            "version": VERSION,
            "gradtrack_version": __version__,
            "model": self._model_identity(),
            "world": {"size": topology.world_size, "rank": topology.rank, "strategy": topology.strategy},
            **self._pipeline.state_dict(),
            "backends": backends,
            "rollback": self._healer.state_dict() if self._healer is not None else None,
        }
        check_plain(state)
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue the run ``state`` came from (``tracker.state_dict()`` in an earlier process): call it
        before entering the ``with`` block.

        The same tracking run is opened again and its step axis goes on from the saved step; detectors,
        clip policies and the summary go on where they were. A state from another model, of an unknown
        format version, or damaged raises :class:`gradtrack.StateError`, and nothing is changed.
        """
        if self._entered:
            raise RuntimeError("load_state_dict must be called before entering the tracker's `with` block")
        if not isinstance(state, Mapping):
            raise TypeError(f"state must be the dict tracker.state_dict() returned, got {type(state).__name__}")
        if state.get("format") != FORMAT:
            raise StateError("state is not a gradtrack state (tracker.state_dict() has 'format': 'gradtrack.state')")
        if state.get("version") != VERSION:
            raise StateError(
                f"state has format version {state.get('version')!r}, which gradtrack {__version__} does not read "
                f"(it reads version {VERSION}); resume with the gradtrack version that saved it"
            )
        saved, here = state.get("model"), self._model_identity()
        if not isinstance(saved, Mapping) or (saved.get("parameters"), saved.get("first")) != (
            here["parameters"],
            here["first"],
        ):
            described = (
                f"{saved.get('parameters')} parameters, the first {saved.get('first')!r}"
                if isinstance(saved, Mapping) else repr(saved)
            )  # fmt: skip
            raise StateError(
                f"state was saved for another model ({described}); this {here['class']} has {here['parameters']} "
                f"parameters, the first {here['first']!r}"
            )
        try:
            check_plain(state)
            world, backends = part(state, "world"), part(state, "backends")
            integer(world, "size"), integer(world, "rank")  # read to check them
            if not all(isinstance(name, str) and isinstance(saved, Mapping) for name, saved in backends.items()):
                raise ValueError("'backends' must map backend names to dicts")
            probe = StepPipeline(self._parameters, replace(self._pipeline.settings,
                                 clip_policy=copy.deepcopy(self._pipeline.clip_policy)),
                                 copy.deepcopy(self._pipeline.judge))  # fmt: skip
            probe.load_state_dict(state)  # a dry run: a damaged state must leave this tracker as it was
            if state.get("rollback") is not None:
                check_healer_state(part(state, "rollback"))
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            raise StateError(f"state is damaged and cannot be resumed from: {exc}") from exc
        for note in self._pipeline.load_state_dict(state):
            warnings.warn(f"gradtrack resumes: {note}", RuntimeWarning, stacklevel=2)
        self._loaded = copy.deepcopy(dict(state))

    def _model_identity(self) -> dict[str, Any]:
        names = [clean_name(name) for name, _ in self.model.named_parameters()]
        return {"class": type(self.model).__name__, "parameters": len(names), "first": names[0] if names else None}

    def _start_at(self, step: int) -> None:
        """A framework's own step count, where no state was saved (a trainer resumed into a new logger run)."""
        if self._loaded is None and not self._entered:
            self._pipeline.step = step

    # -- context ----------------------------------------------------------------------------------

    def __enter__(self) -> GradTracker:
        if self._active or self._entered:
            raise RuntimeError("this GradTracker is already active; a tracker can be entered once")
        if self.model in _tracked_models:
            raise RuntimeError(
                f"{type(self.model).__name__} is already tracked by another active GradTracker; exit that one first"
            )
        if self._engine is None and (wrapping := engine_of(self.model)) is not None:
            raise ValueError(
                f"this {type(self.model).__name__} is the module of a {type(wrapping).__name__}, whose optimizer steps "
                "flat partitions of its own, not these parameters: pass the engine that deepspeed.initialize returned, "
                "GradTracker(engine, ...), not engine.module"
            )
        pipeline = self._pipeline
        self._parameters.refresh()
        trainable = self._parameters.trainable()
        if self._engine is not None:
            trainable = self._engine.updated(trainable)
        names = [name for name, _ in trainable]
        params = [p for _, p in trainable]
        if self._engine is not None:
            pipeline.topology = self._engine.topology(params, names)
        else:
            pipeline.topology = topology(self.model, params, names)
        resumed = self._resumed() if self._loaded is not None else None
        pipeline.start(names)
        if pipeline.topology.reports:
            backends = resolve_backends(self._backend_spec, self._backend_options)
            if self._loaded is not None:
                saved = self._loaded["backends"]
                for name, backend in backends:
                    if name in saved:
                        try:
                            call_backend_hook(name, backend, "gradtrack_load_backend_state", state=saved[name])
                        except ValueError as exc:
                            raise StateError(f"backend {name!r} cannot resume from its saved state: {exc}") from exc
            self._backends = backends
            pipeline.outbox = Outbox.open(backends, requested_names(self._backend_spec), max_pending=self._max_pending)
        self._entered = True
        try:
            _tracked_models.add(self.model)
            registrations.watch()
            self._watching = True
            if self._engine is not None:  # the engine's step measures; its optimizer steps flat partitions
                self._engine.install(self, params)
            elif self.optimizer is None:
                self._handle = register_optimizer_step_pre_hook(self._on_optimizer_step)
            else:
                self._handle = self.optimizer.register_step_pre_hook(self._on_optimizer_step)
            if self._rollback is not None:
                self._healer = self._make_healer()
            if self._rollback is not None or (pipeline.overshoot is not None and self._engine is None):
                if self.optimizer is None:
                    self._post_handle = register_optimizer_step_post_hook(self._after_optimizer_step)
                else:
                    self._post_handle = self.optimizer.register_step_post_hook(self._after_optimizer_step)
            if self.scaler is not None:
                self._scaler_watch = ScalerWatch(self.scaler, self._on_scaler_update)
                self._scaler_watch.install()
            self._active = True
            start = RunStart(
                config=self.config(),
                layer_names=tuple(names),
                num_parameters=(
                    self._engine.num_parameters(params) if self._engine is not None else sum(p.numel() for p in params)
                ),
                model_class=type(self.model).__name__,
                timestamp=time.time(),
                resumed=resumed,
            )
            pipeline.emit(RunStarted(start=start, summary=pipeline.summary.state_dict() if resumed else None))
        except BaseException:  # leave nothing behind: no hook, no reporter, the model free to track again
            self._release()
            pipeline.outbox.close(0.0)
            raise
        return self

    def _resumed(self) -> Resumed:
        """Checks the loaded state against this process's place, and says where the run goes on."""
        assert self._loaded is not None
        topology, world = self._pipeline.topology, self._loaded["world"]
        if topology.reports and world["size"] > 1 and world["rank"] != 0:
            raise StateError(
                f"this state was saved on rank {world['rank']}, which does not report: rank 0 resumes the "
                "tracking run, so load rank 0's state there (any rank's state suits the other ranks)"
            )
        pipeline, summary = self._pipeline, self._pipeline.summary
        summary.resumed_from.append(pipeline.step)
        return Resumed(
            step=pipeline.step,
            steps=tuple(summary.resumed_from),
            divergence=pipeline.judge.divergence.verdict,
            explosions=summary.explosions,
            first_explosion_step=summary.first_explosion_step,
        )

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._release()
        status: RunStatus = "finished"
        if exc_type is not None:
            status = "killed" if issubclass(exc_type, KeyboardInterrupt) else "failed"
        if self._pipeline.step == 0:  # never watch nothing in silence: say why, here and in the run
            self._unmeasured = self._silence.finish()
        self._pipeline.finish_diagnosis()
        outbox = self._pipeline.outbox
        outbox.send(RunEnded(end=RunEnd(status, self.summary(), time.time())))
        late = outbox.close(self.close_timeout)
        if late:
            warnings.warn(
                f"gradtrack backends {late} did not finish within close_timeout={self.close_timeout}s; "
                "they keep going in the background until the process exits",
                RuntimeWarning,
                stacklevel=2,
            )

    def _make_healer(self) -> Healer:
        """The snapshots' keeper; what it cannot snapshot is refused here, at ``__enter__``."""
        assert self._rollback is not None
        pipeline = self._pipeline
        healer = Healer(self.model, every=self._rollback.every, keep=self._rollback.keep,
                        budget=self._rollback.budget, directory=self._rollback.directory,
                        schedulers=self._rollback.schedulers, scaler=self.scaler, learnt=pipeline.learnt_state,
                        load_learnt=pipeline.load_learnt_state)  # fmt: skip
        check_snapshottable([("optimizer", self.optimizer), ("scaler", self.scaler),
                             *(("scheduler", s) for s in self._rollback.schedulers)])  # fmt: skip
        if self.optimizer is not None:
            healer.watch(self.optimizer)
        saved = self._loaded.get("rollback") if self._loaded is not None else None
        if saved is not None:  # the budget spent and the learning-rate scale go on across restarts
            healer.load_state_dict(saved)
        pipeline.healer = healer
        return healer

    def _release(self) -> None:
        """Undo what ``__enter__`` registered."""
        self._active = False
        if self._engine is not None:
            self._engine.remove()
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        if self._post_handle is not None:
            self._post_handle.remove()
            self._post_handle = None
        if self._healer is not None:
            self._healer.close()
        if self._scaler_watch is not None:
            self._scaler_watch.remove()
            self._scaler_watch = None
        if self._watching:
            registrations.unwatch()
            self._watching = False
        _tracked_models.discard(self.model)

    def flush(self, timeout: float = 30.0) -> bool:
        """Wait until every backend has handled everything reported so far; True if they did."""
        return self._pipeline.outbox.flush(timeout)

    # -- user calls -------------------------------------------------------------------------------

    def observe(self, loss: torch.Tensor | float) -> None:
        """Record the loss for this step's divergence check; a tensor stays on its device (no sync)."""
        if isinstance(loss, torch.Tensor):
            if loss.numel() != 1:
                raise ValueError(f"loss must be a scalar, got a tensor of shape {tuple(loss.shape)}")
        elif not isinstance(loss, int | float) or isinstance(loss, bool):
            raise TypeError(f"loss must be a scalar tensor or a number, got {type(loss).__name__}")
        self._pipeline.losses.add(loss)

    def step(self) -> None:
        """Do the per-step work by hand (loops without a torch.optim optimizer)."""
        if not self._active:
            raise RuntimeError("tracker.step() must be called inside `with GradTracker(...) as tracker:`")
        self._parameters.refresh()
        self._snapshot_if_due()
        self._pipeline.sees_updates = False  # no optimizer hook will say when the update is made: no sample
        try:
            self._measure(self._parameters.params, None, None)
        finally:
            self._pipeline.sees_updates = True

    # -- hooks ------------------------------------------------------------------------------------

    def _on_optimizer_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> Any:
        if not self._active:
            return None
        self._parameters.refresh()
        params = self._parameters.of(optimizer)
        if not params:
            self._silence.foreign(optimizer)
            return None
        measured = self._parameters.params if self.optimizer is None else params
        healer = self._healer
        if healer is not None:
            healer.watch(optimizer)
        closure = kwargs.get("closure", args[1] if len(args) > 1 else None)  # args[0] is the optimizer
        if callable(closure):  # the gradients do not exist yet: measure them where the closure makes them
            self._snapshot_if_due()
            if healer is not None:
                healer.scale_lr(optimizer)
            return self._with_measuring_closure(closure, measured, optimizer, args, kwargs)
        if self._iteration.starts(optimizer, params):
            if healer is not None:
                self._snapshot_if_due()
            self._measure(measured, optimizer, amp_state(optimizer, kwargs))
        if healer is not None:  # after a rollback, which restores the optimizer's own learning rates
            healer.scale_lr(optimizer)
        return None

    def _after_optimizer_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if self._active:  # before unscaling: the rates this update used
            self._pipeline.after_update(optimizer, callable(kwargs.get("closure", args[1] if len(args) > 1 else None)))
        if self._healer is not None:
            self._healer.unscale_lr(optimizer)

    def _snapshot_if_due(self) -> None:
        """At the start of an iteration, before its update: the state a rollback would bring back."""
        if self._healer is not None and self._pipeline.snapshot_due():
            self._healer.snapshot(self._pipeline.step)

    def _with_measuring_closure(
        self,
        closure: Callable[[], Any],
        params: Sequence[nn.Parameter],
        optimizer: torch.optim.Optimizer,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """Closure optimizers (LBFGS) evaluate the gradients inside ``step``, maybe several times: the first
        evaluation is this step's (measured, clipped, judged, reported, its loss observed if you did not);
        later ones, at trial points, are clipped alike on the device and their observed losses dropped."""
        first = True

        def measuring_closure() -> Any:
            nonlocal first
            loss = closure()
            if first:
                first = False
                if not self._pipeline.losses and isinstance(loss, torch.Tensor) and loss.numel() == 1:
                    self._pipeline.losses.add(loss)
                self._measure(params, optimizer, None)
            else:
                self._pipeline.clip_only(params)
            return loss

        if "closure" in kwargs:
            return args, {**kwargs, "closure": measuring_closure}
        return (args[0], measuring_closure, *args[2:]), kwargs

    def _measure(
        self, params: Sequence[nn.Parameter], optimizer: torch.optim.Optimizer | None, amp: AmpState | None
    ) -> None:
        self._stepped_since_update = True
        before = self._pipeline.step
        try:
            self._pipeline.run(params, amp)
        finally:
            self._iteration.measured(optimizer)
            self._silence.measured(self._pipeline.step > before)

    def _on_scaler_update(self) -> None:
        """``scaler.update()``: with no step since the last one, the scaler skipped it for overflow."""
        if self._active and not self._stepped_since_update:
            self._pipeline.amp_skipped()
        self._stepped_since_update = False

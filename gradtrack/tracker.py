"""GradTracker: the context manager users write, and the hooks that decide when a step happens.

The step itself (measure, clip, one transfer, judge, report) is ``gradtrack.pipeline``.
"""

from __future__ import annotations

import math
import time
import warnings
import weakref
from collections.abc import Callable, Mapping, Sequence
from types import TracebackType
from typing import Any, Literal, final

import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_pre_hook
from torch.utils.hooks import RemovableHandle

from gradtrack._version import __version__
from gradtrack.amp import AmpState, ScalerWatch, amp_state, check_scaler
from gradtrack.clipping import ClipPolicy, make_clip_policy
from gradtrack.detection import DivergenceDetector, ExplosionDetector, Judge, SpikeSkip
from gradtrack.distributed import topology
from gradtrack.events import Divergence, Explosion, RunEnd, RunStart, RunStatus, Summary
from gradtrack.messages import RunEnded, RunStarted
from gradtrack.outbox import Outbox
from gradtrack.params import ParameterSet, clean_name, registrations
from gradtrack.pipeline import (
    DivergenceError,
    NonFiniteGradientError,
    OnDivergence,
    OnNonfinite,
    Settings,
    StepPipeline,
)
from gradtrack.plugins import BackendSpec, check_backend_spec, requested_names, resolve_backends
from gradtrack.validate import count, mapping, optional_count, seconds

__all__ = ["DivergenceError", "GradTracker", "NonFiniteGradientError", "clean_name"]

_ON_NONFINITE = ("skip", "raise", "continue")
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
    documentation's options reference (``docs/reference/options.md``).
    """

    def __init__(
        self,
        model: nn.Module,
        backend: BackendSpec = None,
        *,
        optimizer: torch.optim.Optimizer | None = None,
        scaler: torch.amp.GradScaler | None = None,
        clip: str | ClipPolicy | None = "norm",
        max_norm: float | None = None,
        norm_type: float | str = 2.0,
        clip_value: float | None = None,
        on_nonfinite: OnNonfinite | None = None,
        on_spike: Literal["skip"] | None = None,
        on_divergence: OnDivergence = "continue",
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
        backend_options: Mapping[str, Mapping[str, Any]] | None = None,
        close_timeout: float = 10.0,
        max_pending: int = 1000,
    ) -> None:
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
        if on_divergence not in ("continue", "raise"):
            raise ValueError(f"on_divergence must be 'continue' or 'raise', got {on_divergence!r}")
        if not isinstance(weight_norms, bool):
            raise ValueError(f"weight_norms must be True or False, got {weight_norms!r}")
        self.model = model
        self.optimizer = optimizer
        self.scaler = check_scaler(scaler)
        self.close_timeout = seconds("close_timeout", close_timeout, allow_inf=True)
        settings = Settings(
            norm_type=_norm_type(norm_type),
            clip_policy=make_clip_policy(clip, max_norm, clip_value),
            log_every=count("log_every", log_every),
            layer_every=optional_count("layer_every", layer_every),
            top_k=count("top_k", top_k),
            weight_norms=weight_norms,
            weight_every=count("weight_every", weight_every),
            on_divergence=on_divergence,
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
        self._iteration = _Iteration(parameters)
        self._handle: RemovableHandle | None = None
        self._scaler_watch: ScalerWatch | None = None
        self._stepped_since_update = False
        self._active = False
        self._watching = False

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
        return self._pipeline.summary.freeze(self._pipeline.outbox.dropped)

    def config(self) -> dict[str, Any]:
        """The settings reported to backends at run start."""
        pipeline = self._pipeline
        settings = pipeline.settings
        config: dict[str, Any] = {"gradtrack_version": __version__, "clip": "none"}
        if pipeline.clip_policy is not None:
            config.update(pipeline.clip_policy.config())
        config.update(
            norm_type=settings.norm_type,
            on_nonfinite=pipeline.judge.on_nonfinite,
            log_every=settings.log_every,
            layer_every=settings.layer_every or 0,
            top_k=settings.top_k,
            weight_every=settings.weight_every if settings.weight_norms else 0,
        )
        config.update(pipeline.judge.config())
        config.update(on_divergence=settings.on_divergence)
        config.update(strategy=pipeline.topology.strategy, world_size=pipeline.topology.world_size)
        return config

    # -- context ----------------------------------------------------------------------------------

    def __enter__(self) -> GradTracker:
        if self._active:
            raise RuntimeError("this GradTracker is already active; a tracker can be entered once")
        if self.model in _tracked_models:
            raise RuntimeError(
                f"{type(self.model).__name__} is already tracked by another active GradTracker; "
                "exit that one first"
            )
        pipeline = self._pipeline
        self._parameters.refresh()
        trainable = self._parameters.trainable()
        names = [name for name, _ in trainable]
        pipeline.topology = topology(self.model, [p for _, p in trainable], names)
        pipeline.start(names)
        if pipeline.topology.reports:
            pipeline.outbox = Outbox.open(
                resolve_backends(self._backend_spec, self._backend_options),
                requested_names(self._backend_spec),
                max_pending=self._max_pending,
            )
        try:
            _tracked_models.add(self.model)
            registrations.watch()
            self._watching = True
            if self.optimizer is None:
                self._handle = register_optimizer_step_pre_hook(self._on_optimizer_step)
            else:
                self._handle = self.optimizer.register_step_pre_hook(self._on_optimizer_step)
            if self.scaler is not None:
                self._scaler_watch = ScalerWatch(self.scaler, self._on_scaler_update)
                self._scaler_watch.install()
            self._active = True
            start = RunStart(
                config=self.config(),
                layer_names=tuple(names),
                num_parameters=sum(p.numel() for _, p in trainable),
                model_class=type(self.model).__name__,
                timestamp=time.time(),
            )
            pipeline.emit(RunStarted(start=start))
        except BaseException:  # leave nothing behind: no hook, no reporter, the model free to track again
            self._release()
            pipeline.outbox.close(0.0)
            raise
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._release()
        status: RunStatus = "finished"
        if exc_type is not None:
            status = "killed" if issubclass(exc_type, KeyboardInterrupt) else "failed"
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

    def _release(self) -> None:
        """Undo what ``__enter__`` registered."""
        self._active = False
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
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
        self._measure(self._parameters.params, None, None)

    # -- hooks ------------------------------------------------------------------------------------

    def _on_optimizer_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> Any:
        if not self._active:
            return None
        self._parameters.refresh()
        params = self._parameters.of(optimizer)
        if not params:
            return None
        measured = self._parameters.params if self.optimizer is None else params
        closure = kwargs.get("closure", args[1] if len(args) > 1 else None)  # args[0] is the optimizer
        if callable(closure):  # the gradients do not exist yet: measure them where the closure makes them
            return self._with_measuring_closure(closure, measured, optimizer, args, kwargs)
        if self._iteration.starts(optimizer, params):
            self._measure(measured, optimizer, amp_state(optimizer, kwargs))
        return None

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
        try:
            self._pipeline.run(params, amp)
        finally:
            self._iteration.measured(optimizer)

    def _on_scaler_update(self) -> None:
        """``scaler.update()``: with no step since the last one, the scaler skipped it for overflow."""
        if self._active and not self._stepped_since_update:
            self._pipeline.amp_skipped()
        self._stepped_since_update = False


@final
class _Iteration:
    """Recognises one training iteration, so several optimizers over one model make one gradtrack step.

    An optimizer step starts a new iteration when that optimizer already stepped in the current one,
    or when the gradients of its parameters changed since gradtrack measured them (their first
    gradient is another tensor, or was written since: autograd and ``zero_grad`` bump its version).
    Otherwise it belongs to the iteration already measured, which measured and clipped every
    parameter of the model. An optimizer seen for the first time joins the current iteration if the
    model's gradients are still those measured (a second optimizer over another part of the model), and
    starts a new one if they changed (an optimizer made anew mid-run, say after a parameter was replaced).
    """

    def __init__(self, parameters: ParameterSet) -> None:
        self._parameters = parameters
        self._marks: weakref.WeakKeyDictionary[torch.optim.Optimizer, _Mark] = weakref.WeakKeyDictionary()
        self._stepped: set[int] = set()
        self._model_mark: _Mark = None
        self._open = False

    def starts(self, optimizer: torch.optim.Optimizer, params: list[nn.Parameter]) -> bool:
        mark = _mark(params)
        if not self._open or id(optimizer) in self._stepped:
            return True
        if optimizer in self._marks:
            if not _same(self._marks[optimizer], mark):
                return True
        elif not _same(_mark(self._parameters.params), self._model_mark):
            return True
        self._stepped.add(id(optimizer))
        self._marks[optimizer] = mark
        return False

    def measured(self, optimizer: torch.optim.Optimizer | None) -> None:
        """After a measurement (clipping rewrote the gradients): the marks of every known optimizer move."""
        self._open = True
        self._stepped = {id(optimizer)} if optimizer is not None else set()
        if optimizer is not None:
            self._marks.setdefault(optimizer, None)
        for known in list(self._marks):
            self._marks[known] = _mark(self._parameters.of(known))
        self._model_mark = _mark(self._parameters.params)


_Mark = tuple["weakref.ref[torch.Tensor]", int] | None


def _mark(params: Sequence[nn.Parameter]) -> _Mark:
    """The first trainable gradient and its version: one moves when the gradients change. A weak reference,
    not ``id()``: a gradient freed by ``zero_grad`` and the one made by the next ``backward`` can share an id."""
    for p in params:
        grad = p.grad
        if grad is not None and p.requires_grad:
            return weakref.ref(grad), grad._version
    return None


def _same(first: _Mark, second: _Mark) -> bool:
    if first is None or second is None:
        return first is second
    return first[0]() is second[0]() is not None and first[1] == second[1]

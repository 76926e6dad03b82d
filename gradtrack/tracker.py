"""GradTracker: hooks the optimizer step and runs the per-step work there, before the update."""

from __future__ import annotations

import math
import time
import warnings
import weakref
from collections import deque
from collections.abc import Mapping, Sequence
from types import TracebackType
from typing import Any, Literal, final

import numpy as np
import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_pre_hook
from torch.utils.hooks import RemovableHandle

from gradtrack._version import __version__
from gradtrack.clipping import ClipPolicy, make_clip_policy
from gradtrack.detection import DivergenceDetector, ExplosionDetector, offenders
from gradtrack.dispatch import Dispatcher
from gradtrack.events import Divergence, Explosion, RunEnd, RunStart, RunStatus, StepStats, Summary
from gradtrack.plugins import BackendSpec, resolve_backends
from gradtrack.stats import HostStats, measure, sorted_quantile, transfer
from gradtrack.summary import RunSummary

__all__ = ["GradTracker", "NonFiniteGradientError"]

OnNonfinite = Literal["skip", "raise", "continue"]
_ON_NONFINITE = ("skip", "raise", "continue")
_NORM_TYPES = (1.0, 2.0, math.inf)
_LEADING_WRAPPERS = ("module.", "_orig_mod.")
_WRAPPER_SEGMENTS = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.")
_KEPT_EVENTS = 256

_tracked_models: weakref.WeakSet[nn.Module] = weakref.WeakSet()


class NonFiniteGradientError(FloatingPointError):
    """Raised by ``on_nonfinite="raise"``; names the layers whose gradients hold NaN/Inf."""


def clean_name(name: str) -> str:
    """Drop the prefixes DDP, ``torch.compile``, FSDP and activation checkpointing add."""
    for segment in _WRAPPER_SEGMENTS:
        name = name.replace(segment, "")
    stripped = True
    while stripped:
        stripped = False
        for prefix in _LEADING_WRAPPERS:
            if name.startswith(prefix):
                name, stripped = name[len(prefix) :], True
    return name


def _norm_type(value: float | str) -> float:
    try:
        norm_type = float(value)
    except (TypeError, ValueError):
        norm_type = math.nan
    if norm_type not in _NORM_TYPES:
        raise ValueError(f"norm_type must be 1, 2 or inf ('inf' or math.inf), got {value!r}")
    return norm_type


def _positive_int(name: str, value: int | None) -> int | None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(f"{name} must be an int >= 1 (or None to disable), got {value!r}")
    return value


@final
class GradTracker:
    """Measures, clips and reports the gradients of ``model`` at every optimizer step.

    Use it as a context manager around an unchanged training loop; see README.md for every option.
    """

    def __init__(
        self,
        model: nn.Module,
        backend: BackendSpec = None,
        *,
        optimizer: torch.optim.Optimizer | None = None,
        clip: str | ClipPolicy | None = "norm",
        max_norm: float = 1.0,
        norm_type: float | str = 2.0,
        clip_value: float | None = None,
        on_nonfinite: OnNonfinite | None = None,
        explosion_threshold: float = 1e3,
        spike_factor: float = 10.0,
        nonfinite_patience: int = 3,
        loss_blowup: float = 10.0,
        loss_patience: int = 5,
        log_every: int = 1,
        layer_every: int | None = 10,
        top_k: int = 5,
        backend_options: Mapping[str, Mapping[str, Any]] | None = None,
        close_timeout: float = 60.0,
        max_pending: int = 1000,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer or None, got {type(optimizer).__name__}")
        named = [(clean_name(n), p) for n, p in model.named_parameters() if p.requires_grad]
        if not named:
            raise ValueError(f"model ({type(model).__name__}) has no trainable parameters to track")
        on_nonfinite = on_nonfinite or ("continue" if clip is None else "skip")
        if on_nonfinite not in _ON_NONFINITE:
            raise ValueError(f"on_nonfinite must be one of {list(_ON_NONFINITE)}, got {on_nonfinite!r}")
        if not (isinstance(close_timeout, int | float) and close_timeout >= 0):
            raise ValueError(f"close_timeout must be a number of seconds >= 0, got {close_timeout!r}")
        self.model = model
        self.optimizer = optimizer
        self.norm_type = _norm_type(norm_type)
        self.clip_policy = make_clip_policy(clip, max_norm, clip_value)
        self.on_nonfinite: OnNonfinite = on_nonfinite
        self.detector = ExplosionDetector(explosion_threshold, spike_factor)
        self.divergence = DivergenceDetector(nonfinite_patience, loss_blowup, loss_patience)
        self.log_every = _positive_int("log_every", log_every) or 1
        self.layer_every = _positive_int("layer_every", layer_every)
        self.top_k = _positive_int("top_k", top_k) or 1
        self.close_timeout = float(close_timeout)
        self._backend_spec = backend
        self._backend_options = backend_options
        self._max_pending = max_pending
        self._names = {id(p): name for name, p in named}
        self._params = [p for _, p in named]
        self._per_optimizer: dict[int, tuple[int, list[nn.Parameter]]] = {}
        self._names_in_order: dict[int, tuple[list[int], list[str]]] = {}
        self._handle: RemovableHandle | None = None
        self._dispatcher = Dispatcher([])
        self._losses: list[torch.Tensor] = []
        self._manual_step_done = False
        self._active = False
        self._step = 0
        self._summary = RunSummary()
        self._events: deque[Explosion] = deque(maxlen=_KEPT_EVENTS)

    # -- public state -----------------------------------------------------------------------------

    @property
    def diverged(self) -> bool:
        return self.divergence.verdict is not None

    @property
    def divergence_event(self) -> Divergence | None:
        return self.divergence.verdict

    @property
    def explosions(self) -> tuple[Explosion, ...]:
        """The most recent explosion events (at most 256 kept; the summary counts them all)."""
        return tuple(self._events)

    @property
    def steps(self) -> int:
        return self._step

    def summary(self) -> Summary:
        return self._summary.freeze(self._dispatcher.dropped)

    def config(self) -> dict[str, Any]:
        """The settings reported to backends at run start."""
        config: dict[str, Any] = {"gradtrack_version": __version__, "clip": "none"}
        if self.clip_policy is not None:
            config.update(self.clip_policy.config())
        config.update(
            norm_type=self.norm_type,
            on_nonfinite=self.on_nonfinite,
            log_every=self.log_every,
            layer_every=self.layer_every or 0,
            top_k=self.top_k,
        )
        config.update(self.detector.config())
        config.update(self.divergence.config())
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
        backends = [] if _is_silent_rank() else resolve_backends(self._backend_spec, self._backend_options)
        self._dispatcher = Dispatcher(backends, max_pending=self._max_pending)
        _tracked_models.add(self.model)
        if self.optimizer is None:
            self._handle = register_optimizer_step_pre_hook(self._on_optimizer_step)
        else:
            self._handle = self.optimizer.register_step_pre_hook(self._on_optimizer_step)
        self._active = True
        self._dispatcher.emit(
            "gradtrack_run_start",
            start=RunStart(
                config=self.config(),
                layer_names=tuple(self._names.values()),
                num_parameters=sum(p.numel() for p in self._params),
                model_class=type(self.model).__name__,
                timestamp=time.time(),
            ),
        )
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._active = False
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        _tracked_models.discard(self.model)
        status: RunStatus = "finished"
        if exc_type is not None:
            status = "killed" if issubclass(exc_type, KeyboardInterrupt) else "failed"
        self._dispatcher.emit("gradtrack_run_end", end=RunEnd(status, self.summary(), time.time()))
        late = self._dispatcher.close(self.close_timeout)
        if late:
            warnings.warn(
                f"gradtrack backends {late} did not finish within close_timeout={self.close_timeout}s; "
                "they keep going in the background until the process exits",
                RuntimeWarning,
                stacklevel=2,
            )

    def flush(self, timeout: float = 30.0) -> bool:
        """Wait until every backend has handled everything reported so far; True if they did."""
        return self._dispatcher.flush(timeout)

    # -- user calls -------------------------------------------------------------------------------

    def observe(self, loss: torch.Tensor | float) -> None:
        """Record the loss for this step's divergence check; a tensor stays on its device (no sync)."""
        if isinstance(loss, torch.Tensor):
            if loss.numel() != 1:
                raise ValueError(f"loss must be a scalar, got a tensor of shape {tuple(loss.shape)}")
            self._losses.append(loss.detach().reshape(()))
        elif isinstance(loss, int | float) and not isinstance(loss, bool):
            self._losses.append(torch.tensor(float(loss), dtype=torch.float64))
        else:
            raise TypeError(f"loss must be a scalar tensor or a number, got {type(loss).__name__}")

    def step(self) -> None:
        """Do the per-step work by hand (loops without a torch.optim optimizer)."""
        if not self._active:
            raise RuntimeError("tracker.step() must be called inside `with GradTracker(...) as tracker:`")
        self._process(self._params)
        self._manual_step_done = True

    # -- hot path ---------------------------------------------------------------------------------

    def _on_optimizer_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if not self._active:
            return
        if self._manual_step_done:
            self._manual_step_done = False
            return
        params = self._params_of(optimizer)
        if params:
            self._process(params)

    def _params_of(self, optimizer: torch.optim.Optimizer) -> list[nn.Parameter]:
        count = sum(len(group["params"]) for group in optimizer.param_groups)
        cached = self._per_optimizer.get(id(optimizer))
        if cached is None or cached[0] != count:
            params = [p for g in optimizer.param_groups for p in g["params"] if id(p) in self._names]
            cached = self._per_optimizer[id(optimizer)] = (count, params)
        return cached[1]

    def _process(self, params: Sequence[nn.Parameter]) -> None:
        with_grad = [p for p in params if p.grad is not None]
        if not with_grad:
            return
        grads = [p.grad for p in with_grad]
        with torch.no_grad():
            batch = measure(grads, self.norm_type)  # type: ignore[arg-type]
            clip_coef = self.clip_policy.clip_(batch) if self.clip_policy is not None else None
            host = transfer(batch, clip_coef, self._take_loss(batch.device))
        # From here on only host numbers: nothing below touches the device.
        cache_key = id(params) if len(with_grad) == len(params) else None
        names = _LazyNames(self, with_grad, batch.order, cache_key)
        self._report(with_grad, names, host)

    def _take_loss(self, device: torch.device) -> torch.Tensor | None:
        if not self._losses:
            return None
        losses, self._losses = self._losses, []
        if len(losses) == 1:
            return losses[0]
        return torch.stack([loss.to(device, torch.float64) for loss in losses]).mean()

    def _report(self, params: Sequence[nn.Parameter], names: _LazyNames, host: HostStats) -> None:
        step, now = self._step, time.time()
        self._step += 1
        finite_mask = np.isfinite(host.layer_norms)
        nonfinite = int(host.layer_norms.size - np.count_nonzero(finite_mask))
        if self.clip_policy is not None:
            self.clip_policy.observe(host.total_norm, host.clip_coef)
        explosion = self._check_explosion(step, now, nonfinite, names, host)
        divergence = self.divergence.update(step, nonfinite, host.loss, now)
        if divergence is not None:
            self._summary.divergence = divergence
        skipped = bool(nonfinite) and self.on_nonfinite == "skip"
        if skipped:
            for p in params:  # optimizers skip parameters without a gradient: the update is skipped
                p.grad = None
        clipped = host.clip_coef < 1.0
        self._summary.add_step(step, host.total_norm, clipped, skipped, bool(nonfinite), explosion is not None)

        if explosion is not None or divergence is not None or nonfinite or step % self.log_every == 0:
            with_layers = self.layer_every is not None and step % self.layer_every == 0
            finite = np.sort(host.layer_norms[finite_mask])
            p50, p95 = sorted_quantile(finite, 0.5), sorted_quantile(finite, 0.95)
            stats = StepStats(
                step=step,
                total_norm=host.total_norm,
                clip_coef=host.clip_coef,
                clipped=clipped,
                nonfinite=nonfinite,
                explosion=explosion is not None,
                diverged=self.diverged,
                skipped=skipped,
                layer_p50=p50,
                layer_p95=p95,
                layer_max=math.inf if nonfinite else float(finite[-1]),
                loss=host.loss,
                timestamp=now,
                layer_norms=dict(zip(names.get(), host.layer_norms.tolist(), strict=True)) if with_layers else None,
            )
            self._dispatcher.emit("gradtrack_step", stats=stats)
        if explosion is not None:
            self._dispatcher.emit("gradtrack_explosion", event=explosion)
        if divergence is not None:
            self._dispatcher.emit("gradtrack_divergence", event=divergence)
        if nonfinite and self.on_nonfinite == "raise":
            bad = [o.name for o in explosion.offenders if o.nonfinite] if explosion else []
            raise NonFiniteGradientError(f"non-finite gradients at step {step} in: {', '.join(bad)}")

    def _check_explosion(
        self, step: int, now: float, nonfinite: int, names: _LazyNames, host: HostStats
    ) -> Explosion | None:
        verdict = self.detector.check(host.total_norm)
        if verdict is None and not nonfinite:
            return None
        kind, threshold = verdict or ("nonfinite", self.detector.explosion_threshold)
        picked = offenders(host.layer_norms, names.get(), threshold, self.top_k)
        explosion = Explosion(step, "nonfinite" if nonfinite else kind, host.total_norm, threshold, picked, now)
        self._events.append(explosion)
        self._summary.add_explosion(explosion)
        return explosion

    def _names_for(self, params: Sequence[nn.Parameter], order: list[int], cache_key: int | None) -> list[str]:
        """Layer names in the order of the norms; cached while the same full parameter list recurs."""
        cached = self._names_in_order.get(cache_key) if cache_key is not None else None
        if cached is not None and cached[0] == order:
            return cached[1]
        names = [self._names[id(params[i])] for i in order]
        if cache_key is not None:
            self._names_in_order[cache_key] = (order, names)
        return names


@final
class _LazyNames:
    """Names are only needed on explosion steps and at the per-layer cadence: build them then."""

    __slots__ = ("_args", "_names", "_tracker")

    def __init__(
        self, tracker: GradTracker, params: Sequence[nn.Parameter], order: list[int], cache_key: int | None
    ) -> None:
        self._tracker = tracker
        self._args = (params, order, cache_key)
        self._names: list[str] | None = None

    def get(self) -> list[str]:
        if self._names is None:
            self._names = self._tracker._names_for(*self._args)
        return self._names


def _is_silent_rank() -> bool:
    """Under torch.distributed only rank 0 reports; every rank still measures and clips."""
    dist = torch.distributed
    return dist.is_available() and dist.is_initialized() and dist.get_rank() != 0

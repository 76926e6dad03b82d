"""gradtrack inside training frameworks that own the training loop.

* ``gradtrack.integrations.lightning``: ``GradTrackerCallback``, a Lightning ``Callback`` (``pip install
  'gradtrack[lightning]'``).
* ``gradtrack.integrations.transformers``: ``GradTrackerCallback``, a Hugging Face ``TrainerCallback``
  (``pip install 'gradtrack[transformers]'``).

Each of those modules imports its framework when it is imported; this package imports neither, and
``import gradtrack`` never imports this package.

What they share is here: a :class:`GradTracker` driven by the framework's callbacks instead of by
gradtrack's own optimizer hook. A framework runs code of its own between the gradients and the
optimizer step (its AMP unscaling, its clipping, a closure around both): the callbacks measure at the
point they choose, by hand, and the tracker's global optimizer step pre-hook is removed so that the
optimizer step that follows is never measured a second time.

Self-healing (``on_divergence="rollback"``) restores what the trainer owns beside the model: its optimizers,
LR schedulers and AMP scaler (:class:`Owned`). The snapshot is taken where the callback measures, before the
update; the halved learning rate of a repeated rollback is applied inside each of the trainer's optimizer
steps, after the callback measured (and maybe rolled back), and undone right after the step.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, final

if TYPE_CHECKING:
    import torch
    from torch import nn
    from torch.utils.hooks import RemovableHandle

    from gradtrack.measure.amp import AmpState
    from gradtrack.tracker import GradTracker

__all__: list[str] = []

# Options the callbacks set themselves: the optimizer step is found by the framework, AMP is read from the
# framework's own GradScaler, and a rollback restores the framework's own optimizers, schedulers and scaler.
_FRAMEWORK_OPTIONS = ("optimizer", "scaler", "scheduler")


def check_options(owner: str, options: Mapping[str, Any]) -> dict[str, Any]:
    """Validate ``GradTracker`` keyword options when the callback is created, not when training starts.

    A tracker built on a one-parameter probe model runs every check of ``GradTracker.__init__`` (it opens
    no backend: that happens when a tracker is entered).
    """
    import torch
    from torch import nn

    from gradtrack.tracker import GradTracker

    for name in _FRAMEWORK_OPTIONS:
        if name in options:
            raise TypeError(f"{owner} takes no {name}= option: it uses the {name} of the trainer it is attached to")
    if "model" in options:
        raise TypeError(f"{owner} takes no model= option: it tracks the model the trainer trains")
    probe = nn.Linear(1, 1, bias=False, device=torch.device("meta"))
    GradTracker(probe, **options)
    return dict(options)


def monitor_only(options: Mapping[str, Any], owner: str, clipper: str, remedy: str) -> dict[str, Any]:
    """The options with ``clip=None``, as the framework clips; options asking gradtrack to clip too are refused."""
    asked = [name for name in ("clip", "max_norm", "clip_value") if options.get(name) is not None]
    if asked:
        given = ", ".join(f"{name}={options[name]!r}" for name in asked)
        raise ValueError(f"{owner}({given}) and {clipper} would clip the gradients twice: {remedy}")
    return {**options, "clip": None}


def backend_options(options: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """A mutable copy of the user's ``backend_options``."""
    given = options.get("backend_options") or {}
    return {name: dict(values) for name, values in given.items()}


def names_in(spec: object) -> set[str]:
    """The backend names in a ``backend=`` value (objects passed directly have none)."""
    items = list(spec) if isinstance(spec, list | tuple) else [spec]
    return {item for item in items if isinstance(item, str)}


def auto_backend(names: list[str]) -> str | list[str] | None:
    return None if not names else names[0] if len(names) == 1 else names


def inner_optimizer(optimizer: Any) -> Any:
    """The ``torch.optim.Optimizer`` under framework wrappers (``gradtrack.measure.amp.inner_optimizer``)."""
    from gradtrack.measure.amp import inner_optimizer as inner

    return inner(optimizer)


def amp_state(scaler: Any, optimizer: Any) -> AmpState | None:
    """What the framework's ``GradScaler`` did to the gradients of ``optimizer`` so far in this step
    (``gradtrack.measure.amp.scaler_state``)."""
    from gradtrack.measure.amp import scaler_state

    return scaler_state(scaler, optimizer)


def loss_scale(scaler: Any) -> torch.Tensor | None:
    """The factor an enabled ``GradScaler`` multiplies losses by (a device tensor: reading it never syncs)."""
    import torch

    if not isinstance(scaler, torch.amp.GradScaler) or not scaler.is_enabled():
        return None
    return scaler._scale


@final
@dataclass(frozen=True, slots=True)
class Owned:
    """What the trainer owns beside the model; ``on_divergence="rollback"`` snapshots and restores it."""

    optimizers: tuple[Any, ...] = ()  # framework wrappers allowed: the torch optimizer under each is used
    schedulers: tuple[Any, ...] = ()
    scaler: Any = None  # a torch.amp.GradScaler; anything else (None, a bf16 plugin's) is not snapshotted


def _snapshottable(owned: Owned) -> tuple[list[torch.optim.Optimizer], torch.amp.GradScaler | None]:
    """The trainer's torch optimizers and GradScaler, refused now (before the tracker is entered) if a
    snapshot could not copy their state."""
    import torch

    from gradtrack.heal.rollback import check_snapshottable

    optimizers = list(dict.fromkeys(inner_optimizer(o) for o in owned.optimizers))
    optimizers = [o for o in optimizers if isinstance(o, torch.optim.Optimizer)]
    scaler = owned.scaler if isinstance(owned.scaler, torch.amp.GradScaler) else None
    check_snapshottable([*(("trainer's optimizer", o) for o in optimizers), ("trainer's scaler", scaler)])
    return optimizers, scaler


@final
class HandDriven:
    """A ``GradTracker`` entered by a callback, stepped by hand, closed by another callback."""

    def __init__(self, tracker: GradTracker) -> None:
        self.tracker = tracker
        self.open = False
        self._lr_hooks: list[RemovableHandle] = []

    @classmethod
    def start(
        cls,
        model: nn.Module,
        options: Mapping[str, Any],
        state: Mapping[str, Any] | None = None,
        step: int = 0,
        owned: Owned | None = None,
    ) -> HandDriven:
        """Create and enter the tracker, resuming ``state`` (``tracker.state_dict()`` in a checkpoint) if given.

        Without a state, ``step`` is the framework's own count of optimizer steps already done (a trainer
        resumed from a checkpoint that holds no gradtrack state): gradtrack's step axis goes on from there
        instead of restarting at 0 in a run that may already hold those steps. ``owned``: what a rollback
        restores beside the model (used only with ``on_divergence="rollback"``).
        """
        from gradtrack.tracker import GradTracker

        optimizers: list[torch.optim.Optimizer] = []
        scaler = None
        if owned is not None and options.get("on_divergence") == "rollback":
            optimizers, scaler = _snapshottable(owned)
            options = {**options, "scheduler": list(owned.schedulers) or None}
        tracker = GradTracker(model, **options)
        if state is not None:
            tracker.load_state_dict(state)
        elif step > 0:
            tracker._start_at(step)
        tracker.__enter__()
        driven = cls(tracker)
        driven.open = True
        # The framework calls optimizer.step() after the callback measured: with the tracker's global step
        # pre-hook in place that step would be measured again whenever the gradients changed in between
        # (the framework's own clipping) or the step takes a closure (Lightning's automatic optimization).
        handle = tracker._handle
        if handle is not None:
            handle.remove()
            tracker._handle = None
        healer = tracker._healer
        if healer is not None:
            healer.scaler = scaler  # entered without scaler=: gradtrack reads AMP from the framework's own way
            for optimizer in optimizers:
                healer.watch(optimizer)
                driven._lr_hooks.append(optimizer.register_step_pre_hook(driven._scale_lr))
        return driven

    def _scale_lr(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> Any:
        """A trainer's optimizer step starts: its learning rates times the healer's ``lr_scale`` for this update
        (the tracker's post-hook undoes it), once the callback has measured, and maybe rolled back, which
        restores the learning rates. With a closure (Lightning), the callback measures inside it: scale after it."""
        healer = self.tracker._healer
        if healer is None or not self.open:
            return None
        closure = kwargs.get("closure", args[1] if len(args) > 1 else None)  # args[0] is the optimizer
        if not callable(closure):
            healer.scale_lr(optimizer)
            return None

        def scaled_closure() -> Any:
            loss = closure()
            healer.scale_lr(optimizer)
            return loss

        if "closure" in kwargs:
            return args, {**kwargs, "closure": scaled_closure}
        return (args[0], scaled_closure, *args[2:]), kwargs

    def observe(self, loss: torch.Tensor | float) -> None:
        if self.open:
            self.tracker.observe(loss)

    def step(self, amp: AmpState | None = None, params: list[Any] | None = None) -> None:
        """One gradtrack step: a rollback snapshot if one is due, then measure, clip, judge, report (the
        tracker's ``step()``, with the AMP state)."""
        if not self.open:
            return
        tracker = self.tracker
        tracker._parameters.refresh()
        tracker._snapshot_if_due()
        tracker._measure(params if params is not None else tracker._parameters.params, None, amp)

    def close(self, exc: BaseException | None = None) -> None:
        """Leave the tracker as its ``with`` block would: ``failed`` (``killed`` for a KeyboardInterrupt) on ``exc``."""
        if not self.open:
            return
        self.open = False
        while self._lr_hooks:
            self._lr_hooks.pop().remove()
        if exc is None:
            self.tracker.__exit__(None, None, None)
        else:
            self.tracker.__exit__(type(exc), exc, exc.__traceback__)


def warn_once(seen: set[str], key: str, message: str, stacklevel: int = 3) -> None:
    if key not in seen:
        seen.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=stacklevel)

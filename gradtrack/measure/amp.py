"""What ``torch.amp.GradScaler`` does to the gradients gradtrack sees, read without a host sync.

* Optimizers that do not handle scaling (SGD, Adam with ``foreach``): ``scaler.step`` unscales the
  gradients first and calls ``optimizer.step()`` only when they are finite. gradtrack's hook sees
  true gradients, and never sees a skipped step. Passing ``scaler=`` lets gradtrack count those:
  it wraps that scaler's ``update`` (restored on exit), and an ``update`` with no gradtrack step since
  the previous one is a step the scaler skipped for overflow. That is a host-side fact, no sync.
* Optimizers that take the scale themselves (``_step_supports_amp_scaling``: fused Adam, AdamW, SGD):
  ``scaler.step`` calls ``optimizer.step()`` on every step with the gradients still scaled, and sets
  ``optimizer.grad_scale`` and ``optimizer.found_inf`` (tensors) for the step to unscale and to skip
  itself on overflow. gradtrack divides its norms by ``grad_scale`` and carries ``found_inf`` in its
  one transfer. An older contract passes the scaler as ``grad_scaler=`` to ``step``; then the scale
  is the scaler's and an overflow is judged from the norms themselves.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, final

import torch

__all__ = ["AmpState", "ScalerWatch", "amp_state", "check_scaler", "inner_optimizer", "scaler_state"]


@final
@dataclass(frozen=True, slots=True)
class AmpState:
    """The stepping optimizer's AMP state: the factor its gradients carry, and the scaler's overflow flag.

    ``found_inf`` is None when the optimizer computes it itself (the ``grad_scaler=`` contract): any
    non-finite norm then means overflow.
    """

    grad_scale: torch.Tensor | None
    found_inf: torch.Tensor | None


def amp_state(optimizer: torch.optim.Optimizer, kwargs: Mapping[str, Any]) -> AmpState | None:
    """The AMP state ``GradScaler.step`` gave an optimizer that handles scaling itself, else None."""
    if not getattr(optimizer, "_step_supports_amp_scaling", False):
        return None
    scaler = kwargs.get("grad_scaler")
    if scaler is not None:
        from torch.amp.grad_scaler import OptState

        stage = scaler._per_optimizer_states[id(optimizer)]["stage"]
        return AmpState(None if stage is OptState.UNSCALED else scaler._get_scale_async(), None)
    found_inf = getattr(optimizer, "found_inf", None)
    if not isinstance(found_inf, torch.Tensor):
        return None  # stepped without a scaler
    grad_scale = getattr(optimizer, "grad_scale", None)  # None after scaler.unscale_(optimizer)
    return AmpState(grad_scale if isinstance(grad_scale, torch.Tensor) else None, found_inf)


def check_scaler(scaler: object) -> torch.amp.GradScaler | None:
    if scaler is not None and not isinstance(scaler, torch.amp.GradScaler):
        raise TypeError(f"scaler must be a torch.amp.GradScaler or None, got {type(scaler).__name__}")
    return scaler


@final
class ScalerWatch:
    """Calls ``on_update`` before each ``scaler.update()`` while installed."""

    def __init__(self, scaler: torch.amp.GradScaler, on_update: Callable[[], None]) -> None:
        self.scaler = scaler
        self._on_update = on_update
        self._wrapper: Callable[..., None] | None = None

    def install(self) -> None:
        original = self.scaler.update  # the bound method, or an earlier tracker's wrapper

        @functools.wraps(original)
        def update(*args: Any, **kwargs: Any) -> None:
            if self._wrapper is not None:  # removed while another wrapper still calls through us
                self._on_update()
            original(*args, **kwargs)

        self._had_attribute = "update" in vars(self.scaler)
        self._previous = original
        self._wrapper = update
        self.scaler.update = update  # type: ignore[method-assign]

    def remove(self) -> None:
        wrapper, self._wrapper = self._wrapper, None
        if wrapper is None or vars(self.scaler).get("update") is not wrapper:
            return  # someone wrapped over us: stay in the chain, inert
        if self._had_attribute:
            self.scaler.update = self._previous  # type: ignore[method-assign]
        else:
            del self.scaler.update


def inner_optimizer(optimizer: Any) -> Any:
    """The ``torch.optim.Optimizer`` under framework wrappers (accelerate's ``AcceleratedOptimizer``,
    Lightning's ``LightningOptimizer``): the one a ``GradScaler`` keeps its state for."""
    seen = 0
    while seen < 8:
        seen += 1
        inner = getattr(optimizer, "optimizer", None)
        if inner is None:
            inner = getattr(optimizer, "_optimizer", None)
        if not isinstance(inner, torch.optim.Optimizer) or inner is optimizer:
            return optimizer
        optimizer = inner
    return optimizer


def scaler_state(scaler: Any, optimizer: Any) -> AmpState | None:
    """What the framework's ``GradScaler`` did to the gradients of ``optimizer`` so far in this step.

    * Not unscaled yet: the gradients carry the scale; gradtrack divides its norms by it on the device,
      clips at the true norm, and judges an overflow from a non-finite norm (the scaler will skip the step).
    * Unscaled (``scaler.unscale_``, as Lightning and accelerate do before clipping): true gradients, and the
      scaler's ``found_inf`` travels in gradtrack's one transfer, so an overflow step is counted as
      ``grad/amp_overflow`` (the scaler skips it) and never as an explosion, without a host sync here.
    """
    from torch.amp.grad_scaler import OptState

    if not isinstance(scaler, torch.amp.GradScaler) or not scaler.is_enabled():
        return None
    optimizer = inner_optimizer(optimizer)
    state = scaler._per_optimizer_states.get(id(optimizer))
    if state is None or state["stage"] is OptState.READY:
        scale = scaler._scale
        return AmpState(scale, None) if scale is not None else None
    found = list(state["found_inf_per_device"].values())
    if not found:
        return None
    found_inf = found[0] if len(found) == 1 else torch.stack([f.to(found[0].device) for f in found]).sum()
    return AmpState(None, found_inf)

"""gradtrack inside a DeepSpeed engine: ``with GradTracker(engine, ...)`` at ZeRO stages 0 to 3.

DeepSpeed owns the gradients: at ZeRO-1/2 each rank keeps the fragments of the flat gradient partition it
updates, at ZeRO-3 the local shard of every parameter, and the optimizer it steps holds flat fp32 copies,
not the model's parameters. gradtrack therefore measures where the engine is about to update and clips
where the optimizer steps:

* **Measured once per engine step, before any clipping.** The engine's ``_take_model_step`` (called once
  per optimizer step, at the gradient-accumulation boundary, after every reduction) is wrapped: before it
  runs, each rank takes the gradients it holds (ZeRO-0: ``param.grad``, already averaged across ranks;
  ZeRO-1/2: each parameter's fragment of its partition; ZeRO-3: each parameter's local partition), measures
  them in one fused pass, and the per-layer sums of squares cross ranks in the one collective of the step,
  with the observed loss. The gradients still carry DeepSpeed's loss scale there (fp16): the norms are
  divided by it, and a non-finite norm under a loss scaler is ``grad/amp_overflow`` (DeepSpeed skips that
  step itself), never an explosion.
* **No extra collective at ZeRO 1-3.** DeepSpeed would compute the same global norm with an all-reduce of
  its own per parameter group (``scaled_global_norm`` at ZeRO-1/2, ``_get_norm_groups`` at ZeRO-3): those
  are answered from gradtrack's measurement instead, so DeepSpeed clips, reports
  (``engine.get_global_grad_norm()``) and judges overflow with the very norm gradtrack logged as
  ``grad/total_norm``, the pre-clip one. At ZeRO-0 the gradients are already averaged across ranks (as under
  DDP) and gradtrack's collective carries only the observed loss.
* **Clipped once, where the optimizer steps.** Who clips follows from DeepSpeed's ``gradient_clipping``
  (its default is 1.0 since DeepSpeed 0.19.3):

  - ``gradient_clipping > 0``: DeepSpeed clips. gradtrack watches and reports DeepSpeed's coefficient,
    ``min(1, gradient_clipping / (norm + 1e-6))``, as ``grad/clip_coef``. Asking gradtrack to clip as well
    (``max_norm=``, ``clip_value=``, a ``clip=`` other than the default ``"norm"`` or None) is refused.
  - ``gradient_clipping == 0``: gradtrack clips with its policy. The coefficient is computed from the global
    norm at the measurement and applied in a step pre-hook of the optimizer DeepSpeed wraps, to the tensors
    it is about to update (the flat fp32 partitions, after DeepSpeed unscaled them), so DeepSpeed's own norm
    stays the pre-clip one. Policies that scale every gradient by one factor (``norm``, ``adaptive``,
    ``zscore``, ``auto``) and ``value`` work this way; ``adagc`` and ``agc`` (per-layer factors, bounds
    relative to the weights) need the measured tensors themselves and are refused.

  A step gradtrack skips (non-finite gradients with ``on_nonfinite="skip"``, ``on_spike="skip"``) leaves
  the optimizer no gradient to update with, so its update does not happen.
* The loss each ``engine.backward(loss)`` receives is observed (its mean over the micro-batches of a step).

Refused at ``GradTracker(engine)``, each with its reason: ``on_divergence="rollback"`` (a rollback would have
to restore the engine's partitions, its optimizer and loss scaler: use DeepSpeed's checkpoints), optimizer or
parameter offload, pipeline engines, model parallelism (a data-parallel group that is not the world), and
ZeRO-1's ``BF16_Optimizer`` (bf16 with fp32 gradient accumulation). ``GradTracker(engine.module)`` raises an
error that says to pass the engine.

This module reads DeepSpeed internals (the engine's step, the ZeRO optimizers' gradient partitions) of the
versions in ``TESTED``; it imports nothing of DeepSpeed itself.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, final

import torch
from torch import nn

from gradtrack.measure.distributed import Reduction, Topology, check_symmetric
from gradtrack.policies.clipping import NormClip, ValueClip
from gradtrack.policies.policy import ClipPolicy, defers
from gradtrack.step.pipeline import Outcome

if TYPE_CHECKING:
    from gradtrack.measure.amp import AmpState
    from gradtrack.tracker import GradTracker

__all__ = ["EngineDriver", "clip_rule", "engine_of", "is_engine"]

TESTED = ((0, 19), (0, 19))  # the DeepSpeed minor versions whose internals this module was checked against


def is_engine(model: object) -> bool:
    """Whether ``model`` is a ``deepspeed.DeepSpeedEngine`` (by class, without importing DeepSpeed)."""
    return any(
        cls.__name__ == "DeepSpeedEngine" and cls.__module__.startswith("deepspeed.") for cls in type(model).__mro__
    )


def engine_of(module: nn.Module) -> Any | None:
    """The DeepSpeed engine wrapping ``module``, found through the forward hooks every engine registers on it."""
    if "deepspeed" not in sys.modules:
        return None
    hooks = [*module._forward_pre_hooks.values(), *module._forward_hooks.values()]
    for hook in hooks:
        if not getattr(hook, "__qualname__", "").startswith("DeepSpeedEngine."):
            continue
        for cell in getattr(hook, "__closure__", None) or ():
            try:
                owner = cell.cell_contents
            except ValueError:  # an empty cell
                continue
            if is_engine(owner) and getattr(owner, "module", None) is module:
                return owner
    return None


def clip_rule(
    engine: Any, clip: str | ClipPolicy | None, max_norm: float | None, clip_value: float | None,
    policy: ClipPolicy | None,
) -> tuple[ClipPolicy | None, bool]:  # fmt: skip
    """The policy that reports (and maybe applies) the clip of an engine's steps, and whether gradtrack applies it.

    ``policy``: what ``clip``, ``max_norm`` and ``clip_value`` made. See the module docstring for the rule.
    """
    ds_clip = float(engine.gradient_clipping() or 0.0)
    if ds_clip > 0:
        asked = clip not in ("norm", None) or max_norm is not None or clip_value is not None
        if asked:
            given = ", ".join(
                f"{name}={value!r}"
                for name, value in (("clip", clip), ("max_norm", max_norm), ("clip_value", clip_value))
                if value is not None and not (name == "clip" and value == "norm")
            )
            raise ValueError(
                f"GradTracker({given}) and DeepSpeed's gradient_clipping={ds_clip:g} would clip the gradients "
                "twice: set \"gradient_clipping\": 0.0 in the DeepSpeed config to let gradtrack clip, or drop "
                f"{given} to let DeepSpeed clip while gradtrack watches (it then reports DeepSpeed's coefficient)"
            )
        return NormClip(ds_clip), False
    if policy is not None and not defers(policy):
        raise ValueError(
            f"clip={policy.name!r} cannot clip inside a DeepSpeed engine: gradtrack applies its clip to the flat "
            "partitions DeepSpeed's optimizer steps on, which takes one factor for every gradient ('norm', "
            "'adaptive', 'zscore', 'auto') or an element bound ('value')"
        )
    return policy, policy is not None


def check_engine(engine: Any) -> None:
    """Refuse, with the reason, an engine whose gradients gradtrack cannot read (see the module docstring)."""
    version = _version(sys.modules["deepspeed"]) if "deepspeed" in sys.modules else None
    if version is not None and version < TESTED[0]:
        raise ValueError(f"gradtrack supports DeepSpeed {TESTED[0][0]}.{TESTED[0][1]} and newer, not {version}")
    if version is not None and version > TESTED[1]:
        warnings.warn(
            f"gradtrack was tested with DeepSpeed {TESTED[1][0]}.{TESTED[1][1]}.x; DeepSpeed "
            f"{'.'.join(map(str, version))} may lay out its gradients differently (gradtrack raises if it finds so)",
            UserWarning,
            stacklevel=4,
        )
    names = [cls.__name__ for cls in type(engine).__mro__]
    if "PipelineEngine" in names:
        raise ValueError("gradtrack does not support DeepSpeed's PipelineEngine: pipeline stages hold different layers")
    if getattr(engine, "optimizer", None) is None:
        raise ValueError("this DeepSpeed engine has no optimizer (an inference engine?): there is no step to track")
    if engine.zero_optimization() and (_offloads(engine.zero_offload_optimizer()) or
                                       _offloads(engine.zero_offload_param())):  # fmt: skip
        raise ValueError(
            "gradtrack does not support DeepSpeed's optimizer or parameter offload (its gradients live in CPU or "
            "NVMe buffers): turn offload_optimizer / offload_param off"
        )
    if type(engine.optimizer).__name__ == "BF16_Optimizer":
        raise ValueError(
            "gradtrack does not support DeepSpeed's BF16_Optimizer (ZeRO-1 with bf16 and fp32 gradient "
            "accumulation): use ZeRO-2, or data_types.grad_accum_dtype='bf16'"
        )
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        group = getattr(engine, "seq_data_parallel_group", None)
        if group is not None and dist.get_world_size(group=group) != dist.get_world_size():
            raise ValueError(
                "gradtrack supports DeepSpeed with data parallelism over the whole world only (no tensor, "
                "sequence or pipeline model parallelism): its norms are combined over the world"
            )


def _offloads(setting: Any) -> bool:
    """Whether a ZeRO ``offload_optimizer`` / ``offload_param`` setting moves anything (its device is not "none")."""
    device = getattr(setting, "device", None)
    return getattr(device, "value", device) not in (None, "none")


def _version(module: Any) -> tuple[int, int] | None:
    try:
        major, minor = str(module.__version__).split(".")[:2]
        return int(major), int(minor)
    except (AttributeError, ValueError):
        return None


@final
class EngineDriver:
    """Drives a tracker from a DeepSpeed engine's own step: measures, hands the clip to its optimizer, observes
    the loss. ``install`` wraps the engine's ``_take_model_step`` and ``backward`` on the instance (restored by
    ``remove``) and adds a step pre-hook to the optimizer DeepSpeed steps."""

    def __init__(self, engine: Any, applies_clip: bool, value_bound: float | None) -> None:
        self.engine = engine
        self.stage = int(engine.zero_optimization_stage()) if engine.zero_optimization() else 0
        self.applies_clip = applies_clip
        self.value_bound = value_bound  # clip="value": clamp at this bound instead of scaling
        self._tracker: GradTracker | None = None
        self._pending: Outcome | None = None
        self._applied: set[int] = set()  # tensors already clipped in this step (sub-groups step one at a time)
        self._originals: dict[tuple[Any, str], Any] = {}
        self._scale: float | torch.Tensor = 1.0  # the loss scale the gradients carried at this step's measurement
        self._hooks: list[Any] = []
        self._params: list[nn.Parameter] = []

    @property
    def strategy(self) -> str:
        return f"deepspeed-zero{self.stage}"

    def updated(self, trainable: Sequence[tuple[str, nn.Parameter]]) -> list[tuple[str, nn.Parameter]]:
        """The named trainable parameters DeepSpeed's optimizer updates, in the model's order."""
        if self.stage == 0:
            return list(trainable)
        optimizer = self.engine.optimizer
        groups = getattr(optimizer, "fp16_groups" if self.stage == 3 else "bit16_groups", None)
        if groups is None:
            raise ValueError(f"gradtrack cannot find the parameter groups of this ZeRO-{self.stage} optimizer "
                             f"({type(optimizer).__name__})")  # fmt: skip
        updated = {id(p) for group in groups for p in group}
        return [(name, p) for name, p in trainable if id(p) in updated]

    def num_parameters(self, params: Sequence[nn.Parameter]) -> int:
        """ZeRO-3 leaves each parameter an empty placeholder: its size is ``ds_numel``."""
        return sum(int(getattr(p, "ds_numel", p.numel())) for p in params)

    def topology(self, params: Sequence[nn.Parameter], names: Sequence[str]) -> Topology:
        """Stage 0 averages the gradients across ranks before the step (as DDP does); stages 1 to 3 leave each
        rank a disjoint part of every gradient, whose squares add up across ranks."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return Topology(self.strategy, 1, 0, sharded=self.stage > 0)
        world, rank = dist.get_world_size(), dist.get_rank()
        factors = None if self.stage == 0 else {id(p): 1.0 for p in params}
        device = torch.device(self.engine.device) if hasattr(self.engine, "device") else torch.device("cpu")
        check_symmetric(sorted(names), world, device)
        return Topology(self.strategy, world, rank, Reduction(None, world, rank, factors), sharded=self.stage > 0)

    # -- hooks --------------------------------------------------------------------------------------

    def install(self, tracker: GradTracker, params: Sequence[nn.Parameter]) -> None:
        self._tracker, self._params = tracker, list(params)
        self._wrap(self.engine, "_take_model_step", self._wrap_step)
        self._wrap(self.engine, "backward", self._wrap_backward)
        optimizer = self.engine.optimizer
        if self.stage in (1, 2) and hasattr(optimizer, "scaled_global_norm"):
            self._wrap(optimizer, "scaled_global_norm", lambda original: self._answer_norm(original, groups=False))
        elif self.stage == 3 and hasattr(optimizer, "_get_norm_groups"):
            self._wrap(optimizer, "_get_norm_groups", lambda original: self._answer_norm(original, groups=True))
        for optimizer in self._stepped_optimizers():
            self._hooks.append(optimizer.register_step_pre_hook(self._apply))

    def remove(self) -> None:
        for (owner, name), (had, previous, wrapper) in self._originals.items():
            if vars(owner).get(name) is not wrapper:
                continue  # wrapped again over us since: leave the chain as it is
            if had:
                object.__setattr__(owner, name, previous)
            else:
                object.__delattr__(owner, name)
        self._originals.clear()
        while self._hooks:
            self._hooks.pop().remove()
        self._tracker, self._pending = None, None

    def _wrap(self, owner: Any, name: str, wrap: Callable[[Any], Any]) -> None:
        """``owner.name`` replaced, on the instance, by ``wrap`` of it (put back by ``remove``)."""
        previous = getattr(owner, name)
        wrapper = wrap(previous)
        self._originals[(owner, name)] = (name in vars(owner), previous, wrapper)
        object.__setattr__(owner, name, wrapper)

    def _stepped_optimizers(self) -> list[torch.optim.Optimizer]:
        """The torch optimizers whose ``step`` updates the model: DeepSpeed's basic optimizer (under its wrapper)."""
        engine = self.engine
        basic = getattr(engine, "basic_optimizer", None)
        if not isinstance(basic, torch.optim.Optimizer):
            basic = getattr(engine.optimizer, "optimizer", engine.optimizer)
        if not isinstance(basic, torch.optim.Optimizer):
            raise ValueError(f"gradtrack cannot find the torch optimizer under {type(engine.optimizer).__name__}")
        return [basic]

    def _wrap_step(self, original: Callable[..., Any]) -> Callable[..., Any]:
        def take_model_step(*args: Any, **kwargs: Any) -> Any:
            tracker = self._tracker
            if tracker is not None and tracker._active:
                self._measure(tracker)
            try:
                return original(*args, **kwargs)
            finally:
                self._pending = None
                self._applied.clear()

        return take_model_step

    def _wrap_backward(self, original: Callable[..., Any]) -> Callable[..., Any]:
        def backward(loss: Any, *args: Any, **kwargs: Any) -> Any:
            tracker = self._tracker
            if tracker is not None and tracker._active and isinstance(loss, torch.Tensor) and loss.numel() == 1:
                tracker.observe(loss.detach())
            return original(loss, *args, **kwargs)

        return backward

    def _answer_norm(self, original: Callable[..., Any], groups: bool) -> Callable[..., Any]:
        """DeepSpeed's global norm times the loss scale, answered from this step's measurement without its
        all-reduces: ZeRO-1/2's ``scaled_global_norm`` (a tensor), ZeRO-3's ``_get_norm_groups`` (one group)."""

        def answer(*args: Any, **kwargs: Any) -> Any:
            outcome = self._pending
            if outcome is None:
                return original(*args, **kwargs)
            norm = self._scaled(outcome.total_norm)
            return [norm] if groups else norm

        return answer

    def _scaled(self, total_norm: float) -> torch.Tensor:
        """The norm as DeepSpeed computes it before unscaling: times the loss scale (a device tensor: no sync)."""
        return torch.tensor(total_norm, dtype=torch.float32, device=self._device()) * self._scale

    def _measure(self, tracker: GradTracker) -> None:
        pipeline = tracker._pipeline
        tracker._parameters.refresh()
        grads = None if self.stage == 0 else self._fragments()
        amp = self._amp()
        self._scale = self._loss_scale() if self.stage else 1.0
        before = pipeline.step
        try:
            self._pending = pipeline.run(self._params, amp, grads=grads, defer_clip=True)
        finally:
            tracker._silence.measured(pipeline.step > before)

    def _apply(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        """In the optimizer's step, on what it is about to update: skip the update, or apply gradtrack's clip."""
        outcome = self._pending
        if outcome is None or not (outcome.skip or self.applies_clip):
            return
        grads = []
        for group in optimizer.param_groups:
            for param in group["params"]:
                if param.grad is None or id(param) in self._applied:
                    continue
                self._applied.add(id(param))
                if outcome.skip:
                    param.grad = None  # torch optimizers leave a parameter without a gradient untouched
                else:
                    grads.append(param.grad)
        if not grads:
            return
        with torch.no_grad():
            if self.value_bound is not None:
                torch._foreach_clamp_min_(grads, -self.value_bound)
                torch._foreach_clamp_max_(grads, self.value_bound)
            elif outcome.clip_coef != 1.0:  # NaN included: torch's clip multiplies by it too
                torch._foreach_mul_(grads, outcome.clip_coef)

    # -- what the engine holds ----------------------------------------------------------------------

    def _amp(self) -> AmpState | None:
        """The loss scale the gradients carry at the measurement: a ZeRO optimizer's (fp16), or a stage-0 torch
        autocast GradScaler's. DeepSpeed's stage-0 fp16 optimizers leave the loss unscaled in ``engine.backward``."""
        from gradtrack.measure.amp import AmpState

        engine = self.engine
        if self.stage == 0:
            scaler = getattr(engine, "torch_autocast_z0_gradscaler", None)
            if scaler is None:
                return None
            from gradtrack.measure.amp import scaler_state

            return scaler_state(scaler, engine.optimizer)
        scale = self._loss_scale()
        if isinstance(scale, torch.Tensor):
            return AmpState(scale, None)
        if scale == 1.0 and not engine.fp16_enabled():
            return None
        return AmpState(torch.tensor(scale, dtype=torch.float32, device=self._device()), None)

    def _loss_scale(self) -> float | torch.Tensor:
        """The factor a ZeRO optimizer's gradients carry: its loss scaler's (1 without one), or under torch autocast
        its GradScaler's (a device tensor, never read on the host)."""
        optimizer = self.engine.optimizer
        autocast = getattr(optimizer, "torch_autocast_gradscaler", None)
        if autocast is not None and autocast._scale is not None:
            scale: torch.Tensor = autocast._scale
            return scale
        try:
            return float(optimizer.loss_scale)
        except (AttributeError, TypeError):
            return 1.0

    def _device(self) -> torch.device:
        device = getattr(self.engine, "device", None)
        return torch.device(device) if device is not None else torch.device("cpu")

    def _fragments(self) -> list[torch.Tensor]:
        """This rank's part of each measured parameter's gradient, in the order of ``self._params`` (empty where it
        holds none), read from the ZeRO optimizer at the accumulation boundary."""
        optimizer = self.engine.optimizer
        held: dict[int, torch.Tensor] = {}
        if self.stage == 3:
            for index, group in enumerate(optimizer.fp16_groups):
                grads = optimizer.averaged_gradients.get(index)
                if grads is None:
                    continue
                for param, grad in zip(group, grads, strict=True):
                    held[id(param)] = grad
        else:
            for index, group in enumerate(optimizer.params_in_partition):
                held.update(self._partition_fragments(group, optimizer.averaged_gradients.get(index)))
        empty = next(iter(held.values()), torch.empty(0, device=self._device())).new_empty(0)
        return [held.get(id(p), empty) for p in self._params]

    def _partition_fragments(self, params: Sequence[nn.Parameter], grads: Any) -> dict[int, torch.Tensor]:
        """ZeRO-1/2: ``averaged_gradients[group]`` holds one tensor per parameter of the partition, in order (padding
        marked ``_zero_padding``), or a compact flat partition where ``_hp_mapping`` gives each fragment's place."""
        if grads is None:
            return {}
        flat = getattr(grads, "flat_partition", None)
        if flat is not None:
            out = {}
            for param in params:
                address = getattr(param, "_hp_mapping").get_hp_fragment_address()  # noqa: B009 (set by DeepSpeed)
                out[id(param)] = flat.view(-1).narrow(0, address.start, address.numel)
            return out
        tensors = [grad for grad in grads if not getattr(grad, "_zero_padding", False)]
        if len(tensors) < len(params):
            raise RuntimeError(self._layout_error(f"{len(tensors)} gradient fragments for {len(params)} parameters"))
        out = {}
        for param, grad in zip(params, tensors, strict=False):
            mapping = getattr(param, "_hp_mapping", None)
            if mapping is not None and grad.numel() != mapping.get_hp_fragment_address().numel:
                raise RuntimeError(self._layout_error("a gradient fragment of another size than its parameter's"))
            out[id(param)] = grad
        return out

    def _layout_error(self, found: str) -> str:
        return (
            f"gradtrack: this DeepSpeed version lays out ZeRO-{self.stage} gradients differently than gradtrack "
            f"reads them ({found}); gradtrack was tested with DeepSpeed {TESTED[1][0]}.{TESTED[1][1]}"
        )


def value_bound(policy: ClipPolicy | None) -> float | None:
    """The element bound of ``clip="value"``, applied by clamping where the optimizer steps."""
    return policy.clip_value if isinstance(policy, ValueClip) else None

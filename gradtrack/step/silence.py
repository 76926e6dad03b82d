"""Never watch nothing in silence: a tracker that sees training but measures nothing says so, and why.

A tracker measures in the step of an optimizer that updates the tracked model's parameters. When the
optimizer that steps updates other tensors (a DeepSpeed engine's flat partitions, a wrapper's fp32 copies,
an optimizer built on another module) or no gradient reaches the model, every step passes unmeasured and
the run would show nothing at all. ``Silence`` counts those steps; after ``PATIENCE`` of them with no step
measured it raises a ``UserWarning`` that names the likely cause and the fix, once, and at the end of a run
that measured nothing it says why in the summary (``Summary.unmeasured``) and the run's description.
"""

from __future__ import annotations

import warnings
from typing import final

__all__ = ["FOREIGN_PATIENCE", "PATIENCE", "Silence"]

PATIENCE = 3  # steps over the model that found no gradient, before the warning
# Steps of optimizers over other tensors, before the warning: more, since another model's optimizer may step
# several times before the tracked one's first step (a WGAN's critic, five times per generator step).
FOREIGN_PATIENCE = 10


@final
class Silence:
    """What a tracker saw but did not measure, and the warning it owes."""

    def __init__(self, model_class: str) -> None:
        self.model_class = model_class
        self.measured_steps = 0
        self.foreign_steps = 0  # optimizer steps that updated no parameter of the model
        self.foreign_optimizers: dict[str, None] = {}  # their class names, in order
        self.empty_steps = 0  # steps over the model's parameters that found no gradient
        self.warned = False

    def foreign(self, optimizer: object) -> None:
        """An optimizer stepped, and none of the tensors it updates is a tracked parameter."""
        if self.measured_steps:
            return
        self.foreign_steps += 1
        self.foreign_optimizers.setdefault(type(optimizer).__name__)
        self._maybe_warn()

    def measured(self, measured: bool) -> None:
        """A step of the model's optimizer: measured, or found no gradient on any parameter."""
        if measured:
            self.measured_steps += 1
            return
        if not self.measured_steps:
            self.empty_steps += 1
            self._maybe_warn()

    def cause(self) -> str | None:
        """Why nothing was measured (None once anything was)."""
        if self.measured_steps:
            return None
        model = self.model_class
        if self.foreign_steps:
            optimizers = ", ".join(self.foreign_optimizers)
            return (
                f"{self.foreign_steps} optimizer step(s) of {optimizers} updated tensors that are not parameters of "
                f"the tracked {model}, so gradtrack measured none. The optimizer that steps updates other tensors "
                "than the model's: a DeepSpeed engine's flat partitions (pass the engine: GradTracker(engine)), a "
                "wrapper's copies, or an optimizer built on another module; track the module whose parameters the "
                "optimizer updates"
            )
        if self.empty_steps:
            return (
                f"{self.empty_steps} optimizer step(s) over the parameters of {model} found no gradient on any of "
                "them: backward() did not reach this model (its parameters are frozen, or the loss does not depend "
                "on them), or the gradients were cleared before optimizer.step()"
            )
        return (
            f"the tracker saw no optimizer step of {model}: gradtrack measures inside optimizer.step() (or at "
            "tracker.step() for loops without a torch.optim optimizer), and none ran while it was active"
        )

    def finish(self) -> str | None:
        """At the end of a run that measured no step: the cause, warned now if it was not yet."""
        cause = self.cause()
        if cause is not None and not self.warned:
            self.warned = True
            warnings.warn(f"gradtrack measured nothing: {cause}", UserWarning, stacklevel=3)
        return cause

    def _maybe_warn(self) -> None:
        if self.warned or (self.empty_steps < PATIENCE and self.foreign_steps < FOREIGN_PATIENCE):
            return
        self.warned = True
        warnings.warn(f"gradtrack has measured nothing so far: {self.cause()}", UserWarning, stacklevel=4)

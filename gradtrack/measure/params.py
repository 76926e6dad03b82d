"""Which parameters a tracker measures, and their names, kept current while the model changes.

Fine-tuning changes the trained set mid-run: ``requires_grad_(True)`` on a frozen backbone, an optimizer's
``add_param_group`` (Lightning's ``BackboneFinetuning``), a parameter replaced under its name
(``resize_token_embeddings``), adapter modules added to the model. gradtrack measures and clips, at every
step, every parameter that has a gradient: the set ``clip_grad_norm_(model.parameters())`` sees, or with
``optimizer=``, that optimizer's current parameter groups (within the model).

Noticing a change costs nothing on a step where nothing changed. torch calls its global registration
hooks (``register_module_parameter_registration_hook``, ``register_module_module_registration_hook``) for
every parameter or module registered anywhere, which is how parameters and modules are added or replaced;
while a tracker is active they bump a counter, and a tracker walks ``named_parameters()`` again only when
that counter moved, and every ``RESCAN_EVERY`` steps for what those hooks cannot see (a module deleted, a
``_parameters`` entry written directly). Unfreezing needs no walk: frozen parameters are in the set
already, measured from the first step they have a gradient. An optimizer's groups are read again when
their sizes change.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Sequence
from typing import Any, final

import torch
from torch import nn
from torch.nn.modules.module import (
    register_module_module_registration_hook,
    register_module_parameter_registration_hook,
)
from torch.utils.hooks import RemovableHandle

__all__ = ["RESCAN_EVERY", "ParameterSet", "clean_name", "registrations"]

RESCAN_EVERY = 1000
_LEADING_WRAPPERS = ("module.",)  # DDP's, only in front: "module" is also a common name of a layer
_WRAPPER_SEGMENTS = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")  # anywhere


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


@final
class _Registrations:
    """A process-wide count of parameter and module registrations, counted while any tracker is active."""

    def __init__(self) -> None:
        self.count = 0
        self._lock = threading.Lock()
        self._watchers = 0
        self._handles: list[RemovableHandle] = []

    def _bump(self, *_: Any) -> None:
        self.count += 1

    def watch(self) -> None:
        with self._lock:
            self._watchers += 1
            if self._watchers == 1:
                self._handles = [
                    register_module_parameter_registration_hook(self._bump),
                    register_module_module_registration_hook(self._bump),
                ]

    def unwatch(self) -> None:
        with self._lock:
            self._watchers -= 1
            if self._watchers == 0:
                for handle in self._handles:
                    handle.remove()
                self._handles = []


registrations = _Registrations()


@final
class ParameterSet:
    """The model's parameters (frozen ones too), their cleaned names and their order in the model."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.params: list[nn.Parameter] = []
        self.names: dict[int, str] = {}  # id(parameter) -> cleaned name
        self.positions: dict[int, int] = {}  # id(parameter) -> its index in named_parameters()
        self.version = 0  # moves when the set of parameters changed
        self._seen = -1
        self._steps = 0
        self._of_optimizer: weakref.WeakKeyDictionary[torch.optim.Optimizer, tuple[Any, list[nn.Parameter]]] = (
            weakref.WeakKeyDictionary()
        )
        self._scan()

    def trainable(self) -> list[tuple[str, nn.Parameter]]:
        """The parameters that would train now (``requires_grad``), with their names."""
        return [(self.names[id(p)], p) for p in self.params if p.requires_grad]

    def refresh(self) -> None:
        """Once per step: walk the model again if a registration happened, or every ``RESCAN_EVERY`` steps."""
        self._steps += 1
        if registrations.count != self._seen or self._steps >= RESCAN_EVERY:
            self._seen, self._steps = registrations.count, 0
            self._scan()

    def _scan(self) -> None:
        named = [(clean_name(name), param) for name, param in self.model.named_parameters()]
        if [id(p) for _, p in named] == [id(p) for p in self.params]:
            return
        self.params = [param for _, param in named]
        self.names = {id(param): name for name, param in named}
        self.positions = {id(param): position for position, (_, param) in enumerate(named)}
        self.version += 1

    def of(self, optimizer: torch.optim.Optimizer) -> list[nn.Parameter]:
        """The model's parameters among ``optimizer``'s groups, in the groups' order; read again when the
        groups change size or the model's parameters changed."""
        groups = optimizer.param_groups
        key = (self.version, len(groups), sum(len(group["params"]) for group in groups))
        cached = self._of_optimizer.get(optimizer)
        if cached is None or cached[0] != key:
            names = self.names
            params = [p for group in groups for p in group["params"] if id(p) in names]
            cached = self._of_optimizer[optimizer] = (key, params)
        return cached[1]

    def name_list(self, params: Sequence[nn.Parameter]) -> list[str]:
        return [self.names[id(p)] for p in params]

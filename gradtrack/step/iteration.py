"""One training iteration, recognised across the optimizer steps that make it: several optimizers over one model
make one gradtrack step, and an optimizer made anew mid-run starts a new one."""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from typing import final

import torch
from torch import nn

from gradtrack.measure.params import ParameterSet

__all__ = ["Iteration"]


@final
class Iteration:
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

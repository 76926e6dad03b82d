"""The benchmark's models, their fixed data and the fast loop's timed steps (issue 5)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

__all__ = ["MODELS", "ModelSpec", "Net", "fast_mlp", "tensor_list", "timed_steps"]


class Net(nn.Module):
    """``depth`` square linear layers of ``width`` (2 tensors each), residual so deep stacks train.

    Residual branches are scaled by ``1/sqrt(depth)`` (GPT-2's scaled residual initialisation): unscaled,
    500 residual layers start at a gradient norm of 37,000, above gradtrack's absolute explosion floor, and
    every benchmarked step was an explosion rather than the healthy step the tables mean to measure.
    """

    def __init__(self, depth: int, width: int, residual: bool) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(width, width) for _ in range(depth))
        self.residual = residual
        self.branch_scale = depth**-0.5

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = x + self.branch_scale * torch.tanh(layer(x)) if self.residual else torch.tanh(layer(x))
        return x


class SimpleRNN(nn.Module):
    """The seed's vanilla RNN (``../shared/seeds/000_*.txt``), with a linear read-out."""

    def __init__(self, input_size: int, hidden_size: int) -> None:
        super().__init__()
        self.W_h = nn.Linear(hidden_size, hidden_size, bias=False)
        self.W_x = nn.Linear(input_size, hidden_size)
        self.readout = nn.Linear(hidden_size, input_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, seq_len, _ = x.shape
        h = x.new_zeros(batch, self.W_h.in_features)
        for t in range(seq_len):
            h = torch.tanh(self.W_h(h) + self.W_x(x[:, t, :]))
        return self.readout(h)


@dataclass(frozen=True)
class ModelSpec:
    """A model and the shape of its (fixed, random) batch; ``quick`` is the small variant."""

    key: str
    title: str
    build: Callable[[bool], nn.Module]
    input_shape: Callable[[bool], tuple[int, ...]]
    target_shape: Callable[[bool], tuple[int, ...]]

    def make(self, quick: bool, device: torch.device, seed: int = 0) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
        torch.manual_seed(seed)
        model = self.build(quick).to(device)
        x = torch.randn(self.input_shape(quick), device=device)
        y = torch.randn(self.target_shape(quick), device=device)
        return model, x, y


def _wide(quick: bool) -> nn.Module:
    return Net(depth=50, width=128 if quick else 566, residual=False)  # 100 tensors, 16.0M parameters


def _many(quick: bool) -> nn.Module:
    return Net(depth=100 if quick else 500, width=32, residual=True)  # 1,000 tensors of 1K or 32 elements


def _rnn(quick: bool) -> nn.Module:
    return SimpleRNN(input_size=32, hidden_size=128 if quick else 512)


MODELS: dict[str, ModelSpec] = {
    "wide": ModelSpec(
        "wide", "wide MLP, 50 x Linear(566)", _wide,
        lambda q: (32, 128 if q else 566), lambda q: (32, 128 if q else 566),
    ),
    "many": ModelSpec(
        "many", "many small tensors, 500 x Linear(32), residual", _many,
        lambda q: (64, 32), lambda q: (64, 32),
    ),
    "rnn": ModelSpec(
        "rnn", "vanilla RNN (seed's SimpleRNN), hidden 512, 64 time steps", _rnn,
        lambda q: (32, 16 if q else 64, 32), lambda q: (32, 32),
    ),
}  # fmt: skip


def tensor_list(count: int, numel: int, device: torch.device) -> nn.ParameterList:
    """``count`` parameters of ``numel`` elements with random gradients: the scaling table's model."""
    params = nn.ParameterList(nn.Parameter(torch.randn(numel, device=device)) for _ in range(count))
    for param in params:
        param.grad = torch.randn_like(param)
    return params


def fast_mlp() -> tuple[nn.Module, torch.optim.Optimizer, torch.Tensor, torch.Tensor]:
    """The fast loop's model: a 6-tensor MLP well under a millisecond a step, its optimizer and one batch."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 1))
    return model, torch.optim.SGD(model.parameters(), lr=1e-3), torch.randn(64, 32), torch.randn(64, 1)


def timed_steps(
    model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor, tracker: Any, steps: int,
    before_step: Callable[[int], None] | None = None,
) -> tuple[list[float], list[float]]:  # fmt: skip
    """The loop users write, ``steps`` times: wall seconds and the process's CPU seconds of each step."""
    wall, cpu = [], []
    for step in range(steps):
        if before_step is not None:
            before_step(step)
        began, began_cpu = time.perf_counter(), time.process_time()
        optimizer.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        tracker.observe(loss)
        optimizer.step()
        wall.append(time.perf_counter() - began)
        cpu.append(time.process_time() - began_cpu)
    return wall, cpu

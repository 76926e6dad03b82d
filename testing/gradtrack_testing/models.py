"""The tests' tiny real models, their fixed batches and the training loop users write, all on the CPU.

Why it exists: tests check gradtrack against PyTorch's own reference functions on small real models;
sharing one set keeps the numbers comparable across test modules and lets spawned ranks and
subprocesses build the same models.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = ["VanillaRNN", "WideQuadratic", "mlp", "regression_batches", "rnn_batch", "spread_curvature", "train_steps"]


class VanillaRNN(nn.Module):
    """The seed's SimpleRNN with a readout; ``radius`` sets the recurrent spectral radius."""

    def __init__(self, input_size: int = 4, hidden: int = 32, radius: float = 1.0, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        generator = torch.Generator().manual_seed(seed)
        self.W_x = nn.Linear(input_size, hidden)
        self.W_h = nn.Linear(hidden, hidden, bias=False)
        self.readout = nn.Linear(hidden, 1)
        with torch.no_grad():
            weight = torch.randn(hidden, hidden, generator=generator)
            weight *= radius / torch.linalg.eigvals(weight).abs().max()
            self.W_h.weight.copy_(weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.zeros(x.shape[0], self.W_h.in_features)
        for t in range(x.shape[1]):
            h = torch.tanh(self.W_h(h) + self.W_x(x[:, t]))
        return self.readout(h).squeeze(-1)


def mlp(seed: int = 0, width: int = 16) -> nn.Module:
    """Three linear layers with tanh between them, 8 inputs, 1 output."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh(), nn.Linear(width, 1))


def rnn_batch(length: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """One fixed batch of 16 sequences of 4 features for ``VanillaRNN``, and a target per sequence."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(16, length, 4, generator=generator), torch.randn(16, generator=generator)


def train_steps(tracker: Any, model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
                steps: int) -> None:  # fmt: skip
    """The loop users write, ``steps`` times on one batch, the loss observed."""
    for _ in range(steps):
        optimizer.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        tracker.observe(loss)
        optimizer.step()


def regression_batches(n: int, seed: int = 0, batch: int = 32) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``n`` batches of a noisy linear regression on 8 features (for ``mlp``)."""
    generator = torch.Generator().manual_seed(seed)
    weights = torch.randn(8, generator=generator)
    batches = []
    for _ in range(n):
        x = torch.randn(batch, 8, generator=generator)
        y = x @ weights + 0.3 * torch.randn(batch, generator=generator)
        batches.append((x, y))
    return batches


class WideQuadratic(nn.Module):
    """``0.5 sum(h_i w_i^2)`` over a tensor too large to be read whole under a small overshoot budget, and a small
    one: with SGD the overshoot ratio is exactly ``lr x h`` where ``h`` is the same everywhere, and a weighted mean of
    ``lr x h`` where it is not (the sampled indicator's tests, in one process and under FSDP2)."""

    def __init__(self, curvature: torch.Tensor, small: int = 30_000) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.h: torch.Tensor
        self.register_buffer("h", curvature)
        self.big = nn.Parameter(torch.randn(curvature.numel() - small, generator=generator, dtype=torch.float64))
        self.small = nn.Parameter(torch.randn(small, generator=generator, dtype=torch.float64))

    def forward(self) -> torch.Tensor:
        w = torch.cat([self.big, self.small])
        return 0.5 * (self.h * w * w).sum()


def spread_curvature(n: int = 300_000, small: int = 30_000) -> torch.Tensor:
    """Curvatures spread over [5, 10] along ``WideQuadratic``'s large tensor and over [1, 2] on its small one."""
    curvature = torch.rand(n, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    curvature[:-small] = 5.0 + 5.0 * curvature[:-small]
    curvature[-small:] = 1.0 + curvature[-small:]
    return curvature

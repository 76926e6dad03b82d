"""The hot path makes one device-to-host transfer per step (issue 5).

A ``TorchFunctionMode`` sees every tensor method and torch function called from Python, so it counts
the calls that copy device data to the host (``.item()``, ``.tolist()``, ``.numpy()``, ``.cpu()``,
``float(t)``, ``bool(t)``, ``.to("cpu")`` ...) or that force a host synchronisation to size their result
(``nonzero``, ``unique``, ``masked_select``) while ``optimizer.step()`` runs under a ``GradTracker``.
The sanity tests prove the counter does catch the per-parameter loops gradtrack replaces.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from gradtrack import GradTracker
from gradtrack.measure.stats import GradBatch
from gradtrack_testing.seed import detect_exploding_gradients

_TO_HOST = {
    torch.Tensor.item,
    torch.Tensor.tolist,
    torch.Tensor.numpy,
    torch.Tensor.cpu,
    torch.Tensor.__float__,
    torch.Tensor.__int__,
    torch.Tensor.__bool__,
    torch.Tensor.__index__,
    torch.Tensor.__complex__,
    torch.Tensor.__array__,
    torch.Tensor.__format__,
    torch.Tensor.__repr__,
    torch.Tensor.__str__,
}
_SIZED_BY_DATA = {
    torch.Tensor.nonzero,
    torch.nonzero,
    torch.Tensor.unique,
    torch.unique,
    torch.Tensor.masked_select,
    torch.masked_select,
}
_MOVES = {torch.Tensor.to, torch.Tensor.copy_}


def _cpu_target(func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    """``t.to(<cpu>)`` or ``cpu_tensor.copy_(t)`` with ``t`` on another device."""
    if func is torch.Tensor.copy_:
        dst, src = args[0], args[1] if len(args) > 1 else kwargs.get("src")
        return isinstance(src, torch.Tensor) and dst.device.type == "cpu" and src.device.type != "cpu"
    source: torch.Tensor = args[0]
    if source.device.type == "cpu":
        return False
    targets = [*args[1:], kwargs.get("device")]
    for target in targets:
        if isinstance(target, torch.Tensor):
            target = target.device
        if isinstance(target, str | torch.device) and torch.device(target).type == "cpu":
            return True
    return False


class TransferCounter(TorchFunctionMode):
    """Counts, by name, the calls that bring tensor data to the host."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: Counter[str] = Counter()

    @property
    def total(self) -> int:
        return sum(self.calls.values())

    def __torch_function__(
        self,
        func: Callable[..., Any],
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        kwargs = kwargs or {}
        if func in _TO_HOST or func in _SIZED_BY_DATA or (func in _MOVES and _cpu_target(func, args, kwargs)):
            self.calls[getattr(func, "__name__", repr(func))] += 1
        return func(*args, **kwargs)


@contextmanager
def counting() -> Iterator[TransferCounter]:
    with TransferCounter() as counter:
        yield counter


class Net(nn.Module):
    def __init__(self, layers: int = 6, width: int = 8) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(width, width) for _ in range(layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = torch.tanh(layer(x))
        return x


def _backward(model: nn.Module, scale: float = 1.0) -> torch.Tensor:
    torch.manual_seed(1)
    x = torch.randn(4, 8, dtype=next(model.parameters()).dtype)
    loss = model(x).square().mean() * scale
    loss.backward()
    return loss


class LeakyClip:
    """A clip policy with the classic mistake: a host read per tensor inside the hot path."""

    name = "leaky"

    def clip_(self, batch: GradBatch) -> torch.Tensor | None:
        for norm in batch.layer_norms:
            if norm.item() > 1e9:
                raise AssertionError("unreachable")
        return None

    def observe(self, total_norm: float, clip_coef: float) -> None:
        pass

    def config(self) -> dict[str, Any]:
        return {"clip": self.name}


# -- the counter counts ---------------------------------------------------------------------------


def test_counter_counts_the_seed_per_parameter_loop() -> None:
    model = Net()
    _backward(model)
    with counting() as counter:
        detect_exploding_gradients(model)
    tensors = len(list(model.parameters()))
    assert counter.calls["item"] == 3 * tensors
    assert counter.total > 1


def test_counter_sees_host_reads_inside_the_tracked_step() -> None:
    model = Net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    with GradTracker(model, clip=LeakyClip(), layer_every=1):
        _backward(model)
        with counting() as counter:
            optimizer.step()
    assert counter.calls["item"] == len(list(model.parameters()))
    assert counter.total > 1


def test_counter_sees_every_kind_of_host_read() -> None:
    scalar, vector = torch.tensor(2.0), torch.ones(3)
    with counting() as counter:
        scalar.item(), float(scalar), int(scalar), bool(scalar), f"{scalar}"
        vector.tolist(), vector.numpy(), vector.cpu(), vector.nonzero()
    assert counter.total == 9


# -- the tracked step makes one transfer -----------------------------------------------------------

_CONFIGS: dict[str, dict[str, Any]] = {
    "monitor-only": {"clip": None},
    "norm clip": {"clip": "norm", "max_norm": 0.01},
    "norm clip, inf-norm": {"clip": "norm", "max_norm": 0.01, "norm_type": "inf"},
    "value clip": {"clip": "value", "clip_value": 1e-3},
    "adaptive clip": {"clip": "adaptive"},
    "layer metrics every step": {"clip": "norm", "layer_every": 1},
    "no layer metrics": {"clip": "norm", "layer_every": None},
    "overshoot indicator every step": {"clip": "norm", "max_norm": 0.01, "overshoot_every": 1},
}


@pytest.mark.parametrize("options", _CONFIGS.values(), ids=_CONFIGS.keys())
@pytest.mark.parametrize("losses", [0, 1, 2], ids=["no loss", "observed loss", "accumulated losses"])
def test_one_transfer_per_optimizer_step(options: dict[str, Any], losses: int) -> None:
    model = Net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    counts = []
    with GradTracker(model, **options) as tracker:
        for step in range(25):  # past the detectors' warm-up, so every branch of the step runs
            optimizer.zero_grad()
            loss = _backward(model, scale=1e6 if step == 20 else 1.0)  # step 20 explodes
            for _ in range(losses):
                tracker.observe(loss=loss)
            with counting() as counter:
                optimizer.step()
            counts.append(counter.total)
    assert tracker.summary().explosions >= 1
    assert max(counts) == 1, f"device-to-host transfers per step: {counts}"


def test_one_transfer_on_nonfinite_and_skipped_steps() -> None:
    model = Net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    with GradTracker(model, layer_every=1, on_nonfinite="skip") as tracker:
        optimizer.zero_grad()
        _backward(model)
        model.layers[2].weight.grad[0, 0] = float("nan")  # type: ignore[index]
        tracker.observe(loss=torch.tensor(float("nan")))
        with counting() as counter:
            optimizer.step()
    assert tracker.summary().skipped_steps == 1
    assert counter.total == 1, dict(counter.calls)


def test_one_transfer_with_mixed_dtypes_and_manual_step() -> None:
    model = Net()
    model.layers[0].double()
    with GradTracker(model, layer_every=1) as tracker:
        out = model.layers[0](torch.randn(4, 8, dtype=torch.float64)).float()
        for layer in list(model.layers)[1:]:
            out = layer(out)
        out.square().mean().backward()
        with counting() as counter:
            tracker.step()  # the loop without a torch.optim optimizer
    assert counter.total == 1, dict(counter.calls)
    assert tracker.steps == 1


def test_one_transfer_for_a_bf16_model() -> None:
    model = Net().to(torch.bfloat16)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)  # AdamW reads its bf16 step counts itself
    with GradTracker(model, layer_every=1) as tracker:
        for _ in range(3):
            optimizer.zero_grad()
            tracker.observe(_backward(model))
            with counting() as counter:
                optimizer.step()
            assert counter.total == 1, dict(counter.calls)


def test_one_transfer_under_amp_with_a_fused_optimizer_including_overflow_steps() -> None:
    model = Net()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, fused=True)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    counts = []
    with GradTracker(model, scaler=scaler, layer_every=1) as tracker:
        for step in range(4):
            optimizer.zero_grad()
            torch.manual_seed(1)
            loss = model(torch.randn(4, 8)).square().mean()
            scaler.scale(loss).backward()
            tracker.observe(loss)
            if step == 2:
                model.layers[0].weight.grad[0, 0] = float("inf")  # type: ignore[index]
            with counting() as counter:
                scaler.step(optimizer)  # the scaler's fused path reads nothing; the found-inf flag rides along
            counts.append(counter.total)
            scaler.update()
    assert tracker.summary().amp_overflow_steps == 1
    assert counts == [1, 1, 1, 1], counts

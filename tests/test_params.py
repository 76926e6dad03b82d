"""Every parameter with a gradient is measured and clipped at every step, as the trained set changes (issue 17).

Each case trains a tracked model and an untracked twin through the same change of the trained set
(unfreezing, ``add_param_group``, a parameter replaced under its name, a module added); the twin clips
with torch's own functions over ``model.parameters()``. The tracked model must train bitwise like the
twin, report torch's norms, and name the new layers.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

import gradtrack.measure.params
from gradtrack import GradTracker
from gradtrack.measure.params import RESCAN_EVERY
from gradtrack_testing.recording import RecordingBackend


class Net(nn.Module):
    """A 3-layer MLP that may grow a residual adapter."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.first = nn.Linear(8, 16)
        self.second = nn.Linear(16, 16)
        self.head = nn.Linear(16, 1)
        self.adapter: nn.Module | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = torch.tanh(self.second(torch.tanh(self.first(x))))
        if self.adapter is not None:
            hidden = hidden + self.adapter(hidden)
        return self.head(hidden).squeeze(-1)


def _batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(step)
    x = torch.randn(32, 8, generator=generator)
    return x, 50.0 * x.sum(-1)  # large targets: gradients far above max_norm, so clipping matters


def _unfreeze(net: Net, optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    net.first.requires_grad_(True)
    return optimizer


def _add_param_group(net: Net, optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    net.first.requires_grad_(True)
    optimizer.add_param_group({"params": list(net.first.parameters())})
    return optimizer


def _replace(net: Net, optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    net.head.weight = nn.Parameter(net.head.weight.detach() * 3.0)  # as resize_token_embeddings does
    return torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=0.01)


def _add_module(net: Net, optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    torch.manual_seed(1)
    net.adapter = nn.Linear(16, 16)
    optimizer.add_param_group({"params": list(net.adapter.parameters())})
    return optimizer


CHANGES: dict[str, tuple[Callable[[Net, torch.optim.Optimizer], torch.optim.Optimizer], set[str]]] = {
    "unfreeze": (_unfreeze, {"first.weight", "first.bias"}),
    "add_param_group": (_add_param_group, {"first.weight", "first.bias"}),
    "replaced": (_replace, set()),  # same name, another Parameter: nothing new to announce
    "added_module": (_add_module, {"adapter.weight", "adapter.bias"}),
}
CLIPS: dict[str, dict[str, Any]] = {
    "norm": {"clip": "norm", "max_norm": 1.0},
    "value": {"clip": "value", "clip_value": 0.05},
    "none": {"clip": None},
}


def _reference_clip(params: list[nn.Parameter], clip: str) -> None:
    if clip == "norm":
        torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True)
    elif clip == "value":
        torch.nn.utils.clip_grad_value_(params, 0.05, foreach=True)


# A replaced parameter needs a new optimizer, which is not the one given to the tracker: only "all" applies.
HOOKED = [
    (hooked, change) for hooked in ("all", "given") for change in CHANGES if (hooked, change) != ("given", "replaced")
]


@pytest.mark.parametrize("clip", list(CLIPS))
@pytest.mark.parametrize(("hooked", "change"), HOOKED, ids=[f"{h}-{c}" for h, c in HOOKED])
def test_a_changing_parameter_set_is_measured_and_clipped_like_torch(change: str, clip: str, hooked: str) -> None:
    apply, new_names = CHANGES[change]
    net = Net()
    net.first.requires_grad_(change not in ("unfreeze", "add_param_group"))
    twin = copy.deepcopy(net)
    optimizers = [torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.01) for m in (net, twin)]
    if change == "unfreeze":  # an optimizer built over every parameter, frozen ones included
        optimizers = [torch.optim.SGD(m.parameters(), lr=0.01) for m in (net, twin)]
    recorder = RecordingBackend()
    expected_norms = []
    options = {"optimizer": optimizers[0]} if hooked == "given" else {}
    with GradTracker(net, backend=recorder, layer_every=1, **CLIPS[clip], **options) as tracker:  # type: ignore[arg-type]
        for step in range(6):
            if step == 3:
                optimizers = [apply(m, o) for m, o in zip((net, twin), optimizers, strict=True)]
            x, y = _batch(step)
            for model, optimizer in zip((net, twin), optimizers, strict=True):
                optimizer.zero_grad()
                nn.functional.mse_loss(model(x), y).backward()
            # what torch clips: model.parameters(), or with optimizer=, that optimizer's groups in their order
            watched = (
                list(twin.parameters())
                if hooked == "all"
                else [p for group in optimizers[1].param_groups for p in group["params"]]
            )
            expected_norms.append(torch.nn.utils.get_total_norm([p.grad for p in watched if p.grad is not None]).item())
            _reference_clip(watched, clip)
            optimizers[0].step()  # gradtrack measures and clips here
            optimizers[1].step()
            for (name, tracked), reference in zip(net.named_parameters(), twin.parameters(), strict=True):
                assert torch.equal(tracked, reference), f"step {step}: {name} trained differently"
    steps = recorder.of("step")
    assert [s.total_norm for s in steps] == expected_norms  # torch's own norms, to the bit
    after = set(steps[-1].layer_norms or {})
    assert after == {name for name, p in net.named_parameters() if p.grad is not None}
    added = recorder.of("layers_added")
    assert {name for event in added for name in event.names} == new_names
    assert all(event.step == 3 for event in added)
    if clip == "norm":
        assert all(s.clipped for s in steps) and tracker.summary().clipped_steps == 6


def test_noticing_costs_no_walk_over_the_model_on_a_step_where_nothing_changed() -> None:
    net = Net()
    optimizer = torch.optim.SGD(net.parameters(), lr=0.01)
    walks = 0
    original = net.named_parameters

    def counting(*args: Any, **kwargs: Any) -> Any:
        nonlocal walks
        walks += 1
        return original(*args, **kwargs)

    net.named_parameters = counting  # type: ignore[method-assign]
    with GradTracker(net) as tracker:
        walks = 0
        for step in range(60):
            if step == 30:
                nn.Linear(2, 2)  # a module built elsewhere: one walk, which finds nothing new
            x, y = _batch(step)
            optimizer.zero_grad()
            nn.functional.mse_loss(net(x), y).backward()
            optimizer.step()
        assert walks == 1
        assert tracker.steps == 60 and RESCAN_EVERY > 60


def test_a_parameter_written_behind_torchs_back_is_found_by_the_periodic_walk(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(gradtrack.measure.params, "RESCAN_EVERY", 25)
    net = Net()
    with GradTracker(net, layer_every=1, backend=(recorder := RecordingBackend())) as tracker:
        net.head._parameters["bias"] = nn.Parameter(torch.zeros(1))  # no registration hook sees this
        for step in range(26):
            x, y = _batch(step)
            net.zero_grad()
            nn.functional.mse_loss(net(x), y).backward()
            tracker.step()
    measured = [("head.bias" in (s.layer_norms or {})) for s in recorder.of("step")]
    assert not measured[0] and measured[-1]  # the new bias is measured from the rescan on

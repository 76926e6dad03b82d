"""The hand-over protocol: typed messages built by keyword, each with its back-pressure class (issue 17)."""

from __future__ import annotations

import math
import os
import pickle
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import gradtrack.delivery.reporter
import gradtrack.handover.channel
from gradtrack import GradTracker
from gradtrack.delivery.dispatch import drops
from gradtrack.events import LayersAdded
from gradtrack.handover.channel import decode, encode
from gradtrack.handover.messages import Diverged, Keep, LayersAnnounced, LayoutAnnounced, RunEnded, StepRecord
from gradtrack_testing import probe_plugin

floats = st.floats(allow_nan=True, allow_infinity=True, width=64)
norms = st.none() | st.lists(st.floats(0, 1e30), max_size=5).map(lambda v: np.array(v, dtype=np.float64).tobytes())


@given(step=st.integers(0, 2**62), total_norm=floats, clip_coef=floats, nonfinite=st.integers(0, 2**31 - 1),
       loss=st.none() | floats, flags=st.lists(st.booleans(), min_size=7, max_size=7),
       layout=st.integers(-1, 2**31 - 1), layer_norms=norms, weight_norms=norms)  # fmt: skip
def test_a_step_record_crosses_the_pipe_unchanged(
    step: int, total_norm: float, clip_coef: float, nonfinite: int, loss: float | None, flags: list[bool],
    layout: int, layer_norms: bytes | None, weight_norms: bytes | None,
) -> None:  # fmt: skip
    names = ("clipped", "explosion", "diverged", "skipped", "amp_overflow", "reported", "with_layers")
    record = StepRecord(step=step, timestamp=time.time(), total_norm=total_norm, clip_coef=clip_coef,
                        nonfinite=nonfinite, loss=loss, layout=layout, layer_norms=layer_norms or None,
                        weight_norms=weight_norms or None, **dict(zip(names, flags, strict=True)))  # fmt: skip
    frame = encode([record])
    (crossed,) = decode(memoryview(frame)[4:])
    for copy in (crossed, pickle.loads(pickle.dumps(record))):
        assert type(copy) is StepRecord
        for name, sent, received in zip(StepRecord._fields, record, copy, strict=True):
            assert _same(sent, received), name


def _same(sent: object, received: object) -> bool:
    if isinstance(sent, float) and math.isnan(sent):
        return isinstance(received, float) and math.isnan(received)
    return sent == received and type(sent) is type(received)


def test_messages_are_built_by_keyword_and_declare_how_they_may_be_dropped() -> None:
    with pytest.raises(TypeError):
        StepRecord(3, 0.0, 1.0)  # type: ignore[misc]
    routine = StepRecord(step=3, timestamp=0.0, total_norm=1.0)
    flagged = StepRecord(step=4, timestamp=0.0, total_norm=1.0, skipped=True)
    layout = LayoutAnnounced(key=1, positions=(0, 1))
    assert (routine.keep, flagged.keep, layout.keep) == (Keep.ROUTINE, Keep.FLAGGED, Keep.ALWAYS)
    assert LayersAnnounced.keep is Diverged.keep is RunEnded.keep is Keep.ALWAYS
    backlog, bound = 5, 5
    assert drops(routine.keep, routine.step, backlog, bound, 10) and not drops(routine.keep, 10, backlog, bound, 10)
    assert not drops(flagged.keep, flagged.step, backlog, bound, 10)
    assert drops(flagged.keep, flagged.step, 10 * bound, bound, 10)  # past the hard bound
    assert not drops(layout.keep, 0, 1000 * bound, bound, 10)  # never


def test_a_step_record_is_smaller_on_the_wire_than_its_pickle() -> None:
    record = StepRecord(step=12345, timestamp=time.time(), total_norm=1.5, loss=0.25, reported=True, layout=0,
                        layer_norms=np.ones(10).tobytes())  # fmt: skip
    assert len(encode([record])) < len(pickle.dumps([tuple(record)], protocol=pickle.HIGHEST_PROTOCOL))


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.first, self.second = nn.Linear(4, 8), nn.Linear(8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(torch.tanh(self.first(x)))


def test_a_new_layout_survives_a_reporter_far_behind(probe: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The reporter is stopped until the hand-over is past its hard bound; a layer unfrozen then still arrives
    by name once it catches up (the layout announcing it is never dropped)."""
    monkeypatch.setattr(gradtrack.handover.channel, "_PIPE_SIZE", 4096)  # a full pipe after a few records
    monkeypatch.setattr(gradtrack.delivery.reporter, "_MAX_BYTES", 1)  # then messages wait, and are dropped by rule
    net = _Net()
    net.first.requires_grad_(False)
    optimizer = torch.optim.SGD(net.parameters(), lr=1e-3)
    options = {"probe": {"path": str(probe)}}
    with pytest.warns(RuntimeWarning, match="reporter process is falling behind"), \
            GradTracker(net, backend="probe", backend_options=options, max_pending=2, layer_every=1,
                        explosion_threshold=1e-9, clip=None) as tracker:  # fmt: skip
        reporter = tracker._pipeline.outbox.reporter  # private: the process to stop
        assert reporter is not None
        os.kill(reporter.process.pid, signal.SIGSTOP)
        try:
            for step in range(80):
                if step == 40:  # every step explodes: 2 flagged messages a step, far past 10 x max_pending
                    net.first.requires_grad_(True)
                net(torch.randn(8, 4)).square().mean().backward()
                optimizer.step()
                optimizer.zero_grad()
            assert reporter.dropped > 0
        finally:
            os.kill(reporter.process.pid, signal.SIGCONT)
        assert tracker.flush(timeout=30)  # the reporter caught up
        for _ in range(20):  # and takes each of these steps as it comes
            net(torch.randn(8, 4)).square().mean().backward()
            optimizer.step()
            optimizer.zero_grad()
            time.sleep(0.1)
        assert tracker.flush(timeout=30)
    delivered = probe_plugin.read(probe)
    late = [line for line in delivered if line["hook"] == "step" and line["step"] >= 80]
    assert len(late) == 20 and all("first.weight" in (line["layer_norms"] or {}) for line in late)
    assert [line["names"] for line in delivered if line["hook"] == "layers_added"] == [["first.weight", "first.bias"]]


def test_layers_added_is_a_frozen_event() -> None:
    event = LayersAdded(step=3, names=("a",))
    with pytest.raises(AttributeError):
        event.step = 4  # type: ignore[misc]

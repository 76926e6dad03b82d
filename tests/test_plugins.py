"""Backend discovery through pluggy and the ``gradtrack`` entry-point group."""

from __future__ import annotations

import os
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pluggy
import pytest

from gradtrack import BackendUnavailableError, GradTracker, UnknownBackendError, available_backends, hookimpl
from gradtrack.delivery.console import ConsoleBackend
from gradtrack.delivery.plugins import AUTOLOAD_ENV, resolve_backends
from gradtrack.events import StepStats
from gradtrack_testing.models import mlp
from gradtrack_testing.recording import RecordingBackend

PLUGIN_SOURCE = """
import os
import sys

from gradtrack import hookimpl


class Collector:
    def __init__(self, label, path):
        self.label = label
        self.path = path

    @hookimpl
    def gradtrack_step(self, stats):
        with open(self.path, "a") as file:
            file.write(f"{self.label} {stats.step} {os.getpid()} {'torch' in sys.modules}\\n")


@hookimpl
def gradtrack_make_backend(name, options):
    return Collector(**options) if name == "collector" else None
"""


@pytest.fixture
def installed_plugin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A third-party distribution on sys.path, found through its entry-point metadata only."""
    (tmp_path / "gradtrack_collector.py").write_text(PLUGIN_SOURCE)
    dist_info = tmp_path / "gradtrack_collector-1.0.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text("Metadata-Version: 2.1\nName: gradtrack-collector\nVersion: 1.0\n")
    (dist_info / "entry_points.txt").write_text(
        textwrap.dedent("""
            [gradtrack]
            collector = gradtrack_collector
        """)
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "gradtrack_collector"
    sys.modules.pop("gradtrack_collector", None)


def test_entry_point_plugin_is_discovered_and_receives_steps_in_the_reporter(
    installed_plugin: str, tmp_path: Path
) -> None:
    assert {"collector", "console", "mlflow", "wandb"} <= set(available_backends())
    model = mlp()
    received = tmp_path / "received.txt"
    options = {"collector": {"label": "x", "path": str(received)}}
    with GradTracker(model, backend="collector", backend_options=options) as tracker:
        for _ in range(3):
            model(__import__("torch").randn(2, 8)).sum().backward()
            tracker.step()
    lines = [line.split() for line in received.read_text().splitlines()]
    assert [(label, int(step)) for label, step, _, _ in lines] == [("x", 0), ("x", 1), ("x", 2)]
    assert {int(pid) for _, _, pid, _ in lines} != {os.getpid()}  # named: run by the reporter process
    assert {torch for _, _, _, torch in lines} == {"False"}  # which never imports torch


def test_autoload_can_be_disabled(installed_plugin: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(AUTOLOAD_ENV, "1")
    assert available_backends() == ["console"]
    with pytest.raises(UnknownBackendError, match=f"disabled by {AUTOLOAD_ENV}"):
        resolve_backends("collector")
    assert installed_plugin not in sys.modules


def test_discovery_is_lazy() -> None:
    code = "import sys, gradtrack; assert 'mlflow' not in sys.modules and 'wandb' not in sys.modules"
    assert __import__("subprocess").run([sys.executable, "-c", code]).returncode == 0


def test_unknown_backend_lists_installed_ones_and_the_extra() -> None:
    with pytest.raises(UnknownBackendError) as caught:
        resolve_backends("tensorboard")
    assert "backend='tensorboard' is not installed; installed backends: [" in str(caught.value)
    assert "'console'" in str(caught.value)
    with (
        pytest.raises(UnknownBackendError, match=r"pip install 'gradtrack\[mlflow\]'"),
        pytest.MonkeyPatch.context() as patch,
    ):
        patch.setenv(AUTOLOAD_ENV, "1")
        resolve_backends("mlflow")


def test_backend_forms_and_their_errors(recorder: RecordingBackend) -> None:
    assert resolve_backends(None) == []
    [(name, console)] = resolve_backends("console", {"console": {"every": 3}})
    assert name == "console" and isinstance(console, ConsoleBackend) and console.every == 3
    pairs = resolve_backends(["console", recorder])
    assert [n for n, _ in pairs] == ["console", "RecordingBackend"] and pairs[1][1] is recorder
    with pytest.raises(TypeError, match="pass an instance"):
        resolve_backends(RecordingBackend)
    with pytest.raises(ValueError, match=r"backend_options has entries for \['mlflow'\]"):
        resolve_backends("console", {"mlflow": {}})
    with pytest.raises(ValueError, match="more than once"):
        resolve_backends(["console", "console"])
    with pytest.raises(ValueError, match="console option 'every'"):
        resolve_backends("console", {"console": {"every": -1}})


def test_a_misspelt_hook_is_rejected_when_the_tracker_starts() -> None:
    class Typo:
        @hookimpl
        def gradtrack_stpe(self, stats: StepStats) -> None: ...

    with pytest.raises(pluggy.PluginValidationError, match="unknown hook 'gradtrack_stpe'"):
        GradTracker(mlp(), backend=Typo()).__enter__()


def test_a_backend_that_cannot_run_here_says_why(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "needs_sdk.py").write_text(
        textwrap.dedent("""
        from gradtrack import BackendUnavailableError, hookimpl

        @hookimpl
        def gradtrack_make_backend(name, options):
            if name == "needs_sdk":
                raise BackendUnavailableError("backend='needs_sdk' needs the SDK: pip install sdk")
    """)
    )
    dist_info = tmp_path / "needs_sdk-1.0.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text("Metadata-Version: 2.1\nName: needs-sdk\nVersion: 1.0\n")
    (dist_info / "entry_points.txt").write_text("[gradtrack]\nneeds_sdk = needs_sdk\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(BackendUnavailableError, match="pip install sdk"):
        GradTracker(mlp(), backend="needs_sdk").__enter__()
    sys.modules.pop("needs_sdk", None)

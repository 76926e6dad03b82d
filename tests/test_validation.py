"""Every setting, refused by name when wrong, and a failed start leaves nothing behind (issue 10)."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from torch.optim.optimizer import _global_optimizer_pre_hooks

from gradtrack import GradTracker
from gradtrack.tracker import _tracked_models
from gradtrack_testing.models import mlp
from gradtrack_testing.recording import RecordingBackend

_BAD_NUMBERS = (0, -1, math.nan, "1", True, None)

_TRACKER: list[tuple[str, Any, str]] = [
    *[("max_norm", bad, "max_norm must be a finite number > 0") for bad in (0, -1, math.nan, "1", True, math.inf)],
    ("on_spike", "drop", "on_spike must be None or 'skip'"),
    ("on_divergence", "stop", "on_divergence must be 'continue', 'raise' or 'rollback'"),
    ("weight_norms", 1, "weight_norms must be True or False"),
    *[("explosion_threshold", bad, "explosion_threshold must be a number > 0") for bad in _BAD_NUMBERS],
    *[("spike_factor", bad, "spike_factor must be a number > 1") for bad in (1, 0.5, math.nan, "x", True)],
    *[("loss_blowup", bad, "loss_blowup must be a finite number > 0") for bad in (*_BAD_NUMBERS, math.inf)],
    *[
        (name, bad, f"{name} must be an int >= 1")
        for name in ("nonfinite_patience", "loss_patience", "log_every", "top_k", "max_pending")
        for bad in (0, -3, 2.5, "3", True, None)
    ],
    *[("layer_every", bad, r"layer_every must be an int >= 1 \(or None") for bad in (0, 1.5, "10", False)],
    *[("close_timeout", bad, "close_timeout must be a number of seconds >= 0") for bad in (-1, math.nan, "5", None)],
    ("norm_type", 3, "norm_type must be 1, 2 or inf"),
    ("norm_type", "l2", "norm_type must be 1, 2 or inf"),
    ("clip", "l2", r"clip='l2' is not a clip policy; accepted"),
    ("clip", 3, "clip must be None, one of"),
    ("clip_value", 0.5, "clip_value is only used with clip='value'"),
    ("on_nonfinite", "ignore", r"on_nonfinite must be one of \['skip', 'raise', 'continue'\]"),
    ("optimizer", "adam", "optimizer must be a torch.optim.Optimizer"),
    ("scaler", object(), "scaler must be a torch.amp.GradScaler"),
    ("backend", 3, "backend=3 is not a backend"),
    ("backend", ["console", 2.5], "backend=2.5 is not a backend"),
    ("backend", object(), "is not a backend: pass a backend name"),
    ("backend", RecordingBackend, "backend=RecordingBackend is a class; pass an instance"),
    ("backend_options", ["console"], "backend_options must be a dict with string keys"),
    ("backend_options", {"console": 3}, r"backend_options\['console'\] must be a dict"),
]


def _id(name: str, value: object) -> str:
    """Stable across processes (pytest-xdist compares the workers' test ids): no object addresses."""
    shown = repr(value) if type(value).__repr__ is not object.__repr__ else f"<{type(value).__name__}>"
    return f"{name}={shown}"


@pytest.mark.parametrize(("name", "value", "message"), _TRACKER, ids=[_id(n, v) for n, v, _ in _TRACKER])
def test_every_tracker_setting_is_refused_by_name(name: str, value: Any, message: str) -> None:
    with pytest.raises((ValueError, TypeError), match=message):
        GradTracker(mlp(), **{name: value})


def test_inf_means_forever_or_never_where_it_is_accepted() -> None:
    model = mlp()
    with GradTracker(model, close_timeout=math.inf, explosion_threshold=math.inf, spike_factor=math.inf) as tracker:
        model(torch.randn(2, 8)).sum().mul(1e9).backward()
        tracker.step()
    assert tracker.summary().explosions == 0  # both explosion rules switched off


def test_clip_value_needs_its_value() -> None:
    with pytest.raises(ValueError, match="clip='value' needs clip_value"):
        GradTracker(mlp(), clip="value")
    for bad in (0, -0.5, math.nan, math.inf, "1"):
        with pytest.raises(ValueError, match="clip_value must be a finite number > 0"):
            GradTracker(mlp(), clip="value", clip_value=bad)


_BACKEND: list[tuple[str, dict[str, Any], str]] = [
    ("mlflow", {"trackin_uri": "x"}, "unexpected keyword argument 'trackin_uri'"),
    ("mlflow", {"tracking_uri": ""}, "mlflow option 'tracking_uri' must be a non-empty string"),
    ("mlflow", {"tracking_uri": 5}, "mlflow option 'tracking_uri' must be a non-empty string"),
    ("mlflow", {"tags": {"a": 1}}, "mlflow option 'tags' must be a dict of str to str"),
    ("mlflow", {"tags": ["a"]}, "mlflow option 'tags' must be a dict with string keys"),
    ("mlflow", {"request_timeout": 0.01}, "mlflow option 'request_timeout' must be a number of seconds >= 0.1"),
    ("mlflow", {"request_timeout": math.inf}, "mlflow option 'request_timeout' must be a number of seconds"),
    ("mlflow", {"exit_timeout": -1}, "mlflow option 'exit_timeout' must be a number of seconds >= 0"),
    ("mlflow", {"flush_every_s": math.nan}, "mlflow option 'flush_every_s' must be a number of seconds"),
    ("mlflow", {"tag_interval_s": "5"}, "mlflow option 'tag_interval_s' must be a number of seconds"),
    ("mlflow", {"spool_dir": 3}, "mlflow option 'spool_dir' must be a path"),
    ("mlflow", {"loss_key": "grad/loss"}, "mlflow option 'loss_key' must be None, 'auto' or a metric key"),
    ("mlflow", {"loss_key": "loss!"}, "mlflow option 'loss_key' must be None, 'auto' or a metric key"),
    ("mlflow", {"loss_key": ""}, "mlflow option 'loss_key' must be None, 'auto' or a metric key"),
    ("wandb", {"layer_scalars": -1}, "wandb option 'layer_scalars' must be an int >= 0 or 'all'"),
    ("wandb", {"layer_scalars": "some"}, "wandb option 'layer_scalars' must be an int >= 0 or 'all'"),
    ("wandb", {"tags": "one"}, "wandb option 'tags' must be a list of strings"),
    ("wandb", {"tags": [1]}, "wandb option 'tags' must be a list of strings"),
    ("wandb", {"alert_every": -5}, "wandb option 'alert_every' must be a number of seconds >= 0"),
    ("wandb", {"alerts": "yes"}, "wandb option 'alerts' must be True or False"),
    ("wandb", {"histogram": 1}, "wandb option 'histogram' must be True or False"),
    ("wandb", {"mode": "online-ish"}, "wandb option 'mode' must be one of"),
    ("wandb", {"project": 3}, "wandb option 'project' must be a non-empty string"),
    ("wandb", {"loss_key": "grad/loss"}, "wandb option 'loss_key' must be None or a non-empty key outside grad/"),
    ("wandb", {"config": [1]}, "wandb option 'config' must be a dict with string keys"),
    ("console", {"every": -1}, "console option 'every' must be an int >= 0"),
    ("console", {"every": 1.5}, "console option 'every' must be an int >= 0"),
    ("console", {"stream": "stdout"}, "console option 'stream' must have a write"),
    ("mlflow", {"experiment_name": None, "run_id": ""}, "mlflow option 'run_id' must be a non-empty string"),
]


@pytest.mark.parametrize(("backend", "options", "message"), _BACKEND,
                         ids=[f"{b}:{sorted(o)}={list(o.values())!r}" for b, o, _ in _BACKEND])  # fmt: skip
def test_every_backend_option_is_refused_by_name_and_leaves_nothing_behind(
    backend: str, options: dict[str, Any], message: str
) -> None:
    pytest.importorskip(backend if backend != "console" else "gradtrack")
    model = mlp()
    hooks = len(_global_optimizer_pre_hooks)
    with pytest.raises((ValueError, TypeError), match=message):
        GradTracker(model, backend=backend, backend_options={backend: options}).__enter__()
    assert len(_global_optimizer_pre_hooks) == hooks
    assert model not in _tracked_models
    with GradTracker(model) as tracker:  # free to be tracked again
        model(torch.randn(2, 8)).sum().backward()
        tracker.step()
    assert tracker.steps == 1


def test_backend_options_for_a_backend_not_requested() -> None:
    with pytest.raises(ValueError, match=r"backend_options has entries for \['mlflow'\]"):
        GradTracker(mlp(), backend="console", backend_options={"mlflow": {}}).__enter__()

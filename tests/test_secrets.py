"""Credentials never leave the process that holds them: not in files, runs, output, warnings or logs (issue 10)."""

from __future__ import annotations

import logging
import time
import uuid
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from gradtrack import GradTracker
from gradtrack.delivery.secrets import redact, strip_userinfo
from gradtrack_testing.models import mlp

SECRETS = {
    "MLFLOW_TRACKING_TOKEN": "tok-5e5a7e1b9c2d",
    "MLFLOW_TRACKING_PASSWORD": "pw-8f3c61d0aa17",
    "WANDB_API_KEY": "wk-0123456789abcdef0123456789abcdef01234567",
}
URI_USER, URI_PASSWORD = "uri-user-7d2e", "uri-pw-c4b19a6e"


def test_redact_masks_userinfo_and_known_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in SECRETS.items():
        monkeypatch.setenv(name, value)
    uri = f"https://{URI_USER}:{URI_PASSWORD}@mlflow.example:5000/path"
    assert strip_userinfo(uri) == "https://mlflow.example:5000/path"
    assert strip_userinfo("sqlite:///mlflow.db") == "sqlite:///mlflow.db"
    token, key = SECRETS["MLFLOW_TRACKING_TOKEN"], SECRETS["WANDB_API_KEY"]
    text = f"failed {uri} with token {token} (pw '{URI_PASSWORD}'), key {key}"
    masked = redact(text, [uri])
    assert "https://***@mlflow.example" in masked
    for secret in (*SECRETS.values(), URI_USER, URI_PASSWORD):
        assert secret not in masked


@pytest.mark.slow
def test_no_credential_anywhere_gradtrack_writes(
    monkeypatch: pytest.MonkeyPatch, server: object, wandb_dir: Path, tmp_path: Path,
    capfd: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    from mlflow.tracking import MlflowClient

    from gradtrack_testing.fault_server import FaultServer

    for name, value in SECRETS.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "someone")  # a name is no secret (MLflow's mlflow.user)
    proxy = FaultServer(server.uri)  # type: ignore[attr-defined]
    host = proxy.uri.removeprefix("http://")
    uri = f"http://{URI_USER}:{URI_PASSWORD}@{host}"
    experiment = f"secrets-{uuid.uuid4().hex[:8]}"
    spool_dir = tmp_path / "spool"
    options = {
        "mlflow": {"tracking_uri": uri, "experiment_name": experiment, "spool_dir": str(spool_dir),
                   "request_timeout": 1.0, "exit_timeout": 2.0, "flush_every_s": 0.1},
        "wandb": {"dir": str(wandb_dir), "project": "secrets"},
        "console": {"every": 1},
    }  # fmt: skip
    caplog.set_level(logging.DEBUG)
    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    proxy.refuse("runs/log-batch", times=1)  # one request refused for good: rejected.jsonl, and a warning
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with GradTracker(model, backend=["mlflow", "wandb", "console"], backend_options=options) as tracker:
                tracker.flush(60.0)
                for step in range(30):
                    if step == 10:
                        proxy.mode = "status"  # a failing server: errors mention the URL they failed on
                    if step == 20:
                        proxy.mode = "silent"  # gone at the end: a spool and its warning are left
                    x = torch.randn(8, 8)
                    optimizer.zero_grad()
                    loss = nn.functional.mse_loss(model(x).squeeze(-1), x.sum(-1))
                    loss.backward()
                    if step == 5:
                        model[0].weight.grad.mul_(1e7)  # type: ignore[index, union-attr]
                    tracker.observe(loss)
                    optimizer.step()
                    time.sleep(0.02)
    finally:
        proxy.mode = "pass"
        proxy.close()
    time.sleep(1.0)
    out, err = capfd.readouterr()
    texts = {"stdout": out, "stderr": err, "logs": caplog.text}
    texts["warnings"] = "\n".join(str(w.message) for w in caught)
    assert any(type(w.message).__name__ == "SpoolLeftWarning" for w in caught), [str(w.message) for w in caught]
    assert any("refused a gradtrack" in str(w.message) for w in caught), [str(w.message) for w in caught]
    for path in [*spool_dir.rglob("*"), *wandb_dir.rglob("*")]:
        if path.is_file():
            texts[str(path)] = path.read_bytes().decode("utf-8", "replace")
    assert (spool_dir.rglob("rejected.jsonl")) and list(spool_dir.rglob("spool.jsonl"))
    client = MlflowClient(server.uri)  # type: ignore[attr-defined]
    (run,) = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    texts["mlflow params"] = repr(run.data.params)
    texts["mlflow tags"] = repr(run.data.tags)
    texts["mlflow metric keys"] = repr(sorted(run.data.metrics))
    for where, text in texts.items():
        for secret in (*SECRETS.values(), URI_USER, URI_PASSWORD):
            assert secret not in text, f"{secret!r} leaked into {where}"
    for path in spool_dir.rglob("*"):
        assert (path.stat().st_mode & 0o777) == (0o700 if path.is_dir() else 0o600), path

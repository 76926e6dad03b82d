"""The examples run as users would run them (shortened)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).parent.parent / "examples"


def test_transformer_adaptive_clip(capfd: pytest.CaptureFixture[str]) -> None:
    path = EXAMPLES / "transformer_adaptive_clip.py"
    spec = importlib.util.spec_from_file_location(path.stem, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main(steps=8)
    out = capfd.readouterr().out  # the console backend prints from the reporter process
    assert "clip=adaptive (1.0)" in out and "run finished: 8 steps" in out and "next time try max_norm=" in out


def test_lstm_clipped_at_one(capfd: pytest.CaptureFixture[str]) -> None:
    path = EXAMPLES / "lstm_clip.py"
    spec = importlib.util.spec_from_file_location(path.stem, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main(steps=6)
    out = capfd.readouterr().out
    assert "clip=norm (1.0)" in out and "run finished: 6 steps" in out and "steps at max_norm=1.0" in out


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["fsdp2", "ddp"])
def test_torchrun_example(strategy: str, tmp_path: Path) -> None:
    torchrun = Path(sys.executable).with_name("torchrun")
    command = [
        str(torchrun),
        "--nproc_per_node=2",
        str(EXAMPLES / "torchrun_fsdp2.py"),
        "--strategy",
        strategy,
        "--steps",
        "6",
        "--backend",
        "console",
    ]
    done = subprocess.run(
        command, cwd=tmp_path, capture_output=True, text=True, timeout=240, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"{strategy} on 2 ranks: 6 steps" in done.stdout
    assert done.stdout.count("[gradtrack] run finished: 6 steps") == 1  # rank 0 alone reports

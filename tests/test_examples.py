"""The examples run as users would run them (shortened)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).parent.parent / "examples"


def test_transformer_adaptive_clip(capsys: pytest.CaptureFixture[str]) -> None:
    path = EXAMPLES / "transformer_adaptive_clip.py"
    spec = importlib.util.spec_from_file_location(path.stem, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main(steps=8)
    out = capsys.readouterr().out
    assert "clip=adaptive (1.0)" in out and "run finished: 8 steps" in out and "next time try max_norm=" in out

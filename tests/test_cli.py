"""The ``gradtrack`` command."""

from __future__ import annotations

import pytest

from gradtrack.cli import main
from gradtrack.delivery.plugins import AUTOLOAD_ENV


def test_backends_lists_what_backend_accepts(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["backends"]) == 0
    assert capsys.readouterr().out.split() == ["console", "mlflow", "wandb"]


def test_backends_says_what_is_missing(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(AUTOLOAD_ENV, "1")
    assert main(["backends"]) == 0
    out, err = capsys.readouterr()
    assert out.split() == ["console"]
    assert "mlflow (pip install 'gradtrack[mlflow]')" in err


def test_a_command_is_required() -> None:
    with pytest.raises(SystemExit) as caught:
        main([])
    assert caught.value.code == 2

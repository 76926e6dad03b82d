"""The run's pictures mark its rollbacks apart from its explosions and its divergence; the history keeps them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from gradtrack.delivery.history import RunHistory

pytest.importorskip("matplotlib")
from matplotlib.colors import to_hex

from gradtrack.delivery.plots import _ROLLBACK, _layers_figure, _norms_figure, compare_runs, draw_layers, draw_norms

PNG = b"\x89PNG\r\n\x1a\n"


def _history(rollbacks: list[tuple[int, int | None]]) -> RunHistory:
    history = RunHistory(threshold=50.0)
    for step in range(200):
        history.add_step(step, 1.0 + (300.0 if step in (57, 140) else 0.0), {"w": 1.0, "b": 0.5} if step % 5 else None)
    history.add_explosion(57, 301.0)
    for step, restored in rollbacks:
        history.add_rollback(step, restored)
    return history


def test_rollbacks_are_dashed_lines_with_the_undone_steps_shaded(tmp_path: Path) -> None:
    history = _history([(57, 50), (140, None)])  # a restored step rebuilt from metrics is not known
    history.diverged_step = 190
    axes = _norms_figure(history, "").axes[0]
    handles, labels = axes.get_legend_handles_labels()
    assert labels == ["grad/total_norm (max per point)", "explosion threshold", "explosions (1)", "rollbacks (2)",
                      "steps undone by rollbacks", "diverged (step 190)"]  # fmt: skip
    lines = handles[labels.index("rollbacks (2)")]
    assert [segment[0, 0] for segment in lines.get_segments()] == [57, 140]
    assert lines.get_linestyle()[0][1] and to_hex(lines.get_color()[0]) == _ROLLBACK  # dashed, orange
    (span,) = axes.patches
    # from the step whose state came back to the step it came back at
    assert (span.get_x(), span.get_x() + span.get_width()) == (50, 57)
    diverged = handles[labels.index("diverged (step 190)")]
    assert to_hex(diverged.get_color()) != _ROLLBACK and diverged.get_linestyle() == "-"
    assert draw_norms(history, tmp_path / "norms.png").read_bytes().startswith(PNG)


def test_a_run_without_rollbacks_has_no_rollback_marks() -> None:
    axes = _norms_figure(_history([]), "").axes[0]
    assert not any("rollback" in label for label in axes.get_legend_handles_labels()[1])
    assert not axes.patches and not axes.collections[1:]  # only the explosions' scatter


def test_explosions_with_non_finite_norms_only_are_counted(tmp_path: Path) -> None:
    """A poisoned batch's explosion has a NaN norm: nothing to place on a log axis, but it counts."""
    history = _history([(57, 50)])
    history.explosions = [(57, float("nan"))]
    labels = _norms_figure(history, "").axes[0].get_legend_handles_labels()[1]
    assert "explosions (1)" in labels and "rollbacks (1)" in labels
    assert draw_norms(history, tmp_path / "norms.png").read_bytes().startswith(PNG)


def test_the_heatmap_and_the_comparison_mark_rollbacks_too(tmp_path: Path) -> None:
    history = _history([(57, 50), (400, 390)])  # 400: after the last per-layer sample
    axes = _layers_figure(history, "", 60).axes[0]
    (lines,) = [c for c in axes.collections if to_hex(c.get_color()[0]) == _ROLLBACK]
    assert [segment[0, 0] for segment in lines.get_segments()] == [57, 400]
    assert axes.get_xlim() == (1, 200)  # the heatmap's extent, not stretched to step 400
    assert draw_layers(history, tmp_path / "layers.png").read_bytes().startswith(PNG)
    healthy = _history([])
    assert compare_runs({"healed": history, "healthy": healthy}, tmp_path / "both.png").read_bytes().startswith(PNG)


def test_the_history_keeps_the_latest_thousand_rollbacks_and_absorbs_a_later_part() -> None:
    history = RunHistory()
    for step in range(1500):
        history.add_rollback(step, step - 10)
    assert len(history.rollbacks) == 1000 and history.rollbacks[0] == (500, 490)
    earlier, later = RunHistory(), RunHistory()
    earlier.add_rollback(5, 0)
    later.add_step(10, 1.0)
    later.add_rollback(12, None)
    earlier.absorb(later)
    assert earlier.rollbacks == [(5, 0), (12, None)]
    np.testing.assert_array_equal(earlier.totals()[0], [10])

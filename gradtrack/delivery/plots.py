"""The pictures of a run: its total gradient norm over time, and a heatmap of every layer's norm.

matplotlib with the headless ``Agg`` backend, imported when a plot is drawn (the ``[plots]`` extra, part
of the ``mlflow`` and ``wandb`` extras). Readable from 10 layers to 5,000: past ``max_rows`` the heatmap
shows modules (a layer's name up to its last dot, the largest norm among its tensors), and past that
the ``max_rows`` layers with the largest norms.
"""

from __future__ import annotations

import base64
import html
import math
import os
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from gradtrack.delivery.history import RunHistory

__all__ = ["compare_runs", "draw_layers", "draw_norms", "report_html", "rows_to_show"]

_EXPLOSION = "#d62728"
_DIVERGED = "#7f0000"
_ROLLBACK = "#ff7f0e"


_LOCK = threading.Lock()  # matplotlib is not thread-safe: two backends end their run at the same time


def _pyplot() -> Any:
    """matplotlib's object-oriented side, without pyplot's global state (there is no screen here)."""
    from matplotlib.figure import Figure

    return Figure


def _save(figure: Any, path: Path) -> None:
    """A PNG only its owner can read (it sits beside the spool), whatever the umask."""
    with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as file:
        figure.savefig(file, format="png")


def _figure(width: float, height: float) -> Any:
    return _pyplot()(figsize=(width, height), dpi=100)


def draw_norms(history: RunHistory, path: Path, title: str = "") -> Path:
    """Total norm over steps, log scale, with the threshold, the explosions, the rollbacks and the divergence point."""
    with _LOCK:
        figure = _norms_figure(history, title)
        _save(figure, path)
        return path


def _norms_figure(history: RunHistory, title: str) -> Any:
    steps, norms = history.totals()
    figure = _figure(9, 3.6)
    axes = figure.subplots()
    shown = np.where(np.isfinite(norms) & (norms > 0), norms, np.nan)
    axes.plot(steps, shown, color="#1f77b4", linewidth=1.2, label="grad/total_norm (max per point)")
    bad = ~np.isfinite(norms)
    if bad.any():
        top = np.nanmax(shown) if np.isfinite(shown).any() else 1.0
        axes.scatter(steps[bad], np.full(bad.sum(), top), marker="^", color=_DIVERGED, label="NaN / Inf", zorder=3)
    if history.threshold is not None and math.isfinite(history.threshold):
        axes.axhline(history.threshold, color="#888888", linestyle="--", linewidth=1, label="explosion threshold")
    if history.explosions:  # those with a NaN/Inf norm are counted, and drawn as NaN / Inf above
        drawn = [(step, value) for step, value in history.explosions if math.isfinite(value) and value > 0]
        axes.scatter([step for step, _ in drawn], [value for _, value in drawn], marker="x", color=_EXPLOSION, s=28,
                     label=f"explosions ({len(history.explosions)})", zorder=3)  # fmt: skip
    _mark_rollbacks(axes, history.rollbacks, _ROLLBACK, f"rollbacks ({len(history.rollbacks)})")
    if history.diverged_step is not None:
        label = f"diverged (step {history.diverged_step})"
        axes.axvline(history.diverged_step, color=_DIVERGED, linewidth=1.5, label=label)
    if np.isfinite(shown).any():
        axes.set_yscale("log")
    axes.set_xlabel("step")
    axes.set_ylabel("total gradient norm")
    axes.set_title(title or "gradient norm over training")
    axes.grid(True, which="both", alpha=0.25)
    axes.legend(loc="upper left", fontsize=8)
    figure.tight_layout()
    return figure


def _mark_rollbacks(axes: Any, rollbacks: Sequence[tuple[int, int | None]], colour: str, label: str | None) -> None:
    """A dashed line at each rollback's step, and the steps whose training was thrown away (from the restored
    state to the rollback) shaded, where the restored step is known: the step axis counts loop iterations,
    so the run goes on to the right of the line from the state of the shaded span's left edge."""
    if not rollbacks:
        return
    steps = [step for step, _ in rollbacks]
    # One collection, whatever the number: x in data, y across the whole axes.
    axes.vlines(steps, 0, 1, transform=axes.get_xaxis_transform(), colors=colour, linestyles="--", linewidth=1.2,
                label=label, zorder=2)  # fmt: skip
    spans = [(restored, step) for step, restored in rollbacks if restored is not None and restored < step]
    for index, (start, end) in enumerate(spans):
        shaded = "steps undone by rollbacks" if label and index == 0 else None
        axes.axvspan(start, end, color=colour, alpha=0.12, linewidth=0, label=shaded, zorder=1)


def rows_to_show(history: RunHistory, max_rows: int = 60) -> tuple[list[str], Mapping[str, list[str]]]:
    """The heatmap's rows: every layer, else modules, else the ``max_rows`` largest; and what each row holds."""
    names = history.layer_names
    if len(names) <= max_rows:
        return names, {name: [name] for name in names}
    modules: dict[str, list[str]] = {}
    for name in names:
        modules.setdefault(name.rsplit(".", 1)[0], []).append(name)
    if len(modules) <= max_rows:
        return list(modules), modules
    peaks = history.peaks()
    largest = sorted(names, key=lambda name: peaks[name], reverse=True)[:max_rows]
    order = [name for name in names if name in set(largest)]
    return order, {name: [name] for name in order}


def draw_layers(history: RunHistory, path: Path, title: str = "", max_rows: int = 60) -> Path:
    """Layers x steps, log10 of each layer's gradient norm; non-finite cells marked."""
    with _LOCK:
        figure = _layers_figure(history, title, max_rows)
        _save(figure, path)
        return path


def _layers_figure(history: RunHistory, title: str, max_rows: int) -> Any:
    rows, members = rows_to_show(history, max_rows)
    wanted = [name for row in rows for name in members[row]]
    names, steps, matrix = history.layers(wanted)
    index = {name: i for i, name in enumerate(names)}
    grid = np.full((len(rows), matrix.shape[1] if matrix.size else 0), np.nan)
    for r, row in enumerate(rows):
        parts = [matrix[index[name]] for name in members[row] if name in index]
        if parts:
            grid[r] = np.nanmax(np.where(np.isnan(parts), -np.inf, parts), axis=0)
            grid[r][np.isneginf(grid[r])] = np.nan
    inf_rows, inf_cols = np.nonzero(np.isinf(grid))  # NaN/Inf norms (stored as inf); NaN cells: not logged
    _hold_between_samples(grid)
    height = min(2.0 + 0.18 * max(len(rows), 1), 14.0)
    figure = _figure(9, height)
    axes = figure.subplots()
    if grid.size:
        positive = grid[np.isfinite(grid) & (grid > 0)]
        floor = positive.min() / 10 if positive.size else 1e-12  # zero norms: the bottom of the scale
        with np.errstate(divide="ignore", invalid="ignore"):
            logs = np.log10(np.where(grid == 0, floor, grid))
        finite = np.isfinite(logs)
        image = axes.imshow(np.where(finite, logs, np.nan), aspect="auto", interpolation="nearest", cmap="viridis",
                            extent=(steps[0], steps[-1] + (steps[1] - steps[0] if steps.size > 1 else 1),
                                    len(rows) - 0.5, -0.5))  # fmt: skip
        figure.colorbar(image, ax=axes, label="log10 gradient norm")
        if inf_rows.size:
            axes.scatter(steps[inf_cols], inf_rows, marker="s", color=_DIVERGED, s=6)
        axes.set_yticks(range(len(rows)))
        axes.set_yticklabels(rows if len(rows) <= 80 else [""] * len(rows), fontsize=6 if len(rows) > 30 else 8)
    else:
        axes.text(0.5, 0.5, "no per-layer norms were logged", ha="center", va="center", transform=axes.transAxes)
    if grid.size and history.rollbacks:
        extent = axes.get_xlim()  # the heatmap's: a rollback after the last per-layer sample must not stretch it
        _mark_rollbacks(axes, [(step, None) for step, _ in history.rollbacks], _ROLLBACK, None)
        axes.set_xlim(extent)
    if history.diverged_step is not None:
        axes.axvline(history.diverged_step, color="#ff4040", linewidth=1.2)
    shown = "modules" if rows and len(members[rows[0]]) > 1 else "layers"
    total = len(history.layer_names)
    axes.set_title(title or f"gradient norm per layer ({len(rows)} {shown} of {total} tensors)")
    axes.set_xlabel("step")
    figure.tight_layout()
    return figure


def _hold_between_samples(grid: np.ndarray) -> None:
    """Per-layer norms come every ``layer_every`` steps: each sample fills the columns until the next.

    A column where no layer was logged takes the previous column, so the heatmap reads as bands, not as
    thin stripes on white. A layer missing from a sampled column (no gradient that step) stays empty.
    """
    if not grid.size:
        return
    sampled = ~np.all(np.isnan(grid), axis=0)
    source = np.where(sampled, np.arange(grid.shape[1]), 0)
    np.maximum.accumulate(source, out=source)
    filled = grid[:, source]
    filled[:, ~sampled & (np.cumsum(sampled) == 0)] = np.nan  # before the first sample: nothing to hold
    grid[:] = filled


def compare_runs(histories: Mapping[str, RunHistory], path: Path, title: str = "") -> Path:
    """Several runs' total norms on one log axis, with each run's rollbacks and divergence."""
    with _LOCK:
        figure = _figure(9, 4)
        axes = figure.subplots()
        return _compare(figure, axes, histories, path, title)


def _compare(figure: Any, axes: Any, histories: Mapping[str, RunHistory], path: Path, title: str) -> Path:
    colours = ["#d62728", "#2ca02c", "#1f77b4", "#9467bd", "#ff7f0e"]
    for (label, history), colour in zip(histories.items(), colours, strict=False):
        steps, norms = history.totals()
        shown = np.where(np.isfinite(norms) & (norms > 0), norms, np.nan)
        axes.plot(steps, shown, color=colour, linewidth=1.2, label=label)
        if history.diverged_step is not None:
            axes.axvline(history.diverged_step, color=colour, linestyle=":", linewidth=1.5,
                         label=f"{label}: diverged at step {history.diverged_step}")  # fmt: skip
        if history.rollbacks:
            _mark_rollbacks(axes, [(step, None) for step, _ in history.rollbacks], colour,
                            f"{label}: rollbacks ({len(history.rollbacks)})")  # fmt: skip
    axes.set_yscale("log")
    axes.set_xlabel("step")
    axes.set_ylabel("total gradient norm (before clipping)")
    axes.set_title(title or "gradient norm per run")
    axes.grid(True, which="both", alpha=0.25)
    axes.legend(fontsize=8)
    figure.tight_layout()
    _save(figure, path)
    return path


def _base64(image: Path) -> str:
    return base64.b64encode(image.read_bytes()).decode()


def report_html(title: str, summary: Mapping[str, Any], images: Sequence[Path]) -> str:
    """One self-contained page: the summary as a table, the plots inlined."""
    rows = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(str(v))}</td></tr>" for k, v in summary.items())
    pictures = "".join(
        f'<img alt="{html.escape(image.stem)}" src="data:image/png;base64,{_base64(image)}">' for image in images
    )
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        "<style>body{font-family:sans-serif;margin:2em}th{text-align:left;padding-right:1em}img{max-width:100%}</style>"
        f"</head><body><h1>{html.escape(title)}</h1><table>{rows}</table>{pictures}</body></html>"
    )

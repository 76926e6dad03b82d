"""What the run's description says, so that the run page tells what happened without any set-up.

gradtrack writes one section of the run's description (MLflow: the ``mlflow.note.content`` tag shown at
the top of the run page; W&B: the run's notes): the moment the run diverges, a line with the step and
the reason; at the end, a short markdown summary. The section starts at ``MARKER``; whatever the user
wrote above it is kept, and a later gradtrack section replaces the earlier one, never the user's text.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from gradtrack.events import Divergence, Summary, format_norm

__all__ = ["MARKER", "divergence_note", "lr_advice", "merge_note", "summary_note"]

MARKER = "<!-- gradtrack -->"


def merge_note(existing: str | None, section: str) -> str:
    """``existing`` with its gradtrack section (if any) replaced by ``section``."""
    kept = (existing or "").split(MARKER, 1)[0].rstrip()
    return f"{kept}\n\n{MARKER}\n{section}" if kept else f"{MARKER}\n{section}"


def divergence_note(event: Divergence) -> str:
    return f"### gradtrack: diverged at step {event.step}\n\n{_escape(event.reason)}\n"


def summary_note(summary: Summary, status: str, images: Sequence[tuple[str, str]] = ()) -> str:
    """The end-of-run section; ``images``: (caption, markdown image URL) pairs of the plots."""
    if summary.unmeasured:
        return f"### gradtrack: nothing measured\n\n| status | {status} |\n|---|---|\n\n{_escape(summary.unmeasured)}\n"
    if summary.diverged:
        reason = _escape(summary.diverged_reason or "")
        headline = f"### gradtrack: diverged at step {summary.diverged_step}\n\n{reason}"
    elif summary.rollbacks:
        headline = f"### gradtrack: healed by {len(summary.rollbacks)} rollback(s), not diverged"
    elif summary.explosions:
        headline = f"### gradtrack: {summary.explosions} explosion(s), not diverged"
    else:
        headline = "### gradtrack: healthy gradients"
    norm = format_norm(summary.norm_p95) if summary.norm_p95 is not None else "n/a"
    advice = format_norm(summary.recommended_max_norm) if summary.recommended_max_norm is not None else "n/a"
    offenders = ", ".join(f"`{_escape(name)}` ({count})" for name, count in summary.top_offenders[:5]) or "none"
    first = summary.first_explosion_step if summary.first_explosion_step is not None else "-"
    lines = [
        headline,
        "",
        "| | |",
        "|---|---|",
        f"| status | {status} |",
        f"| steps | {summary.steps} |",
        f"| clipped | {summary.clipped_steps} ({summary.clip_rate:.1%}) |",
        f"| explosions | {summary.explosions} |",
        f"| first explosion | step {first} |",
        f"| gradient norm p95 | {norm} |",
        f"| recommended max_norm | {advice} |",
        f"| top offenders | {offenders} |",
    ]
    if summary.rollbacks:  # healed: the states that came back, and what it cost the learning rate
        listed = ", ".join(f"step {step} -> {restored}" for step, restored in summary.rollbacks[-10:])
        more = f" (the last 10 of {len(summary.rollbacks)})" if len(summary.rollbacks) > 10 else ""
        lines.append(f"| rollbacks | {len(summary.rollbacks)}: {listed}{more}; learning rate x{summary.lr_scale:g} |")
    if summary.overshoot_samples:  # the overshoot indicator: the distribution, and its advice when it warned
        lines.append(f"| overshoot (lr x curvature) | median {format_norm(summary.overshoot_p50 or 0.0)}, p95 "
                     f"{format_norm(summary.overshoot_p95 or 0.0)}; above the edge 2 on {summary.overshoot_above_edge} "
                     f"of {summary.overshoot_samples} samples |")  # fmt: skip
    if summary.instability is not None:
        lines.append(f"| learning rate | {_escape(lr_advice(summary.instability))} |")
    if summary.resumed_from:  # the steps each restart went on from: MLflow keeps both values of a step trained twice
        resumed = ", ".join(f"step {step}" for step in summary.resumed_from)
        lines.append(f"| resumed | {len(summary.resumed_from)} time(s), from {resumed} |")
    lines += ["", *(f"![{caption}]({url})" for caption, url in images)] if images else []
    return "\n".join(lines) + "\n"


def lr_advice(warning: Mapping[str, Any]) -> str:
    """The overshoot warning's advice in words: too high for which layers, by about how much (measured)."""
    layers = ", ".join(f"{name} ({float(ratio):.3g})" for name, ratio in warning.get("layers") or [])
    rates = ", ".join(f"{float(lr):.3g}" for lr in warning.get("learning_rates") or [])
    level, scale = float(warning.get("overshoot", math.nan)), float(warning.get("lr_scale", 1.0))
    text = (f"too high from step {warning.get('since')}: the steps overshot (lr x curvature {level:.3g}, the edge "
            f"is 2) in {layers or 'every layer'}; about x{scale:.2g}")  # fmt: skip
    return text + (f" (lr {rates})" if rates else "") + " brings it back to 1"


def _escape(text: str) -> str:
    """Plain text inside markdown: no HTML, no table breaks, no markers."""
    return text.replace("<", "&lt;").replace(">", "&gt;").replace("|", "\\|").replace("\n", " ")

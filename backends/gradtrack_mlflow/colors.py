"""A run's colour in the MLflow UI, saying how it went: the ``mlflow.runColor`` tag.

MLflow's UI colours a run's pill in the runs table and its lines in every chart with this tag, and without it
picks a colour from its palette by the run's id, reds and oranges included: a healthy run could look like a
diverged one. So every run gradtrack reports to gets a colour by its outcome:

* diverged: red (``DIVERGED_COLOR``);
* rolled back by ``on_divergence="rollback"`` and not diverged (healed): orange (``HEALED_COLOR``);
* healthy: one of MLflow's own calm colours (blues, greens, greys, a violet), chosen by the run's id so that
  healthy runs stay told apart in the charts (``CALM_COLORS``).

A colour the user chose stays: gradtrack writes ``mlflow.runColor`` only when the run has none or still has
the one gradtrack wrote last, which it records in ``gradtrack.run_color``. Picking a colour in the UI (or
logging the tag) takes the run out of gradtrack's hands for good. Nothing here imports MLflow.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping
from typing import Literal

__all__ = [
    "CALM_COLORS",
    "DIVERGED_COLOR",
    "HEALED_COLOR",
    "OWN_COLOR_TAG",
    "RUN_COLOR_TAG",
    "Outcome",
    "color_tags",
    "outcome_color",
]

RUN_COLOR_TAG = "mlflow.runColor"
OWN_COLOR_TAG = "gradtrack.run_color"  # the colour gradtrack wrote last: a different runColor is the user's
DIVERGED_COLOR = "#c83243"  # MLflow's palette red
HEALED_COLOR = "#de7921"  # MLflow's palette orange
CALM_COLORS = ("#434a93", "#137dae", "#04867d", "#308613", "#8a63bf", "#0e538b", "#2272b4", "#277c43",
               "#5f7281", "#115026", "#445461", "#3ba65e")  # fmt: skip  # MLflow's palette without reds/oranges

Outcome = Literal["healthy", "healed", "diverged"]
_OUTCOMES = ("healthy", "healed", "diverged")


def outcome_color(outcome: Outcome, run_id: str) -> str:
    """The colour of a run with this outcome; a healthy run's depends on its id (stable, spread out)."""
    if outcome == "diverged":
        return DIVERGED_COLOR
    if outcome == "healed":
        return HEALED_COLOR
    if outcome != "healthy":
        raise ValueError(f"outcome must be one of {', '.join(_OUTCOMES)}, got {outcome!r}")
    return CALM_COLORS[zlib.crc32(run_id.encode()) % len(CALM_COLORS)]


def color_tags(tags: Mapping[str, str], color: str) -> dict[str, str]:
    """The tags to write for ``color`` on a run that has ``tags`` now: none when its colour is the user's
    (set, and not the one gradtrack wrote last) or already this one."""
    current = tags.get(RUN_COLOR_TAG)
    if current is not None and current != tags.get(OWN_COLOR_TAG):
        return {}
    if current == color:
        return {}
    return {RUN_COLOR_TAG: color, OWN_COLOR_TAG: color}

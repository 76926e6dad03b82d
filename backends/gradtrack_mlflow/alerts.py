"""What a ``gradtrack watch`` alert says: the flagged run it is about, its Slack-safe text, its JSON payload and
the variables a command gets, and the run's link in the MLflow UI.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

from gradtrack.delivery.secrets import strip_userinfo

DIVERGED = "diverged"
EXPLOSIONS = "explosions"
ROLLBACK = "rollback"
_TEXT_FIELD = 300  # characters of one user-controlled field in the one-line Slack text
_UNSAFE = re.compile(r"[\s\x00-\x1f\x7f-\x9f\u2028\u2029]+")

# -- what an alert says ------------------------------------------------------------------------------------


def slack_escape(text: str) -> str:
    """``&``, ``<`` and ``>`` as Slack's ``&amp;``, ``&lt;`` and ``&gt;``: no ``<!channel>``, ``<@U…>``,
    ``<url|label>`` can be spelt by the text. Whitespace and control characters become one space."""
    text = _UNSAFE.sub(" ", text).strip()
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def one_line(text: str, limit: int = _TEXT_FIELD) -> str:
    text = _UNSAFE.sub(" ", text).strip()
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _int_or_none(value: str | None) -> int | None:
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


@dataclass(frozen=True)
class FlaggedRun:
    """A run as the watcher reads it: ids, name and tags."""

    run_id: str
    run_name: str
    experiment_id: str
    experiment_name: str
    tags: Mapping[str, str]

    @property
    def diverged(self) -> bool:
        return self.tags.get("diverged") == "true"

    @property
    def explosions(self) -> int:
        count = _int_or_none(self.tags.get("gradtrack.explosions"))
        return max(count or 0, 0)

    @property
    def rollbacks(self) -> int:
        count = _int_or_none(self.tags.get("gradtrack.rollbacks"))
        return max(count or 0, 0)


@dataclass(frozen=True)
class Alert:
    """One alert: ``event`` is ``"diverged"``, ``"rollback"`` or ``"explosions"``; ``rollback_steps``: for a
    rollback, the steps of the run's latest rollbacks, oldest first (None when they could not be read)."""

    event: str
    run: FlaggedRun
    url: str | None
    rollback_steps: tuple[int, ...] | None = None

    @property
    def step(self) -> int | None:
        if self.event == ROLLBACK:
            return self.rollback_steps[-1] if self.rollback_steps else None
        tag = "gradtrack.diverged_step" if self.event == DIVERGED else "gradtrack.first_explosion_step"
        return _int_or_none(self.run.tags.get(tag))

    @property
    def reason(self) -> str | None:
        return self.run.tags.get("gradtrack.diverged_reason")

    @property
    def top_offenders(self) -> str | None:
        offenders = self.run.tags.get("gradtrack.summary.top_offenders")
        return offenders if offenders and offenders != "none" else None

    def text(self) -> str:
        """The one-line Slack message: every value that comes from the run escaped and shortened."""
        run = self.run
        name = slack_escape(one_line(run.run_name or run.run_id))
        if self.url:
            target = self.url.replace("|", "%7C").replace(" ", "%20")
            link = f"<{slack_escape(target)}|{name}>"
        else:
            link = f"{name} ({slack_escape(run.run_id)})" if run.run_name else name
        step = f" at step {self.step}" if self.step is not None else ""
        experiment = slack_escape(one_line(run.experiment_name or run.experiment_id))
        count = f"{run.explosions} gradient explosion{'s' if run.explosions != 1 else ''}"
        rollbacks = f"{run.rollbacks} rollback{'s' if run.rollbacks != 1 else ''}"
        if self.event == DIVERGED:
            reason = f": {slack_escape(one_line(self.reason))}" if self.reason else ""
            count += f"; {rollbacks}" if run.rollbacks else ""
            return f":rotating_light: gradtrack: run {link} diverged{step}{reason} (experiment {experiment}; {count})"
        if self.event == ROLLBACK:
            said = f"{self._steps_said()}, {rollbacks} so far"
            return f":rewind: gradtrack: run {link} rolled back{said} (experiment {experiment}; {count})"
        details = [f"first{step}"] if step else []
        if self.top_offenders:
            details.append(f"top offenders: {slack_escape(one_line(self.top_offenders))}")
        said = f" ({'; '.join(details)})" if details else ""
        return f":warning: gradtrack: run {link} has {count}{said} (experiment {experiment})"

    def _steps_said(self) -> str:
        """`` at step 57`` or `` at steps 27, 57`` (the latest five), or nothing when they are not known."""
        steps = (self.rollback_steps or ())[-5:]
        if not steps:
            return ""
        return f" at step{'s' if len(steps) > 1 else ''} {', '.join(str(step) for step in steps)}"

    def payload(self) -> dict[str, Any]:
        return {
            "text": self.text(),
            "event": self.event,
            "run_id": self.run.run_id,
            "run_name": self.run.run_name,
            "experiment_id": self.run.experiment_id,
            "experiment_name": self.run.experiment_name,
            "step": self.step,
            "reason": self.reason,
            "explosions": self.run.explosions,
            "rollbacks": self.run.rollbacks,
            "rollback_steps": None if self.rollback_steps is None else list(self.rollback_steps),
            "top_offenders": self.top_offenders,
            "url": self.url,
        }

    def body(self) -> bytes:
        """The payload as JSON: ``json.dumps`` escapes whatever the tags hold."""
        return json.dumps(self.payload()).encode("utf-8")

    def environment(self) -> dict[str, str]:
        """The ``GRADTRACK_*`` variables of ``--exec`` (NUL, which no variable can hold, removed)."""
        values = {
            "EVENT": self.event,
            "RUN_ID": self.run.run_id,
            "RUN_NAME": self.run.run_name,
            "EXPERIMENT": self.run.experiment_name,
            "EXPERIMENT_ID": self.run.experiment_id,
            "STEP": "" if self.step is None else str(self.step),
            "REASON": self.reason or "",
            "EXPLOSIONS": str(self.run.explosions),
            "ROLLBACKS": str(self.run.rollbacks),
            "ROLLBACK_STEPS": ",".join(str(step) for step in self.rollback_steps or ()),
            "TOP_OFFENDERS": self.top_offenders or "",
            "URL": self.url or "",
        }
        return {f"GRADTRACK_{key}": value.replace("\0", "") for key, value in values.items()}

    def summary(self) -> str:
        """The line printed when the alert was sent (control characters removed)."""
        run = self.run
        where = f"run {one_line(run.run_name or '?', 120)!r} ({run.run_id}) in experiment "
        where += f"{one_line(run.experiment_name, 120)!r} ({run.experiment_id})"
        step = f" at step {self.step}" if self.step is not None else ""
        if self.event == DIVERGED:
            return f"sent diverged alert: {where}{step}"
        if self.event == ROLLBACK:
            return f"sent rollback alert: {where}, {run.rollbacks} rollbacks{self._steps_said()}"
        first = f" (the first{step})" if step else ""
        return f"sent explosions alert: {where}, {run.explosions} explosions{first}"


def run_url(tracking_uri: str, experiment_id: str, run_id: str) -> str | None:
    """The run in the MLflow UI served at an http(s) tracking URI (credentials removed); None otherwise."""
    if not tracking_uri.startswith(("http://", "https://")):
        return None
    base = strip_userinfo(tracking_uri).rstrip("/")
    return f"{base}/#/experiments/{quote(experiment_id, safe='')}/runs/{quote(run_id, safe='')}"



"""``gradtrack watch``: alerts for MLflow runs that gradtrack monitors (MLflow itself has none).

The watcher polls the tracking server for runs that gradtrack flagged (tag ``diverged`` = ``"true"``,
``gradtrack.explosions`` or ``gradtrack.rollbacks`` above 0) and sends one alert per new condition: a run whose
``diverged`` tag turned ``"true"``, a run that rolled back again (``on_divergence="rollback"``), a run whose
explosion count rose. The gravest news stands for the rest: a run first seen already diverged gets one
divergence alert (not one per past explosion or rollback), a rollback alert covers the explosions so far, and
once a divergence was alerted nothing more of that run is. A state file remembers what was delivered, so a
restart never alerts twice; an alert that could not be delivered (webhook down, command failed) is tried
again at the next poll and only then recorded.

Only three filtered searches per poll reach the server (``tags.diverged = 'true'``,
``tags.`gradtrack.explosions` != '0'`` and ``tags.`gradtrack.rollbacks` != '0'``): healthy runs are never
read; a rollback alert also reads that run's ``grad/rollback`` metric for the steps. Over HTTP each request is
made once, bounded by ``--timeout``, without MLflow's own retry loop (minutes by default): the next poll is
the retry.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import hashlib
import http.client
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from types import FrameType, SimpleNamespace
from typing import IO, Any, Protocol
from urllib.parse import quote, urlsplit

from gradtrack._version import __version__
from gradtrack.secrets import redact, strip_userinfo

__all__ = [
    "Alert",
    "FlaggedRun",
    "StateError",
    "StateInUseError",
    "WatchState",
    "Watcher",
    "add_parser",
    "default_state_path",
    "main",
    "run",
    "slack_escape",
]

DIVERGED = "diverged"
EXPLOSIONS = "explosions"
ROLLBACK = "rollback"
ROLLBACK_METRIC = "grad/rollback"  # 1 at each rollback's step

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2

DEFAULT_INTERVAL = 30.0
DEFAULT_TIMEOUT = 10.0
STATE_VERSION = 1

_API = "/api/2.0/mlflow"
_PAGE = 1000  # runs or experiments per search request
_IDS_PER_SEARCH = 100  # experiment ids per runs/search request
_FILTERS = ("tags.diverged = 'true'", "tags.`gradtrack.explosions` != '0'", "tags.`gradtrack.rollbacks` != '0'")
_STEPS_LISTED = 100  # the latest rollback steps an alert carries
_TEXT_FIELD = 300  # characters of one user-controlled field in the one-line Slack text
_ERROR_LINE = 500
_BODY_LIMIT = 64 * 1024  # what is read of a webhook's answer
_UNSAFE = re.compile(r"[\s\x00-\x1f\x7f-\x9f\u2028\u2029]+")

_DESCRIPTION = """\
Alerts for MLflow runs: poll the tracking server and send one alert per new condition of a run that
gradtrack monitors: a run whose tag `diverged` turned "true", a run whose `gradtrack.rollbacks` count rose
(on_divergence="rollback" healed it) and a run whose `gradtrack.explosions` count rose. A run first seen
already diverged gets one divergence alert, not one per past explosion or rollback; a rollback alert covers
the explosions before it; after its divergence alert nothing more of a run is alerted. What was delivered
is kept in a state file, so a restart never alerts twice (the first start, with no state file, alerts
every run already flagged, once); an alert that could not be delivered is tried again at the next poll.
A tracking server that cannot be read costs one line on stderr per poll, never the watcher.
"""

_EPILOG = """\
alerts:
  --webhook: one JSON POST per alert (Content-Type: application/json) with a Slack-compatible "text"
  (in which "&", "<" and ">" are escaped as Slack documents, so a layer name or a reason cannot mention
  @channel or forge a link) and the fields: event ("diverged", "rollback" or "explosions"), run_id,
  run_name, experiment_id, experiment_name, step (gradtrack.diverged_step; the latest rollback's step; or
  gradtrack.first_explosion_step for explosions), reason (gradtrack.diverged_reason), explosions,
  rollbacks (gradtrack.rollbacks), rollback_steps (for a rollback alert the steps of the latest 100, from
  the metric grad/rollback, else null), top_offenders (gradtrack.summary.top_offenders, or null) and url
  (the run in the MLflow UI for an http(s) tracking URI, else null). Any 2xx answer is a delivery;
  redirects are not followed.
  --exec: the command (run directly, never through a shell; --exec comes last on the command line, as
  every argument after it belongs to the command) gets the same JSON on stdin and the variables
  GRADTRACK_EVENT, GRADTRACK_RUN_ID, GRADTRACK_RUN_NAME, GRADTRACK_EXPERIMENT, GRADTRACK_EXPERIMENT_ID,
  GRADTRACK_STEP, GRADTRACK_REASON, GRADTRACK_EXPLOSIONS, GRADTRACK_ROLLBACKS, GRADTRACK_ROLLBACK_STEPS
  (comma-separated), GRADTRACK_TOP_OFFENDERS and GRADTRACK_URL (empty when unknown). Exit status 0 is a
  delivery; its output is shown only when it fails.

state:
  default $XDG_CACHE_HOME/gradtrack/watch-<hash>.json (else ~/.cache/gradtrack/...), one per tracking
  URI and set of experiments; written atomically, readable by its owner only, without credentials. Two
  watchers cannot share one state file: give each its own --state.

exit codes:
  0  --once: everything read and every alert delivered; or the watcher was stopped (SIGTERM, Ctrl-C)
  1  --once: the tracking server could not be read, an alert could not be delivered or the state file
     could not be written; or another watcher is using the state file
  2  bad arguments (an unknown option, a webhook that is not http(s), an --interval <= 0, a command
     that cannot be found), an unreadable state file, or MLflow not installed

examples:
  gradtrack watch --experiment rnn --webhook https://hooks.slack.com/services/T000/B000/XXXX
  MLFLOW_TRACKING_URI=http://mlflow:5000 gradtrack watch --once --exec notify.sh --page-oncall
"""


# -- what an alert says ------------------------------------------------------------------------------------


def slack_escape(text: str) -> str:
    """``&``, ``<`` and ``>`` as Slack's ``&amp;``, ``&lt;`` and ``&gt;``: no ``<!channel>``, ``<@U…>``,
    ``<url|label>`` can be spelt by the text. Whitespace and control characters become one space."""
    text = _UNSAFE.sub(" ", text).strip()
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _one_line(text: str, limit: int = _TEXT_FIELD) -> str:
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
        name = slack_escape(_one_line(run.run_name or run.run_id))
        if self.url:
            target = self.url.replace("|", "%7C").replace(" ", "%20")
            link = f"<{slack_escape(target)}|{name}>"
        else:
            link = f"{name} ({slack_escape(run.run_id)})" if run.run_name else name
        step = f" at step {self.step}" if self.step is not None else ""
        experiment = slack_escape(_one_line(run.experiment_name or run.experiment_id))
        count = f"{run.explosions} gradient explosion{'s' if run.explosions != 1 else ''}"
        rollbacks = f"{run.rollbacks} rollback{'s' if run.rollbacks != 1 else ''}"
        if self.event == DIVERGED:
            reason = f": {slack_escape(_one_line(self.reason))}" if self.reason else ""
            count += f"; {rollbacks}" if run.rollbacks else ""
            return f":rotating_light: gradtrack: run {link} diverged{step}{reason} (experiment {experiment}; {count})"
        if self.event == ROLLBACK:
            said = f"{self._steps_said()}, {rollbacks} so far"
            return f":rewind: gradtrack: run {link} rolled back{said} (experiment {experiment}; {count})"
        details = [f"first{step}"] if step else []
        if self.top_offenders:
            details.append(f"top offenders: {slack_escape(_one_line(self.top_offenders))}")
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
        where = f"run {_one_line(run.run_name or '?', 120)!r} ({run.run_id}) in experiment "
        where += f"{_one_line(run.experiment_name, 120)!r} ({run.experiment_id})"
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


# -- reading the tracking server ---------------------------------------------------------------------------


class _Reader(Protocol):
    def experiments(self, names: Sequence[str]) -> tuple[dict[str, str], list[str]]: ...

    def flagged_runs(self, experiments: Mapping[str, str]) -> list[FlaggedRun]: ...

    def rollback_steps(self, run_id: str) -> list[int]: ...


def _flagged(info: Mapping[str, Any], tags: dict[str, str], experiments: Mapping[str, str]) -> FlaggedRun:
    experiment_id = str(info.get("experiment_id", ""))
    return FlaggedRun(
        run_id=str(info["run_id"]),
        run_name=str(info.get("run_name") or tags.get("mlflow.runName") or ""),
        experiment_id=experiment_id,
        experiment_name=experiments.get(experiment_id, ""),
        tags=tags,
    )


def _rolled_back(points: Iterable[Any]) -> list[int]:
    """The steps of the latest rollbacks from ``grad/rollback``'s points (``step``, ``timestamp``, ``value``):
    each step's newest value counts (a resumed run logs some steps twice)."""
    from gradtrack_mlflow.cli import newest

    steps = [step for step, value in newest(points).items() if value >= 1]
    return steps[-_STEPS_LISTED:]


def _chunks(items: Sequence[str], size: int) -> Iterator[list[str]]:
    for start in range(0, len(items), size):
        yield list(items[start : start + size])


class _RestReader:
    """MLflow's REST API over http(s), one bounded attempt per request (MLflow's credentials, TLS settings)."""

    def __init__(self, tracking_uri: str, timeout: float) -> None:
        self.tracking_uri = tracking_uri
        self.timeout = timeout

    def _call(self, method: str, endpoint: str, body: dict[str, Any]) -> Any:
        from mlflow.utils.credentials import get_default_host_creds
        from mlflow.utils.rest_utils import http_request, verify_rest_response

        path = f"{_API}/{endpoint}"
        payload = {"params": body} if method == "GET" else {"json": body}
        response = http_request(
            get_default_host_creds(self.tracking_uri), path, method, max_retries=0, timeout=self.timeout, **payload
        )
        verify_rest_response(response, path)
        return response.json()

    def experiments(self, names: Sequence[str]) -> tuple[dict[str, str], list[str]]:
        from mlflow.exceptions import MlflowException

        found: dict[str, str] = {}
        missing: list[str] = []
        if names:
            for name in names:
                try:
                    experiment = self._call("GET", "experiments/get-by-name", {"experiment_name": name})["experiment"]
                except MlflowException as exc:
                    if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
                        raise
                    missing.append(name)
                    continue
                if experiment.get("lifecycle_stage", "active") != "active":
                    missing.append(name)
                else:
                    found[str(experiment["experiment_id"])] = str(experiment["name"])
            return found, missing
        for experiment in self._pages("experiments/search", "experiments", {"view_type": "ACTIVE_ONLY"}):
            found[str(experiment["experiment_id"])] = str(experiment["name"])
        return found, missing

    def flagged_runs(self, experiments: Mapping[str, str]) -> list[FlaggedRun]:
        runs: dict[str, FlaggedRun] = {}
        for ids in _chunks(sorted(experiments), _IDS_PER_SEARCH):
            for filter_string in _FILTERS:
                body = {"experiment_ids": ids, "filter": filter_string, "run_view_type": "ACTIVE_ONLY"}
                for found in self._pages("runs/search", "runs", body):
                    tags = {tag["key"]: tag.get("value", "") for tag in found.get("data", {}).get("tags", [])}
                    run = _flagged(found["info"], tags, experiments)
                    runs[run.run_id] = run
        return list(runs.values())

    def rollback_steps(self, run_id: str) -> list[int]:
        points: list[SimpleNamespace] = []
        token: str | None = None
        while True:
            query = {"run_id": run_id, "metric_key": ROLLBACK_METRIC, **({"page_token": token} if token else {})}
            answer = self._call("GET", "metrics/get-history", query)
            points += [SimpleNamespace(step=int(point.get("step", 0)), timestamp=int(point.get("timestamp", 0)),
                                       value=float(point["value"])) for point in answer.get("metrics", [])]  # fmt: skip
            token = answer.get("next_page_token")
            if not token:
                return _rolled_back(points)

    def _pages(self, endpoint: str, key: str, body: dict[str, Any]) -> Iterator[Any]:
        """Every item under ``key`` of a paged search, page after page."""
        token: str | None = None
        while True:
            page = {"max_results": _PAGE, **({"page_token": token} if token else {})}
            answer = self._call("POST", endpoint, {**body, **page})
            yield from answer.get(key, [])
            token = answer.get("next_page_token")
            if not token:
                return


class _ClientReader:
    """Any other tracking URI (a local sqlite store, databricks, ...): through ``MlflowClient``."""

    def __init__(self, tracking_uri: str) -> None:
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri)

    def experiments(self, names: Sequence[str]) -> tuple[dict[str, str], list[str]]:
        from mlflow.entities import ViewType

        found: dict[str, str] = {}
        missing: list[str] = []
        if names:
            for name in names:
                experiment = self.client.get_experiment_by_name(name)
                if experiment is None or experiment.lifecycle_stage != "active":
                    missing.append(name)
                else:
                    found[str(experiment.experiment_id)] = str(experiment.name)
            return found, missing
        search = functools.partial(self.client.search_experiments, view_type=ViewType.ACTIVE_ONLY, max_results=_PAGE)
        found.update({str(experiment.experiment_id): str(experiment.name) for experiment in _client_pages(search)})
        return found, missing

    def flagged_runs(self, experiments: Mapping[str, str]) -> list[FlaggedRun]:
        from mlflow.entities import ViewType

        runs: dict[str, FlaggedRun] = {}
        for ids in _chunks(sorted(experiments), _IDS_PER_SEARCH):
            for filter_string in _FILTERS:
                search = functools.partial(self.client.search_runs, ids, filter_string,
                                           run_view_type=ViewType.ACTIVE_ONLY, max_results=_PAGE)  # fmt: skip
                for found in _client_pages(search):
                    info = {
                        "run_id": found.info.run_id,
                        "run_name": found.info.run_name,
                        "experiment_id": found.info.experiment_id,
                    }
                    run = _flagged(info, dict(found.data.tags), experiments)
                    runs[run.run_id] = run
        return list(runs.values())

    def rollback_steps(self, run_id: str) -> list[int]:
        return _rolled_back(self.client.get_metric_history(run_id, ROLLBACK_METRIC))


def _client_pages(search: Callable[..., Any]) -> Iterator[Any]:
    """Every item of an ``MlflowClient`` search, page after page (``search(page_token=...)``)."""
    token: str | None = None
    while True:
        page = search(page_token=token)
        yield from page
        token = page.token
        if not token:
            return


def _reader(tracking_uri: str, timeout: float) -> _Reader:
    if tracking_uri.startswith(("http://", "https://")):
        return _RestReader(tracking_uri, timeout)
    return _ClientReader(tracking_uri)


# -- delivering alerts -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Failure:
    message: str
    unreachable: bool  # the destination itself failed: the other alerts of this poll wait for the next one


class _Delivery(Protocol):
    def send(self, alert: Alert) -> _Failure | None: ...


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """A webhook that redirects is an error: urllib would turn the POST into a GET and drop the alert."""

    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


class _Webhook:
    def __init__(self, url: str, timeout: float) -> None:
        self.url = url
        self.timeout = timeout
        self._opener = urllib.request.build_opener(_NoRedirect)

    def send(self, alert: Alert) -> _Failure | None:
        request = urllib.request.Request(
            self.url,
            data=alert.body(),
            method="POST",
            headers={"Content-Type": "application/json", "User-Agent": f"gradtrack/{__version__}"},
        )
        try:
            with self._opener.open(request, timeout=self.timeout) as response:
                response.read(_BODY_LIMIT)
        except urllib.error.HTTPError as exc:  # an answer, but not a 2xx one
            exc.close()
            busy = exc.code >= 500 or exc.code == 429  # the others would meet the same answer
            return _Failure(f"the webhook answered {exc.code} {exc.reason}", unreachable=busy)
        except (OSError, http.client.HTTPException, ValueError) as exc:  # URLError, timeouts, resets
            reason = exc.reason if isinstance(exc, urllib.error.URLError) else exc
            return _Failure(f"the webhook could not be reached ({reason!r})", unreachable=True)
        return None


class _Command:
    def __init__(self, argv: Sequence[str], timeout: float) -> None:
        self.argv = list(argv)
        self.timeout = timeout

    def send(self, alert: Alert) -> _Failure | None:
        name = os.path.basename(self.argv[0])
        try:
            process = subprocess.Popen(
                self.argv,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env={**os.environ, **alert.environment()},
                start_new_session=True,  # a process group of its own, killed whole on timeout
            )
        except OSError as exc:
            return _Failure(f"cannot run {name!r} ({exc.strerror or exc!r})", unreachable=True)
        with process:
            try:
                _, err = process.communicate(alert.body(), timeout=self.timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    process.communicate(timeout=5)
                return _Failure(f"{name!r} did not finish within {self.timeout:g}s (killed)", unreachable=True)
        if process.returncode != 0:
            lines = err.decode("utf-8", "replace").strip().splitlines()
            said = f": {_one_line(lines[-1], 200)}" if lines else ""
            return _Failure(f"{name!r} exited with status {process.returncode}{said}", unreachable=False)
        return None


# -- the state file ----------------------------------------------------------------------------------------


class StateError(ValueError):
    """The state file exists but is not one ``gradtrack watch`` wrote."""


class StateInUseError(RuntimeError):
    """Another watcher holds the state file's lock."""


def _cache_home() -> Path:
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    return Path(xdg) if os.path.isabs(xdg) else Path.home() / ".cache"


def default_state_path(tracking_uri: str, experiments: Sequence[str]) -> Path:
    """``<cache>/gradtrack/watch-<hash of the tracking URI (without credentials) and experiments>.json``."""
    key = json.dumps([strip_userinfo(tracking_uri), sorted(set(experiments))])
    digest = hashlib.sha256(key.encode("utf-8")).hexdigest()[:16]
    return _cache_home() / "gradtrack" / f"watch-{digest}.json"


def _private_directories(directory: Path) -> None:
    """Create ``directory`` and its missing parents readable by their owner only (existing ones untouched)."""
    missing = [d for d in (directory, *directory.parents) if not d.exists()]
    for folder in reversed(missing):
        with contextlib.suppress(FileExistsError):
            folder.mkdir(mode=0o700)
            os.chmod(folder, 0o700)


@dataclass
class _Sent:
    diverged: bool = False
    explosions: int = 0
    rollbacks: int = 0


class WatchState:
    """What was delivered, per run: the divergence alerted or not, and the explosion and rollback counts alerted
    (a state written before rollbacks were watched has none: 0)."""

    def __init__(self, path: Path, tracking_uri: str, experiments: Sequence[str]) -> None:
        self.path = path
        self.tracking_uri = strip_userinfo(tracking_uri)
        self.experiments = sorted(set(experiments))
        self.runs: dict[str, _Sent] = {}
        self._lock: IO[str] | None = None

    def load(self) -> None:
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return
        except OSError as exc:
            raise StateError(f"cannot read the state file {self.path}: {exc.strerror or exc!r}") from None
        try:
            data = json.loads(text)
            if not isinstance(data, dict) or data.get("version") != STATE_VERSION:
                raise ValueError(f"not a version {STATE_VERSION} gradtrack watch state")
            runs = {}
            for run_id, sent in data["runs"].items():
                diverged, explosions, rollbacks = sent["diverged"], sent["explosions"], sent.get("rollbacks", 0)
                counts_ok = all(isinstance(n, int) and not isinstance(n, bool) for n in (explosions, rollbacks))
                if not isinstance(diverged, bool) or not counts_ok:
                    raise ValueError(f"bad entry for run {run_id!r}")
                runs[str(run_id)] = _Sent(diverged, explosions, rollbacks)
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise StateError(
                f"{self.path} is not a gradtrack watch state file ({exc}); move it away to start afresh "
                "(every flagged run is then alerted again)"
            ) from None
        self.runs = runs

    def lock(self) -> None:
        """Hold ``<state>.lock`` for this process's lifetime: two watchers on one state would alert twice."""
        try:
            import fcntl
        except ImportError:  # pragma: no cover - not POSIX: no lock
            return
        _private_directories(self.path.parent)
        lock_path = self.path.with_name(self.path.name + ".lock")
        handle = open(os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600), "r+", encoding="utf-8")  # noqa: SIM115
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.close()
            raise StateInUseError(
                f"another gradtrack watch is using the state file {self.path}; give this one its own --state"
            ) from None
        self._lock = handle

    def unlock(self) -> None:
        if self._lock is not None:
            self._lock.close()  # closing releases the lock
            self._lock = None

    def sent(self, run_id: str) -> _Sent:
        return self.runs.get(run_id, _Sent())

    def record(self, alert: Alert) -> None:
        sent = self.runs.setdefault(alert.run.run_id, _Sent())
        if alert.event == DIVERGED:
            sent.diverged = True  # covers the explosions so far: no explosion alert for them afterwards
        sent.explosions = max(sent.explosions, alert.run.explosions)  # every alert says the counts so far
        sent.rollbacks = max(sent.rollbacks, alert.run.rollbacks)

    def save(self) -> None:
        """Write the whole state to a temporary file in the same folder (0600), then rename it over the old."""
        data = {
            "version": STATE_VERSION,
            "tracking_uri": self.tracking_uri,
            "experiments": self.experiments,
            "runs": {
                run_id: {"diverged": s.diverged, "explosions": s.explosions, "rollbacks": s.rollbacks}
                for run_id, s in self.runs.items()
            },
        }
        _private_directories(self.path.parent)
        descriptor, temporary = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.", suffix=".tmp")
        try:
            with open(descriptor, "w", encoding="utf-8") as file:
                json.dump(data, file, indent=1, sort_keys=True)
                file.flush()
                os.fsync(file.fileno())
            os.chmod(temporary, 0o600)
            os.replace(temporary, self.path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(temporary)
            raise


# -- the watcher -------------------------------------------------------------------------------------------


class Watcher:
    """Polls one tracking URI and delivers what is new; ``poll()`` never raises for a server or a delivery."""

    def __init__(
        self,
        tracking_uri: str,
        experiments: Sequence[str],
        delivery: _Delivery,
        state: WatchState,
        timeout: float = DEFAULT_TIMEOUT,
        secrets: Sequence[str] = (),
    ) -> None:
        self.tracking_uri = tracking_uri
        self.experiments = list(dict.fromkeys(experiments))
        self.delivery = delivery
        self.state = state
        self.timeout = timeout
        self.secrets = [s for s in secrets if s]
        self._reader: _Reader | None = None
        self._warned_missing: set[str] = set()

    def _clean(self, text: str) -> str:
        """One line without credentials: tracking URI userinfo, secret variables, the webhook URL."""
        for secret in self.secrets:
            text = text.replace(secret, _masked_url(secret))
        return _one_line(redact(text, [self.tracking_uri]), _ERROR_LINE)

    def error(self, message: str) -> None:
        print(f"gradtrack watch: {self._clean(message)}", file=sys.stderr, flush=True)

    def pending(self, run: FlaggedRun) -> Alert | None:
        """The alert this run is owed now, if any."""
        sent = self.state.sent(run.run_id)
        if sent.diverged:
            return None  # its explosions after the divergence are no news
        url = run_url(self.tracking_uri, run.experiment_id, run.run_id)
        if run.diverged:
            return Alert(DIVERGED, run, url)
        if run.rollbacks > sent.rollbacks:
            return Alert(ROLLBACK, run, url)
        if run.explosions > sent.explosions:
            return Alert(EXPLOSIONS, run, url)
        return None

    def poll(self) -> bool:
        """One poll; True when the server was read, every alert due was delivered and the state saved."""
        where = strip_userinfo(self.tracking_uri)
        try:
            if self._reader is None:
                self._reader = _reader(self.tracking_uri, self.timeout)
            reader = self._reader
            experiments, missing = reader.experiments(self.experiments)
            runs = reader.flagged_runs(experiments) if experiments else []
        except Exception as exc:
            self.error(f"cannot read the MLflow tracking server at {where}: {type(exc).__name__}: {exc}")
            return False
        for name in set(missing) - self._warned_missing:
            self.error(f"experiment {name!r} does not exist (yet) at {where}; watching for it")
        self._warned_missing = set(missing)
        ok = True
        unreachable: _Failure | None = None
        waiting = 0
        for run in sorted(runs, key=lambda r: (r.experiment_id, r.run_id)):
            alert = self.pending(run)
            if alert is None:
                continue
            if unreachable is not None:
                waiting += 1
                continue
            if alert.event == ROLLBACK:
                alert = self._with_rollback_steps(reader, alert)
            try:
                failure = self.delivery.send(alert)
            except Exception as exc:  # a bug in delivering costs this alert a retry, never the watcher
                failure = _Failure(f"{type(exc).__name__}: {exc}", unreachable=False)
            if failure is not None:
                ok = False
                self.error(
                    f"could not deliver the {alert.event} alert for run {run.run_id}: {failure.message}; "
                    "trying again at the next poll"
                )
                if failure.unreachable:
                    unreachable = failure
                continue
            self.state.record(alert)
            print(self._clean(alert.summary()), flush=True)
            ok = self._save() and ok
        if waiting:
            self.error(f"{waiting} more alerts wait for the next poll")
        if not self.state.path.exists():
            ok = self._save() and ok
        return ok

    def _with_rollback_steps(self, reader: _Reader, alert: Alert) -> Alert:
        """The alert with the steps of the run's rollbacks; without them when they cannot be read (the count is
        the news: it is not held back for the steps)."""
        try:
            return replace(alert, rollback_steps=tuple(reader.rollback_steps(alert.run.run_id)))
        except Exception as exc:
            self.error(f"cannot read the rollback steps of run {alert.run.run_id} ({type(exc).__name__}: {exc}); "
                       "alerting without them")  # fmt: skip
            return alert

    def _save(self) -> bool:
        try:
            self.state.save()
        except OSError as exc:
            self.error(f"cannot write the state file {self.state.path}: {exc.strerror or exc!r}")
            return False
        return True

    def loop(self, interval: float, stop: threading.Event) -> None:
        """Poll every ``interval`` seconds (start to start) until ``stop`` is set."""
        while not stop.is_set():
            started = time.monotonic()
            self.poll()
            stop.wait(max(0.0, started + interval - time.monotonic()))


def _masked_url(url: str) -> str:
    """A URL reduced to its scheme and host: a webhook's path is its secret (Slack, Teams, Discord)."""
    parts = urlsplit(url)
    if parts.scheme and parts.hostname:
        port = f":{parts.port}" if parts.port else ""
        return f"{parts.scheme}://{parts.hostname}{port}/***"
    return "***"


# -- command line ------------------------------------------------------------------------------------------


def _configure(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument(
        "--webhook",
        metavar="URL",
        help="POST each alert as JSON to this http(s) URL (a Slack incoming webhook, or any JSON endpoint)",
    )
    target.add_argument(
        "--exec",
        dest="exec_command",
        nargs=argparse.REMAINDER,
        metavar="CMD",
        help="run CMD [ARG ...] for each alert, the event JSON on stdin and in GRADTRACK_* variables; "
        "must be the last option (everything after it is the command)",
    )
    parser.add_argument(
        "--experiment",
        dest="experiments",
        action="append",
        default=[],
        metavar="NAME",
        help="watch this experiment (repeatable); default: every active experiment",
    )
    parser.add_argument(
        "--interval",
        type=float,
        default=DEFAULT_INTERVAL,
        metavar="S",
        help=f"seconds between polls (default {DEFAULT_INTERVAL:g})",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT,
        metavar="S",
        help=f"bound of each request to the tracking server and the webhook, and of each --exec command "
        f"(default {DEFAULT_TIMEOUT:g})",
    )
    parser.add_argument(
        "--state",
        metavar="PATH",
        help="the state file (default: $XDG_CACHE_HOME/gradtrack/watch-<hash>.json, else ~/.cache/gradtrack/...)",
    )
    parser.add_argument(
        "--tracking-uri",
        metavar="URI",
        help="the MLflow tracking URI (default: MLflow's configuration, MLFLOW_TRACKING_URI)",
    )
    parser.add_argument("--once", action="store_true", help="poll once and exit (cron, tests); see exit codes")
    return parser


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> argparse.ArgumentParser:
    """Add the ``watch`` command to ``subparsers`` (``gradtrack watch``); run it with ``run(args)``, which is
    also set as the parser's ``handler`` default (what ``gradtrack_cli_commands`` commands set)."""
    parser = subparsers.add_parser(
        "watch",
        help="send alerts (webhook or command) when MLflow runs diverge or their gradients explode",
        description=_DESCRIPTION,
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.set_defaults(handler=run)
    return _configure(parser)


def _usage_error(message: str) -> int:
    print(f"gradtrack watch: error: {message}", file=sys.stderr)
    return EXIT_USAGE


def _check_webhook(url: str) -> str | None:
    """None when ``url`` is an http(s) URL with a host; else why not (without echoing it: it is a secret)."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number
    except ValueError:
        return "--webhook is not a valid URL"
    if parts.scheme.lower() not in ("http", "https"):
        got = f"scheme {parts.scheme!r}" if parts.scheme else "no scheme"
        return f"--webhook must be an http:// or https:// URL (got {got})"
    if not parts.hostname:
        return "--webhook has no host"
    return None


@contextlib.contextmanager
def _stop_on_signals(stop: threading.Event) -> Iterator[None]:
    """SIGTERM and SIGINT end the loop after the current poll (a second SIGINT interrupts it)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: FrameType | None) -> None:
        if stop.is_set() and signum == signal.SIGINT:
            raise KeyboardInterrupt
        stop.set()

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def run(args: argparse.Namespace) -> int:
    """Run ``gradtrack watch`` with parsed arguments; returns the exit code."""
    if args.exec_command is not None and not args.exec_command:
        return _usage_error("--exec needs a command: --exec CMD [ARG ...]")
    if args.webhook is not None and (problem := _check_webhook(args.webhook)):
        return _usage_error(problem)
    if args.exec_command and shutil.which(args.exec_command[0]) is None:
        return _usage_error(f"--exec: command {os.path.basename(args.exec_command[0])!r} not found")
    for option, value in (("--interval", args.interval), ("--timeout", args.timeout)):
        if not value > 0 or value == float("inf"):
            return _usage_error(f"{option} must be a finite number of seconds > 0, got {value!r}")
    try:
        import mlflow
    except ImportError:
        return _usage_error("gradtrack watch needs MLflow: pip install 'gradtrack[mlflow]'")
    tracking_uri = args.tracking_uri or mlflow.get_tracking_uri()
    experiments = list(dict.fromkeys(args.experiments))
    path = Path(args.state) if args.state else default_state_path(tracking_uri, experiments)
    state = WatchState(path, tracking_uri, experiments)
    try:
        state.load()
    except StateError as exc:
        return _usage_error(redact(str(exc), [tracking_uri]))
    delivery: _Delivery
    if args.webhook is not None:
        delivery = _Webhook(args.webhook, args.timeout)
    else:
        delivery = _Command(args.exec_command or [], args.timeout)
    watcher = Watcher(tracking_uri, experiments, delivery, state, args.timeout, secrets=[args.webhook or ""])
    try:
        state.lock()
    except (StateInUseError, OSError) as exc:
        watcher.error(str(exc))
        return EXIT_FAILED
    try:
        if args.once:
            return EXIT_OK if watcher.poll() else EXIT_FAILED
        which = ", ".join(repr(name) for name in experiments) or "every experiment"
        watcher.error(
            f"watching {which} at {strip_userinfo(tracking_uri)} every {args.interval:g}s; state in {state.path}"
        )
        stop = threading.Event()
        with _stop_on_signals(stop), contextlib.suppress(KeyboardInterrupt):
            watcher.loop(args.interval, stop)
        watcher.error("stopped")
        return EXIT_OK
    finally:
        state.unlock()


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m gradtrack_mlflow.watch``: the same command, standalone; returns the exit code."""
    parser = argparse.ArgumentParser(
        prog="python -m gradtrack_mlflow.watch",
        description=_DESCRIPTION,
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _configure(parser)
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help (0) or a bad argument (2)
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    return run(args)


if __name__ == "__main__":
    sys.exit(main())

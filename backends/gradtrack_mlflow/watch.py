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
import os
import shutil
import signal
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from types import FrameType
from urllib.parse import urlsplit

from gradtrack.delivery.secrets import redact, strip_userinfo
from gradtrack_mlflow.alerts import DIVERGED, EXPLOSIONS, ROLLBACK, Alert, FlaggedRun, one_line, run_url, slack_escape
from gradtrack_mlflow.watch_delivery import Command, Delivery, Failure, Webhook
from gradtrack_mlflow.watch_reader import Reader, reader_for
from gradtrack_mlflow.watch_state import StateError, StateInUseError, WatchState, default_state_path

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

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
DEFAULT_INTERVAL = 30.0
DEFAULT_TIMEOUT = 10.0
_ERROR_LINE = 500

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


# -- the watcher -------------------------------------------------------------------------------------------


class Watcher:
    """Polls one tracking URI and delivers what is new; ``poll()`` never raises for a server or a delivery."""

    def __init__(
        self,
        tracking_uri: str,
        experiments: Sequence[str],
        delivery: Delivery,
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
        self._reader: Reader | None = None
        self._warned_missing: set[str] = set()

    def _clean(self, text: str) -> str:
        """One line without credentials: tracking URI userinfo, secret variables, the webhook URL."""
        for secret in self.secrets:
            text = text.replace(secret, _masked_url(secret))
        return one_line(redact(text, [self.tracking_uri]), _ERROR_LINE)

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
                self._reader = reader_for(self.tracking_uri, self.timeout)
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
        unreachable: Failure | None = None
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
                failure = Failure(f"{type(exc).__name__}: {exc}", unreachable=False)
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

    def _with_rollback_steps(self, reader: Reader, alert: Alert) -> Alert:
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
    delivery: Delivery
    if args.webhook is not None:
        delivery = Webhook(args.webhook, args.timeout)
    else:
        delivery = Command(args.exec_command or [], args.timeout)
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

"""``MLflowBackend``: gradtrack's records as an MLflow run, without ever holding up training.

The hooks (on gradtrack's per-backend worker thread) only turn records into small operations and
hand them to a :class:`~gradtrack_mlflow.sender.Sender`, whose own thread talks to MLflow.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import subprocess
import sys
import threading
import time
import uuid
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any, final

import numpy as np

from gradtrack import hookimpl
from gradtrack._version import __version__
from gradtrack.delivery.history import RunHistory
from gradtrack.delivery.notes import divergence_note, summary_note
from gradtrack.delivery.secrets import strip_userinfo
from gradtrack.events import (
    Divergence,
    Explosion,
    Instability,
    LayersAdded,
    Rollback,
    RunEnd,
    RunStart,
    StepBatch,
    Summary,
)
from gradtrack.naming import extend_names, sanitize_names
from gradtrack.validate import mapping, seconds, text
from gradtrack_mlflow.colors import Outcome
from gradtrack_mlflow.sender import Sender
from gradtrack_mlflow.spool import Spool, private_directory, private_open
from gradtrack_mlflow.transport import LINKS, Sink, encode_value

__all__ = ["MLflowBackend", "SpoolLeftWarning"]

_STATUS = {"finished": "FINISHED", "failed": "FAILED", "killed": "KILLED"}
_SUMMARY_METRICS = (
    "steps", "clipped_steps", "skipped_steps", "nonfinite_steps", "explosions", "clip_rate",
    "norm_mean", "norm_median", "norm_p95", "norm_p99", "norm_max", "recommended_max_norm",
    "dropped_records", "amp_overflow_steps",
)  # fmt: skip
_MAX_TAG_VALUE = 8000


class SpoolLeftWarning(RuntimeWarning):
    """Some records could not reach MLflow before the exit deadline; they wait in a spool file."""


_LOSS_KEY = re.compile(r"(?!/)(?!.*//)[\w.\- :/]{1,250}")  # MLflow's rule for metric keys


def _option(name: str) -> str:
    return f"mlflow option {name!r}"


def replay_command(spool: Spool) -> str:
    return f"{Path(sys.executable).name} -m gradtrack_mlflow replay {spool.path}"


@final
class MLflowBackend:
    """Logs gradtrack's metrics, tags, params and artifacts to an MLflow run.

    Options (``backend_options={"mlflow": {...}}`` or ``MLflowBackend(...)``):

    * ``tracking_uri``: where to log; default MLflow's own configuration (``mlflow.set_tracking_uri``,
      ``MLFLOW_TRACKING_URI``, else ``sqlite:///mlflow.db`` in the working directory).
    * ``experiment_name``: default ``MLFLOW_EXPERIMENT_NAME``, else MLflow's default experiment.
    * ``run_name``, ``tags`` (dict of str): for the run gradtrack creates (tags also on a reused run).
    * ``run_id``: log into this existing run and leave it open. Without it, an active run
      (``with mlflow.start_run():`` on the thread that enters the tracker) is used the same way;
      otherwise gradtrack creates a run and ends it FINISHED / FAILED / KILLED like the tracker.
    * ``flush_every_s`` (1.0): how often routine records are batched and sent.
    * ``request_timeout`` (5.0): bound of each HTTP request; failed batches are retried with backoff.
    * ``exit_timeout`` (30.0): how long the end of the run waits for unsent records (plus, at most,
      ``request_timeout`` for a request already under way, so that what it carries is spooled, not lost).
    * ``spool_dir`` (``.gradtrack/spool``): where unsent records, events and the summary wait.
    * ``tag_interval_s`` (5.0): at most one ``gradtrack.explosions`` tag update per interval.
    * ``loss_key`` (``"auto"``): the metric key of the observed loss (None: not logged). ``"auto"`` is the
      contract's ``loss`` in a run gradtrack creates and ``gradtrack/loss`` in a run it reuses (yours, a
      Lightning or Trainer logger's), whose ``loss`` is the owner's, on the owner's step axis.
    * ``color`` (True): colour the run in the MLflow UI by how it goes (red diverged, orange healed by a
      rollback, a calm colour while healthy), never over a colour you chose (:mod:`gradtrack_mlflow.colors`).
    """

    def __init__(
        self,
        tracking_uri: str | None = None,
        experiment_name: str | None = None,
        run_name: str | None = None,
        run_id: str | None = None,
        tags: Mapping[str, str] | None = None,
        flush_every_s: float = 1.0,
        request_timeout: float = 5.0,
        exit_timeout: float = 30.0,
        spool_dir: str | os.PathLike[str] | None = None,
        tag_interval_s: float = 5.0,
        plots: bool = True,
        note: bool = True,
        loss_key: str | None = "auto",
        color: bool = True,
    ) -> None:
        self.tracking_uri = text(_option("tracking_uri"), tracking_uri)
        self.experiment_name = text(_option("experiment_name"), experiment_name)
        self.run_name = text(_option("run_name"), run_name)
        self.run_id = text(_option("run_id"), run_id)
        self.tags = mapping(_option("tags"), tags, values=str)
        self.flush_every_s = seconds(_option("flush_every_s"), flush_every_s)
        self.request_timeout = seconds(_option("request_timeout"), request_timeout, minimum=0.1)
        self.exit_timeout = seconds(_option("exit_timeout"), exit_timeout, allow_inf=True)
        self.tag_interval_s = seconds(_option("tag_interval_s"), tag_interval_s)
        if spool_dir is not None and not (isinstance(spool_dir, str | os.PathLike) and os.fspath(spool_dir)):
            raise ValueError(f"mlflow option 'spool_dir' must be a path, got {spool_dir!r}")
        for option, flag in (("plots", plots), ("note", note), ("color", color)):
            if not isinstance(flag, bool):
                raise ValueError(f"mlflow option {option!r} must be True or False, got {flag!r}")
        self.plots, self.note, self.color = plots, note, color
        if loss_key is not None and (not isinstance(loss_key, str) or not _LOSS_KEY.fullmatch(loss_key)
                                     or loss_key.startswith(("grad/", "grad_norm/", "weight_norm/"))):  # fmt: skip
            raise ValueError(
                f"mlflow option 'loss_key' must be None, 'auto' or a metric key (letters, digits, '_-. /:', at most "
                f"250 characters) outside grad/, grad_norm/ and weight_norm/, got {loss_key!r}"
            )
        self._history = RunHistory()
        self.owns_run = self.run_id is None
        # MLflow keeps the active run and a set_tracking_uri per thread or process of the caller: read
        # them here, on the training thread. Without mlflow imported there is neither to read.
        mlflow = sys.modules.get("mlflow")
        if mlflow is not None:
            active = mlflow.active_run() if self.run_id is None else None
            if active is not None:
                self.run_id, self.owns_run = active.info.run_id, False
            self.tracking_uri = self.tracking_uri or mlflow.get_tracking_uri()
        self._context = _training_context() if self.owns_run else {}
        if loss_key == "auto":
            loss_key = "loss" if self.owns_run else "gradtrack/loss"
        self.loss_key = loss_key
        self.run_key = uuid.uuid4().hex  # tags the run gradtrack creates: a retry, or a resumed process, finds it
        self.resuming = False
        self._ends_given_run = False  # a resumed process that goes on in the run an earlier one was given
        self._saved_experiment_id: str | None = None
        self._resumed_step: int | None = None
        self._default_spool_dir = spool_dir is None
        self.spool = Spool(Path(spool_dir or Path(".gradtrack", "spool")).absolute() / uuid.uuid4().hex)
        self.sender: Sender | None = None
        self._layer_keys: dict[str, str] = {}
        self._explosions = 0
        self._tags_sent_at = -math.inf
        self._explosion_tag_due = False
        self._unwritable: set[str] = set()
        self._outcome: Outcome | None = None  # the last outcome whose colour was asked for

    # -- resuming -----------------------------------------------------------------------------------

    @hookimpl
    def gradtrack_backend_state(self) -> dict[str, Any]:
        """The run's key (gradtrack's tag on the run it created) or the id of the run it was given, and the
        experiment as configured: no tracking URI, which may carry credentials."""
        if not self.owns_run:
            return {"run_id": self.run_id, "owned": False}
        return {"run_key": self.run_key, "owned": True, "experiment_name": self._experiment_name(),
                "experiment_id": self._experiment_id()}  # fmt: skip

    @hookimpl
    def gradtrack_load_backend_state(self, state: Mapping[str, Any]) -> None:
        """Open the saved run again, unless this process was given a run of its own (an active run,
        ``run_id``, a logger's run): that one is the user's choice, and the step axis goes on in it."""
        owned = state.get("owned")
        if not isinstance(owned, bool):
            raise ValueError(f"mlflow state 'owned' must be True or False, got {owned!r}")
        for key in ("run_key", "run_id", "experiment_name", "experiment_id"):
            if state.get(key) is not None and not isinstance(state[key], str):
                raise ValueError(f"mlflow state {key!r} must be a string or None, got {type(state[key]).__name__}")
        if not self.owns_run:
            return
        if not owned:  # the earlier process logged into a run it was given: go on in it, and end it now
            if not state.get("run_id"):
                raise ValueError("mlflow state has neither a run_id nor a run_key")
            self.run_id, self.owns_run = state["run_id"], False
            self._ends_given_run = True
            return
        if not state.get("run_key") or not re.fullmatch(r"[0-9a-f]{32}", state["run_key"]):
            raise ValueError(f"mlflow state 'run_key' must be 32 hex digits, got {state.get('run_key')!r}")
        self.run_key, self.resuming = state["run_key"], True
        if self.experiment_name is None and state.get("experiment_name"):
            self.experiment_name = state["experiment_name"]
        self._saved_experiment_id = state.get("experiment_id")

    def _experiment_name(self) -> str | None:
        return self.experiment_name or os.environ.get("MLFLOW_EXPERIMENT_NAME")

    def _experiment_id(self) -> str | None:
        if self.experiment_name:
            return None
        return self._saved_experiment_id or os.environ.get("MLFLOW_EXPERIMENT_ID")

    # -- lifecycle ----------------------------------------------------------------------------------

    @hookimpl
    def gradtrack_run_start(self, start: RunStart) -> None:
        from mlflow.tracking import get_tracking_uri
        from mlflow.tracking.context.registry import resolve_tags

        uri = self.tracking_uri or get_tracking_uri()
        if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):  # a replay runs elsewhere
            uri = "sqlite:///" + str(Path(uri.removeprefix("sqlite:///")).absolute())
        self.tracking_uri = uri
        self._layer_keys = sanitize_names(start.layer_names, prefix="grad_norm/")
        self._history.threshold = start.config.get("explosion_threshold")
        if self.plots:  # matplotlib takes seconds to import: not at the end of the run, where exit waits
            threading.Thread(target=_import_plots, name="gradtrack-plots-import", daemon=True).start()
        self.sender = Sender(Sink(uri, self.request_timeout), self.spool, self.run_key, self.run_id, self.flush_every_s)
        resumed = start.resumed
        start_tags = {**self.tags, "diverged": "true" if resumed and resumed.divergence else "false"}
        if resumed is not None:  # what an earlier process counted stays counted
            start_tags["gradtrack.resumes"] = str(len(resumed.steps))
            self._explosions = resumed.explosions
            self._history.diverged_step = resumed.divergence.step if resumed.divergence else None
            self._history.diverged_reason = resumed.divergence.reason if resumed.divergence else None
            self._resumed_step = resumed.step
        if self.owns_run:  # the training process's script and commit, not the reporter's
            create = {
                "op": "create_run",
                "experiment_name": self._experiment_name(),
                "experiment_id": self._experiment_id(),
                "run_name": self.run_name,
                "start_time": int(start.timestamp * 1000),
                "tags": resolve_tags({**self._context, **start_tags}),
            }
            if self.resuming:  # the run with this key, open again; a new one (with a warning) if it is gone
                create["resume"] = True
            self.sender.put(create)
        params = {f"gradtrack.{k.removeprefix('gradtrack_')}": str(v) for k, v in start.config.items()}
        params.update(
            {
                "gradtrack.version": __version__,
                "gradtrack.model_class": start.model_class,
                "gradtrack.num_parameters": str(start.num_parameters),
            }
        )
        if resumed is not None:  # MLflow's params never change: log the new ones, keep (and name) the changed
            self.sender.put({"op": "new_params", "params": params}, urgent=True)
            params = {}
        self.sender.put({"op": "fragment", "params": params, "tags": start_tags}, urgent=True)
        self._color("diverged" if resumed and resumed.divergence else "healthy")
        self._write("events.jsonl", "")

    @hookimpl
    def gradtrack_layers_added(self, layers: LayersAdded) -> None:
        self._layer_keys = extend_names(self._layer_keys, layers.names, prefix="grad_norm/")

    @hookimpl
    def gradtrack_steps(self, batch: StepBatch) -> None:
        """Every step of the batch as metric rows, column by column, in one fragment for the sender."""
        steps, timestamps = batch.step, (batch.timestamp * 1000).astype(np.int64)
        measured = ~batch.amp_overflow
        self._history.add_steps(steps[measured], batch.total_norm[measured])
        metrics: list[list[Any]] = []
        for key, rows, values in batch.metric_columns():
            if key == "loss":
                if self.loss_key is None:
                    continue
                key = self.loss_key
            metrics += _rows(key, values, timestamps[rows], steps[rows])
        for layer in batch.layers:
            step, timestamp = int(steps[layer.row]), int(timestamps[layer.row])
            self._history.add_layer_values(step, layer.norms)
            keys = self._keys_for(layer.norms)
            metrics.extend([keys[n], encode_value(v), timestamp, step] for n, v in layer.norms.items())
            if layer.weights:  # the same keys under weight_norm/: grad_norm/ is 10 characters, weight_norm/ 12
                for name, value in layer.weights.items():
                    key = "weight_norm/" + keys[name].removeprefix("grad_norm/")
                    metrics.append([key[:250], encode_value(value), timestamp, step])
        fragment: dict[str, Any] = {"op": "fragment", "metrics": metrics}
        if self._explosion_tag_due and time.monotonic() - self._tags_sent_at >= self.tag_interval_s:
            fragment["tags"] = self._explosion_tags()
        self._send(fragment)

    def _keys_for(self, norms: Mapping[str, float]) -> dict[str, str]:
        """The metric keys of these layers (a name never announced gets one now, the others keep theirs)."""
        if not norms.keys() <= self._layer_keys.keys():
            self._layer_keys = extend_names(self._layer_keys, norms, prefix="grad_norm/")
        return self._layer_keys

    @hookimpl
    def gradtrack_explosion(self, event: Explosion) -> None:
        self._history.add_explosion(event.step, event.total_norm)
        self._write("events.jsonl", json.dumps(event.to_dict()) + "\n")
        self._explosions += 1
        tags = {}
        if self._explosions == 1:
            tags["gradtrack.first_explosion_step"] = str(event.step)
        self._explosion_tag_due = True
        if self._explosions == 1 or time.monotonic() - self._tags_sent_at >= self.tag_interval_s:
            tags.update(self._explosion_tags())
        if tags:
            self._send({"op": "fragment", "tags": tags}, urgent=self._explosions == 1)

    @hookimpl
    def gradtrack_rollback(self, event: Rollback) -> None:
        """``grad/rollback`` = 1 and the learning-rate scale at that step, the count as a tag, out at once."""
        ms = int(event.timestamp * 1000)
        metrics = [["grad/rollback", 1.0, ms, event.step], ["grad/lr_scale", event.lr_scale, ms, event.step]]
        self._send({"op": "fragment", "metrics": metrics, "tags": {"gradtrack.rollbacks": str(event.count)}},
                   urgent=True)  # fmt: skip
        self._write("events.jsonl", json.dumps({"rollback": event.to_dict()}) + "\n")
        self._history.add_rollback(event.step, event.restored_step)
        if self._history.diverged_step is None:
            self._color("healed")

    @hookimpl
    def gradtrack_instability(self, event: Instability) -> None:
        """``grad/instability`` = 1 and the offenders' own ratios (``grad_overshoot/<layer>``) at that step, the
        warning's step and advice as tags, out at once: it comes before the trouble."""
        ms = int(event.timestamp * 1000)
        keys = self._keys_for(dict(event.layers))
        metrics = [["grad/instability", 1.0, ms, event.step]]
        metrics += [["grad_overshoot/" + keys[name].removeprefix("grad_norm/"), ratio, ms, event.step]
                    for name, ratio in event.layers]  # fmt: skip
        tags = {"gradtrack.instability_step": str(event.step), "gradtrack.overshoot": f"{event.overshoot:.3g}",
                "gradtrack.lr_advice": event.describe()[:_MAX_TAG_VALUE]}  # fmt: skip
        self._send({"op": "fragment", "metrics": metrics, "tags": tags}, urgent=True)
        self._write("events.jsonl", json.dumps({"instability": event.to_dict()}) + "\n")

    @hookimpl
    def gradtrack_divergence(self, event: Divergence) -> None:
        tags = {
            "diverged": "true",
            "gradtrack.diverged_step": str(event.step),
            "gradtrack.diverged_reason": event.reason[:_MAX_TAG_VALUE],
        }
        self._send({"op": "fragment", "tags": tags}, urgent=True)
        self._color("diverged", urgent=True)
        self._history.diverged_step, self._history.diverged_reason = event.step, event.reason
        if self.note:
            self._send({"op": "note", "text": f"{divergence_note(event)}\n{LINKS}"}, urgent=True)
        self.flush(2 * self.request_timeout + 1.0)  # the tag is out (or spooled) when this hook returns

    @hookimpl
    def gradtrack_run_end(self, end: RunEnd) -> None:
        assert self.sender is not None
        deadline = time.monotonic() + self.exit_timeout  # drawing the plots comes out of the same budget
        ms = int(end.timestamp * 1000)
        self.sender.put(
            {"op": "fragment", "metrics": _summary_metrics(end.summary, ms), "tags": _summary_tags(end.summary)}
        )
        self._write("summary.json", json.dumps(end.summary.to_dict(), indent=2), append=False)
        plots = self._draw_plots() if self.plots else []
        for name in ("summary.json", "events.jsonl", *plots):
            if name not in self._unwritable:  # an artifact that could not be written is not promised
                path = str(self.spool.directory / name)
                self.sender.put({"op": "log_artifact", "local_path": path, "artifact_path": "gradtrack"})
        if self.note:  # {run_id} is filled in when the note is sent: the run may not exist yet
            images = [(name, f"get-artifact?path=gradtrack/{name}&run_uuid={{run_id}}") for name in plots]
            self.sender.put({"op": "note", "text": f"{summary_note(end.summary, end.status, images)}\n{LINKS}"})
        self._color("diverged" if end.summary.diverged else "healed" if end.summary.rollbacks else "healthy")
        if self.owns_run or self._ends_given_run:
            self.sender.put({"op": "terminate", "status": _STATUS[end.status], "end_time": ms})
        done = self.sender.close(max(0.0, deadline - time.monotonic()))
        if not done and not self.sender.held and not self.sender.thread.is_alive() and not self.spool.has_pending():
            done = True  # offline at the deadline, but nothing was left to send
        if done:
            if not self.spool.rejected_path.exists():
                shutil.rmtree(self.spool.directory, ignore_errors=True)
                if self._default_spool_dir:
                    _remove_empty_parents(self.spool.directory.parent, levels=2)
            return
        where = strip_userinfo(self.tracking_uri or "")
        if self.sender.held:
            warnings.warn(
                f"gradtrack could not send {self.sender.held} operations to MLflow at {where} nor write them to "
                f"its spool ({self.sender.spool_error!r}); they are lost",
                RuntimeWarning,
                stacklevel=2,
            )
            if not self.spool.has_pending():
                return
        warnings.warn(
            f"gradtrack could not send everything to MLflow at {where} within "
            f"exit_timeout={self.exit_timeout:g}s; the rest is kept in {self.spool.path}. "
            f"Replay it with: {replay_command(self.spool)}",
            SpoolLeftWarning,
            stacklevel=2,
        )

    # -- helpers ------------------------------------------------------------------------------------

    def flush(self, timeout: float = 30.0) -> bool:
        """Wait until every record handed to the backend so far was sent to MLflow or spooled."""
        return self.sender.flush(timeout) if self.sender is not None else True

    @hookimpl
    def gradtrack_flush(self, timeout: float) -> None:
        self.flush(timeout)

    def _draw_plots(self) -> list[str]:
        """The run's two pictures beside the spool, for the artifacts; none (with a warning) without matplotlib."""
        try:
            from gradtrack.delivery.plots import draw_layers, draw_norms

            private_directory(self.spool.directory)
            history = self._whole_history()
            draw_norms(history, self.spool.directory / "norms.png")
            draw_layers(history, self.spool.directory / "layers.png")
        except ImportError as exc:
            warnings.warn(f"gradtrack draws no plots: {exc} (pip install 'gradtrack[plots]')", RuntimeWarning,
                          stacklevel=3)  # fmt: skip
            return []
        except OSError as exc:
            warnings.warn(f"gradtrack cannot write its plots ({exc!r})", RuntimeWarning, stacklevel=3)
            return []
        return ["norms.png", "layers.png"]

    def _whole_history(self, timeout: float = 10.0) -> RunHistory:
        """A resumed run's plots cover it all: the earlier processes' steps come back from MLflow (their newest
        values), within ``timeout``, when the server answers now; else this process's steps alone."""
        assert self.sender is not None
        run_id = self.run_id or self.sender.sink.run_ids.get(self.run_key)
        if self._resumed_step is None or run_id is None or self.spool.has_pending():
            return self._history
        result: list[RunHistory] = []

        def fetch() -> None:
            from gradtrack_mlflow.cli import history_of

            client = self.sender.sink.client  # type: ignore[union-attr]
            with contextlib.suppress(Exception):  # a plot of this process's steps is still a plot
                result.append(history_of(client, client.get_run(run_id), before=self._resumed_step))

        worker = threading.Thread(target=fetch, name="gradtrack-mlflow-history", daemon=True)
        worker.start()
        worker.join(timeout)
        if not result:
            return self._history
        whole = result[0]
        whole.absorb(self._history)
        return whole

    def _write(self, name: str, text: str, append: bool = True) -> None:
        """A file beside the spool (events, summary); a full or read-only disk costs a warning, not the run."""
        if name in self._unwritable:
            return
        try:
            private_directory(self.spool.directory)
            with private_open(self.spool.directory / name, "a" if append else "w") as file:
                file.write(text)
        except OSError as exc:
            self._unwritable.add(name)
            warnings.warn(
                f"gradtrack cannot write {name} in {self.spool.directory} ({exc!r}); the run goes on without "
                "that artifact",
                RuntimeWarning,
                stacklevel=3,
            )

    def _send(self, fragment: dict[str, Any], urgent: bool = False) -> None:
        if self.sender is not None:
            self.sender.put(fragment, urgent=urgent)

    def _color(self, outcome: Outcome, urgent: bool = False) -> None:
        """The run's colour for a new outcome, set by the sender (which reads the run's tags first): two
        requests when the outcome changes, none at every rollback of a run that is healed already."""
        if self.color and outcome != self._outcome:
            self._outcome = outcome
            self._send({"op": "run_color", "outcome": outcome}, urgent=urgent)

    def _explosion_tags(self) -> dict[str, str]:
        self._tags_sent_at = time.monotonic()
        self._explosion_tag_due = False
        return {"gradtrack.explosions": str(self._explosions)}


def _rows(key: str, values: np.ndarray, timestamps: np.ndarray, steps: np.ndarray) -> list[list[Any]]:
    """``[key, value, timestamp, step]`` metric rows of one column; NaN and inf spelt for JSON."""
    if np.isfinite(values).all():
        return [[key, value, timestamp, step] for value, timestamp, step in
                zip(values.tolist(), timestamps.tolist(), steps.tolist(), strict=True)]  # fmt: skip
    return [[key, encode_value(value), timestamp, step] for value, timestamp, step in
            zip(values.tolist(), timestamps.tolist(), steps.tolist(), strict=True)]  # fmt: skip


def _training_context() -> dict[str, str]:
    """What MLflow's own context providers would read in the training process: the script, and its git commit.

    Read here, where the factory runs, because the run is created in the reporter process, whose own
    script is gradtrack's. Cheap: three ``git`` commands with a short timeout, nothing when git is absent.
    """
    main = sys.argv[0] if sys.argv and sys.argv[0] else "<console>"
    tags = {"mlflow.source.name": main, "mlflow.source.type": "LOCAL"}
    folder = os.path.dirname(os.path.abspath(main)) if main not in ("<console>", "-c") else os.getcwd()
    for key, command in (
        ("mlflow.source.git.commit", ["rev-parse", "HEAD"]),
        ("mlflow.source.git.branch", ["rev-parse", "--abbrev-ref", "HEAD"]),
        ("mlflow.source.git.repoURL", ["config", "--get", "remote.origin.url"]),
    ):
        try:
            done = subprocess.run(["git", "-C", folder, *command], capture_output=True, text=True, timeout=2)
        except (OSError, subprocess.SubprocessError):
            break
        if done.returncode == 0 and done.stdout.strip():
            tags[key] = strip_userinfo(done.stdout.strip())  # a remote URL may carry a token
    return tags


def _import_plots() -> None:
    with contextlib.suppress(ImportError):
        import gradtrack.delivery.plots

        gradtrack.delivery.plots._pyplot()  # imports matplotlib


def _remove_empty_parents(directory: Path, levels: int) -> None:
    """Leave no empty default ``.gradtrack/spool`` behind after a clean run; a folder in use stays."""
    for folder in (directory, *directory.parents)[:levels]:
        try:
            folder.rmdir()
        except OSError:  # not empty (another run's spool), or gone already
            return


def _summary_metrics(summary: Summary, timestamp: int) -> list[list[Any]]:
    """``gradtrack.summary.<field>`` for every numeric field that has a value."""
    data = summary.to_dict()
    return [
        [f"gradtrack.summary.{name}", encode_value(float(data[name])), timestamp, summary.steps]
        for name in _SUMMARY_METRICS
        if isinstance(data.get(name), int | float) or data.get(name) in ("nan", "inf", "-inf")
    ]


def _summary_tags(summary: Summary) -> dict[str, str]:
    """The final value of every live tag, so the run's tags are right even if a live update was late."""
    tags = {"diverged": str(summary.diverged).lower(), "gradtrack.explosions": str(summary.explosions)}
    if summary.first_explosion_step is not None:
        tags["gradtrack.first_explosion_step"] = str(summary.first_explosion_step)
    if summary.diverged_step is not None:
        tags["gradtrack.diverged_step"] = str(summary.diverged_step)
    if summary.diverged_reason is not None:
        tags["gradtrack.diverged_reason"] = summary.diverged_reason[:_MAX_TAG_VALUE]
    offenders = ", ".join(f"{name} ({count})" for name, count in summary.top_offenders)
    tags["gradtrack.summary.top_offenders"] = offenders[:_MAX_TAG_VALUE] or "none"
    return tags

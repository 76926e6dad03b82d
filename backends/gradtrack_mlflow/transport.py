"""Executing journal operations against one MLflow tracking URI, each request bounded in time.

An operation is a small JSON-able dict (``create_run``, which with ``resume`` opens the run of that key
again, ``log_batch``, ``new_params``, ``log_artifact``, ``note``, ``run_color``, ``terminate``), the same shape
whether it is sent live or replayed from a spool file.

Over HTTP the JSON endpoints are called through ``mlflow.utils.rest_utils.http_request`` with
``max_retries=0`` and ``timeout=request_timeout``: MLflow's own client reads its retry policy from
process-wide environment variables (about four minutes of retries by default), which a plugin must
not change under the user's feet. Retrying is the sender's job. Other stores (sqlite, file) are local
and go through ``MlflowClient``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from typing import Any, final

from gradtrack_mlflow.colors import Outcome, color_tags, outcome_color
from gradtrack_mlflow.links import note_links
from gradtrack_mlflow.view import VIEW_TAG, ui_version, view_supported, view_tag_value

__all__ = [
    "EXPERIMENT_KIND_TAG",
    "RUN_KEY_TAG",
    "TRAINING_EXPERIMENT_KIND",
    "PermanentError",
    "Sink",
    "encode_value",
    "failure_kind",
    "is_permanent",
]

Op = dict[str, Any]

_API = "/api/2.0/mlflow"
NOTE_TAG = "mlflow.note.content"  # the run's description, shown at the top of its page
RUN_KEY_TAG = "gradtrack.run_key"  # on every run gradtrack creates: a retried create_run finds it instead
LINKS = "{gradtrack_links}"  # in a note's text: the links to the experiment's diverged runs and its view
# On experiments gradtrack creates, never on others: without it MLflow 3's UI opens an experiment on its GenAI
# traces overview, one click away from the training runs gradtrack logged there.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
TRAINING_EXPERIMENT_KIND = "custom_model_development"


class PermanentError(RuntimeError):
    """An operation the tracking store will never accept as it is (e.g. a param changed value)."""


def encode_value(value: float) -> float | str:
    """JSON has no NaN/Inf: use protobuf's JSON spelling, which MLflow's server parses back."""
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "Infinity" if value > 0 else "-Infinity"
    return value


def failure_kind(exc: BaseException) -> str:
    """``permanent`` (a 4xx answer other than 429: it will not change on retry), ``transient`` (the
    network, the server, the store: retry), or ``unexpected`` (anything else: most likely a bug)."""
    if isinstance(exc, PermanentError):
        return "permanent"
    from mlflow.exceptions import MlflowException

    if isinstance(exc, MlflowException):
        status = exc.get_http_status_code()
        return "permanent" if 400 <= status < 500 and status != 429 else "transient"
    if isinstance(exc, OSError):  # connections, timeouts (requests' errors are OSErrors too), files
        return "transient"
    if type(exc).__module__.startswith("sqlalchemy"):  # a busy or locked local store
        return "transient"
    return "unexpected"


def is_permanent(exc: BaseException) -> bool:
    return failure_kind(exc) == "permanent"


@final
class Sink:
    """Runs operations against ``tracking_uri``; remembers the run ids of runs it created."""

    def __init__(self, tracking_uri: str, request_timeout: float) -> None:
        self.tracking_uri = tracking_uri
        self.request_timeout = request_timeout
        self.is_http = tracking_uri.startswith(("http://", "https://"))
        self.run_ids: dict[str, str] = {}
        self._client: Any = None
        self._ui_version: str | None = None

    @property
    def client(self) -> Any:
        if self._client is None:
            from mlflow.tracking import MlflowClient

            self._client = MlflowClient(self.tracking_uri)
        return self._client

    def run_id(self, op: Op) -> str:
        run_id = op.get("run_id") or self.run_ids.get(op["run_key"])
        if run_id is None:
            raise PermanentError(f"no run for run_key {op['run_key']!r}: its create_run was never sent")
        return str(run_id)

    def execute(self, op: Op) -> None:
        kind = op["op"]
        if kind == "create_run":
            self.run_ids[op["run_key"]] = self._create_run(op)
        elif kind == "log_batch":
            self._log_batch(self.run_id(op), op["metrics"], op["params"], op["tags"])
        elif kind == "log_artifact":
            if self.is_http:
                self._rest("GET", "/health", None, api=False)  # bounded probe: the upload itself is not
            self.client.log_artifact(self.run_id(op), op["local_path"], op["artifact_path"])
        elif kind == "terminate":
            self._terminate(self.run_id(op), op["status"], op["end_time"])
        elif kind == "note":
            self._note(self.run_id(op), op["text"].replace("{run_id}", self.run_id(op)))
        elif kind == "run_color":
            self._run_color(self.run_id(op), op["outcome"])
        elif kind == "new_params":
            self._new_params(self.run_id(op), op["params"])
        else:
            raise PermanentError(f"unknown operation {kind!r}")

    # -- operations -------------------------------------------------------------------------------

    def _create_run(self, op: Op) -> str:
        tags: Mapping[str, str] = {**op["tags"], RUN_KEY_TAG: op["run_key"]}
        if op.get("resume"):
            found = self._resume_run(op)
            if found is not None:
                return found
        if not self.is_http:
            experiment_id = op.get("experiment_id") or self._local_experiment(op.get("experiment_name"))
            if op.get("attempted") and (found := self._local_run_with_key(experiment_id, op["run_key"])):
                return found
            run = self.client.create_run(experiment_id, op["start_time"], dict(tags), op.get("run_name"))
            return str(run.info.run_id)
        experiment_id = op.get("experiment_id") or self._rest_experiment(op.get("experiment_name"))
        if op.get("attempted") and (found := self._rest_run_with_key(experiment_id, op["run_key"])):
            return found
        body = {
            "experiment_id": experiment_id,
            "start_time": op["start_time"],
            "tags": [{"key": k, "value": v} for k, v in tags.items()],
        }
        if op.get("run_name"):
            body["run_name"] = op["run_name"]
        return str(self._rest("POST", "runs/create", body)["run"]["info"]["run_id"])

    def _resume_run(self, op: Op) -> str | None:
        """The run an earlier process created with this key, set RUNNING again with this process's tags;
        None (and a warning) when it is gone: deleted, or in no experiment this process can see."""
        key = op["run_key"]
        if self.is_http:
            experiment_id = op.get("experiment_id") or self._rest_experiment(op.get("experiment_name"))
            body = {"experiment_ids": [experiment_id], "filter": _key_filter(key), "max_results": 1,
                    "run_view_type": "ACTIVE_ONLY"}  # fmt: skip
            runs = self._rest("POST", "runs/search", body).get("runs", [])
            run_id = str(runs[0]["info"]["run_id"]) if runs else None
        else:
            from mlflow.entities import ViewType

            experiment_id = op.get("experiment_id") or self._local_experiment(op.get("experiment_name"))
            found = self.client.search_runs([experiment_id], _key_filter(key), ViewType.ACTIVE_ONLY, max_results=1)
            run_id = str(found[0].info.run_id) if found else None
        if run_id is None:
            import warnings

            warnings.warn(
                f"gradtrack cannot find the MLflow run it is resuming (tag {RUN_KEY_TAG}={key} in experiment "
                f"{experiment_id}: deleted since?); it logs into a new run",
                RuntimeWarning,
                stacklevel=2,
            )
            return None
        tags = {k: v for k, v in op["tags"].items() if not k.startswith("mlflow.")}  # the run keeps its source
        if self.is_http:
            self._rest("POST", "runs/update", {"run_id": run_id, "status": "RUNNING"})
            body = {"run_id": run_id, "tags": [{"key": k, "value": v} for k, v in tags.items()]}
            self._rest("POST", "runs/log-batch", body)
        else:
            from mlflow.entities import RunTag

            self.client.update_run(run_id, status="RUNNING")
            self.client.log_batch(run_id, tags=[RunTag(k, v) for k, v in tags.items()], synchronous=True)
        return run_id

    def _new_params(self, run_id: str, params: Mapping[str, str]) -> None:
        """Params a resumed run does not have yet; one whose value changed keeps its first value (MLflow
        refuses to change a param), and the change is named in a warning."""
        if self.is_http:
            logged = self._rest("GET", "runs/get", {"run_id": run_id})["run"]["data"].get("params", [])
            existing = {param["key"]: param["value"] for param in logged}
        else:
            existing = dict(self.client.get_run(run_id).data.params)
        changed = sorted(key for key, value in params.items() if key in existing and existing[key] != value)
        if changed:
            import warnings

            listed = ", ".join(f"{key}: {existing[key]} -> {params[key]}" for key in changed)
            warnings.warn(
                f"the resumed run's settings changed ({listed}); MLflow keeps a param's first value, so the run's "
                "params show the earlier ones",
                RuntimeWarning,
                stacklevel=2,
            )
        new = {key: value for key, value in params.items() if key not in existing}
        for start in range(0, len(new), 100):  # MLflow takes at most 100 params a request
            chunk = dict(list(new.items())[start : start + 100])
            self._log_batch(run_id, [], chunk, {})

    def _local_run_with_key(self, experiment_id: str, run_key: str) -> str | None:
        """The run an earlier attempt of this create_run made, if the store got it before the answer was lost."""
        from mlflow.entities import ViewType

        runs = self.client.search_runs([experiment_id], _key_filter(run_key), ViewType.ALL, max_results=1)
        return str(runs[0].info.run_id) if runs else None

    def _rest_run_with_key(self, experiment_id: str, run_key: str) -> str | None:
        body = {"experiment_ids": [experiment_id], "filter": _key_filter(run_key), "max_results": 1,
                "run_view_type": "ALL"}  # fmt: skip
        runs = self._rest("POST", "runs/search", body).get("runs", [])
        return str(runs[0]["info"]["run_id"]) if runs else None

    def _local_experiment(self, name: str | None) -> str:
        if name is None:
            return "0"
        from mlflow.exceptions import MlflowException

        experiment = self.client.get_experiment_by_name(name)
        if experiment is not None:
            return str(experiment.experiment_id)
        try:
            return str(self.client.create_experiment(name, tags=self._new_experiment_tags()))
        except MlflowException as exc:  # another run created it between our two calls
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        return str(self.client.get_experiment_by_name(name).experiment_id)

    def _rest_experiment(self, name: str | None) -> str:
        if name is None:
            return "0"
        from mlflow.exceptions import MlflowException

        try:
            found = self._rest("GET", "experiments/get-by-name", {"experiment_name": name})
            return str(found["experiment"]["experiment_id"])
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
                raise
        try:
            tags = [{"key": key, "value": value} for key, value in self._new_experiment_tags().items()]
            return str(self._rest("POST", "experiments/create", {"name": name, "tags": tags})["experiment_id"])
        except MlflowException as exc:  # another run created it between our two requests
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        found = self._rest("GET", "experiments/get-by-name", {"experiment_name": name})
        return str(found["experiment"]["experiment_id"])

    def _new_experiment_tags(self) -> dict[str, str]:
        """The tags of an experiment gradtrack creates: its kind, and the "gradtrack" saved view where the UI
        that shows it reads the view's format (:mod:`gradtrack_mlflow.view`)."""
        tags = {EXPERIMENT_KIND_TAG: TRAINING_EXPERIMENT_KIND}
        if self._ui_version is None:  # a failed request raises: the create is retried, the view not forgotten
            self._ui_version = ui_version(self.tracking_uri, self.request_timeout)
        if view_supported(self._ui_version):
            tags[VIEW_TAG] = view_tag_value(int(time.time() * 1000))
        return tags

    def _log_batch(
        self, run_id: str, metrics: list[list[Any]], params: Mapping[str, str], tags: Mapping[str, str]
    ) -> None:
        if not self.is_http:
            from mlflow.entities import Metric, Param, RunTag

            self.client.log_batch(
                run_id,
                metrics=[Metric(k, float(v), int(ts), int(step)) for k, v, ts, step in metrics],
                params=[Param(k, v) for k, v in params.items()],
                tags=[RunTag(k, v) for k, v in tags.items()],
                synchronous=True,
            )
            return
        body = {
            "run_id": run_id,
            "metrics": [{"key": k, "value": v, "timestamp": ts, "step": step} for k, v, ts, step in metrics],
            "params": [{"key": k, "value": v} for k, v in params.items()],
            "tags": [{"key": k, "value": v} for k, v in tags.items()],
        }
        self._rest("POST", "runs/log-batch", body)

    def _note(self, run_id: str, section: str) -> None:
        """gradtrack's section of the run's description, below whatever the user wrote there; ``LINKS`` in it
        becomes the links to the experiment's diverged runs and its saved view."""
        from gradtrack.delivery.notes import merge_note

        tags, experiment_id = self._run_tags(run_id)
        if LINKS in section:
            has_view = VIEW_TAG in self._experiment_tags(experiment_id)
            section = section.replace(LINKS, note_links(experiment_id, has_view))
        self._set_tags(run_id, {NOTE_TAG: merge_note(tags.get(NOTE_TAG), section)})

    def _run_color(self, run_id: str, outcome: Outcome) -> None:
        """The run's colour for its outcome, unless the colour it has is the user's (:mod:`gradtrack_mlflow.colors`)."""
        tags, _ = self._run_tags(run_id)
        wanted = color_tags(tags, outcome_color(outcome, run_id))
        if wanted:
            self._set_tags(run_id, wanted)

    def _run_tags(self, run_id: str) -> tuple[dict[str, str], str]:
        """The run's tags and its experiment's id."""
        if not self.is_http:
            run = self.client.get_run(run_id)
            return dict(run.data.tags), str(run.info.experiment_id)
        run = self._rest("GET", "runs/get", {"run_id": run_id})["run"]
        tags = {tag["key"]: tag["value"] for tag in run["data"].get("tags", [])}
        return tags, str(run["info"]["experiment_id"])

    def _experiment_tags(self, experiment_id: str) -> dict[str, str]:
        if not self.is_http:
            return dict(self.client.get_experiment(experiment_id).tags)
        found = self._rest("GET", "experiments/get", {"experiment_id": experiment_id})["experiment"]
        return {tag["key"]: tag["value"] for tag in found.get("tags", [])}

    def _set_tags(self, run_id: str, tags: Mapping[str, str]) -> None:
        if not self.is_http:
            from mlflow.entities import RunTag

            self.client.log_batch(run_id, tags=[RunTag(k, v) for k, v in tags.items()], synchronous=True)
            return
        body = {"run_id": run_id, "tags": [{"key": k, "value": v} for k, v in tags.items()]}
        self._rest("POST", "runs/log-batch", body)

    def _terminate(self, run_id: str, status: str, end_time: int) -> None:
        if not self.is_http:
            self.client.set_terminated(run_id, status, end_time)
            return
        self._rest("POST", "runs/update", {"run_id": run_id, "status": status, "end_time": end_time})

    def _rest(self, method: str, endpoint: str, body: dict[str, Any] | None, api: bool = True) -> Any:
        from mlflow.utils.credentials import get_default_host_creds
        from mlflow.utils.rest_utils import http_request, verify_rest_response

        path = f"{_API}/{endpoint}" if api else endpoint
        payload = {"params": body} if method == "GET" else {"json": body}
        response = http_request(
            get_default_host_creds(self.tracking_uri),
            path,
            method,
            max_retries=0,
            timeout=self.request_timeout,
            **payload,
        )
        verify_rest_response(response, path)
        return response.json() if api else None


def _key_filter(run_key: str) -> str:
    return f"tags.`{RUN_KEY_TAG}` = '{run_key}'"  # run keys are hex: nothing to escape

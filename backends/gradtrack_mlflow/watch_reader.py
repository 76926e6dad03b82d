"""How ``gradtrack watch`` reads the tracking server: three filtered searches per poll, over MLflow's REST API
(each request made once, bounded by a timeout, no retry loop) or its client for other stores.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from types import SimpleNamespace
from typing import Any, Protocol

from gradtrack_mlflow.alerts import FlaggedRun

ROLLBACK_METRIC = "grad/rollback"  # 1 at each rollback's step
_API = "/api/2.0/mlflow"
_PAGE = 1000  # runs or experiments per search request
_IDS_PER_SEARCH = 100  # experiment ids per runs/search request
_FILTERS = ("tags.diverged = 'true'", "tags.`gradtrack.explosions` != '0'", "tags.`gradtrack.rollbacks` != '0'")
_STEPS_LISTED = 100  # the latest rollback steps an alert carries

# -- reading the tracking server ---------------------------------------------------------------------------


class Reader(Protocol):
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


def reader_for(tracking_uri: str, timeout: float) -> Reader:
    if tracking_uri.startswith(("http://", "https://")):
        return _RestReader(tracking_uri, timeout)
    return _ClientReader(tracking_uri)


def newest(metrics: Iterable[Any], before: int | None = None) -> dict[int, float]:
    """Each step's newest value, in step order: a resumed run trained (and logged) some steps twice."""
    latest: dict[int, tuple[int, float]] = {}
    for metric in metrics:
        if (before is None or metric.step < before) and (
            metric.step not in latest or metric.timestamp >= latest[metric.step][0]
        ):
            latest[metric.step] = (metric.timestamp, metric.value)
    return {step: latest[step][1] for step in sorted(latest)}

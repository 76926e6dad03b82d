"""The "gradtrack" saved view of an experiment's runs in the MLflow UI, in MLflow's own (internal) format.

MLflow's UI (3.15 and later) lists an experiment's saved views in the runs table's "Views" menu and opens one
with ``#/experiments/<id>/runs?viewStateShareKey=<id>``. A view is an experiment tag
``mlflow.sharedViewState.<id>`` whose value is a JSON envelope ``{name, createdAt, updatedAt, state}``; the
state is itself a JSON string (or ``deflate;`` + base64 of the zlib-compressed JSON): the runs table's search
facets (filter, sort) and its UI state (columns, charts, grouping). That format is no public API: it was read
from the UI bundle that MLflow 3.17.2 installs (``mlflow/server/js/build``), so gradtrack writes the view only
for the versions in ``VERIFIED_VERSIONS``, and a browser test opens it so that an MLflow that reads it
differently fails that test instead of silently showing a default table.

Nothing here imports MLflow at import time; ``ui_version`` imports its HTTP helper when it asks a server.
"""

from __future__ import annotations

import base64
import json
import re
import zlib
from typing import Any

__all__ = [
    "CHARTS",
    "COLUMNS",
    "VERIFIED_VERSIONS",
    "VIEW_ID",
    "VIEW_NAME",
    "VIEW_TAG",
    "read_view",
    "ui_version",
    "view_state",
    "view_supported",
    "view_tag_value",
]

VIEW_ID = "gradtrack"  # the tag's suffix and the link's viewStateShareKey
VIEW_NAME = "gradtrack"  # what the "Views" menu shows
VIEW_TAG = f"mlflow.sharedViewState.{VIEW_ID}"
# [first, last) MLflow versions whose UI bundle was read for this format. 3.17.2, on 2026-12-06; widen only
# after reading the bundle of the version added (and running tests/test_report.py's browser test on it).
VERIFIED_VERSIONS = ((3, 17), (3, 18))
DEFLATE_PREFIX = "deflate;"
_MAX_VALUE = 20_000  # MLflow's limit on an experiment tag's value, and the UI's on a saved view

# The runs table's columns, as the UI names them: ``<type>.`<key>```.
COLUMNS = (
    "tags.`diverged`",
    "tags.`gradtrack.explosions`",
    "tags.`gradtrack.rollbacks`",
    "metrics.`grad/total_norm`",
    "metrics.`loss`",
)
# (metric, y scale) of the charts in the view's first section, in order.
CHARTS = (("grad/total_norm", "log"), ("loss", "linear"), ("grad/clip_coef", "linear"))
_SECTION = "gradtrack"


def view_supported(version: str) -> bool:
    """Whether ``version`` (an MLflow version string) is one whose saved-view format was verified."""
    found = re.match(r"(\d+)\.(\d+)", version)
    if found is None:
        return False
    major_minor = (int(found.group(1)), int(found.group(2)))
    return VERIFIED_VERSIONS[0] <= major_minor < VERIFIED_VERSIONS[1]


def view_state() -> dict[str, Any]:
    """The runs table as the view opens it: every run, the diverged first (the ``diverged`` tag sorted
    descending: "true" before "false"), the contract's columns, and a first chart section with the total norm
    on a log scale, the loss and the clip factor. Keys the UI does not find here take its defaults."""
    return {
        # search facets (MLflow's searchFacetsState)
        "searchFilter": "",
        "orderByKey": "tags.`diverged`",
        "orderByAsc": False,
        "startTime": "ALL",
        "lifecycleFilter": "Active",
        "datasetsFilter": [],
        "modelVersionFilter": "All Runs",
        # UI state (MLflow's ExperimentPageUIState)
        "selectedColumns": list(COLUMNS),
        "columnOrder": [],
        "columnWidths": {},
        "runsHiddenMode": "FIRST_10_RUNS",
        "compareRunCharts": [_line_chart(metric, scale) for metric, scale in CHARTS],
        "compareRunSections": [_section()],
        "isAccordionReordered": True,  # keeps this section first; MLflow appends its own sections after it
        "viewMaximized": False,
        "runListHidden": False,
        "groupBy": None,
        "groupsExpanded": {},
        "useGroupedValuesInCharts": True,
        "hideEmptyCharts": True,
        "globalLineChartConfig": {"xAxisKey": "step", "lineSmoothness": 0, "selectedXAxisMetricKey": ""},
    }


def _section() -> dict[str, Any]:
    """The view's first chart section (MLflow's ChartSectionConfig)."""
    return {"uuid": _SECTION, "name": _SECTION, "display": True, "isReordered": False, "deleted": False,
            "isGenerated": False}  # fmt: skip


def _line_chart(metric: str, scale: str) -> dict[str, Any]:
    """One line chart card (MLflow's RunsChartsLineCardConfig, its defaults spelt out)."""
    return {
        "uuid": f"gradtrack-{metric.replace('/', '-')}",
        "type": "LINE",
        "runsCountToCompare": 10,
        "metricSectionId": _SECTION,
        "deleted": False,
        "isGenerated": False,  # MLflow regenerates generated cards; this one is the view's
        "displayName": f"{metric} (log scale)" if scale == "log" else metric,
        "metricKey": metric,
        "selectedMetricKeys": [metric],
        "lineSmoothness": 0,
        "xAxisScaleType": "linear",
        "scaleType": scale,
        "range": {},
        "xAxisKey": "step",
        "selectedXAxisMetricKey": "",
        "yAxisKey": "metric",
        "yAxisExpressions": [],
        "ignoreOutliers": False,
        "useGlobalXaxisKey": True,
        "useGlobalLineSmoothing": True,
    }


def view_tag_value(created_at_ms: int, state: dict[str, Any] | None = None) -> str:
    """The ``mlflow.sharedViewState.gradtrack`` tag's value: the envelope, the state as plain JSON (what the
    UI writes when its compression flag is off), compressed only if plain JSON would not fit."""
    if not isinstance(created_at_ms, int) or created_at_ms < 0:
        raise ValueError(f"created_at_ms must be a non-negative int of milliseconds, got {created_at_ms!r}")
    text = json.dumps(view_state() if state is None else state, separators=(",", ":"))
    value = _envelope(text, created_at_ms)
    if len(value) > _MAX_VALUE:
        value = _envelope(DEFLATE_PREFIX + base64.b64encode(zlib.compress(text.encode())).decode(), created_at_ms)
    if len(value) > _MAX_VALUE:
        raise ValueError(f"the view is {len(value)} characters long; MLflow keeps at most {_MAX_VALUE}")
    return value


def _envelope(state: str, created_at_ms: int) -> str:
    return json.dumps({"name": VIEW_NAME, "createdAt": created_at_ms, "updatedAt": created_at_ms, "state": state})


def read_view(value: str) -> dict[str, Any]:
    """A saved view's tag value read back as the UI reads it: the envelope, with ``state`` decoded to a dict.
    Raises ``ValueError`` naming what is wrong."""
    try:
        envelope = json.loads(value)
    except json.JSONDecodeError as exc:
        raise ValueError(f"a saved view must be a JSON object: {exc}") from None
    if not (isinstance(envelope, dict) and isinstance(envelope.get("name"), str)
            and isinstance(envelope.get("createdAt"), int) and isinstance(envelope.get("state"), str)):  # fmt: skip
        raise ValueError("a saved view must be an object with a string 'name', an int 'createdAt' and a string 'state'")
    state = envelope["state"]
    if state.startswith(DEFLATE_PREFIX):
        state = zlib.decompress(base64.b64decode(state.removeprefix(DEFLATE_PREFIX))).decode()
    return {**envelope, "state": json.loads(state)}


def ui_version(tracking_uri: str, timeout: float = 5.0) -> str:
    """The MLflow version whose UI shows this tracking URI's runs: the server's (``GET /version``) over HTTP,
    else the installed MLflow's (``mlflow ui`` on a local store is this MLflow). "" for Databricks, whose UI is
    not MLflow's open-source one, and when a server answers without one (4xx: a proxy that does not pass
    ``/version`` on); a request that fails or a 5xx raises."""
    if tracking_uri.startswith(("databricks", "uc:")):  # a hosted UI of its own: not MLflow's open-source one
        return ""
    if not tracking_uri.startswith(("http://", "https://")):
        import mlflow

        return str(mlflow.__version__)
    from mlflow.utils.credentials import get_default_host_creds
    from mlflow.utils.rest_utils import http_request

    response = http_request(get_default_host_creds(tracking_uri), "/version", "GET", max_retries=0, timeout=timeout)
    if 400 <= response.status_code < 500:  # answered, without a version: no view, for good
        return ""
    response.raise_for_status()  # a server error is worth a retry (requests' errors are OSErrors)
    return str(response.text).strip()

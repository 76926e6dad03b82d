"""Links into the MLflow UI that open on the answer: the diverged runs, and the "gradtrack" saved view.

``#/experiments/<id>/runs?searchFilter=...`` opens the runs table already filtered (the bare
``#/experiments/<id>`` drops the filter); ``...?viewStateShareKey=gradtrack`` opens the saved view
(:mod:`gradtrack_mlflow.view`). Both are built for the tracking server's own address, without any credentials
the tracking URI may carry; a local store (sqlite, files) has no address of its own, and its links are for
``mlflow ui``'s default, ``http://127.0.0.1:5000``. The run's description uses the same links relative to the
page, so they work at whatever address the UI is opened.
"""

from __future__ import annotations

from urllib.parse import quote

from gradtrack.delivery.secrets import strip_userinfo
from gradtrack_mlflow.view import VIEW_ID

__all__ = [
    "DIVERGED_FILTER",
    "LOCAL_UI",
    "diverged_link",
    "note_links",
    "runs_link",
    "ui_address",
    "view_link",
]

LOCAL_UI = "http://127.0.0.1:5000"  # where `mlflow ui` serves a local store by default
DIVERGED_FILTER = "tags.diverged = 'true'"
# MLflow 3.17 opens an experiment on the GenAI or the Model training side of its switch, as this browser last
# chose; this parameter picks Model training for the visit (the runs table opens either way, its side bar not).
_TRAINING = "workflowType=machine_learning"


def ui_address(tracking_uri: str) -> str:
    """The address the UI of this tracking URI is served at (no credentials, no trailing slash)."""
    if tracking_uri.startswith(("http://", "https://")):
        return strip_userinfo(tracking_uri).rstrip("/")
    return LOCAL_UI


def _fragment(experiment_id: str, query: str = "") -> str:
    if not experiment_id or not str(experiment_id).isdigit():
        raise ValueError(f"experiment_id must be MLflow's numeric experiment id, got {experiment_id!r}")
    return f"#/experiments/{experiment_id}/runs" + (f"?{query}" if query else "")


def runs_link(tracking_uri: str, experiment_id: str) -> str:
    """The experiment's runs table."""
    return f"{ui_address(tracking_uri)}/{_fragment(experiment_id, _TRAINING)}"


def diverged_link(tracking_uri: str, experiment_id: str) -> str:
    """The runs table filtered to the runs tagged ``diverged=true``."""
    return f"{ui_address(tracking_uri)}/{_fragment(experiment_id, f'{_diverged_query()}&{_TRAINING}')}"


def view_link(tracking_uri: str, experiment_id: str) -> str:
    """The experiment's runs as the "gradtrack" saved view shows them."""
    return f"{ui_address(tracking_uri)}/{_fragment(experiment_id, f'viewStateShareKey={VIEW_ID}&{_TRAINING}')}"


def _diverged_query() -> str:
    return "searchFilter=" + quote(DIVERGED_FILTER, safe="")  # quotes too: markdown ends a link's URL at one


def note_links(experiment_id: str, has_view: bool) -> str:
    """The markdown line of the run's description that links to the experiment's diverged runs (and its
    gradtrack view when the experiment has one), relative to the UI's page."""
    diverged = _fragment(experiment_id, f"{_diverged_query()}&{_TRAINING}")
    links = [f"[the experiment's diverged runs]({diverged})"]
    if has_view:
        links.append(
            f"[the gradtrack view of its runs]({_fragment(experiment_id, f'viewStateShareKey={VIEW_ID}&{_TRAINING}')})"
        )
    return "Compare: " + " · ".join(links) + "\n"

"""The MLflow UI at a glance (issue 27): runs coloured by outcome (``gradtrack_mlflow.colors``), the "gradtrack"
saved view (``gradtrack_mlflow.view``, ``gradtrack view``), and the links that open on the answer
(``gradtrack_mlflow.links``). The browser opens them in ``tests/test_report.py``."""

from __future__ import annotations

import json
import re
import uuid
from pathlib import Path
from typing import Any

import pytest
import torch
from gradtrack_mlflow.colors import (
    CALM_COLORS,
    DIVERGED_COLOR,
    HEALED_COLOR,
    OWN_COLOR_TAG,
    RUN_COLOR_TAG,
    color_tags,
    outcome_color,
)
from gradtrack_mlflow.links import diverged_link, note_links, runs_link, view_link
from gradtrack_mlflow.view import (
    CHARTS,
    COLUMNS,
    VIEW_TAG,
    read_view,
    ui_version,
    view_state,
    view_supported,
    view_tag_value,
)

from gradtrack import GradTracker
from gradtrack.cli import main
from gradtrack_testing.healing import healed_run
from gradtrack_testing.models import VanillaRNN, rnn_batch, train_steps

mlflow = pytest.importorskip("mlflow")
from mlflow.tracking import MlflowClient  # noqa: E402

UI_BUILD = Path(mlflow.__file__).parent / "server" / "js" / "build" / "static" / "js"


# -- the saved view's format ----------------------------------------------------------------------


def test_the_view_reads_back_as_the_ui_reads_it() -> None:
    view = read_view(view_tag_value(1_700_000_000_000))
    assert view["name"] == "gradtrack" and view["createdAt"] == view["updatedAt"] == 1_700_000_000_000
    state = view["state"]
    assert state["selectedColumns"] == list(COLUMNS) and "tags.`diverged`" in COLUMNS
    assert (state["orderByKey"], state["orderByAsc"]) == ("tags.`diverged`", False)  # "true" sorts first
    charts = {chart["metricKey"]: chart["scaleType"] for chart in state["compareRunCharts"]}
    assert charts == {"grad/total_norm": "log", "loss": "linear", "grad/clip_coef": "linear"} == dict(CHARTS)
    assert all(
        chart["metricSectionId"] == state["compareRunSections"][0]["uuid"] for chart in state["compareRunCharts"]
    )


def test_a_view_too_long_for_plain_json_is_compressed_as_the_ui_compresses_it() -> None:
    state = {**view_state(), "columnWidths": {f"metrics.`m{i}`": 100 for i in range(1000)}}
    value = view_tag_value(5, state)
    assert len(value) <= 20_000 and json.loads(value)["state"].startswith("deflate;")
    assert read_view(value)["state"] == state
    with pytest.raises(ValueError, match="created_at_ms"):
        view_tag_value(-1)
    with pytest.raises(ValueError, match="'name'"):
        read_view('{"state": "{}"}')


@pytest.mark.parametrize(("version", "supported"), [("3.17.2", True), ("3.17.0rc0", True), ("3.16.1", False),
                                                     ("3.18.0", False), ("", False), ("dev", False)])  # fmt: skip
def test_the_view_is_written_only_for_the_verified_mlflow_versions(version: str, supported: bool) -> None:
    assert view_supported(version) is supported


def test_the_installed_mlflow_ui_reads_what_gradtrack_writes() -> None:
    """The bundle of the installed MLflow UI still holds the keys gradtrack's view and colours rely on; an MLflow
    outside the verified versions gets no view at all (the browser test opens it in a real UI)."""
    if not view_supported(mlflow.__version__):
        pytest.fail(f"MLflow {mlflow.__version__} is installed: read its UI bundle for the saved-view format, then "
                    "widen gradtrack_mlflow.view.VERIFIED_VERSIONS")  # fmt: skip
    bundle = "".join(path.read_text(errors="replace") for path in UI_BUILD.glob("*.js"))
    for literal in ('"mlflow.sharedViewState."', '"viewStateShareKey"', '"mlflow.runColor"', '"deflate;"'):
        assert literal in bundle, literal
    for key in view_state():
        assert f'"{key}"' in bundle or f"{key}:" in bundle, key  # each key of the state is one the UI knows


# -- colours ---------------------------------------------------------------------------------------


def test_the_colour_says_the_outcome_and_never_replaces_the_users() -> None:
    assert outcome_color("diverged", "a") == DIVERGED_COLOR and outcome_color("healed", "a") == HEALED_COLOR
    calm = {outcome_color("healthy", uuid.uuid4().hex) for _ in range(50)}
    assert calm <= set(CALM_COLORS) and len(calm) > 3  # healthy runs stay told apart
    assert outcome_color("healthy", "run-1") == outcome_color("healthy", "run-1")
    with pytest.raises(ValueError, match="outcome"):
        outcome_color("exploded", "a")  # type: ignore[arg-type]
    assert color_tags({}, "#c83243") == {RUN_COLOR_TAG: "#c83243", OWN_COLOR_TAG: "#c83243"}
    ours = {RUN_COLOR_TAG: "#137dae", OWN_COLOR_TAG: "#137dae"}
    assert color_tags(ours, DIVERGED_COLOR) == {RUN_COLOR_TAG: DIVERGED_COLOR, OWN_COLOR_TAG: DIVERGED_COLOR}
    assert color_tags(ours, "#137dae") == {}
    assert color_tags({RUN_COLOR_TAG: "#ff00ff"}, DIVERGED_COLOR) == {}  # the user's
    assert color_tags({RUN_COLOR_TAG: "#ff00ff", OWN_COLOR_TAG: "#137dae"}, DIVERGED_COLOR) == {}  # re-picked in the UI


# -- links -----------------------------------------------------------------------------------------


def test_links_open_on_the_answer_at_the_servers_own_address() -> None:
    uri = "https://user:secret@mlflow.example:8443/"
    assert diverged_link(uri, "7") == ("https://mlflow.example:8443/#/experiments/7/runs?searchFilter=tags.diverged"
                                       "%20%3D%20%27true%27&workflowType=machine_learning")  # fmt: skip
    assert view_link(uri, "7").endswith(
        "/#/experiments/7/runs?viewStateShareKey=gradtrack&workflowType=machine_learning"
    )
    assert (
        runs_link("sqlite:///mlflow.db", "1")
        == "http://127.0.0.1:5000/#/experiments/1/runs?workflowType=machine_learning"
    )
    with pytest.raises(ValueError, match="experiment_id"):
        view_link(uri, "../1")
    assert "viewStateShareKey" not in note_links("3", has_view=False)
    assert re.findall(r"\]\((#/experiments/3/runs\?[^)]*)\)", note_links("3", has_view=True)) == [
        "#/experiments/3/runs?searchFilter=tags.diverged%20%3D%20%27true%27&workflowType=machine_learning",
        "#/experiments/3/runs?viewStateShareKey=gradtrack&workflowType=machine_learning",
    ]


# -- through the reporter, to a real server -------------------------------------------------------


def _rnn(uri: str, experiment: str, tmp_path: Path, radius: float, **options: Any) -> GradTracker:
    model = VanillaRNN(radius=radius)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5 if radius > 1 else 0.05)
    clipping: dict[str, Any] = {"clip": None} if radius > 1 else {"clip": "norm", "max_norm": 5.0}
    backend_options = {"mlflow": {"tracking_uri": uri, "experiment_name": experiment, "spool_dir": str(tmp_path),
                                  **options}}  # fmt: skip
    with GradTracker(model, backend="mlflow", backend_options=backend_options, **clipping,
                     close_timeout=120.0) as tracker:  # fmt: skip
        train_steps(tracker, model, optimizer, *rnn_batch(20), 30)
    return tracker


def _run(client: Any, experiment: str, name: str) -> Any:
    (run,) = client.search_runs([client.get_experiment_by_name(experiment).experiment_id],
                                f"attributes.run_name = '{name}'")  # fmt: skip
    return run


def test_runs_are_coloured_by_outcome_and_the_experiment_gets_the_view(server: Any, tmp_path: Path) -> None:
    experiment = f"colours-{uuid.uuid4().hex[:8]}"
    assert _rnn(server.uri, experiment, tmp_path, radius=3.0, run_name="diverged").diverged
    assert not _rnn(server.uri, experiment, tmp_path, radius=0.5, run_name="healthy").diverged
    assert _rnn(server.uri, experiment, tmp_path, radius=3.0, run_name="mine", tags={RUN_COLOR_TAG: "#ff00ff"}).diverged
    healed = healed_run("mlflow", backend_options={"mlflow": {"tracking_uri": server.uri, "experiment_name": experiment,
                                                              "run_name": "healed", "spool_dir": str(tmp_path)}},
                        close_timeout=120.0)  # fmt: skip
    assert healed.summary().rollbacks and not healed.diverged
    client = MlflowClient(server.uri)
    diverged, healthy = _run(client, experiment, "diverged"), _run(client, experiment, "healthy")
    assert diverged.data.tags[RUN_COLOR_TAG] == DIVERGED_COLOR and diverged.info.status == "FINISHED"
    assert healthy.data.tags[RUN_COLOR_TAG] in CALM_COLORS and healthy.data.tags["diverged"] == "false"
    assert _run(client, experiment, "healed").data.tags[RUN_COLOR_TAG] == HEALED_COLOR
    assert _run(client, experiment, "mine").data.tags[RUN_COLOR_TAG] == "#ff00ff"  # the user's colour, kept
    note = diverged.data.tags["mlflow.note.content"]
    experiment_id = diverged.info.experiment_id
    assert f"(#/experiments/{experiment_id}/runs?viewStateShareKey=gradtrack&workflowType=machine_learning)" in note
    view = read_view(client.get_experiment(experiment_id).tags[VIEW_TAG])
    assert view["state"] == view_state()


def test_the_colour_turns_red_while_the_run_goes_on(server: Any, tmp_path: Path) -> None:
    experiment = f"live-{uuid.uuid4().hex[:8]}"
    model = VanillaRNN(radius=3.0)
    options = {"mlflow": {"tracking_uri": server.uri, "experiment_name": experiment, "spool_dir": str(tmp_path)}}
    client = MlflowClient(server.uri)
    with GradTracker(model, backend="mlflow", backend_options=options, clip=None, close_timeout=120.0) as tracker:
        optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
        for _ in range(30):
            train_steps(tracker, model, optimizer, *rnn_batch(20), 1)
            if tracker.diverged:
                break
        assert tracker.diverged and tracker.flush(60.0)
        (run,) = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
        assert run.info.status == "RUNNING" and run.data.tags[RUN_COLOR_TAG] == DIVERGED_COLOR
    assert client.get_run(run.info.run_id).info.status == "FINISHED"  # red says diverged; the status stays


def test_a_colour_the_user_set_on_their_own_run_stays(server: Any, tmp_path: Path) -> None:
    mlflow.set_tracking_uri(server.uri)
    mlflow.set_experiment(f"own-{uuid.uuid4().hex[:8]}")  # the user's experiment: gradtrack adds no view to it
    try:
        with mlflow.start_run() as run:
            mlflow.set_tag(RUN_COLOR_TAG, "#123456")
            model = VanillaRNN(radius=3.0)
            with GradTracker(model, backend="mlflow", clip=None, close_timeout=120.0,
                             backend_options={"mlflow": {"spool_dir": str(tmp_path)}}) as tracker:  # fmt: skip
                train_steps(tracker, model, torch.optim.SGD(model.parameters(), lr=0.5), *rnn_batch(20), 30)
    finally:
        mlflow.set_tracking_uri(None)
    assert tracker.diverged
    client = MlflowClient(server.uri)
    finished = client.get_run(run.info.run_id)
    assert finished.data.tags[RUN_COLOR_TAG] == "#123456" and OWN_COLOR_TAG not in finished.data.tags
    assert "viewStateShareKey" not in finished.data.tags["mlflow.note.content"]  # the experiment has no view
    assert VIEW_TAG not in client.get_experiment(run.info.experiment_id).tags


def test_gradtrack_view_adds_the_view_to_a_users_experiment(server: Any, capsys: pytest.CaptureFixture[str]) -> None:
    client = MlflowClient(server.uri)
    name = f"mine-{uuid.uuid4().hex[:8]}"
    experiment_id = client.create_experiment(name)
    assert main(["view", name, "--tracking-uri", server.uri]) == 0
    out = capsys.readouterr().out
    assert view_link(server.uri, experiment_id) in out and diverged_link(server.uri, experiment_id) in out
    assert read_view(client.get_experiment(experiment_id).tags[VIEW_TAG])["state"] == view_state()
    assert main(["view", experiment_id, "--tracking-uri", server.uri]) == 0  # by id; the same view again
    edited = json.dumps({"name": "gradtrack", "createdAt": 1, "state": json.dumps({"selectedColumns": []})})
    client.set_experiment_tag(experiment_id, VIEW_TAG, edited)
    assert main(["view", name, "--tracking-uri", server.uri]) == 1  # edited in the UI: kept
    assert "--replace" in capsys.readouterr().err and client.get_experiment(experiment_id).tags[VIEW_TAG] == edited
    assert main(["view", name, "--tracking-uri", server.uri, "--replace"]) == 0
    assert main(["view", "no-such-experiment", "--tracking-uri", server.uri]) == 2
    assert ui_version(server.uri) == mlflow.__version__ == ui_version("sqlite:///mlflow.db")  # the server's, asked
    assert ui_version("databricks") == ""  # its UI is not the one whose format was read: no view there


def test_gradtrack_runs_prints_the_links(server: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    experiment = f"links-{uuid.uuid4().hex[:8]}"
    _rnn(server.uri, experiment, tmp_path, radius=3.0, run_name="diverged")
    experiment_id = MlflowClient(server.uri).get_experiment_by_name(experiment).experiment_id
    assert main(["runs", "--tracking-uri", server.uri, "--experiment", experiment]) == 0
    out = capsys.readouterr().out
    assert f"{experiment}: diverged runs {diverged_link(server.uri, experiment_id)}" in out
    assert f"{experiment}: gradtrack view {view_link(server.uri, experiment_id)}" in out

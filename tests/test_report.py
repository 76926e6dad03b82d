"""What a run says about itself: plots, its description, and the ``gradtrack`` commands that read it (issue 12)."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from gradtrack import GradTracker
from gradtrack.cli import main, parser
from gradtrack.delivery.history import RunHistory
from gradtrack.delivery.notes import MARKER, merge_note
from gradtrack.delivery.plots import _hold_between_samples, draw_layers, rows_to_show
from gradtrack_testing.models import VanillaRNN, rnn_batch, train_steps
from gradtrack_testing.skips import missing_system_dependency

mlflow = pytest.importorskip("mlflow")
from mlflow.tracking import MlflowClient  # noqa: E402

PNG = b"\x89PNG\r\n\x1a\n"
EXAMPLES = Path(__file__).parent.parent / "examples"


def _rnn_run(uri: str, experiment: str, tmp_path: Path, radius: float, clip: str | None,
             run_name: str, steps: int = 30) -> GradTracker:  # fmt: skip
    model = VanillaRNN(radius=radius)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5 if clip is None else 0.05)
    options = {"mlflow": {"tracking_uri": uri, "experiment_name": experiment, "run_name": run_name,
                          "spool_dir": str(tmp_path / "spool")}}  # fmt: skip
    # close_timeout: the tests read these runs at once; the niced reporter may need more than 10 s on a busy machine
    with GradTracker(model, backend="mlflow", backend_options=options, clip=clip, layer_every=2,
                     max_norm=5.0 if clip else None, close_timeout=120.0) as tracker:  # fmt: skip
        train_steps(tracker, model, optimizer, *rnn_batch(20), steps)
    return tracker


@pytest.fixture(scope="module")
def two_runs(server: Any, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str, dict[str, str]]:
    """A diverged run and a healthy one, logged through the reporter to the real server."""
    tmp = tmp_path_factory.mktemp("two-runs")
    experiment = f"report-{uuid.uuid4().hex[:8]}"
    diverged = _rnn_run(server.uri, experiment, tmp, radius=3.0, clip=None, run_name="exploding")
    healthy = _rnn_run(server.uri, experiment, tmp, radius=0.5, clip="norm", run_name="healthy")
    assert diverged.diverged and not healthy.diverged
    client = MlflowClient(server.uri)
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    return server.uri, experiment, {run.info.run_name: run.info.run_id for run in runs}


def test_the_run_page_says_what_happened_and_holds_the_plots(two_runs: tuple[str, str, dict[str, str]],
                                                             tmp_path: Path) -> None:  # fmt: skip
    uri, _, ids = two_runs
    client = MlflowClient(uri)
    for name, headline in (("exploding", "diverged at step"), ("healthy", "healthy gradients")):
        run = client.get_run(ids[name])
        note = run.data.tags["mlflow.note.content"]
        assert note.startswith(MARKER) and f"### gradtrack: {headline}" in note
        assert "| recommended max_norm |" in note and f"run_uuid={ids[name]}" in note  # the plots, inline
        assert "/runs?searchFilter=tags.diverged%20%3D%20%27true%27&" in note  # a link to the diverged runs
        artifacts = {a.path for a in client.list_artifacts(ids[name], "gradtrack")}
        assert {"gradtrack/norms.png", "gradtrack/layers.png"} <= artifacts
        picture = Path(client.download_artifacts(ids[name], "gradtrack/norms.png", str(tmp_path / name)))
        assert picture.read_bytes().startswith(PNG) and picture.stat().st_size > 5000


def test_a_users_own_description_is_kept_above_gradtracks(server: Any, tmp_path: Path) -> None:
    mlflow.set_tracking_uri(server.uri)
    experiment = f"described-{uuid.uuid4().hex[:8]}"
    mlflow.set_experiment(experiment)
    try:
        with mlflow.start_run(description="my own notes: lr sweep, run 3") as run:
            model = VanillaRNN(radius=0.5)
            with GradTracker(model, backend="mlflow", backend_options={"mlflow": {"spool_dir": str(tmp_path)}}):
                model(torch.randn(4, 5, 4)).sum().backward()
                torch.optim.SGD(model.parameters(), lr=0.01).step()
    finally:
        mlflow.set_tracking_uri(None)
    note = MlflowClient(server.uri).get_run(run.info.run_id).data.tags["mlflow.note.content"]
    assert note.startswith("my own notes: lr sweep, run 3\n\n" + MARKER) and note.count(MARKER) == 1


def test_merge_note_replaces_only_its_own_section() -> None:
    first = merge_note("user text", "old section")
    assert merge_note(first, "new section") == f"user text\n\n{MARKER}\nnew section"
    assert merge_note(None, "only") == f"{MARKER}\nonly"


def test_runs_lists_the_runs_with_their_health(two_runs: tuple[str, str, dict[str, str]],
                                              capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    uri, experiment, _ids = two_runs
    assert main(["runs", "--tracking-uri", uri, "--experiment", experiment, "--json"]) == 0
    rows = {row["run_name"]: row for row in json.loads(capsys.readouterr().out)}
    assert set(rows) == {"exploding", "healthy"}
    assert rows["exploding"]["diverged"] and rows["exploding"]["explosions"] > 0
    assert rows["exploding"]["first_explosion_step"] is not None and rows["exploding"]["diverged_step"] is not None
    assert not rows["healthy"]["diverged"] and rows["healthy"]["recommended_max_norm"] > 0
    assert main(["runs", "--tracking-uri", uri, "--experiment", experiment, "--diverged"]) == 0
    table, links = capsys.readouterr().out.split("\n\n", 1)  # the table, then the links into the MLflow UI
    table = table.splitlines()
    assert f"{experiment}: diverged runs http" in links
    assert table[0].split()[:4] == ["run", "name", "experiment", "status"]
    assert len(table) == 2 and "exploding" in table[1] and "True" in table[1]
    assert main(["runs", "--tracking-uri", uri, "--experiment", "no-such-experiment"]) == 2


@pytest.mark.parametrize("suffix", [".png", ".html"])
def test_report_draws_the_run_and_prints_its_summary(
    two_runs: tuple[str, str, dict[str, str]], suffix: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    uri, _, ids = two_runs
    output = tmp_path / f"report{suffix}"
    assert main(["report", ids["exploding"], "-o", str(output), "--tracking-uri", uri]) == 0
    out = capsys.readouterr().out
    assert "diverged True at step" in out and "top offenders:" in out and str(output) in out
    content = output.read_bytes()
    assert content.startswith(PNG) if suffix == ".png" else content.count(b"data:image/png;base64,") == 2
    assert main(["report", "nonexistent-run", "--tracking-uri", uri]) == 2


def test_every_command_has_help() -> None:
    commands = parser()._subparsers._group_actions[0].choices  # type: ignore[union-attr]
    assert {"backends", "runs", "report", "replay", "watch"} <= set(commands)
    for name in commands:
        done = subprocess.run([sys.executable, "-m", "gradtrack.cli", name, "--help"], capture_output=True, text=True)
        assert done.returncode == 0 and "usage: gradtrack" in done.stdout, name


def test_the_heatmap_stays_readable_from_ten_to_five_thousand_layers(tmp_path: Path) -> None:
    for count in (10, 5000):
        history = RunHistory()
        rng = torch.Generator().manual_seed(0)
        for step in range(0, 200, 5):
            norms = torch.rand(count, generator=rng) * (1 + step / 10)
            history.add_step(step, float(norms.norm()), {f"block{i // 4}.part{i % 4}": float(v) for i, v in
                                                          enumerate(norms.tolist())})  # fmt: skip
        rows, members = rows_to_show(history)
        assert len(rows) <= 60
        assert (rows == history.layer_names) if count == 10 else all(len(members[row]) == 1 for row in rows)
        assert draw_layers(history, tmp_path / f"{count}.png").read_bytes().startswith(PNG)


def test_per_layer_samples_fill_the_heatmap_until_the_next_one() -> None:
    nan, inf = math.nan, math.inf
    grid = np.array([[nan, 1.0, nan, nan, 2.0, nan], [nan, inf, nan, nan, nan, nan]])  # layer_every=3
    _hold_between_samples(grid)
    expected = np.array([[nan, 1.0, 1.0, 1.0, 2.0, 2.0], [nan, inf, inf, inf, nan, nan]])
    np.testing.assert_array_equal(grid, expected)  # a layer absent from a sampled column stays empty


# -- the MLflow UI, in a real browser ------------------------------------------------------------------


@pytest.fixture
def browser(tmp_path: Path) -> Any:
    """Debian's Chromium, headless, driven by selenium through Debian's chromedriver (nothing downloaded)."""
    import shutil

    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if chromium is None or driver is None:
        missing_system_dependency("Chromium is not installed (Debian: apt-get install chromium chromium-driver; "
                                  "make test does it when it runs as root)")  # fmt: skip
    try:
        import selenium
    except ImportError:
        missing_system_dependency("selenium is not installed (pip install selenium)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for argument in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        "--window-size=1600,1000",
        f"--user-data-dir={tmp_path / 'profile'}",
    ):
        options.add_argument(argument)  # fmt: skip
    session = webdriver.Chrome(service=Service(driver), options=options)
    session.implicitly_wait(20)
    assert selenium is not None
    yield session
    session.quit()


def _wait_for_text(browser: Any, text: str, timeout: float = 30.0) -> str:
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        body = browser.find_element("tag name", "body").text
        if text in body:
            return str(body)
        time.sleep(0.25)
    raise AssertionError(f"{text!r} never appeared on {browser.current_url}: {body[-1500:]}")


@pytest.fixture
def demo(server: Any, tmp_path: Path) -> list[str]:
    """``make demo`` against the tracking server: the links it prints into the MLflow UI (the runs, the gradtrack
    view, the diverged runs)."""
    environment = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    environment["MLFLOW_TRACKING_URI"] = server.uri  # the demo's own way to log elsewhere than ./mlflow.db
    done = subprocess.run([sys.executable, str(EXAMPLES / "rnn_explosion_demo.py")], cwd=tmp_path, env=environment,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    printed = re.findall(r"open (\S+)", done.stdout)
    assert len(printed) == 3 and all(link.startswith(f"{server.uri}/#/") for link in printed), done.stdout[-2000:]
    return printed


def _run_colours(browser: Any) -> dict[str, str]:
    """Each run's name in the runs table and the CSS colour of its pill (MLflow's run colour)."""
    pills = browser.find_elements("xpath", "//*[@data-testid='experiment-view-table-run-color']")
    return {pill.find_element("xpath", "./following-sibling::a").text: pill.value_of_css_property("background-color")
            for pill in pills}  # fmt: skip


def _grid_row(browser: Any, run_name: str) -> str:
    """The position of a run's row in the runs table as shown (the grid's order in the page is not the shown one)."""
    row = browser.find_element("xpath", f"//a[normalize-space(.)='{run_name}']/ancestor::*[@row-index][1]")
    return str(row.get_attribute("row-index"))


def _rgb(color: str) -> str:
    """``#rrggbb`` as Chromium reports a computed colour."""
    red, green, blue = (int(color[i : i + 2], 16) for i in (1, 3, 5))
    return f"rgba({red}, {green}, {blue}, 1)"


@pytest.mark.slow
def test_the_demos_links_open_on_the_answer_without_a_click(server: Any, demo: list[str], browser: Any,
                                                           tmp_path: Path) -> None:  # fmt: skip
    """The runs, coloured by outcome; the "gradtrack" saved view, whose format is MLflow's internal one: an
    MLflow that reads it differently fails here (its sort, columns and charts are checked), not in users' hands."""
    from gradtrack_mlflow.colors import CALM_COLORS, DIVERGED_COLOR

    runs, view, diverged = demo
    client = MlflowClient(server.uri)
    experiment = client.get_experiment_by_name("gradtrack-rnn-demo")
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"  # gradtrack created it
    ids = {run.info.run_name: run.info.run_id for run in client.search_runs([experiment.experiment_id])}
    assert set(ids) == {"monitor-only", "clip-norm-5"}

    browser.get(runs)  # the page that opens, before any click: the runs table, the diverged run red
    body = _wait_for_text(browser, "clip-norm-5")
    colours = _run_colours(browser)
    browser.save_screenshot(str(tmp_path / "experiment.png"))
    assert f"/experiments/{experiment.experiment_id}/runs" in browser.current_url
    assert "Run Name" in body and "monitor-only" in body and "Token Usage" not in body
    assert colours["monitor-only"] == _rgb(DIVERGED_COLOR)
    assert colours["clip-norm-5"] in {_rgb(color) for color in CALM_COLORS}
    rows = body[body.index("Run Name") :]
    assert "rnn_explosion_demo.py" in rows and "reporter_main.py" not in rows  # the source: the user's script

    browser.get(view)  # the saved view: sorted by diverged, its columns, the diverged run first
    body = _wait_for_text(browser, "gradtrack.explosions")
    browser.save_screenshot(str(tmp_path / "view.png"))
    assert "Sort: diverged" in body and "Error loading shared view state" not in body
    rows = body[body.index("Run Name") :]
    assert "diverged" in rows and "grad/total_norm" in rows and "loss" in rows
    assert _grid_row(browser, "monitor-only") == "0" and _grid_row(browser, "clip-norm-5") == "1"  # sorted
    [cell] = browser.find_elements("xpath", "//*[@row-index='0']/*[@col-id='tags.`diverged`']")  # the view's column
    assert cell.text == "true"
    assert _run_colours(browser)["monitor-only"] == _rgb(DIVERGED_COLOR)

    browser.get(view.replace("?", "?compareRunsMode=CHART&", 1))  # the view's charts, its section first
    body = _wait_for_text(browser, "gradtrack\n(3)")  # a section's name, then its count of charts
    browser.save_screenshot(str(tmp_path / "charts.png"))
    assert body.index("gradtrack\n(3)") < body.index("grad\n(")

    browser.get(diverged)  # filtered: the diverged run alone
    body = _wait_for_text(browser, "1 matching run")
    browser.save_screenshot(str(tmp_path / "diverged.png"))
    assert "monitor-only" in body and "clip-norm-5" not in body

    run_page = f"{server.uri}/#/experiments/{experiment.experiment_id}/runs/{ids['monitor-only']}"
    browser.get(run_page)  # its description links to the same two pages, whole (markdown ends a URL at a quote)
    for text, page in (("the experiment's diverged runs", diverged), ("the gradtrack view of its runs", view)):
        link = browser.find_element("xpath", f'//a[normalize-space(.)="{text}"]')  # waits for the page
        assert link.get_attribute("href").endswith(page.split("/#/")[1]), text
    browser.execute_script("arguments[0].scrollIntoView()", link)
    browser.save_screenshot(str(tmp_path / "run.png"))

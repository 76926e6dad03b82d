"""``gradtrack watch`` against the real MLflow test server, a loopback webhook receiver and ``--exec`` commands."""

from __future__ import annotations

import http.server
import json
import signal
import stat
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gradtrack_testing.fault_server import FaultServer
from gradtrack_testing.mlflow_server import MlflowServer
from gradtrack_testing.ports import free_port

pytest.importorskip("mlflow")
from gradtrack_mlflow import watch
from mlflow.tracking import MlflowClient

ROOT = Path(__file__).resolve().parents[1]


class Receiver:
    """A webhook on 127.0.0.1: records every POST; answers ``statuses`` in turn, then 200."""

    def __init__(self) -> None:
        self.posts: list[dict[str, Any]] = []  # every attempt: path, headers, raw body
        self.statuses: list[int] = []
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                status = receiver.statuses.pop(0) if receiver.statuses else 200
                receiver.posts.append(
                    {"path": self.path, "headers": dict(self.headers), "body": body, "status": status}
                )
                answer = b"ok" if status == 200 else b"error"
                self.send_response(status)
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}/hooks/T000/B000/secretpath"
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True)
        self._thread.start()

    @property
    def delivered(self) -> list[dict[str, Any]]:
        """The JSON of every POST answered 200."""
        return [json.loads(post["body"]) for post in self.posts if post["status"] == 200]

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    running = Receiver()
    yield running
    running.close()


@pytest.fixture
def client(server: MlflowServer) -> MlflowClient:
    return MlflowClient(server.uri)


@pytest.fixture
def experiment(client: MlflowClient) -> tuple[str, str]:
    """A fresh experiment: (name, id)."""
    name = f"watch-{uuid.uuid4().hex[:12]}"
    return name, str(client.create_experiment(name))


def make_run(client: MlflowClient, experiment_id: str, name: str, **tags: str) -> str:
    """A run with gradtrack's tags as its MLflow backend writes them (``_`` in a keyword is ``.``)."""
    run = client.create_run(experiment_id, run_name=name, tags={"diverged": "false", **_tags(tags)})
    return str(run.info.run_id)


def set_tags(client: MlflowClient, run_id: str, **tags: str) -> None:
    for key, value in _tags(tags).items():
        client.set_tag(run_id, key, value)


def _tags(tags: dict[str, str]) -> dict[str, str]:
    names = {
        "explosions": "gradtrack.explosions",
        "first_explosion_step": "gradtrack.first_explosion_step",
        "diverged_step": "gradtrack.diverged_step",
        "diverged_reason": "gradtrack.diverged_reason",
        "top_offenders": "gradtrack.summary.top_offenders",
        "rollbacks": "gradtrack.rollbacks",
    }
    return {names.get(key, key): value for key, value in tags.items()}


def once(uri: str, experiment: str, state: Path, *target: str) -> int:
    return watch.main(["--once", "--tracking-uri", uri, "--experiment", experiment, "--state", str(state), *target])


# -------------------------------------------------------------------------
# Alerts: one per new condition
# -------------------------------------------------------------------------


def test_one_alert_per_new_condition(
    server: MlflowServer,
    client: MlflowClient,
    experiment: tuple[str, str],
    receiver: Receiver,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    name, experiment_id = experiment
    make_run(client, experiment_id, "healthy", explosions="0")
    exploding = make_run(client, experiment_id, "exploding", explosions="2", first_explosion_step="40")
    diverged = make_run(
        client, experiment_id, "diverged", explosions="7", first_explosion_step="3", diverged="true",
        diverged_step="120", diverged_reason="non-finite gradients for 3 steps", top_offenders="W_h.weight (5)",
    )  # fmt: skip
    state = tmp_path / "state.json"

    assert once(server.uri, name, state, "--webhook", receiver.url) == 0
    alerts = {alert["run_id"]: alert for alert in receiver.delivered}
    assert len(receiver.posts) == 2 and set(alerts) == {exploding, diverged}
    assert alerts[diverged] | {"text": None} == {
        "text": None,
        "event": "diverged",
        "run_id": diverged,
        "run_name": "diverged",
        "experiment_id": experiment_id,
        "experiment_name": name,
        "step": 120,
        "reason": "non-finite gradients for 3 steps",
        "explosions": 7,
        "rollbacks": 0,
        "rollback_steps": None,
        "top_offenders": "W_h.weight (5)",
        "url": f"{server.uri}/#/experiments/{experiment_id}/runs/{diverged}",
    }
    text = alerts[diverged]["text"]
    assert f"<{server.uri}/#/experiments/{experiment_id}/runs/{diverged}|diverged>" in text
    assert "diverged at step 120: non-finite gradients for 3 steps" in text
    explosion = alerts[exploding]
    assert (explosion["event"], explosion["step"], explosion["explosions"]) == ("explosions", 40, 2)
    assert explosion["reason"] is None and explosion["top_offenders"] is None
    assert "2 gradient explosions (first at step 40)" in explosion["text"]
    assert receiver.posts[0]["headers"]["Content-Type"] == "application/json"
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 2 and all(line.startswith("sent ") for line in out)
    assert "secretpath" not in "".join(out)

    assert once(server.uri, name, state, "--webhook", receiver.url) == 0  # nothing new
    assert len(receiver.posts) == 2
    assert capsys.readouterr().out == ""


def test_rising_explosions_then_divergence(
    server: MlflowServer, client: MlflowClient, experiment: tuple[str, str], receiver: Receiver, tmp_path: Path
) -> None:
    name, experiment_id = experiment
    run_id = make_run(client, experiment_id, "rnn", explosions="1", first_explosion_step="10")
    state = tmp_path / "state.json"
    target = ("--webhook", receiver.url)

    assert once(server.uri, name, state, *target) == 0
    assert [(a["event"], a["explosions"]) for a in receiver.delivered] == [("explosions", 1)]
    set_tags(client, run_id, explosions="3")
    assert once(server.uri, name, state, *target) == 0
    assert once(server.uri, name, state, *target) == 0
    assert [(a["event"], a["explosions"]) for a in receiver.delivered] == [("explosions", 1), ("explosions", 3)]

    set_tags(client, run_id, diverged="true", diverged_step="55", diverged_reason="loss blow-up")
    assert once(server.uri, name, state, *target) == 0
    set_tags(client, run_id, explosions="9")  # after the divergence: no news
    assert once(server.uri, name, state, *target) == 0
    events = [(a["event"], a["step"], a["explosions"]) for a in receiver.delivered]
    assert events == [("explosions", 10, 1), ("explosions", 10, 3), ("diverged", 55, 3)]
    saved = json.loads(state.read_text())["runs"]
    assert saved == {run_id: {"diverged": True, "explosions": 3, "rollbacks": 0}}  # what was sent


def log_rollbacks(client: MlflowClient, run_id: str, *steps: int) -> None:
    """``grad/rollback`` = 1 at each step, as the MLflow backend logs a rollback."""
    for step in steps:
        client.log_metric(run_id, "grad/rollback", 1.0, step=step)


def test_each_rollback_is_alerted_once_with_its_steps_and_covers_the_explosions(
    server: MlflowServer, client: MlflowClient, experiment: tuple[str, str], receiver: Receiver, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    name, experiment_id = experiment
    healed = make_run(client, experiment_id, "healed", explosions="1", first_explosion_step="27", rollbacks="1")
    log_rollbacks(client, healed, 27)
    quiet = make_run(client, experiment_id, "quiet", explosions="0", rollbacks="1")  # a NaN loss: no explosion
    state, target = tmp_path / "state.json", ("--webhook", receiver.url)

    assert once(server.uri, name, state, *target) == 0
    alerts = {alert["run_id"]: alert for alert in receiver.delivered}
    assert len(receiver.posts) == 2 and set(alerts) == {healed, quiet}  # one each: no explosions alert for healed
    first = alerts[healed]
    assert (first["event"], first["step"], first["rollbacks"], first["rollback_steps"]) == ("rollback", 27, 1, [27])
    assert first["explosions"] == 1 and first["reason"] is None
    assert "|healed> rolled back at step 27, 1 rollback so far (experiment" in first["text"]
    assert "1 gradient explosion)" in first["text"] and first["text"].startswith(":rewind: gradtrack: run <")
    assert (alerts[quiet]["step"], alerts[quiet]["rollback_steps"]) == (None, [])  # its metric not logged (yet)
    assert "sent rollback alert: run 'healed'" in capsys.readouterr().out
    assert once(server.uri, name, state, *target) == 0
    assert len(receiver.posts) == 2  # nothing new

    set_tags(client, healed, rollbacks="2", explosions="2")
    log_rollbacks(client, healed, 57)
    assert once(server.uri, name, state, *target) == 0
    assert once(server.uri, name, state, *target) == 0
    second = receiver.delivered[-1]
    assert (second["event"], second["step"], second["rollback_steps"]) == ("rollback", 57, [27, 57])
    assert "rolled back at steps 27, 57, 2 rollbacks so far" in second["text"] and len(receiver.posts) == 3

    set_tags(client, healed, explosions="3")  # an explosion the run came through without a rollback: news
    assert once(server.uri, name, state, *target) == 0
    set_tags(client, healed, diverged="true", diverged_step="90", diverged_reason="loss is nan")
    assert once(server.uri, name, state, *target) == 0
    events = [(a["event"], a["explosions"], a["rollbacks"]) for a in receiver.delivered if a["run_id"] == healed]
    assert events == [("rollback", 1, 1), ("rollback", 2, 2), ("explosions", 3, 2), ("diverged", 3, 2)]
    assert (
        "(experiment " in receiver.delivered[-1]["text"]
        and "; 3 gradient explosions; 2 rollbacks)" in (receiver.delivered[-1]["text"])
    )
    saved = json.loads(state.read_text())["runs"]
    assert saved[healed] == {"diverged": True, "explosions": 3, "rollbacks": 2}


def test_rollback_steps_that_cannot_be_read_do_not_hold_the_alert_back(
    server: MlflowServer, client: MlflowClient, experiment: tuple[str, str], tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    """And a state file written before rollbacks were watched loads: its runs have none alerted."""
    name, experiment_id = experiment
    run_id = make_run(client, experiment_id, "healed", explosions="1", rollbacks="2")
    log_rollbacks(client, run_id, 27, 57)
    state = tmp_path / "state.json"
    old = {"version": 1, "tracking_uri": server.uri, "experiments": [name],
           "runs": {run_id: {"diverged": False, "explosions": 1}}}  # fmt: skip
    state.write_text(json.dumps(old))
    record = tmp_path / "events.jsonl"
    command = ("--exec", sys.executable, "-c", RECORDER, str(record))
    with FaultServer(server.uri) as proxy:
        proxy.refuse("metrics/get-history", times=1)
        assert once(proxy.uri, name, state, *command) == 0
    assert "cannot read the rollback steps of run" in capsys.readouterr().err
    assert once(server.uri, name, state, *command) == 0  # delivered: not again
    (line,) = [json.loads(text) for text in record.read_text().splitlines()]
    assert (line["stdin"]["event"], line["stdin"]["rollbacks"], line["stdin"]["rollback_steps"]) == (
        "rollback",
        2,
        None,
    )
    assert (line["env"]["GRADTRACK_ROLLBACKS"], line["env"]["GRADTRACK_ROLLBACK_STEPS"]) == ("2", "")
    record.unlink()
    set_tags(client, run_id, rollbacks="3")
    log_rollbacks(client, run_id, 80)
    assert once(server.uri, name, state, *command) == 0
    (line,) = [json.loads(text) for text in record.read_text().splitlines()]
    assert line["env"]["GRADTRACK_ROLLBACK_STEPS"] == "27,57,80" and line["env"]["GRADTRACK_STEP"] == "80"


def test_a_restart_with_the_same_state_sends_nothing_and_keeps_no_credentials(
    server: MlflowServer,
    client: MlflowClient,
    experiment: tuple[str, str],
    receiver: Receiver,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """``python -m gradtrack_mlflow.watch``, then a restart in process: the default state file, credentials in
    the URI."""
    name, experiment_id = experiment
    run_id = make_run(client, experiment_id, "r", diverged="true", diverged_step="4", diverged_reason="nan")
    cache = tmp_path / "cache"
    host = server.uri.removeprefix("http://")
    uri = f"http://alice:hunter2pass@{host}"  # the server has no auth: it ignores them
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    command = [sys.executable, "-m", "gradtrack_mlflow.watch", "--once", "--experiment", name,
               "--webhook", receiver.url]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("sent diverged alert: ") and done.stderr == ""
    assert [alert["run_id"] for alert in receiver.delivered] == [run_id]
    assert receiver.delivered[0]["url"] == f"{server.uri}/#/experiments/{experiment_id}/runs/{run_id}"

    assert watch.main(["--once", "--experiment", name, "--webhook", receiver.url]) == 0  # the restart
    assert len(receiver.posts) == 1
    out, err = capsys.readouterr()
    assert "hunter2pass" not in done.stdout + done.stderr + out + err
    assert "secretpath" not in done.stdout + done.stderr + out + err

    state = watch.default_state_path(uri, [name])
    assert state.parent == cache / "gradtrack" and state.name.startswith("watch-")
    assert watch.default_state_path(server.uri, [name]) == state  # the hash ignores credentials
    assert stat.S_IMODE(state.stat().st_mode) == 0o600
    assert stat.S_IMODE(state.parent.stat().st_mode) == 0o700
    text = state.read_text()
    assert "hunter2pass" not in text and "alice" not in text
    assert json.loads(text)["tracking_uri"] == server.uri
    assert [p.name for p in state.parent.iterdir() if p.suffix == ".tmp"] == []  # nothing left of the atomic writes


def test_every_experiment_by_default_and_a_local_store(
    server: MlflowServer, client: MlflowClient, experiment: tuple[str, str], receiver: Receiver, tmp_path: Path
) -> None:
    """No --experiment: every experiment (the shared server holds others' runs too); a sqlite store through
    MlflowClient (the shared server's own database, read directly)."""
    name, experiment_id = experiment
    run_id = make_run(client, experiment_id, "r", explosions="1")
    base = ["--once", "--webhook", receiver.url]
    assert watch.main([*base, "--tracking-uri", server.uri, "--state", str(tmp_path / "a.json")]) == 0
    mine = [alert for alert in receiver.delivered if alert["experiment_id"] == experiment_id]
    assert [(alert["run_id"], alert["experiment_name"]) for alert in mine] == [(run_id, name)]

    set_tags(client, run_id, explosions="2")
    state = tmp_path / "b.json"
    assert once(server.store, name, state, *base[1:]) == 0
    local = receiver.delivered[-1]
    assert (local["run_id"], local["explosions"], local["url"]) == (run_id, 2, None)
    assert "(" + run_id + ")" in local["text"]

    set_tags(client, run_id, rollbacks="1")  # the steps, read through MlflowClient too
    log_rollbacks(client, run_id, 12)
    assert once(server.store, name, state, *base[1:]) == 0
    assert (receiver.delivered[-1]["event"], receiver.delivered[-1]["rollback_steps"]) == ("rollback", [12])


def test_missing_experiment_is_reported_not_fatal(
    server: MlflowServer, receiver: Receiver, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert once(server.uri, f"absent-{uuid.uuid4().hex}", tmp_path / "s.json", "--webhook", receiver.url) == 0
    assert "does not exist (yet)" in capsys.readouterr().err
    assert receiver.posts == []


# -------------------------------------------------------------------------
# --exec
# -------------------------------------------------------------------------

RECORDER = """
import json, os, sys
event = json.loads(sys.stdin.read())
variables = {key: value for key, value in os.environ.items() if key.startswith("GRADTRACK_")}
with open(sys.argv[1], "a") as file:
    file.write(json.dumps({"stdin": event, "env": variables}) + "\\n")
"""


def test_exec_gets_the_event_on_stdin_and_in_the_environment(
    server: MlflowServer,
    client: MlflowClient,
    experiment: tuple[str, str],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("GRADTRACK_REQUIRE_ALL_TESTS", raising=False)  # CI's own; the command inherits the environment
    name, experiment_id = experiment
    reason = 'said "stop"\nthen $(rm -rf /) `x` ; <!channel>'
    run_id = make_run(
        client, experiment_id, "exec run", diverged="true", diverged_step="9", diverged_reason=reason, explosions="2"
    )
    state = tmp_path / "state.json"
    failing = ["--exec", sys.executable, "-c", "import sys; sys.stderr.write('no route\\n'); sys.exit(3)"]
    assert once(server.uri, name, state, *failing) == 1  # not delivered: not recorded
    assert "exited with status 3: no route" in capsys.readouterr().err
    assert json.loads(state.read_text())["runs"] == {}

    record = tmp_path / "events.jsonl"
    assert once(server.uri, name, state, "--exec", sys.executable, "-c", RECORDER, str(record)) == 0
    assert once(server.uri, name, state, "--exec", sys.executable, "-c", RECORDER, str(record)) == 0
    lines = [json.loads(line) for line in record.read_text().splitlines()]
    assert len(lines) == 1
    event, env = lines[0]["stdin"], lines[0]["env"]
    assert (event["event"], event["run_id"], event["reason"], event["step"]) == ("diverged", run_id, reason, 9)
    assert env == {
        "GRADTRACK_EVENT": "diverged",
        "GRADTRACK_RUN_ID": run_id,
        "GRADTRACK_RUN_NAME": "exec run",
        "GRADTRACK_EXPERIMENT": name,
        "GRADTRACK_EXPERIMENT_ID": experiment_id,
        "GRADTRACK_STEP": "9",
        "GRADTRACK_REASON": reason,
        "GRADTRACK_EXPLOSIONS": "2",
        "GRADTRACK_ROLLBACKS": "0",
        "GRADTRACK_ROLLBACK_STEPS": "",
        "GRADTRACK_TOP_OFFENDERS": "",
        "GRADTRACK_URL": f"{server.uri}/#/experiments/{experiment_id}/runs/{run_id}",
    }
    assert not (tmp_path / "rm").exists()


def test_exec_that_hangs_is_killed_and_retried(
    server: MlflowServer, client: MlflowClient, experiment: tuple[str, str], tmp_path: Path
) -> None:
    name, experiment_id = experiment
    make_run(client, experiment_id, "r", explosions="1")
    started = time.monotonic()
    hang = ["--timeout", "0.5", "--exec", sys.executable, "-c", "import time; time.sleep(60)"]
    assert once(server.uri, name, tmp_path / "s.json", *hang) == 1
    assert time.monotonic() - started < 10
    assert json.loads((tmp_path / "s.json").read_text())["runs"] == {}


# -------------------------------------------------------------------------
# Outages: the tracking server, the webhook
# -------------------------------------------------------------------------


def test_server_outage_in_once_mode_then_back(
    server: MlflowServer,
    client: MlflowClient,
    experiment: tuple[str, str],
    receiver: Receiver,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    name, experiment_id = experiment
    run_id = make_run(client, experiment_id, "r", explosions="1", first_explosion_step="2")
    state = tmp_path / "state.json"
    assert once(server.uri, name, state, "--webhook", receiver.url) == 0
    set_tags(client, run_id, diverged="true", diverged_step="8", diverged_reason="nan")
    before = state.read_bytes()
    capsys.readouterr()

    down = f"http://carol:s3cretpw@127.0.0.1:{free_port()}"  # nothing listens: connection refused
    started = time.monotonic()
    assert once(down, name, state, "--webhook", receiver.url) == 1
    assert time.monotonic() - started < 5  # one bounded attempt, not MLflow's minutes of retries
    out, err = capsys.readouterr()
    assert out == "" and len(err.splitlines()) == 1 and "cannot read the MLflow tracking server" in err
    assert "s3cretpw" not in err and "carol" not in err
    assert state.read_bytes() == before
    assert len(receiver.posts) == 1

    assert once(server.uri, name, state, "--webhook", receiver.url) == 0
    assert once(server.uri, name, state, "--webhook", receiver.url) == 0
    assert [alert["event"] for alert in receiver.delivered] == ["explosions", "diverged"]


def _wait_for(condition: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def _start_watcher(uri: str, name: str, state: Path, url: str, log: Path) -> subprocess.Popen[bytes]:
    command = [
        sys.executable, "-m", "gradtrack_mlflow.watch", "--tracking-uri", uri, "--experiment", name,
        "--state", str(state), "--interval", "0.2", "--timeout", "1", "--webhook", url,
    ]  # fmt: skip
    with log.open("wb") as output:
        return subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, cwd=ROOT)


def _stop_watcher(process: subprocess.Popen[bytes]) -> int:
    process.send_signal(signal.SIGTERM)
    return process.wait(30)


def test_server_outage_while_watching(
    server: MlflowServer, client: MlflowClient, experiment: tuple[str, str], receiver: Receiver, tmp_path: Path
) -> None:
    """The loop survives a server answering 503 and then one that hangs; the alert goes out once it is back."""
    name, experiment_id = experiment
    make_run(client, experiment_id, "r", diverged="true", diverged_step="3", diverged_reason="nan")
    proxy = FaultServer(server.uri)
    proxy.mode = "status"
    log = tmp_path / "watch.log"
    process = _start_watcher(proxy.uri, name, tmp_path / "state.json", receiver.url, log)
    try:
        _wait_for(lambda: "cannot read" in log.read_text(), 60, "a failed poll")
        proxy.mode = "silent"
        count = log.read_text().count("cannot read")
        _wait_for(lambda: log.read_text().count("cannot read") > count, 10, "a timed-out poll")
        assert process.poll() is None and receiver.posts == []
        proxy.mode = "pass"
        _wait_for(lambda: receiver.posts, 10, "the alert")
        time.sleep(0.6)  # a few more polls
        assert _stop_watcher(process) == 0
    finally:
        if process.poll() is None:
            process.kill()
        proxy.mode = "pass"
        proxy.close()
    assert [alert["event"] for alert in receiver.delivered] == ["diverged"]
    output = log.read_text()
    assert output.count("sent diverged alert") == 1 and "Traceback" not in output
    assert output.rstrip().endswith("stopped")


@pytest.mark.slow
def test_dedicated_server_stopped_and_restarted_while_watching(receiver: Receiver, tmp_path: Path) -> None:
    own = MlflowServer(tmp_path / "mlflow")
    own.root.mkdir()
    own.start()
    process = None
    try:
        client = MlflowClient(own.uri)
        experiment_id = client.create_experiment("outage")
        make_run(client, experiment_id, "r", diverged="true", diverged_step="3", diverged_reason="nan")
        own.stop()
        log = tmp_path / "watch.log"
        process = _start_watcher(own.uri, "outage", tmp_path / "state.json", receiver.url, log)
        _wait_for(lambda: log.read_text().count("cannot read") >= 2, 60, "two failed polls")
        assert process.poll() is None and receiver.posts == []
        own.start()
        _wait_for(lambda: receiver.posts, 30, "the alert")
        time.sleep(1.0)
        assert _stop_watcher(process) == 0
    finally:
        if process is not None and process.poll() is None:
            process.kill()
        own.stop()
    assert [alert["event"] for alert in receiver.delivered] == ["diverged"]


def test_webhook_answering_500_once_is_retried_at_the_next_poll(
    server: MlflowServer,
    client: MlflowClient,
    experiment: tuple[str, str],
    receiver: Receiver,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    name, experiment_id = experiment
    first = make_run(client, experiment_id, "a", explosions="1")
    second = make_run(client, experiment_id, "b", explosions="1")
    state = tmp_path / "state.json"
    receiver.statuses = [500]
    assert once(server.uri, name, state, "--webhook", receiver.url) == 1
    err = capsys.readouterr().err
    assert "answered 500" in err and "1 more alerts wait for the next poll" in err and "secretpath" not in err
    assert len(receiver.posts) == 1 and json.loads(state.read_text())["runs"] == {}

    assert once(server.uri, name, state, "--webhook", receiver.url) == 0
    assert once(server.uri, name, state, "--webhook", receiver.url) == 0
    assert sorted(alert["run_id"] for alert in receiver.delivered) == sorted([first, second])
    assert len(receiver.posts) == 3


def test_webhook_answering_400_does_not_hold_up_the_others(
    server: MlflowServer, client: MlflowClient, experiment: tuple[str, str], receiver: Receiver, tmp_path: Path
) -> None:
    name, experiment_id = experiment
    make_run(client, experiment_id, "a", explosions="1")
    make_run(client, experiment_id, "b", explosions="1")
    receiver.statuses = [400]
    assert once(server.uri, name, tmp_path / "s.json", "--webhook", receiver.url) == 1
    assert [post["status"] for post in receiver.posts] == [400, 200]


def test_unreachable_webhook(
    server: MlflowServer,
    client: MlflowClient,
    experiment: tuple[str, str],
    receiver: Receiver,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    name, experiment_id = experiment
    make_run(client, experiment_id, "r", explosions="1")
    state = tmp_path / "state.json"
    assert once(server.uri, name, state, "--webhook", f"http://127.0.0.1:{free_port()}/hook/secretpath") == 1
    err = capsys.readouterr().err
    assert "could not be reached" in err and "secretpath" not in err
    assert once(server.uri, name, state, "--webhook", receiver.url) == 0
    assert len(receiver.delivered) == 1


def test_webhook_redirect_is_not_a_delivery(
    server: MlflowServer, client: MlflowClient, experiment: tuple[str, str], receiver: Receiver, tmp_path: Path
) -> None:
    name, experiment_id = experiment
    make_run(client, experiment_id, "r", explosions="1")
    receiver.statuses = [302]
    assert once(server.uri, name, tmp_path / "s.json", "--webhook", receiver.url) == 1
    assert json.loads((tmp_path / "s.json").read_text())["runs"] == {}


# -------------------------------------------------------------------------
# The payload cannot be injected into
# -------------------------------------------------------------------------


def test_reason_and_names_cannot_inject_into_the_payload_or_mention_anyone(
    server: MlflowServer, client: MlflowClient, experiment: tuple[str, str], receiver: Receiver, tmp_path: Path
) -> None:
    name, experiment_id = experiment
    reason = 'grad "norm" of a\\b\n<!channel> <!here|here> <@U024BE7LH> & <https://evil.example|click>"}, "x": "'
    run_name = "run <!everyone>\n\x1b[31mred"
    offenders = '<!channel> (3), layer"}{ (1)'
    run_id = make_run(
        client, experiment_id, run_name, diverged="true", diverged_step="7", diverged_reason=reason,
        explosions="4", top_offenders=offenders,
    )  # fmt: skip
    assert once(server.uri, name, tmp_path / "s.json", "--webhook", receiver.url) == 0
    [post] = receiver.posts
    alert = json.loads(post["body"])  # valid JSON, and the values come back exactly
    assert set(alert) == {"text", "event", "run_id", "run_name", "experiment_id", "experiment_name", "step",
                          "reason", "explosions", "rollbacks", "rollback_steps", "top_offenders", "url"}  # fmt: skip
    assert (alert["reason"], alert["run_name"], alert["top_offenders"]) == (reason, run_name, offenders)
    text = alert["text"]
    for mention in ("<!channel>", "<!here", "<@U024BE7LH>", "<!everyone>", "<https://evil"):
        assert mention not in text
    assert "&lt;!channel&gt;" in text and "&lt;@U024BE7LH&gt;" in text and " &amp; " in text
    assert "\n" not in text and "\x1b" not in text
    assert text.count("<") == 1 and text.count(">") == 1  # only the run link gradtrack made
    assert f"<{server.uri}/#/experiments/{experiment_id}/runs/{run_id}|run &lt;!everyone&gt; [31mred>" in text


def test_slack_escape() -> None:
    assert watch.slack_escape("a & <b>\n<!channel>") == "a &amp; &lt;b&gt; &lt;!channel&gt;"


# -------------------------------------------------------------------------
# Arguments, state file, --help
# -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "said"),
    [
        ("file:///etc/passwd", "got scheme 'file'"),
        ("ftp://127.0.0.1/hook", "got scheme 'ftp'"),
        ("hooks.example/services/T0/B0/topsecret", "got no scheme"),
        ("http:///path-only", "no host"),
    ],
)
def test_webhook_must_be_http(url: str, said: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = watch.main(
        ["--once", "--tracking-uri", "http://127.0.0.1:9", "--state", str(tmp_path / "s"), "--webhook", url]
    )
    err = capsys.readouterr().err
    assert code == 2
    assert "--webhook" in err and said in err and "topsecret" not in err
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize(
    "argv",
    [
        [],  # neither --webhook nor --exec
        ["--webhook", "http://127.0.0.1:9/", "--exec", "true"],
        ["--exec"],
        ["--exec", "no-such-command-for-gradtrack-watch"],
        ["--webhook", "http://127.0.0.1:9/", "--interval", "0"],
        ["--webhook", "http://127.0.0.1:9/", "--interval", "nan"],
        ["--webhook", "http://127.0.0.1:9/", "--timeout", "-1"],
        ["--webhook", "http://127.0.0.1:9/", "--frequency", "3"],
    ],
)
def test_bad_arguments_exit_2(argv: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert watch.main(["--once", "--tracking-uri", "http://127.0.0.1:9", "--state", str(tmp_path / "s"), *argv]) == 2
    assert capsys.readouterr().err


def test_help_documents_everything(capsys: pytest.CaptureFixture[str]) -> None:
    assert watch.main(["--help"]) == 0
    text = capsys.readouterr().out
    for word in ("--experiment", "--webhook", "--exec", "--interval", "--state", "--tracking-uri", "--once",
                 "--timeout", "exit codes", "GRADTRACK_REASON", "GRADTRACK_URL", "XDG_CACHE_HOME",
                 "gradtrack.rollbacks", "GRADTRACK_ROLLBACK_STEPS", "rollback_steps"):  # fmt: skip
        assert word in text, word


def test_add_parser_makes_a_watch_subcommand() -> None:
    import argparse

    parser = argparse.ArgumentParser(prog="gradtrack")
    watch.add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["watch", "--once", "--experiment", "a", "--exec", "echo", "--once"])
    assert args.command == "watch" and args.handler is watch.run  # --exec does not take over `command`
    assert (args.once, args.experiments, args.exec_command, args.webhook) == (True, ["a"], ["echo", "--once"], None)


def test_an_unreadable_state_file_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    state = tmp_path / "state.json"
    state.write_text("{not json")
    assert watch.main(["--once", "--tracking-uri", "http://127.0.0.1:9", "--state", str(state), "--exec", "true"]) == 2
    assert "not a gradtrack watch state file" in capsys.readouterr().err
    assert state.read_text() == "{not json"


def test_two_watchers_cannot_share_a_state_file(
    server: MlflowServer, experiment: tuple[str, str], receiver: Receiver, tmp_path: Path
) -> None:
    name, _ = experiment
    state = tmp_path / "state.json"
    holder = watch.WatchState(state, server.uri, [name])
    holder.lock()
    try:
        assert once(server.uri, name, state, "--webhook", receiver.url) == 1
    finally:
        holder.unlock()
    assert once(server.uri, name, state, "--webhook", receiver.url) == 0


def test_state_directory_created_owner_only(
    server: MlflowServer, experiment: tuple[str, str], receiver: Receiver, tmp_path: Path
) -> None:
    name, _ = experiment
    state = tmp_path / "a" / "b" / "state.json"
    assert once(server.uri, name, state, "--webhook", receiver.url) == 0
    assert stat.S_IMODE(state.stat().st_mode) == 0o600
    for folder in (state.parent, state.parent.parent):
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700

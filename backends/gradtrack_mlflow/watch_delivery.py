"""How ``gradtrack watch`` delivers an alert: a webhook POST (no redirects followed, the answer's size bounded) or
a command run directly with the alert on stdin and in its environment.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import signal
import subprocess
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from gradtrack._version import __version__
from gradtrack_mlflow.alerts import Alert, one_line

_BODY_LIMIT = 64 * 1024  # what is read of a webhook's answer

# -- delivering alerts -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Failure:
    message: str
    unreachable: bool  # the destination itself failed: the other alerts of this poll wait for the next one


class Delivery(Protocol):
    def send(self, alert: Alert) -> Failure | None: ...


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """A webhook that redirects is an error: urllib would turn the POST into a GET and drop the alert."""

    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


class Webhook:
    def __init__(self, url: str, timeout: float) -> None:
        self.url = url
        self.timeout = timeout
        self._opener = urllib.request.build_opener(_NoRedirect)

    def send(self, alert: Alert) -> Failure | None:
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
            return Failure(f"the webhook answered {exc.code} {exc.reason}", unreachable=busy)
        except (OSError, http.client.HTTPException, ValueError) as exc:  # URLError, timeouts, resets
            reason = exc.reason if isinstance(exc, urllib.error.URLError) else exc
            return Failure(f"the webhook could not be reached ({reason!r})", unreachable=True)
        return None


class Command:
    def __init__(self, argv: Sequence[str], timeout: float) -> None:
        self.argv = list(argv)
        self.timeout = timeout

    def send(self, alert: Alert) -> Failure | None:
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
            return Failure(f"cannot run {name!r} ({exc.strerror or exc!r})", unreachable=True)
        with process:
            try:
                _, err = process.communicate(alert.body(), timeout=self.timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    process.communicate(timeout=5)
                return Failure(f"{name!r} did not finish within {self.timeout:g}s (killed)", unreachable=True)
        if process.returncode != 0:
            lines = err.decode("utf-8", "replace").strip().splitlines()
            said = f": {one_line(lines[-1], 200)}" if lines else ""
            return Failure(f"{name!r} exited with status {process.returncode}{said}", unreachable=False)
        return None



"""Where a tracker's records go: the reporter process, and backends kept in the training process.

Placement, decided once when the tracker starts:

* **Backends named by string** (``"mlflow"``, ``"wandb"``, ``"console"``, any entry-point plugin) are
  created by their plugin's factory here, where the user's context is visible (an active MLflow or W&B
  run, ``mlflow.set_tracking_uri``), then pickled into the reporter process, which runs them. The
  training process never imports their SDK.
* **Backend objects passed by instance** run here, each on a worker thread, as before: they are the
  user's objects, whose state the user may read after the run (a recorder in a test, a list of
  alerts) and which may hold what cannot cross processes (an open socket, a stream). Their Python
  work shares the interpreter lock with the training loop; use a named plugin where that matters.
* A named backend that sets ``gradtrack_in_process = True`` (the console printing to a stream object,
  W&B logging into an active run of a wandb too old to attach to it from another process), or whose
  object cannot be pickled, runs here too; the latter with a warning.
"""

from __future__ import annotations

import pickle
import time
import warnings
from collections.abc import Collection, Sequence
from typing import final

from gradtrack.delivery.dispatch import Dispatcher
from gradtrack.delivery.plugins import new_plugin_manager
from gradtrack.delivery.reporter import Reporter
from gradtrack.handover.messages import Message

__all__ = ["Outbox"]


@final
class Outbox:
    """Fans each record out to the local dispatcher and the reporter; never waits but in flush/close."""

    def __init__(self, local: Dispatcher | None = None, reporter: Reporter | None = None) -> None:
        self.local = local or Dispatcher([])
        self.reporter = reporter

    @classmethod
    def open(
        cls,
        backends: Sequence[tuple[str, object]],
        named: Collection[str],
        *,
        max_pending: int,
    ) -> Outbox:
        """Place every backend (module docstring) and start the reporter if any goes there."""
        local: list[tuple[str, object]] = []
        remote: list[tuple[str, bytes]] = []
        for name, backend in backends:
            _validate(name, backend)
            if name not in named or getattr(backend, "gradtrack_in_process", False):
                local.append((name, backend))
                continue
            try:
                remote.append((name, pickle.dumps(backend)))
            except Exception as exc:
                warnings.warn(
                    f"gradtrack backend {name!r} cannot be pickled into the reporter process ({exc!r}); it runs "
                    "in the training process, on a thread",
                    RuntimeWarning,
                    stacklevel=3,
                )
                local.append((name, backend))
        reporter = Reporter(remote, max_pending=max_pending) if remote else None
        return cls(Dispatcher(local, max_pending=max_pending), reporter)

    @property
    def dropped(self) -> int:
        return self.local.dropped + (self.reporter.dropped if self.reporter is not None else 0)

    def send(self, message: Message) -> None:
        """Hand one message to the backends here (queued to their threads) and to the reporter process."""
        if self.local:
            self.local.send([message])
        if self.reporter is not None:
            self.reporter.send(message)

    def flush(self, timeout: float) -> bool:
        local = self.local.flush(timeout)
        return (self.reporter.flush(timeout) if self.reporter is not None else True) and local

    def close(self, timeout: float) -> list[str]:
        """Stop both within ``timeout``; the names of backends still busy at the deadline."""
        deadline = time.monotonic() + timeout
        if self.reporter is not None:
            self.reporter.end_stream(deadline)  # first: the reporter works on while the threads here finish
        late = self.local.close(timeout)
        if self.reporter is not None:
            late += self.reporter.wait(deadline)
        return late


def _validate(name: str, backend: object) -> None:
    """Misspelt hooks fail here, when the tracker starts, wherever the backend will run."""
    manager = new_plugin_manager()
    manager.register(backend, name=name)
    manager.check_pending()

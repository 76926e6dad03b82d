"""Which W&B run gradtrack logs into, named before it opens, so that a restarted process logs into it again.

``tracker.state_dict()`` asks the backend object in the training process, while the run is opened by
``wandb.init`` in the reporter process: so the run id is chosen up front, when the tracker makes the
backend, and handed to ``wandb.init(id=...)``. wandb is not imported here.
"""

from __future__ import annotations

import os
import secrets
import string
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, final

from gradtrack.validate import text

__all__ = ["RunIdentity", "identity_to_resume", "new_run_id", "resume_note"]

_ID_ALPHABET = string.ascii_lowercase + string.digits  # what wandb's own ids are made of


def new_run_id() -> str:
    """An 8-character run id like wandb's own."""
    return "".join(secrets.choice(_ID_ALPHABET) for _ in range(8))


@final
@dataclass(frozen=True, slots=True, kw_only=True)
class RunIdentity:
    """The W&B run a gradtrack-owned run is: its id, and the project and entity it lives in (None: wandb's
    default, as the environment says when the run opens)."""

    run_id: str
    project: str | None = None
    entity: str | None = None

    @classmethod
    def choose(cls, init: Mapping[str, Any]) -> RunIdentity:
        """The run about to be opened with ``wandb.init(**init)``: the user's id (option or ``WANDB_RUN_ID``) or a
        new one; project and entity from the options or the environment, so a restart finds the same run."""
        run_id = init.get("id") or os.environ.get("WANDB_RUN_ID") or new_run_id()
        if not isinstance(run_id, str):
            raise ValueError(f"wandb option 'init_kwargs' has an 'id' that is not a string: {run_id!r}")
        return cls(
            run_id=run_id,
            project=init.get("project") or os.environ.get("WANDB_PROJECT") or None,
            entity=init.get("entity") or os.environ.get("WANDB_ENTITY") or None,
        )

    def state(self) -> dict[str, Any]:
        return {"owned": True, "run_id": self.run_id, "project": self.project, "entity": self.entity}

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> RunIdentity | None:
        """The run a saved ``state()`` names; None when gradtrack logged into the user's own run. A value of the
        wrong type raises ``ValueError`` naming its key."""
        owned = state.get("owned", True)
        if not isinstance(owned, bool):
            raise ValueError(f"wandb state 'owned' must be True or False, got {owned!r}")
        if not owned:
            return None
        run_id = state.get("run_id")
        if not isinstance(run_id, str) or not run_id:
            raise ValueError(f"wandb state 'run_id' must be a non-empty string, got {run_id!r}")
        project, entity = (text(f"wandb state {key!r}", state.get(key)) for key in ("project", "entity"))
        return cls(run_id=run_id, project=project, entity=entity)


def identity_to_resume(
    state: Mapping[str, Any], *, init: Mapping[str, Any], user_run_id: str | None
) -> RunIdentity | None:
    """The run a restarted process opens from a saved ``state``, in the project and entity ``init`` (the
    options) names, else the saved ones: the user may have moved the run. None where the run to log into is
    not gradtrack's to open: the user's active run (``user_run_id``), or a new one when the saved run was the
    user's and the user has not opened it again (with a warning)."""
    saved = RunIdentity.from_state(state)
    if saved is None:
        if user_run_id is None:
            warnings.warn("gradtrack resumes a run that was your own W&B run, but no W&B run is active: gradtrack "
                          "opens a new one (call wandb.init(id=..., resume='allow') before the tracker starts)",
                          RuntimeWarning, stacklevel=2)  # fmt: skip
        return None
    if user_run_id is not None:
        if user_run_id != saved.run_id:
            warnings.warn(f"gradtrack resumes W&B run {saved.run_id!r} in your active run {user_run_id!r}",
                          RuntimeWarning, stacklevel=2)  # fmt: skip
        return None
    if init.get("id") not in (None, saved.run_id):
        raise ValueError(f"wandb state 'run_id' is {saved.run_id!r}, but init_kwargs asks for id {init['id']!r}")
    return RunIdentity(run_id=saved.run_id, project=init.get("project") or saved.project,
                       entity=init.get("entity") or saved.entity)  # fmt: skip


def resume_note(steps: Sequence[int]) -> str:
    """The run description's line for the restarts (empty for a run never resumed)."""
    if not steps:
        return ""
    listed = ", ".join(str(step) for step in steps)
    return f"\nresumed from a checkpoint at step{'s' if len(steps) > 1 else ''} {listed}\n"

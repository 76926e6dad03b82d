"""Every hook a gradtrack backend can implement.

A backend is any object whose methods are marked with :data:`gradtrack.hookimpl` and named after the
specifications below; it implements only the hooks it needs, and each implementation takes only the
keyword arguments it needs.

Where hooks run:

* ``gradtrack_make_backend`` runs in the training process, on the thread that enters the tracker, so
  a factory can read the user's context there (an active MLflow or W&B run, a tracking URI set in
  code). It must not import a tracker SDK the user has not imported: keep plain values.
* For a backend the user named by string, the object the factory returned is pickled into the
  **reporter process** (``gradtrack.delivery.reporter_main``), which never imports torch; every other hook runs
  there. The object must therefore be picklable when the factory returns it; one that is not, or that
  sets ``gradtrack_in_process = True``, runs in the training process instead (see ``gradtrack.delivery.outbox``).
* A backend object the user passed by instance runs in the training process.

Either way, the lifecycle, step and event hooks of a backend are called on that backend's own worker
thread, in the order the tracker produced them, never on the training thread. A backend may block
there (network I/O), but while it does its queue fills; past its bound, routine step records are
decimated by rule (see ``gradtrack.delivery.dispatch``). An exception raised by a hook is reported once as a
warning (in the training process, wherever the hook ran) and the backend keeps receiving later
calls; training never sees it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pluggy

from gradtrack.events import (
    Divergence,
    Explosion,
    Instability,
    LayersAdded,
    Rollback,
    RunEnd,
    RunStart,
    StepBatch,
    StepStats,
)

__all__ = ["PROJECT_NAME", "hookimpl", "hookspec"]

PROJECT_NAME = "gradtrack"

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)


# -------------------------------------------------------------------------
# Discovery: called on the training thread when a tracker enters its context.
# -------------------------------------------------------------------------


@hookspec(firstresult=True)
def gradtrack_make_backend(name: str, options: Mapping[str, Any]) -> object | None:
    """Create the backend object for one run.

    Called once for each backend name the user passed to ``GradTracker(backend=...)``, on every
    plugin loaded from the ``gradtrack`` entry-point group and on the built-in plugins.

    :param name: the name the user asked for, e.g. ``"mlflow"``.
    :param options: ``backend_options[name]`` from the tracker, or an empty mapping.

    Return a new object implementing the hooks below when ``name`` is yours, else None. Raise
    :class:`gradtrack.BackendUnavailableError` when it is yours but cannot work here (a missing SDK).
    Stops at the first non-None result.
    """


@hookspec
def gradtrack_cli_commands(subparsers: Any) -> None:
    """Add subcommands to the ``gradtrack`` command line.

    Called once when the ``gradtrack`` command starts, on every plugin loaded from the ``gradtrack``
    entry-point group and on the built-in plugins (not when ``GRADTRACK_DISABLE_PLUGIN_AUTOLOAD`` is set).

    :param subparsers: the ``argparse`` subparsers object of the ``gradtrack`` command. Each command added
        sets ``handler``, a callable taking the parsed arguments and returning the exit code, with
        ``parser.set_defaults(handler=...)``. Import heavy SDKs in the handler, not here.

    The return value is ignored. (The MLflow plugin adds ``runs``, ``report``, ``watch`` and ``replay``.)
    """


# -------------------------------------------------------------------------
# Resuming: called in the training process, on the backend object the factory returned.
# -------------------------------------------------------------------------


@hookspec(firstresult=True)
def gradtrack_backend_state() -> Mapping[str, Any] | None:
    """What a later process needs to log into this backend's run again: ``tracker.state_dict()`` asks.

    Called in the training process, on the thread that calls ``state_dict``, on the object
    ``gradtrack_make_backend`` returned (not on the copy in the reporter process): so return what was
    decided there, such as a run id chosen up front or a key the run is tagged with. Return plain values
    (str, int, float, bool, None, lists and dicts of them): they go into the user's checkpoint. Never
    credentials, tokens or URLs with a user in them. None: nothing to resume (the default).
    """


@hookspec
def gradtrack_load_backend_state(state: Mapping[str, Any]) -> None:
    """The tracker entering its context resumes a run: ``state`` is what this backend's
    ``gradtrack_backend_state`` returned in the earlier process.

    Called in the training process right after ``gradtrack_make_backend`` made the object and before it
    is placed (pickled into the reporter process, or started on a thread here), so configure the object
    to open that run again in ``gradtrack_run_start``, whose ``start.resumed`` says from which step. A
    state the backend cannot use (another format) should raise ``ValueError`` naming the problem. The
    return value is ignored.
    """


# -------------------------------------------------------------------------
# Run lifecycle.
# -------------------------------------------------------------------------


@hookspec
def gradtrack_run_start(start: RunStart) -> None:
    """The tracker entered its context.

    :param start: the tracker's configuration, the watched layer names, the model's size, and
        ``start.resumed`` when the run goes on from a checkpoint (see ``gradtrack_load_backend_state``).

    Called once, before any other lifecycle hook. Open the run here (or open the saved run again, and keep
    what ``start.resumed`` says must not be reset: a diverged run stays diverged); the return value is
    ignored.
    """


@hookspec
def gradtrack_run_end(end: RunEnd) -> None:
    """The tracker left its context.

    :param end: the status (``finished``, ``failed`` when the body raised, ``killed`` on
        KeyboardInterrupt, or when the training process died without ending the run: then the
        reporter ends it with the summary of every step it received) and the run's
        :class:`~gradtrack.events.Summary`.

    Called once, last. Flush, store the summary, and close what the backend opened (leave open
    what the user opened). The training process waits for this hook for at most its
    ``close_timeout``; in the reporter the hook may take longer (bound it yourself, as the MLflow
    backend does with ``exit_timeout``).
    """


# -------------------------------------------------------------------------
# Per optimizer step.
# -------------------------------------------------------------------------


@hookspec
def gradtrack_step(stats: StepStats) -> None:
    """One optimizer step was measured.

    :param stats: the step's statistics; ``stats.layer_norms`` is set at the per-layer cadence.

    Called every ``log_every`` steps and on every step that raised an explosion, saw non-finite
    gradients, was skipped or was judged diverged. Under back-pressure routine steps may be
    decimated; flagged steps are kept unless the backend is ten times ``max_pending`` behind (see
    ``gradtrack.delivery.dispatch``). Not called on a backend that implements ``gradtrack_steps``. The return
    value is ignored.
    """


@hookspec
def gradtrack_steps(batch: StepBatch) -> None:
    """Several consecutive optimizer steps were measured: the same steps ``gradtrack_step`` would get,
    column by column.

    :param batch: one numpy array per field of ``StepStats``, a row per step, in order; the per-layer rows
        in ``batch.layers``; the contract metrics column by column from ``batch.metric_columns()``.

    Implement it instead of ``gradtrack_step`` when a backend can log many steps at once (a batch API, a
    vectorised conversion): the reporter hands over everything a read of its pipe brought, often hundreds
    of steps, so the per-step cost of a Python call and a ``StepStats`` is paid per batch. A backend that
    implements it never gets ``gradtrack_step``. Explosion and divergence hooks of a step come after the
    batch that holds it. The return value is ignored.
    """


@hookspec
def gradtrack_layers_added(layers: LayersAdded) -> None:
    """Parameters started to train after the run started: unfrozen (``requires_grad_``), added to the
    model or to an optimizer (``add_param_group``), or put in place of another under a new name.

    :param layers: the step they first have gradients at, and their cleaned names, which per-layer norms,
        offenders and summaries use from then on beside ``RunStart.layer_names``.

    Called before the first step that reports them. Give them metric keys that do not change the keys of
    the layers already logged. The return value is ignored.
    """


@hookspec
def gradtrack_flush(timeout: float) -> None:
    """``tracker.flush()`` was called: deliver what the backend still buffers.

    :param timeout: seconds the caller waits at most; return by then even if something is left.

    Called after every record emitted before the flush was handled. Backends that send from their own
    thread or batch records (the MLflow backend does both) wait here until that is sent or spooled, so
    that after ``tracker.flush()`` everything reported so far is out. The return value is ignored.
    """


# -------------------------------------------------------------------------
# Events: delivered as soon as the step that raised them is measured. Divergence is never dropped;
# explosions only past the hard backlog bound of ``gradtrack.delivery.dispatch``.
# -------------------------------------------------------------------------


@hookspec
def gradtrack_explosion(event: Explosion) -> None:
    """A step's gradients exploded.

    :param event: the step, the kind (``nonfinite``, ``threshold``, ``spike``), the total norm, the
        threshold it crossed and the offending layers.

    Called after the ``gradtrack_step`` of the same step. The return value is ignored.
    """


@hookspec
def gradtrack_divergence(event: Divergence) -> None:
    """The run was judged diverged; called at most once per run, at the step it happened.

    :param event: the step and a human-readable reason.

    Flip the run's ``diverged`` tag here, while the run is still going. The return value is ignored.
    """


@hookspec
def gradtrack_rollback(event: Rollback) -> None:
    """``on_divergence="rollback"`` healed the run: an earlier training state came back at ``event.step``.

    :param event: the step it happened at, the step whose state came back, the batches skipped, the
        learning-rate scale from now on, the number of rollbacks so far and the divergence rule's reason.

    Called after the ``gradtrack_step`` of the same step. gradtrack's step axis goes on increasing (it counts
    loop iterations); the event says which state came back. Log ``grad/rollback`` = 1 at ``event.step``,
    count the run's rollbacks (the ``gradtrack.rollbacks`` tag) and alert here. A run whose budget of
    rollbacks is spent is judged diverged as usual (``gradtrack_divergence``). The return value is ignored.
    """


@hookspec
def gradtrack_instability(event: Instability) -> None:
    """A leading warning: the optimizer's steps overshoot persistently (``grad/overshoot`` above 2, the edge
    of stability, on most recent samples), usually before any gradient norm looks wrong.

    :param event: the step, the overshoot level, since when, the layers that overshoot most with their own
        ratio, and the learning-rate scale (and rates, when known) that would bring the ratio back to 1.

    Called after the ``gradtrack_step`` of the same step, at most once per episode of overshoot. Nothing in
    training changes because of it, unless ``on_divergence="rollback"`` acts on it (a ``gradtrack_rollback``
    follows then). Tag the run, alert, or lower the learning rate here. The return value is ignored.
    """

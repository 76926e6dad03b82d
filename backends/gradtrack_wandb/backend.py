"""``WandbBackend``: gradtrack's records as W&B history rows, a histogram, run tags, summary and alerts.

Every hook runs on the backend's worker thread, so nothing here can stall or break training. wandb
is imported when the run starts, never at import time.

Step axis: rows carry ``gradtrack/step`` and every gradtrack metric is plotted against it through
``define_metric``. ``run.log`` is never given ``step=``, so a user's own ``wandb.log`` calls keep
working, interleaved, without "step less than current step" warnings; after a restart from a checkpoint
the axis goes on from the saved step in the same run. A rollback (``on_divergence="rollback"``) does not move
it back: it counts loop iterations, so the rollback's own row (``grad/rollback`` = 1, ``grad/lr_scale``) sits
at the step the rollback happened, and which step's state came back is in the summary, the notes and the alert.
"""

from __future__ import annotations

import contextlib
import heapq
import logging
import math
import os
import sys
import tempfile
import threading
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, NoReturn, final

from gradtrack.delivery.history import RunHistory
from gradtrack.delivery.notes import divergence_note, merge_note, summary_note
from gradtrack.events import (
    Divergence,
    Explosion,
    Instability,
    LayersAdded,
    Resumed,
    Rollback,
    RunEnd,
    RunStart,
    StepBatch,
    format_norm,
)
from gradtrack.hookspecs import hookimpl
from gradtrack.naming import extend_names, sanitize_names
from gradtrack.validate import count, mapping, seconds, text, texts
from gradtrack_wandb.live import Throttle, rollback_note
from gradtrack_wandb.resume import RunIdentity, identity_to_resume, resume_note

__all__ = [
    "DIVERGED_TAG",
    "EXPLODED_TAG",
    "HISTOGRAM_KEY",
    "HISTOGRAM_EXCLUDED_KEY",
    "ROLLED_BACK_TAG",
    "STEP_KEY",
    "WANDB_INVALID",
    "WandbBackend",
]

log = logging.getLogger(__name__)

STEP_KEY = "gradtrack/step"
HISTOGRAM_KEY = "grad/layer_log10_norm"
HISTOGRAM_EXCLUDED_KEY = "grad/layer_log10_excluded"
DIVERGED_TAG = "diverged"
EXPLODED_TAG = "exploded"
ROLLED_BACK_TAG = "rolled-back"  # healed by on_divergence="rollback"; "diverged" only once the budget is spent
ROLLBACK_KEY = "grad/rollback"
LR_SCALE_KEY = "grad/lr_scale"
SUMMARY_KEY = "gradtrack"  # shown in the runs table as gradtrack.explosions, gradtrack.diverged_step, ...
EXPLOSION_TITLE = "gradtrack: gradients exploded"
DIVERGENCE_TITLE = "gradtrack: run diverged"
ROLLBACK_TITLE = "gradtrack: run rolled back"
INSTABILITY_TITLE = "gradtrack: the steps overshoot"
OVERSHOOT_TAG = "overshoot"  # the overshoot indicator warned: the learning rate is past the edge
ROLLBACKS_KEPT = 100  # the latest (step, restored step) pairs the summary lists
PLOT_KEYS = ("gradtrack/norms_plot", "gradtrack/layers_plot")

# W&B metric names sort and filter in the UI only when made of letters, digits and underscores;
# "/" is kept because W&B groups charts into sections by it.
WANDB_INVALID = r"[^/A-Za-z0-9_]"
_MAX_KEY = 200
_EXIT_CODES = {"finished": 0, "failed": 1, "killed": 255}
_INIT_OPTIONS = ("project", "entity", "name", "group", "job_type", "notes", "mode", "dir")

Mode = Literal["online", "offline", "disabled", "shared"]
_MODES = ("online", "offline", "disabled", "shared", "dryrun", "run")


@final
class WandbBackend:
    """Reports one gradtrack run to Weights & Biases.

    If a W&B run is active when the tracker starts, gradtrack logs into it and leaves it open;
    otherwise it calls ``wandb.init`` with the options below and finishes that run at the end.

    ``project``, ``entity``, ``name``, ``group``, ``job_type``, ``notes``, ``mode``, ``dir``,
    ``tags``: passed to ``wandb.init`` (ignored when reusing an active run, except ``tags``, which
    are added to it). ``config``: extra config merged over the tracker's settings.
    ``init_kwargs``: any other ``wandb.init`` argument.
    ``layer_scalars``: how many of the largest per-layer norms to log as ``grad_norm/<name>`` at
    each per-layer step (``"all"`` for every layer, 0 for none); the histogram always has them all.
    ``histogram``: log the per-layer log10-norm histogram. ``alerts``: send ``run.alert``s.
    ``alert_every``: seconds between two explosion alerts, and between two rollback alerts (the first of
    each is sent at once).
    ``loss_key``: the key for the observed loss (None: do not log it). The default ``"auto"`` is the
    contract's ``loss`` in a run gradtrack starts, and ``gradtrack/loss`` in the user's own active run,
    where ``loss`` is almost always the user's key on the user's step axis.

    Restarts: a run gradtrack opens gets its id here (``init_kwargs={"id": ...}``, ``WANDB_RUN_ID``, or a
    new one), which ``tracker.state_dict()`` saves; a tracker that loaded that state opens the same run
    again (``resume="allow"``). In the user's own run, resuming is the user's business.
    """

    def __init__(
        self,
        *,
        project: str | None = None,
        entity: str | None = None,
        name: str | None = None,
        group: str | None = None,
        job_type: str | None = None,
        notes: str | None = None,
        mode: Mode | None = None,
        dir: str | os.PathLike[str] | None = None,
        tags: Sequence[str] = (),
        config: Mapping[str, Any] | None = None,
        init_kwargs: Mapping[str, Any] | None = None,
        layer_scalars: int | Literal["all"] = 10,
        histogram: bool = True,
        alerts: bool = True,
        alert_every: float = 600.0,
        loss_key: str | None = "auto",
        plots: bool = True,
        note: bool = True,
    ) -> None:
        if layer_scalars != "all":
            try:
                count(_option("layer_scalars"), layer_scalars, minimum=0)
            except ValueError:
                _invalid("layer_scalars", "an int >= 0 or 'all'", layer_scalars)
        for option, flag in (("histogram", histogram), ("alerts", alerts), ("plots", plots), ("note", note)):
            if not isinstance(flag, bool):
                _invalid(option, "True or False", flag)
        if mode is not None and mode not in _MODES:
            _invalid("mode", f"one of {list(_MODES)} or None", mode)
        if loss_key is not None and (not isinstance(loss_key, str) or not loss_key
                                     or loss_key.startswith(("grad/", "grad_norm/"))):  # fmt: skip
            _invalid("loss_key", "None or a non-empty key outside grad/ and grad_norm/", loss_key)
        if dir is not None and not (isinstance(dir, str | os.PathLike) and os.fspath(dir)):
            _invalid("dir", "a path", dir)
        directory = None if dir is None else os.fspath(dir)
        values = (project, entity, name, group, job_type, notes, mode, directory)
        for option, setting in zip(_INIT_OPTIONS, values, strict=True):
            text(_option(option), setting)
        self._init_options = {key: value for key, value in zip(_INIT_OPTIONS, values, strict=True) if value}
        self.tags = texts(_option("tags"), tags)
        self.extra_config = mapping(_option("config"), config)
        self.init_kwargs = mapping(_option("init_kwargs"), init_kwargs)
        self.layer_scalars = layer_scalars
        self.histogram = histogram
        self.alerts = alerts
        self.plots = plots
        self.note = note
        self._history = RunHistory()
        self.alert_every = seconds(_option("alert_every"), alert_every)
        # The factory runs on the training thread, where the user's run is visible as wandb.run.
        self._user_run = _active_run()
        if loss_key == "auto":
            loss_key = "gradtrack/loss" if self._user_run is not None else "loss"
        self.loss_key = loss_key
        # Chosen here, in the training process, so that tracker.state_dict() can name the run.
        self._identity = None if self._user_run is not None else RunIdentity.choose(self._init())
        self._resuming = False
        self._resumed_from: tuple[int, ...] = ()
        self._run: Any = None
        self._owned = False
        self._keys: dict[str, str] = {}
        self._state: dict[str, Any] = {"explosions": 0, "diverged": False, "resumes": 0, "rollbacks": 0}
        self._last_norm = math.nan
        self._last_explosion: Explosion | None = None
        self._divergence: Divergence | None = None
        self._rollbacks: list[tuple[int, int]] = []  # the latest ROLLBACKS_KEPT
        self._explosion_alerts = Throttle(self.alert_every)
        self._rollback_alerts = Throttle(self.alert_every)

    # -- restarts (training process, before the object is handed to the reporter) ----------------------

    @hookimpl
    def gradtrack_backend_state(self) -> dict[str, Any]:
        return {"owned": False} if self._identity is None else self._identity.state()

    @hookimpl
    def gradtrack_load_backend_state(self, state: Mapping[str, Any]) -> None:
        user_run_id = None if self._user_run is None else self._user_run.id
        resumed = identity_to_resume(state, init=self._init(), user_run_id=user_run_id)
        if resumed is not None:
            self._identity, self._resuming = resumed, True

    def _init(self) -> dict[str, Any]:
        """``wandb.init``'s arguments as the options give them."""
        return {**self._init_options, **self.init_kwargs}

    # -- lifecycle --------------------------------------------------------------------------------

    @hookimpl
    def gradtrack_run_start(self, start: RunStart) -> None:
        import wandb

        config = {**start.config, **self.extra_config}
        if self._user_run is not None:
            run = self._user_run
            # Nested so that gradtrack's keys (clip, max_norm, ...) never clash with the user's own.
            run.config.update({SUMMARY_KEY: config}, allow_val_change=True)
            if self.tags:
                run.tags = _merged(run.tags, *self.tags)
        else:
            init = self._init()
            init["tags"] = list(dict.fromkeys([*init.get("tags", ()), *self.tags]))
            init["config"] = {**config, **init.get("config", {})}
            if self._identity is not None:
                init.update(id=self._identity.run_id, project=self._identity.project, entity=self._identity.entity)
            if self._resuming:
                init.setdefault("resume", "allow")
            run = wandb.init(**init)
            self._owned = True
        self._keys = _wandb_keys(start.layer_names)
        run.define_metric(STEP_KEY, hidden=True)
        for pattern in ("grad/*", "grad_norm/*", "weight_norm/*", *([self.loss_key] if self.loss_key else [])):
            run.define_metric(pattern, step_metric=STEP_KEY)
        run.define_metric("grad/total_norm", step_metric=STEP_KEY, summary="max")
        self._run = run
        self._history.threshold = start.config.get("explosion_threshold")
        if self.plots:  # matplotlib takes seconds to import: not at the end of the run
            threading.Thread(target=_import_plots, name="gradtrack-plots-import", daemon=True).start()
        if start.resumed is not None:
            self._carry_over(start.resumed)
        self._publish_state()

    def _carry_over(self, resumed: Resumed) -> None:
        """What earlier processes of this run found stays found (an offline resumed run starts with no tags or
        notes, and gradtrack's summary entry is written anew), and the restart is recorded."""
        self._resumed_from = resumed.steps
        self._state.update(explosions=resumed.explosions, resumes=len(resumed.steps), resumed_from=list(resumed.steps))
        tags = []
        if resumed.explosions:
            self._state["first_explosion_step"] = resumed.first_explosion_step
            tags.append(EXPLODED_TAG)
        divergence = self._divergence = resumed.divergence
        if divergence is not None:
            self._state.update(diverged=True, diverged_step=divergence.step, diverged_reason=divergence.reason)
            self._history.diverged_step, self._history.diverged_reason = divergence.step, divergence.reason
            tags.append(DIVERGED_TAG)
        if tags:
            self._run.tags = _merged(self._run.tags, *tags)
        if self.note:
            self._write_note(divergence_note(divergence) if divergence is not None else "")

    @hookimpl
    def gradtrack_run_end(self, end: RunEnd) -> None:
        run = self._run
        if run is None:
            return
        summary = end.summary
        self._state.update(summary.to_dict(), status=end.status, resumes=len(summary.resumed_from),
                           rollbacks=len(summary.rollbacks))  # fmt: skip
        if summary.rollbacks:  # every process's (the live list has this one's)
            self._state["rollback_steps"] = [list(pair) for pair in summary.rollbacks[-ROLLBACKS_KEPT:]]
        self._publish_state()
        if self.plots:
            self._log_plots()
        self._resumed_from = end.summary.resumed_from
        if self.note:
            self._write_note(summary_note(end.summary, end.status), resumes=False)  # the summary lists them
        if self._owned:
            run.finish(exit_code=_EXIT_CODES[end.status])
        self._run = None

    @hookimpl
    def gradtrack_flush(self, timeout: float) -> None:
        """Wait until wandb-core has taken everything logged so far: one round trip through its queue,
        which it answers after the records before it (wandb has no public flush)."""
        run = self._run
        if run is None:
            return
        try:
            run._backend.interface.deliver_get_summary().wait_or(timeout=timeout)
        except Exception as exc:  # a private API of wandb's: if it moved, flushing is all that is lost
            log.debug("wandb flush round trip failed: %r", exc)

    # -- per step ---------------------------------------------------------------------------------

    @hookimpl
    def gradtrack_layers_added(self, layers: LayersAdded) -> None:
        self._keys = _wandb_keys(layers.names, self._keys)

    @hookimpl
    def gradtrack_steps(self, batch: StepBatch) -> None:
        """One history row per step (W&B logs rows one by one), built column by column."""
        run = self._run
        if run is None:
            return
        measured = ~batch.amp_overflow
        self._history.add_steps(batch.step[measured], batch.total_norm[measured])
        rows: list[dict[str, Any]] = [{STEP_KEY: step} for step in batch.step.tolist()]
        for key, indices, values in batch.metric_columns():
            if key == "loss":
                if not self.loss_key:
                    continue
                key = self.loss_key
            for index, value in zip(indices.tolist(), values.tolist(), strict=True):
                rows[index][key] = value
        for layer in batch.layers:
            self._history.add_layer_values(int(batch.step[layer.row]), layer.norms)
            rows[layer.row].update(self._layer_rows(layer.norms, layer.weights or {}))
        if measured.any():
            self._last_norm = float(batch.total_norm[measured][-1])
        for row in rows:
            run.log(row)

    def _layer_rows(self, layer_norms: Mapping[str, float], weight_norms: Mapping[str, float]) -> dict[str, Any]:
        """The histogram, the per-layer scalars and those layers' weight norms, at one per-layer step."""
        import wandb

        row: dict[str, Any] = {}
        if self.histogram:
            logs = [math.log10(norm) for norm in layer_norms.values() if math.isfinite(norm) and norm > 0]
            # W&B rejects NaN/Inf in a histogram; zero norms have no log10: count both instead.
            row[HISTOGRAM_EXCLUDED_KEY] = float(len(layer_norms) - len(logs))
            if logs:
                row[HISTOGRAM_KEY] = wandb.Histogram(logs)
        if self.layer_scalars == "all":
            chosen = list(layer_norms.items())
        else:
            # NaN sorts as the largest: a layer with non-finite gradients is the first to show.
            chosen = heapq.nlargest(self.layer_scalars, layer_norms.items(), key=_nan_first)
        for name, norm in chosen:
            key = self._key(name)
            row[key] = norm
            if name in weight_norms:
                row["weight_norm/" + key.removeprefix("grad_norm/")] = weight_norms[name]
        return row

    def _key(self, name: str) -> str:
        key = self._keys.get(name)
        if key is None:  # a layer never announced: name it now, the others keep their keys
            self._keys = _wandb_keys([name], self._keys)
            key = self._keys[name]
        return key

    # -- events -----------------------------------------------------------------------------------

    @hookimpl
    def gradtrack_explosion(self, event: Explosion) -> None:
        run = self._run
        if run is None:
            return
        first = self._state["explosions"] == 0
        self._state["explosions"] += 1
        self._history.add_explosion(event.step, event.total_norm)
        self._last_explosion = event
        if first:
            self._state["first_explosion_step"] = event.step
            run.tags = _merged(run.tags, EXPLODED_TAG)
        self._publish_state()
        if self.alerts and (held := self._explosion_alerts.due(first)):
            since = f" ({held} explosions since the last alert)" if held > 1 else ""
            run.alert(
                title=EXPLOSION_TITLE,
                text=event.describe(top=None) + since,
                level="WARN",
                wait_duration=self.alert_every,
            )

    @hookimpl
    def gradtrack_rollback(self, event: Rollback) -> None:
        """A row at the rollback's step, the count and the steps in the summary, a tag, the notes, an alert."""
        run = self._run
        if run is None:
            return
        run.log({STEP_KEY: event.step, ROLLBACK_KEY: 1.0, LR_SCALE_KEY: event.lr_scale})
        first = not self._rollbacks
        self._rollbacks = [*self._rollbacks, (event.step, event.restored_step)][-ROLLBACKS_KEPT:]
        self._history.add_rollback(event.step, event.restored_step)
        self._state.update(rollbacks=event.count, lr_scale=event.lr_scale,
                           rollback_steps=[list(pair) for pair in self._rollbacks])  # fmt: skip
        if first:
            run.tags = _merged(run.tags, ROLLED_BACK_TAG)
        self._publish_state()
        if self.note:
            self._write_note(self._live_note())
        if self.alerts and (held := self._rollback_alerts.due(first)):
            since = f" ({held} rollbacks since the last alert)" if held > 1 else ""
            run.alert(title=ROLLBACK_TITLE, text=event.describe() + since, level="WARN", wait_duration=self.alert_every)

    @hookimpl
    def gradtrack_instability(self, event: Instability) -> None:
        """The warning in the run's summary state (``gradtrack.instability_step``, ``.overshoot``, ``.lr_advice``:
        the learning-rate scale), the ``overshoot`` tag, an alert. No row of its own: one row per reported step,
        which carries ``grad/overshoot``."""
        run = self._run
        if run is None:
            return
        run.tags = _merged(run.tags, OVERSHOOT_TAG)
        layers = {name: ratio for name, ratio in event.layers}
        self._state.update(instability_step=event.step, overshoot=event.overshoot, lr_advice=event.lr_scale,
                           overshoot_layers=layers)  # fmt: skip
        self._publish_state()
        if self.alerts:
            run.alert(title=INSTABILITY_TITLE, text=event.describe(), level="WARN", wait_duration=self.alert_every)

    @hookimpl
    def gradtrack_divergence(self, event: Divergence) -> None:
        run = self._run
        if run is None:
            return
        run.tags = _merged(run.tags, DIVERGED_TAG)
        self._state.update(diverged=True, diverged_step=event.step, diverged_reason=event.reason)
        self._publish_state()
        self._history.diverged_step, self._history.diverged_reason = event.step, event.reason
        self._divergence = event
        if self.note:
            self._write_note(self._live_note())
        if self.alerts:
            text = f"step {event.step}: {event.reason}; last total_norm={format_norm(self._last_norm)}"
            if self._last_explosion is not None:
                text += f". Last explosion: {self._last_explosion.describe(top=None)}"
            run.alert(title=DIVERGENCE_TITLE, text=text, level="ERROR", wait_duration=self.alert_every)

    def _log_plots(self) -> None:
        """The run's two pictures, as W&B images (the Media panel)."""
        import wandb

        try:
            from gradtrack.delivery.plots import draw_layers, draw_norms
        except ImportError as exc:
            warnings.warn(f"gradtrack draws no plots: {exc} (pip install 'gradtrack[plots]')", RuntimeWarning,
                          stacklevel=3)  # fmt: skip
            return
        with tempfile.TemporaryDirectory(prefix="gradtrack-plots-") as folder:
            norms = draw_norms(self._history, Path(folder, "norms.png"))
            layers = draw_layers(self._history, Path(folder, "layers.png"))
            # Their own row, on W&B's step (media are not plotted against a step axis).
            self._run.log({PLOT_KEYS[0]: wandb.Image(str(norms)), PLOT_KEYS[1]: wandb.Image(str(layers))})

    def _live_note(self) -> str:
        """The notes while the run goes: the divergence, if any, then the rollbacks (the end's summary follows)."""
        section = divergence_note(self._divergence) if self._divergence is not None else ""
        if self._rollbacks:
            section += rollback_note(self._rollbacks, self._state["rollbacks"], self._state["lr_scale"],
                                     headline=self._divergence is None)  # fmt: skip
        return section

    def _write_note(self, section: str, resumes: bool = True) -> None:
        """gradtrack's section of the run's notes, with the steps the run resumed at."""
        self._run.notes = merge_note(self._run.notes, section + (resume_note(self._resumed_from) if resumes else ""))

    def _publish_state(self) -> None:
        """One nested summary entry, shown in the runs table as ``gradtrack.<key>`` columns."""
        self._run.summary[SUMMARY_KEY] = dict(self._state)


def _option(name: str) -> str:
    return f"wandb option {name!r}"


def _import_plots() -> None:
    with contextlib.suppress(ImportError):
        import gradtrack.delivery.plots

        gradtrack.delivery.plots._pyplot()  # imports matplotlib


def _invalid(option: str, expected: str, value: object) -> NoReturn:
    raise ValueError(f"{_option(option)} must be {expected}, got {value!r}")


def _nan_first(item: tuple[str, float]) -> float:
    return math.inf if math.isnan(item[1]) else item[1]


def _active_run() -> Any:
    """The user's active W&B run, if wandb is already imported and a run is open."""
    wandb = sys.modules.get("wandb")
    return getattr(wandb, "run", None) if wandb is not None else None


def _merged(tags: Sequence[str] | None, *extra: str) -> tuple[str, ...]:
    return tuple(dict.fromkeys([*(tags or ()), *extra]))


def _wandb_keys(names: Sequence[str], keys: dict[str, str] | None = None) -> dict[str, str]:
    """``grad_norm/<name>`` keys, distinct even under W&B's case-insensitive metric names; with ``keys``,
    those keys kept and keys added for ``names``."""
    options: dict[str, Any] = {"prefix": "grad_norm/", "invalid": WANDB_INVALID, "max_length": _MAX_KEY,
                               "fold_case": True}  # fmt: skip
    return sanitize_names(names, **options) if keys is None else extend_names(keys, names, **options)

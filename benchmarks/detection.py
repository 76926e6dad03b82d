"""Detection and clipping quality (issue 11): does gradtrack tag the runs that diverge, only those, early
enough, and does its clipping bring them back, at what cost to runs that were fine?

**What.** Small scenarios (``benchmarks/_scenarios.py``): six that really diverge unclipped (a tanh RNN
with recurrent spectral radius 2, a 16-layer plain MLP and a 1-layer transformer at learning rates far too
high, one poisoned batch, an exponential learning-rate ramp, least squares just past the stability limit,
which grows smoothly and never spikes) and four that are noisy but stable (tiny batches with label noise,
Student-t inputs, a learning-rate and batch-size switch, a data-mix switch), and ten *held-out* diverging ones
(issue 19: the same failures on other recurrent nets, a transformer on SGD, least squares at other margins, with
momentum or an lr ramp, a poisoned batch of another size), kept apart so that a policy tuned on the first six is
judged on runs it was not tuned on; the by-scenario table totals the two groups separately. Each runs 200 to 300
steps on 5 seeds (``--quick``: 2). Every (scenario, seed) is trained, on the same initial weights and batches, by:

* the **untracked, unclipped** run: the ground truth (below), and the traces (loss, total gradient norm from
  ``torch.nn.utils.get_total_norm``, per-tensor norms) that the detection baselines are replayed on;
* for a diverging scenario, its **healthy twin**: the same run with the cause removed (a safe learning rate,
  no poisoned batch, no ramp), trained by every configuration below as well: it is the reference for rescue,
  and one more healthy run for false alarms and cost;
* **gradtrack** through its public API, ``GradTracker(model, backend=<event recorder>, clip=...)`` around an
  ordinary loop: monitor only (``clip=None``) with and without ``tracker.observe(loss=...)``, ``clip="norm"``
  at 1.0, and every policy among ``adaptive``, ``zscore``, ``agc``, ``adagc``, ``auto`` that
  ``gradtrack.policies.clipping.CLIP_POLICIES`` has (``n/a`` otherwise), with their defaults, plus
  ``on_spike="skip"`` where ``GradTracker`` accepts it; every configuration but one monitor observes the loss;
* **baselines**, plain functions of the run's norms and losses. Detection only: the seed's fixed threshold
  (total norm > 10, or NaN/Inf); Megatron's check (non-finite, or at least 10x the largest of the first 100
  finite norms: ``RerunStateMachine.is_unexpectedly_large``); OLMo-core's skip-step rule
  (``SkipStepOptimizer``: loss or norm more than 6 standard deviations above the mean of the previous
  up-to-128 finite values, or non-finite, judged once 64 values are in, ``max(20, 128 // 2)``); llm-foundry's
  ``KillLossSpike`` (once its window of 100 losses is full, a loss >= 2x the window mean on more than 4
  consecutive steps, or after 200 steps half the window above ``min(max(first window), 10)``; a NaN loss
  compares false, as there). Clippers, applied to the scenario's own optimizer and also replayed as detectors
  on the unclipped traces (an event: a step they change; ZClip: its z-score trigger; AdaGC: a tensor clipped
  after its warm-up): ``clip_grad_norm_`` at 1.0; AutoClip (Seetharaman et al. 2020) at the 10th percentile
  of every norm seen so far (p = 10, the paper's best setting; its reference code takes p without a
  default); ZClip with the defaults of its package (zclip 1.0.0: EMA alpha 0.97, z threshold 2.5, 25 warm-up
  steps clipped at ``max_grad_norm`` 1.0, mode "zscore" with "adaptive_scaling", i.e. clip at mean +
  z_thr^2 std / z once z > 2.5, the EMA fed the clipped value, and the default ``max_grad_norm`` = 1.0 kept as
  a ceiling); AdaGC (Wang et al. 2025) with its defaults (global clip at lambda_abs = 1.0 for the first 100
  steps while each tensor's gamma tracks its smallest clipped norm, then each tensor clipped at lambda_rel =
  1.05 x its gamma, an EMA (beta 0.98) of its clipped norms). Non-finite norms are kept out of every
  baseline's statistics (kinder than the originals, whose statistics a single NaN poisons).

**Ground truth** comes from the untracked, unclipped run of the same seed. ``L0`` is the untrained model's
loss on held-out data drawn like the first steps' batches. The run **blows up** at the first step ``t`` whose
training loss is non-finite or above ``10 x L0`` *and* the median of the losses of steps ``t .. t+4`` is
too (non-finite counting as infinite): a sustained excursion, so that one heavy-tailed batch is not a
divergence. A run diverges if it blows up. Every metric uses this per-run truth (gradtrack's monitor-only
runs are checked to be bitwise the untracked run); the scenario labels only say which runs should blow up,
and a mismatch is printed as a warning.

**Metrics.** *Recall*: diverging runs flagged (gradtrack: ``tracker.diverged``; baselines: any event).
*False alarms*: healthy runs (stable scenarios and healthy twins) flagged, and events per 1,000 healthy
steps. *Lead time*: blow-up step minus the first flag (explosion event, divergence tag or baseline event);
positive is early. *Rescue*: the clipped run of a diverging seed is rescued when its final held-out loss is
finite and at most ``max(2 x twin, twin + 0.1 x L0)``, ``twin`` being its healthy twin's final loss (the
margin serves twins that reach ~0). *Cost*: the final held-out loss of a clipped healthy run against the
unclipped run of the same seed, in % (negative: clipping helped), on the stable scenarios and on the healthy
twins. *Spike score* (OLMo 2): the share of steps whose value lies at least 7 standard deviations from the
mean of the previous (up to 1,000) values, non-finite values counted as spikes, on the loss and on the
pre-clip norm. Runs stop after 10 consecutive non-finite losses. Two diverging scenarios are beyond any
gradient clipping by construction: Adam's first update moves every weight by about the learning rate
whatever the gradient's scale (``transformer``), and a learning rate that keeps growing outgrows any clip
bound (``lr-ramp``); they count against every policy's rescue rate alike.

Issue 19's targets compare ``clip="auto"`` with ``clip="norm"`` at 1.0: on no diverging scenario may auto rescue
fewer seeds, and its mean cost over every healthy run (stable scenarios and twins) must be lower.

Run it (one worker process per core; every run is seeded, so the numbers do not depend on ``--jobs``)::

    .venv/bin/python benchmarks/detection.py            # 5 seeds, all scenarios, about 8 minutes on 2 free cores
    .venv/bin/python benchmarks/detection.py --quick    # 2 seeds
    .venv/bin/python benchmarks/detection.py --markdown # the same tables for README.md
    .venv/bin/python benchmarks/detection.py --scenarios held-out tiny-noisy --configs gt:norm gt:auto
                                                        # a subset: scenario keys or groups (original, held-out),
                                                        # and only the named configurations besides the untracked run
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import math
import multiprocessing
import multiprocessing.pool
import os
import platform
import statistics
import subprocess
import sys
import time
import warnings
from collections import deque
from collections.abc import Callable, Collection, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from _scenarios import SCENARIOS, Scenario, Setup

import gradtrack

BLOWUP_FACTOR = 10.0  # a loss above 10 x L0 ...
SUSTAIN = 5  # ... whose median over this many steps stays above: the run blew up
DEAD_AFTER = 10  # consecutive non-finite losses that end a run
RESCUE_FACTOR, RESCUE_MARGIN = 2.0, 0.1  # rescued: final <= max(2 x twin, twin + 0.1 x L0)
SPIKE_SIGMA, SPIKE_WINDOW = 7.0, 1000
COST_TARGET, RESCUE_TARGET, EARLY_TARGET, GRADS_ONLY_TARGET = 2.0, 0.70, 0.90, 0.50

# gradtrack configurations: key -> (label, tracker keyword arguments, observe the loss)
MONITORS = {
    "gt:monitor+loss": ("gradtrack monitor, loss observed", {"clip": None}, True),
    "gt:monitor": ("gradtrack monitor, gradients only", {"clip": None}, False),
}
POLICIES = ("norm", "adaptive", "zscore", "agc", "adagc", "auto")
SCENARIO_GROUPS = {"original": [k for k, s in SCENARIOS.items() if not s.held_out],
                   "held-out": [k for k, s in SCENARIOS.items() if s.held_out],
                   "hot": [k for k, s in SCENARIOS.items() if s.group == "hot"]}  # fmt: skip
SKIP_TRIES = ({"clip": None, "on_spike": "skip"}, {"clip": "norm", "max_norm": 1.0, "on_spike": "skip"})


# -- runs -------------------------------------------------------------------------------------------------


@dataclass
class Run:
    """What one training run left behind: traces, outcome, and gradtrack's verdicts when it ran."""

    scenario: str
    seed: int
    twin: bool
    config: str
    losses: np.ndarray
    norms: np.ndarray
    initial: float  # L0: the untrained model's loss on held-out data of the first steps' distribution
    final: float  # the evaluation loss after the last step
    seconds: float
    tensor_norms: np.ndarray | None = None
    diverged: bool | None = None
    diverged_step: int | None = None
    reason: str | None = None
    explosion_steps: list[int] = field(default_factory=list)
    instability_steps: list[int] = field(default_factory=list)  # the overshoot indicator's warnings (issue 25)
    overshoot: dict[int, float] = field(default_factory=dict)  # step -> grad/overshoot (issue 25)
    error: str | None = None
    warnings: list[str] = field(default_factory=list)


class EventLog:
    """A gradtrack backend object: it runs on a thread of this process and keeps every event."""

    def __init__(self) -> None:
        self.explosions: list[int] = []
        self.divergences: list[int] = []
        self.instabilities: list[int] = []
        self.overshoot: dict[int, float] = {}  # step -> grad/overshoot, where a sample completed

    @gradtrack.hookimpl
    def gradtrack_explosion(self, event: gradtrack.Explosion) -> None:
        self.explosions.append(event.step)

    @gradtrack.hookimpl
    def gradtrack_divergence(self, event: gradtrack.Divergence) -> None:
        self.divergences.append(event.step)

    @gradtrack.hookimpl
    def gradtrack_instability(self, event: gradtrack.Instability) -> None:
        self.instabilities.append(event.step)

    @gradtrack.hookimpl
    def gradtrack_steps(self, batch: gradtrack.StepBatch) -> None:
        if batch.overshoot is not None:
            sampled = np.flatnonzero(np.isfinite(batch.overshoot))
            self.overshoot.update(zip(batch.step[sampled].tolist(), batch.overshoot[sampled].tolist(), strict=True))


def _evaluate(setup: Setup, initial: bool = False) -> float:
    with torch.no_grad():
        x, y = setup.initial_set if initial and setup.initial_set is not None else setup.eval_set
        return float(setup.loss_fn(setup.model(x), y))


def _scale_(grads: Sequence[torch.Tensor], factors: float | np.ndarray) -> None:
    with torch.no_grad():
        if isinstance(factors, np.ndarray):
            for grad, factor in zip(grads, factors.tolist(), strict=True):
                if factor != 1.0:
                    grad.mul_(factor)
        elif factors != 1.0:
            for grad in grads:
                grad.mul_(factors)


def train(scenario: Scenario, seed: int, twin: bool, config: str, tracker_kwargs: dict | None) -> Run:
    """One run: the plain loop users write, with gradtrack around it or a baseline clipper inside it."""
    setup = scenario.make(seed, twin)
    model, optimizer = setup.model, setup.optimizer
    params = [p for p in model.parameters() if p.requires_grad]
    clipper = BASELINE_CLIPPERS[config][1]() if config in BASELINE_CLIPPERS else None
    wants_tensor_norms = config == "untracked" or isinstance(clipper, AdaGC)
    observe = MONITORS[config][2] if config in MONITORS else config.startswith("gt:")
    events = EventLog()
    initial = _evaluate(setup, initial=True)
    losses: list[float] = []
    norms: list[float] = []
    tensor_rows: list[np.ndarray] = []
    started = time.perf_counter()
    tracker = gradtrack.GradTracker(model, backend=events, log_every=1, layer_every=None,
                                    **tracker_kwargs) if tracker_kwargs is not None else None  # fmt: skip
    with tracker if tracker is not None else _nothing():
        dead = 0
        for step in range(scenario.steps):
            if setup.lr_at is not None:
                for group in optimizer.param_groups:
                    group["lr"] = setup.lr_at(step)
            x, y = setup.batch(step)
            optimizer.zero_grad(set_to_none=True)
            loss = setup.loss_fn(model(x), y)
            loss.backward()
            grads = [p.grad for p in params if p.grad is not None]
            norms.append(float(torch.nn.utils.get_total_norm(grads)))
            tensor_norms = None
            if wants_tensor_norms:
                tensor_norms = np.array([float(g.detach().norm()) for g in grads])
                if config == "untracked":
                    tensor_rows.append(tensor_norms)
            if clipper is not None:
                factors, _ = clipper.decide(norms[-1], tensor_norms)
                _scale_(grads, factors)
            if tracker is not None and observe:
                tracker.observe(loss=loss)
            optimizer.step()
            losses.append(loss.item())
            dead = 0 if math.isfinite(losses[-1]) else dead + 1
            if dead >= DEAD_AFTER:
                break
    seconds = time.perf_counter() - started
    run = Run(scenario.key, seed, twin, config, np.array(losses), np.array(norms), initial, _evaluate(setup), seconds)
    if config == "untracked":
        run.tensor_norms = np.array(tensor_rows)
    if tracker is not None:
        run.diverged = tracker.diverged
        event = tracker.divergence_event
        run.diverged_step, run.reason = (event.step, event.reason) if event is not None else (None, None)
        run.explosion_steps = sorted(events.explosions)
        run.instability_steps = sorted(events.instabilities)
        summary = tracker.summary()
        run.overshoot = dict(events.overshoot)
        counted = summary.explosions
        if counted != len(run.explosion_steps):  # the recorder must have seen every event the summary counts
            run.error = f"the event recorder got {len(run.explosion_steps)} explosions, the summary counts {counted}"
    return run


@contextmanager
def _nothing() -> Iterator[None]:
    yield


# -- baselines: clippers (replayed as detectors too) and detection-only rules ---------------------------


class FixedClip:
    """``clip_grad_norm_(params, 1.0)``: an event is every step it scales."""

    def decide(self, norm: float, tensor_norms: np.ndarray | None) -> tuple[float, bool]:
        return min(1.0, 1.0 / (norm + 1e-6)) if not math.isnan(norm) else math.nan, not norm <= 1.0


class AutoClip:
    """Clip at the 10th percentile of every finite norm seen so far, this one included (AutoClip, p = 10)."""

    def __init__(self, percentile: float = 10.0) -> None:
        self.percentile = percentile
        self.history: list[float] = []

    def decide(self, norm: float, tensor_norms: np.ndarray | None) -> tuple[float, bool]:
        if math.isfinite(norm):
            self.history.append(norm)
        if not self.history:
            return 1.0, True
        limit = float(np.percentile(self.history, self.percentile))
        return (min(1.0, limit / (norm + 1e-6)) if not math.isnan(norm) else math.nan), not norm <= limit


class ZClip:
    """zclip 1.0.0's defaults: z-score mode, adaptive scaling, ``max_grad_norm`` 1.0. Event: the z-score trigger."""

    def __init__(self, alpha: float = 0.97, z_thresh: float = 2.5, warmup: int = 25, cap: float = 1.0) -> None:
        self.alpha, self.z_thresh, self.warmup, self.cap, self.eps = alpha, z_thresh, warmup, cap, 1e-6
        self.buffer: list[float] = []
        self.mean: float | None = None
        self.var = 0.0

    def decide(self, norm: float, tensor_norms: np.ndarray | None) -> tuple[float, bool]:
        if self.mean is None:  # warm-up: collect, and clip at max_grad_norm
            if math.isfinite(norm):
                self.buffer.append(norm)
            if len(self.buffer) >= self.warmup:
                self.mean = statistics.fmean(self.buffer)
                self.var = statistics.fmean((v - self.mean) ** 2 for v in self.buffer)
            return (min(1.0, self.cap / (norm + 1e-6)) if not math.isnan(norm) else math.nan), False
        if not math.isfinite(norm):
            return math.nan if math.isnan(norm) else 0.0, True
        std = math.sqrt(self.var)
        z = (norm - self.mean) / (std + self.eps)
        clip_value = self.mean + self.z_thresh * std / (z / self.z_thresh) if z > self.z_thresh else None
        effective = min(clip_value if clip_value is not None else norm, self.cap)
        factor = effective / (norm + 1e-6) if norm > effective else 1.0
        update = clip_value if clip_value is not None else norm
        self.mean = self.alpha * self.mean + (1 - self.alpha) * update
        self.var = self.alpha * self.var + (1 - self.alpha) * (update - self.mean) ** 2
        return factor, clip_value is not None


class AdaGC:
    """Per-tensor adaptive clipping (AdaGC defaults). Event: a tensor clipped after the warm-up."""

    def __init__(self, beta: float = 0.98, lambda_rel: float = 1.05, lambda_abs: float = 1.0, warmup: int = 100):
        self.beta, self.lambda_rel, self.lambda_abs, self.warmup = beta, lambda_rel, lambda_abs, warmup
        self.step = 0
        self.gamma: np.ndarray | None = None

    def decide(self, norm: float, tensor_norms: np.ndarray | None) -> tuple[np.ndarray, bool]:
        assert tensor_norms is not None
        self.step += 1
        finite = np.isfinite(tensor_norms)
        with np.errstate(divide="ignore", invalid="ignore"):
            if self.step < self.warmup or self.gamma is None:  # global clip at lambda_abs
                factor = min(1.0, self.lambda_abs / (norm + 1e-8)) if not math.isnan(norm) else math.nan
                factors = np.full(tensor_norms.shape, factor)
                clipped = tensor_norms * factor
                if self.gamma is None:
                    self.gamma = np.where(np.isfinite(clipped), clipped, np.inf)
                else:
                    self.gamma = np.where(np.isfinite(clipped), np.minimum(self.gamma, clipped), self.gamma)
                return factors, False
            factors = np.minimum(self.lambda_rel * self.gamma / tensor_norms, 1.0)
            factors = np.where(tensor_norms == 0, 1.0, factors)
            clipped = tensor_norms * factors
            self.gamma = np.where(finite, self.beta * self.gamma + (1 - self.beta) * clipped, self.gamma)
        return factors, bool(np.any(factors < 1.0) or not finite.all())


BASELINE_CLIPPERS: dict[str, tuple[str, Callable[[], FixedClip | AutoClip | ZClip | AdaGC]]] = {
    "bl:clip1": ("clip_grad_norm_ 1.0", FixedClip),
    "bl:autoclip": ("AutoClip p10", AutoClip),
    "bl:zclip": ("ZClip (defaults)", ZClip),
    "bl:adagc": ("AdaGC (defaults)", AdaGC),
}


def seed_threshold_events(run: Run) -> list[int]:
    """The seed's check: total norm above 10, or NaN/Inf."""
    return [t for t, v in enumerate(run.norms.tolist()) if not v <= 10.0]


def megatron_events(run: Run, threshold: float = 10.0, samples: int = 100) -> list[int]:
    """Non-finite, or at least ``threshold`` x the largest of the first ``samples`` finite norms."""
    events, seen, largest = [], 0, 0.0
    for t, v in enumerate(run.norms.tolist()):
        if not math.isfinite(v):
            events.append(t)
        elif seen < samples:
            seen, largest = seen + 1, max(largest, abs(v))
        elif abs(v) >= threshold * largest:
            events.append(t)
    return events


def olmo_skip_events(run: Run, window: int = 128, sigma: float = 6.0) -> list[int]:
    """OLMo-core's ``SkipStepOptimizer``: loss or norm above mean + 6 std of the previous <= 128 finite values."""

    def passes(history: Sequence[float], latest: float) -> bool:
        finite = [v for v in history if math.isfinite(v)]
        if not math.isfinite(latest) or len(finite) < 2:
            return False
        return latest <= statistics.fmean(finite) + sigma * statistics.stdev(finite)

    events = []
    losses, norms = run.losses.tolist(), run.norms.tolist()
    for t in range(len(losses)):
        if t + 1 < max(20, window // 2):
            continue
        start = max(0, t - window)
        if not (passes(losses[start:t], losses[t]) and passes(norms[start:t], norms[t])):
            events.append(t)
    return events


def llm_foundry_events(run: Run, window: int = 100, multiplier: float = 2.0, patience: int = 4) -> list[int]:
    """llm-foundry's ``KillLossSpike`` with its defaults (``log_only``: every detection is an event)."""
    recent: deque[float] = deque(maxlen=window)
    events, outliers, cap = [], 0, None
    for t, loss in enumerate(run.losses.tolist()):
        if len(recent) == window:
            if cap is None:
                cap = min(max(recent), 10.0)
            average = float(np.mean(recent))
            if loss >= average * multiplier:
                outliers += 1
                if outliers > patience:
                    events.append(t)
            else:
                outliers = 0
                if t + 1 >= 2 * window and sum(v > cap for v in recent) >= window / 2:
                    events.append(t)
        recent.append(loss)
    return events


def replay(clipper: FixedClip | AutoClip | ZClip | AdaGC, run: Run) -> list[int]:
    """A clipper's decisions on the unclipped run's norms, as events."""
    assert run.tensor_norms is not None
    events = []
    for t, norm in enumerate(run.norms.tolist()):
        if clipper.decide(norm, run.tensor_norms[t])[1]:
            events.append(t)
    return events


DETECTORS: dict[str, tuple[str, str, Callable[[Run], list[int]]]] = {
    "seed": ("seed's threshold (norm > 10)", "norm", seed_threshold_events),
    "megatron": ("Megatron (10x max of first 100)", "norm", megatron_events),
    "olmo": ("OLMo-core skip step (6 sigma)", "loss+norm", olmo_skip_events),
    "foundry": ("llm-foundry KillLossSpike", "loss", llm_foundry_events),
    **{key: (f"{label} as detector", "norm", lambda run, make=make: replay(make(), run))
       for key, (label, make) in BASELINE_CLIPPERS.items()},
}  # fmt: skip


# -- ground truth and metrics -------------------------------------------------------------------------------


def blowup_step(losses: np.ndarray, initial: float) -> int | None:
    """The first step of a sustained excursion above ``BLOWUP_FACTOR x L0`` (non-finite counts as infinite)."""
    values = np.where(np.isfinite(losses), losses, np.inf)
    limit = BLOWUP_FACTOR * initial
    for t in np.flatnonzero(values > limit).tolist():
        if np.median(values[t : t + SUSTAIN]) > limit:
            return int(t)
    return None


def spike_score(values: np.ndarray) -> float:
    """OLMo 2's spike score in %: values >= 7 sigma from the mean of the previous <= 1,000 (non-finite: spikes)."""
    spikes, counted = 0, 0
    for t, value in enumerate(values.tolist()):
        if not math.isfinite(value):
            spikes, counted = spikes + 1, counted + 1
            continue
        history = values[max(0, t - SPIKE_WINDOW) : t]
        history = history[np.isfinite(history)]
        if history.size < 2:
            continue
        counted += 1
        mean, std = float(history.mean()), float(history.std())
        std = max(std, 1e-6 * abs(mean))  # a converged full-batch loss is flat to rounding: not 7 sigma of nothing
        spikes += abs(value - mean) >= SPIKE_SIGMA * std > 0
    return 100.0 * spikes / counted if counted else 0.0


@dataclass
class Truth:
    run: Run  # the untracked run
    blowup: int | None

    @property
    def diverged(self) -> bool:
        return self.blowup is not None


def rescued(run: Run, twin: Run) -> bool:
    bound = max(RESCUE_FACTOR * twin.final, twin.final + RESCUE_MARGIN * twin.initial)
    return math.isfinite(run.final) and run.final <= bound


# -- running everything ---------------------------------------------------------------------------------------


def tracker_configs() -> dict[str, tuple[str, dict | None, str]]:
    """Every gradtrack configuration: key -> (label, kwargs or None when unavailable, note)."""
    from gradtrack.policies.clipping import CLIP_POLICIES

    probe = torch.nn.Linear(2, 2)
    configs: dict[str, tuple[str, dict | None, str]] = {}

    def accepted(kwargs: dict) -> str:
        try:
            gradtrack.GradTracker(probe, **kwargs)
        except (TypeError, ValueError) as error:
            return f"refused: {error}"
        return ""

    for key, (label, kwargs, _) in MONITORS.items():
        configs[key] = (label, kwargs, "")
    for name in POLICIES:
        kwargs = {"clip": name, **({"max_norm": 1.0} if name == "norm" else {})}
        label = f'gradtrack clip="{name}"' + (" 1.0" if name == "norm" else "")
        if name not in CLIP_POLICIES:
            configs[f"gt:{name}"] = (label, None, "not in CLIP_POLICIES")
            continue
        problem = accepted(kwargs)
        configs[f"gt:{name}"] = (label, None if problem else kwargs, problem)
    if "on_spike" not in inspect.signature(gradtrack.GradTracker.__init__).parameters:
        configs["gt:skip"] = ('gradtrack on_spike="skip"', None, "GradTracker has no on_spike")
    else:
        for kwargs in SKIP_TRIES:
            problem = accepted(kwargs)
            clip = kwargs["clip"]
            label = f'gradtrack on_spike="skip", clip={clip!r}'
            configs["gt:skip"] = (label, None if problem else kwargs, problem)
            if not problem:
                break
    return configs


_TRACKER_KWARGS: dict[str, dict | None] = {}
_STEP_CAP: list[int | None] = [None]


def _worker_init(threads: int, tracker_kwargs: dict[str, dict | None], step_cap: int | None) -> None:
    torch.set_num_threads(threads)
    _TRACKER_KWARGS.update(tracker_kwargs)
    _STEP_CAP[0] = step_cap


def _job(spec: tuple[str, int, bool, str]) -> Run:
    scenario_key, seed, twin, config = spec
    kwargs = _TRACKER_KWARGS.get(config) if config.startswith("gt:") else None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            scenario = SCENARIOS[scenario_key]
            if _STEP_CAP[0] is not None:
                scenario = dataclasses.replace(scenario, steps=min(scenario.steps, _STEP_CAP[0]))
            run = train(scenario, seed, twin, config, kwargs)
        except Exception as error:  # a configuration that breaks is reported, not fatal
            run = Run(scenario_key, seed, twin, config, np.array([]), np.array([]), math.nan, math.nan, 0.0,
                      error=f"{type(error).__name__}: {error}")  # fmt: skip
    run.warnings = sorted({f"{w.category.__name__}: {w.message}" for w in caught})
    return run


COST_HINT = {"rnn": 6.0, "transformer": 5.0, "deep-mlp": 2.0}  # relative cost, for scheduling only


def run_section(specs: list[tuple[str, int, bool, str]], pool: multiprocessing.pool.Pool | None) -> list[Run]:
    specs = sorted(specs, key=lambda s: -COST_HINT.get(s[0], 1.0))  # the long runs first: less idle at the end
    if pool is None:
        return [_job(spec) for spec in specs]
    return list(pool.imap_unordered(_job, specs, chunksize=1))


# -- reporting --------------------------------------------------------------------------------------------


def table(headers: Sequence[str], rows: Sequence[Sequence[str]], markdown: bool, left: int = 1) -> str:
    """A plain-text table (the first ``left`` columns left-aligned, the rest right-aligned), or markdown."""
    if markdown:
        align = [":---" if i < left else "---:" for i in range(len(headers))]
        lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(align) + "|"]
        return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(
            c.ljust(w) if i < left else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        )

    return "\n".join([line(headers), "  ".join("-" * w for w in widths), *(line(r) for r in rows)])


def _frac(hits: int, total: int) -> str:
    return f"{hits}/{total}" if total else "-"


def _lead(leads: Sequence[int]) -> str:
    if not leads:
        return "-"
    return f"{statistics.median(leads):+g} [{min(leads):+d}, {max(leads):+d}]"


def _pct(value: float, digits: int = 2) -> str:
    """A signed percentage, in powers of ten once it is large."""
    return f"{value:+.{digits}f}" if abs(value) < 1000 else f"{value:+.2e}".replace("e+0", "e+")


def _cost(costs: Sequence[float]) -> str:
    """Mean and largest final-loss cost in %."""
    return f"{_pct(statistics.fmean(costs))} [{_pct(max(costs), 1)}]" if costs else "-"


def _num(value: float | None, digits: int = 3) -> str:
    if value is None:
        return "-"
    return f"{value:.{digits}g}" if math.isfinite(value) else str(value)


class Report:
    """Turns the runs into tables; every number is computed here from the runs and the ground truth."""

    def __init__(self, runs: list[Run], seeds: list[int], configs: dict[str, tuple[str, dict | None, str]]) -> None:
        self.seeds = seeds
        self.configs = configs
        self.by = {(r.scenario, r.seed, r.twin, r.config): r for r in runs}
        self.ran = {r.config for r in runs}  # --configs may leave some out
        self.truth = {
            (r.scenario, r.seed, r.twin): Truth(r, blowup_step(r.losses, r.initial))
            for r in runs
            if r.config == "untracked"
        }
        self.positives = sorted(k for k, t in self.truth.items() if t.diverged)
        self.negatives = sorted(k for k, t in self.truth.items() if not t.diverged)
        self.warnings: list[str] = []
        self._flag_cache: dict[tuple[tuple[str, int, bool], str], tuple[bool, int | None, int, int] | None] = {}
        self._spike_cache: dict[int, tuple[float, float]] = {}
        for (scenario, seed, twin), truth in sorted(self.truth.items()):
            expected = SCENARIOS[scenario].diverging and not twin
            if truth.diverged != expected:
                what = "twin " if twin else ""
                did = "blew up" if truth.diverged else "did not blow up"
                wanted = "a blow-up" if expected else "none"
                self.warnings.append(f"{scenario} {what}seed {seed}: the unclipped run {did} (expected {wanted})")

    def scenarios(self) -> list[Scenario]:
        """The scenarios that ran, in their order."""
        ran = {key[0] for key in self.truth}
        return [scenario for key, scenario in SCENARIOS.items() if key in ran]

    def run(self, key: tuple[str, int, bool], config: str) -> Run | None:
        run = self.by.get((*key, config))
        return run if run is not None and run.error is None else None

    # -- ground truth -------------------------------------------------------------------------------

    def ground_truth(self, markdown: bool) -> str:
        rows = []
        for scenario in self.scenarios():
            mains = [self.truth[k] for k in self.truth if k[0] == scenario.key and not k[2]]
            twins = [self.truth[k] for k in self.truth if k[0] == scenario.key and k[2]]
            if not mains:
                continue
            steps = [t.blowup for t in mains if t.blowup is not None]
            identical = [
                bool(np.array_equal(m.losses, t.run.losses, equal_nan=True))
                for k, t in self.truth.items() if k[0] == scenario.key
                for c in MONITORS if (m := self.run(k, c)) is not None
            ]  # fmt: skip
            rows.append([
                scenario.key, scenario.title, "diverging" if scenario.diverging else "stable",
                _frac(len(steps), len(mains)),
                f"{statistics.median(steps):g} [{min(steps)}, {max(steps)}]" if steps else "-",
                _num(statistics.median(t.run.initial for t in mains)),
                _num(statistics.median(t.run.final for t in mains)),
                f"{_num(statistics.median(t.run.final for t in twins))} ({scenario.twin})" if twins else "-",
                _frac(sum(t.diverged for t in twins), len(twins)) if twins else "-",
                _frac(sum(identical), len(identical)),
            ])  # fmt: skip
        headers = ["scenario", "what", "kind", "blew up", "blow-up step", "L0", "final (unclipped)",
                   "twin final (change)", "twin blew up", "monitor = untracked"]  # fmt: skip
        return table(headers, rows, markdown, left=3)

    # -- detection ----------------------------------------------------------------------------------

    def _flags(self, key: tuple[str, int, bool], detector: str) -> tuple[bool, int | None, int, int] | None:
        """(flagged, first flag step, events, steps) of one detector on one run; None if it did not run."""
        if (key, detector) not in self._flag_cache:
            self._flag_cache[key, detector] = self._compute_flags(key, detector)
        return self._flag_cache[key, detector]

    def _compute_flags(self, key: tuple[str, int, bool], detector: str) -> tuple[bool, int | None, int, int] | None:
        truth = self.truth[key]
        if detector in ("tag+loss", "tag", "events", "warnings", "first"):
            run = self.run(key, self._monitor(detector))
            if run is None:
                return None
            if detector in ("events", "warnings", "first"):
                every = [*run.explosion_steps, *run.instability_steps, *([run.diverged_step] if run.diverged else [])]
                steps = {"events": run.explosion_steps, "warnings": run.instability_steps, "first": sorted(every)}[
                    detector
                ]  # type: ignore[assignment]
                return bool(steps), steps[0] if steps else None, len(steps), len(run.losses)
            return bool(run.diverged), run.diverged_step, int(bool(run.diverged)), len(run.losses)
        events = DETECTORS[detector][2](truth.run)
        return bool(events), events[0] if events else None, len(events), len(truth.run.losses)

    def _detector_stats(self, detector: str, scenario: str | None = None) -> dict[str, object]:
        pos = [k for k in self.positives if scenario is None or k[0] == scenario]
        neg = [k for k in self.negatives if scenario is None or k[0] == scenario]
        flagged, early, leads = 0, 0, []
        for key in pos:
            result = self._flags(key, detector)
            if result is None:
                continue
            hit, first, _, _ = result
            flagged += hit
            if first is not None:
                lead = self.truth[key].blowup - first  # type: ignore[operator]
                leads.append(lead)
                early += lead >= 0
        alarms, events, steps = 0, 0, 0
        for key in neg:
            result = self._flags(key, detector)
            if result is None:
                continue
            alarms += result[0]
            events += result[2]
            steps += result[3]
        return {"pos": len(pos), "flagged": flagged, "early": early, "leads": leads, "neg": len(neg),
                "alarms": alarms, "per_1k": 1000 * events / steps if steps else None}  # fmt: skip

    def detection_rows(self) -> list[tuple[str, str, str]]:
        rows = [("first", "gradtrack first event (warning, explosion or tag), loss observed", "loss+norm"),
                ("warnings", "gradtrack overshoot warnings, loss observed", "norm"),
                ("tag+loss", "gradtrack divergence tag, loss observed", "loss+norm"),
                ("tag", "gradtrack divergence tag, gradients only", "norm"),
                ("events", "gradtrack explosion events", "norm")]  # fmt: skip
        rows = [row for row in rows if self._monitor(row[0]) in self.ran]
        rows += [(key, label, needs) for key, (label, needs, _) in DETECTORS.items()]
        return rows

    @staticmethod
    def _monitor(detector: str) -> str:
        """The monitor-only configuration a gradtrack detector row is read from."""
        return "gt:monitor+loss" if detector in ("tag+loss", "warnings", "first") else "gt:monitor"

    def detection(self, markdown: bool) -> str:
        out = []
        for key, label, needs in self.detection_rows():
            s = self._detector_stats(key)
            out.append([
                label, needs, _frac(s["flagged"], s["pos"]), _frac(s["early"], s["pos"]), _lead(s["leads"]),
                _frac(s["alarms"], s["neg"]), _num(s["per_1k"]) if key not in ("tag+loss", "tag") else "-",
            ])  # fmt: skip
        headers = ["detector", "input", "recall", "flag <= blow-up", "lead: median [min, max]",
                   "false-alarm runs", "events / 1k healthy steps"]  # fmt: skip
        return table(headers, out, markdown, left=2)

    def detection_by_scenario(self, markdown: bool) -> str:
        columns = [("first", "gt first event"), ("warnings", "gt warnings"),
                   ("tag+loss", "gt tag+loss"), ("tag", "gt tag"), ("events", "gt events"), ("seed", "seed >10"),
                   ("megatron", "Megatron"), ("olmo", "OLMo skip"), ("foundry", "llm-foundry"),
                   ("bl:zclip", "ZClip z")]  # fmt: skip
        gradtrack_rows = ("first", "warnings", "tag+loss", "tag", "events")
        columns = [c for c in columns if c[0] not in gradtrack_rows or self._monitor(c[0]) in self.ran]
        rows = []
        for scenario in self.scenarios():
            cells = [scenario.key]
            for key, _ in columns:
                s = self._detector_stats(key, scenario.key)
                if scenario.diverging:
                    lead = f" {statistics.median(s['leads']):+g}" if s["leads"] else ""
                    cells.append(_frac(s["flagged"], s["pos"]) + lead)
                else:
                    rate = (
                        f" ({_num(s['per_1k'], 2)})"
                        if s["per_1k"] is not None and key not in ("tag+loss", "tag")
                        else ""
                    )
                    cells.append(_frac(s["alarms"], s["neg"]) + rate)
            rows.append(cells)
        return table(["scenario", *(label for _, label in columns)], rows, markdown)

    # -- protection -----------------------------------------------------------------------------------

    def _spikes(self, run: Run) -> tuple[float, float]:
        """(loss, norm) spike scores of one run, computed once."""
        if id(run) not in self._spike_cache:
            self._spike_cache[id(run)] = (spike_score(run.losses), spike_score(run.norms))
        return self._spike_cache[id(run)]

    def protection_configs(self) -> list[tuple[str, str, str]]:
        """(key, label, note) of every clipping configuration, gradtrack's first, then the baselines."""
        out = [("untracked", "unclipped", "")]
        out += [(k, label, note) for k, (label, kwargs, note) in self.configs.items() if k not in MONITORS]
        out += [(k, label, "") for k, (label, _) in BASELINE_CLIPPERS.items() if k in self.ran]
        return out

    def _rescuable(self, configs: Sequence[str]) -> int:
        """Diverging seeds that some clipping configuration rescued: the ceiling for every policy."""
        hits = 0
        for key in self.positives:
            twin = self.truth.get((key[0], key[1], True))
            if key[2] or twin is None or twin.diverged:
                continue
            runs = [run for config in configs if (run := self.run(key, config)) is not None]
            hits += any(rescued(run, twin.run) for run in runs)
        return hits

    def _protection(self, config: str, scenarios: Collection[str] | None = None) -> dict[str, object]:
        """Rescue, cost and spike numbers of one configuration, on every scenario or on ``scenarios``."""
        rescued_n, rescue_total, ratios, tagged, diverging_runs, better = 0, 0, [], 0, 0, 0
        for key in self.positives:
            if key[2] or (scenarios is not None and key[0] not in scenarios):
                continue
            twin_key = (key[0], key[1], True)
            run = self.run(key, config)
            if run is None:
                continue
            diverging_runs += 1
            tagged += bool(run.diverged)
            unclipped = self.truth[key].run.final
            better += math.isfinite(run.final) and not run.final >= unclipped  # a NaN unclipped final is beaten
            twin = self.truth.get(twin_key)
            if twin is None or twin.diverged:
                continue
            rescue_total += 1
            rescued_n += rescued(run, twin.run)
            ratios.append(run.final / twin.run.final if math.isfinite(run.final) else math.inf)
        costs, twin_costs, alarms, healthy_runs = [], [], 0, 0
        for key in self.negatives:
            run = self.run(key, config)
            if run is None or (scenarios is not None and key[0] not in scenarios):
                continue
            healthy_runs += 1
            alarms += bool(run.diverged)
            reference = self.truth[key].run.final
            cost = 100.0 * (run.final - reference) / reference
            if key[2]:
                twin_costs.append(cost)
            elif not SCENARIOS[key[0]].diverging:
                costs.append(cost)
        spikes = {}
        for name, keys in (("stable", [k for k in self.negatives if not k[2] and not SCENARIOS[k[0]].diverging]),
                           ("diverging", [k for k in self.positives if not k[2]])):  # fmt: skip
            scores = [self._spikes(r) for k in keys if (scenarios is None or k[0] in scenarios)
                      and (r := self.run(k, config)) is not None]  # fmt: skip
            spikes[name] = (statistics.fmean(s[0] for s in scores) if scores else None,
                            statistics.fmean(s[1] for s in scores) if scores else None)  # fmt: skip
        return {"rescued": rescued_n, "rescue_total": rescue_total, "ratios": ratios, "tagged": tagged,
                "better": better, "diverging_runs": diverging_runs, "costs": costs, "twin_costs": twin_costs,
                "alarms": alarms, "healthy_runs": healthy_runs, "spikes": spikes}  # fmt: skip

    def protection(self, markdown: bool) -> str:
        rows = []
        for key, label, _ in self.protection_configs():
            if key != "untracked" and self.configs.get(key, ("", {}, ""))[1] is None:
                rows.append([label, "n/a", *["-"] * 9])
                continue
            p = self._protection(key)
            ratios = p["ratios"]
            costs = p["costs"]
            tagged = "-" if key == "untracked" or key.startswith("bl:") else _frac(p["tagged"], p["diverging_runs"])
            alarms = "-" if key == "untracked" or key.startswith("bl:") else _frac(p["alarms"], p["healthy_runs"])
            (ls, ns), (ld, nd) = p["spikes"]["stable"], p["spikes"]["diverging"]
            rows.append([
                label, _frac(p["rescued"], p["rescue_total"]), _frac(p["better"], p["diverging_runs"]),
                _num(statistics.median(ratios)) if ratios else "-", tagged, alarms,
                _cost(costs), _cost(p["twin_costs"]),
                f"{_num(ls, 2)} / {_num(ld, 2)}", f"{_num(ns, 2)} / {_num(nd, 2)}",
                f"{sum(r.seconds for r in self.by.values() if r.config == key):.0f}",
            ])  # fmt: skip
        headers = ["clipping", "rescued", "< unclipped", "final / twin", "tagged", "false alarms",
                   "cost % stable", "cost % twins", "loss spikes % st / div", "norm spikes % st / div",
                   "train s"]  # fmt: skip
        return table(headers, rows, markdown)

    def protection_by_scenario(self, markdown: bool) -> str:
        configs = [(k, label) for k, label, _ in self.protection_configs()
                   if k == "untracked" or k.startswith("bl:") or self.configs[k][1] is not None]  # fmt: skip
        short = {"untracked": "none", "bl:clip1": "clip 1.0", "bl:autoclip": "AutoClip", "bl:zclip": "ZClip",
                 "bl:adagc": "AdaGC", "gt:skip": "gt skip"}  # fmt: skip
        headers = ["scenario", *(short.get(k, "gt " + k[3:]) for k, _ in configs)]
        rows = []
        for scenario in self.scenarios():
            cells = [scenario.key]
            for key, _ in configs:
                p = self._protection(key, {scenario.key})
                if scenario.diverging:
                    twin = f" {_pct(statistics.fmean(p['twin_costs']), 0)}%" if p["twin_costs"] else ""
                    cells.append(_frac(p["rescued"], p["rescue_total"]) + twin)
                else:
                    cells.append(f"{_pct(statistics.fmean(p['costs']), 1)}%" if p["costs"] else "-")
            rows.append(cells)
        ran = self.scenarios()
        groups = [(f"= {name}, rescued", {s.key for s in ran if s.diverging and (s.held_out, s.group) == group})
                  for name, group in (("original", (False, "")), ("held out", (True, "")),
                                      ("held out, too hot", (True, "hot")))]  # fmt: skip
        for title, keys in groups:
            if keys:
                totals = [self._protection(key, keys) for key, _ in configs]
                rows.append([title, *(_frac(p["rescued"], p["rescue_total"]) for p in totals)])
        healthy = [self._protection(key) for key, _ in configs]
        rows.append(["= healthy runs, mean cost", *(f"{_pct(statistics.fmean(costs), 1)}%"
                     if (costs := p["costs"] + p["twin_costs"]) else "-" for p in healthy)])  # fmt: skip
        return table(headers, rows, markdown)

    # -- targets --------------------------------------------------------------------------------------

    def targets(self) -> list[str]:
        """The issues' summary targets, one PASS/FAIL line each."""
        lines = self._detection_targets() if {"gt:monitor+loss", "gt:monitor"} <= self.ran else []

        def check(ok: bool, text: str) -> None:
            lines.append(f"{'PASS' if ok else 'FAIL'}  {text}")

        runs = [
            r
            for k, (_, kwargs, _) in self.configs.items()
            if kwargs is not None
            for neg in self.negatives
            if (r := self.run(neg, k)) is not None
        ]
        alarms = sum(bool(r.diverged) for r in runs)
        check(
            alarms == 0,
            f"healthy runs tagged diverged, every gradtrack configuration: {alarms}/{len(runs)} (target: none)",
        )
        available = [k for k, (_, kwargs, _) in self.configs.items() if kwargs is not None and k not in MONITORS]
        if not available:
            return lines
        protection = {k: self._protection(k) for k in available}
        # clip="auto" is the headline; until it exists, the available policy that rescues most
        headline = "gt:auto" if "gt:auto" in available else max(available, key=lambda k: protection[k]["rescued"])
        rescuable = self._rescuable([*available, *BASELINE_CLIPPERS])
        lines.append(
            f"NOTE  diverging runs rescued by at least one configuration here (gradtrack or baseline): "
            f"{rescuable}/{protection[headline]['rescue_total']}, the most any policy reaches on this suite"
        )
        for key in sorted(available, key=lambda k: k != headline):
            p, label = protection[key], self.configs[key][0]
            mark = "  <- headline" if key == headline else ""
            rescue = _share(p["rescued"], p["rescue_total"])
            check(
                rescue >= RESCUE_TARGET,
                f"diverging runs rescued by {label}: {p['rescued']}/{p['rescue_total']} "
                f"= {rescue:.0%} (target: >= {RESCUE_TARGET:.0%}){mark}",
            )
            for what, costs in (("stable scenarios", p["costs"]), ("healthy twins", p["twin_costs"])):
                cost = statistics.fmean(costs) if costs else math.nan
                check(
                    cost <= COST_TARGET,
                    f"final-loss cost of {label} on {what}: {_pct(cost)}% mean (target: <= {COST_TARGET:g}%){mark}",
                )
        if {"gt:auto", "gt:norm"} <= set(available):
            lines += self._auto_against_norm()
        return lines

    def _overshoot_targets(self) -> list[str]:
        """Issue 25's detection targets (the overshoot indicator), from the monitor-only runs with the loss."""
        lines = []
        groups = (("every diverging run", lambda s: True),
                  ("original and issue-19 held-out (tuned on)", lambda s: s.group != "hot"),
                  ("issue-25 held-out too hot (never tuned on)", lambda s: s.group == "hot"))  # fmt: skip
        for name, member in groups:
            early = total = 0
            leads = []
            for key in self.positives:
                if not member(SCENARIOS[key[0]]) or (flags := self._flags(key, "first")) is None:
                    continue
                total += 1
                if flags[1] is not None:
                    lead = self.truth[key].blowup - flags[1]  # type: ignore[operator]
                    early += lead >= 0
                    leads.append(lead)
            if total:
                lines.append(f"{'PASS' if early / total >= EARLY_TARGET else 'FAIL'}  {name}: first gradtrack event "
                             f"(warning, explosion or tag) at or before the blow-up in {early}/{total} = "
                             f"{early / total:.0%} (target >= {EARLY_TARGET:.0%}), lead {_lead(leads)}")  # fmt: skip
        warned = self._detector_stats("warnings")
        lines.append(f"{'PASS' if warned['alarms'] == 0 else 'FAIL'}  healthy runs with an overshoot warning: "
                     f"{warned['alarms']}/{warned['neg']} (target: none)")  # fmt: skip
        before = [
            value
            for key in self.positives
            if key[0] == "lsq-edge" and (run := self.run(key, "gt:monitor+loss")) is not None
            for step, value in run.overshoot.items()
            if step <= self.truth[key].blowup  # type: ignore[operator]
        ]
        healthy = [statistics.median(r.overshoot.values()) for k in self.negatives
                   if (r := self.run(k, "gt:monitor+loss")) is not None and r.overshoot]  # fmt: skip
        if before:
            ok = statistics.median(before) > 1.8
            lines.append(f"{'PASS' if ok else 'FAIL'}  grad/overshoot on lsq-edge before its blow-up: median "
                         f"{statistics.median(before):.3g}, min {min(before):.3g} (target > 1.8)")  # fmt: skip
        if healthy:
            ok = max(healthy) < 1.5
            lines.append(f"{'PASS' if ok else 'FAIL'}  grad/overshoot on healthy runs: the runs' medians are "
                         f"{statistics.median(healthy):.3g} typically, at most {max(healthy):.3g} "
                         "(target < 1.5)")  # fmt: skip
        return lines

    def _detection_targets(self) -> list[str]:
        """Issue 11's detection targets, read from the monitor-only runs."""
        loss, grads, events = (self._detector_stats(d) for d in ("tag+loss", "tag", "events"))
        early, alone = _share(events["early"], events["pos"]), _share(grads["flagged"], grads["pos"])
        checks = [
            (loss["flagged"] == loss["pos"] > 0,
             f"diverging runs tagged diverged, loss observed: {loss['flagged']}/{loss['pos']} (target: all)"),
            (early >= EARLY_TARGET,
             f"diverging runs with an explosion event no later than the blow-up: "
             f"{events['early']}/{events['pos']} = {early:.0%} (target: >= {EARLY_TARGET:.0%})"),
            (alone >= GRADS_ONLY_TARGET and grads["alarms"] == 0,
             f"diverging runs tagged from gradients alone: {grads['flagged']}/{grads['pos']} = {alone:.0%} "
             f"(target: >= {GRADS_ONLY_TARGET:.0%}), false alarms {grads['alarms']}/{grads['neg']} (target: none)"),
        ]  # fmt: skip
        return [f"{'PASS' if ok else 'FAIL'}  {text}" for ok, text in checks] + self._overshoot_targets()

    def _auto_against_norm(self) -> list[str]:
        """Issue 19: clip="auto" rescues no fewer runs than clip="norm" 1.0 on any scenario, at a lower cost."""
        behind = []
        for scenario in self.scenarios():
            if scenario.diverging:
                auto, norm = (self._protection(k, {scenario.key})["rescued"] for k in ("gt:auto", "gt:norm"))
                if auto < norm:  # type: ignore[operator]
                    behind.append(f"{scenario.key} {auto} < {norm}")
        auto, norm = self._protection("gt:auto"), self._protection("gt:norm")
        cost = {
            name: _mean([*p["costs"], *p["twin_costs"]])  # type: ignore[misc]
            for name, p in (("auto", auto), ("norm", norm))
        }
        return [
            f'{"FAIL" if behind else "PASS"}  scenarios where clip="auto" rescues fewer runs than clip="norm" 1.0: '
            f"{', '.join(behind) or 'none'} (rescued {auto['rescued']} against {norm['rescued']}; target: none)",
            f"{'PASS' if cost['auto'] < cost['norm'] else 'FAIL'}  mean final-loss cost on every healthy run: "
            f'clip="auto" {_pct(cost["auto"])}% against clip="norm" 1.0 {_pct(cost["norm"])}% (target: lower)',
        ]


def _mean(values: Sequence[float]) -> float:
    return statistics.fmean(values) if values else math.nan


def _share(hits: int, total: int) -> float:
    return hits / total if total else 0.0


# -- main -------------------------------------------------------------------------------------------------


def _version() -> str:
    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "-C", str(root), "describe", "--always", "--dirty"], capture_output=True,
                                text=True, timeout=10, check=False).stdout.strip()  # fmt: skip
    except OSError:
        commit = ""
    return f"gradtrack {gradtrack.__version__}" + (f" ({commit})" if commit else "")


def print_blocks(say: Callable[[str], None], heading: str, blocks: Sequence[tuple[str, Any, str]],
                 markdown: bool) -> None:  # fmt: skip
    """Each (title, table renderer, legend) as a section of the report."""
    for title, render, legend in blocks:
        say(f"\n{heading}{title}\n")
        say(render(markdown))
        if legend:
            say(f"\n{legend}")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="2 seeds instead of 5 (< 2 minutes)")
    parser.add_argument("--seeds", type=int, default=None, help="number of seeds (default 5, --quick 2)")
    parser.add_argument(
        "--scenarios",
        nargs="+",
        choices=[*SCENARIO_GROUPS, *SCENARIOS],
        default=None,
        help="a subset: scenario keys, or the groups original (the first ten), held-out",
    )
    parser.add_argument("--configs", nargs="+", default=None, metavar="CONFIG",
                        help="run only these configurations besides the untracked one, e.g. gt:norm gt:auto "
                             "(keys: gt:monitor+loss, gt:monitor, gt:<policy>, gt:skip, bl:clip1, bl:autoclip, "
                             "bl:zclip, bl:adagc); tables about the others then read n/a")  # fmt: skip
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), help="worker processes")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per worker (tiny models: 1)")
    parser.add_argument("--markdown", action="store_true", help="markdown tables, for README.md")
    parser.add_argument("--max-steps", type=int, default=None, help="cap every run's steps (smoke tests only)")
    args = parser.parse_args(argv)
    os.environ.setdefault("GRADTRACK_DISABLE_PLUGIN_AUTOLOAD", "1")  # only our in-process event recorder
    torch.set_num_threads(args.threads)
    seeds = list(range(args.seeds if args.seeds is not None else (2 if args.quick else 5)))
    picked = {key for name in (args.scenarios or SCENARIOS) for key in SCENARIO_GROUPS.get(name, [name])}
    chosen = [scenario for key, scenario in SCENARIOS.items() if key in picked]
    configs = tracker_configs()
    wanted = set(args.configs) if args.configs else None
    if wanted is not None:
        unknown = wanted - set(configs) - set(BASELINE_CLIPPERS)
        if unknown:
            parser.error(f"unknown --configs {sorted(unknown)}; known: {[*configs, *BASELINE_CLIPPERS]}")
        configs = {key: (label, kwargs, note) if key in wanted else (label, None, "not run: --configs")
                   for key, (label, kwargs, note) in configs.items()}  # fmt: skip
    tracker_kwargs = {key: kwargs for key, (_, kwargs, _) in configs.items()}
    gradtrack_keys = [k for k, (_, kwargs, _) in configs.items() if kwargs is not None and k not in MONITORS]
    monitor_keys = [k for k in MONITORS if configs[k][1] is not None]
    baseline_keys = [k for k in BASELINE_CLIPPERS if wanted is None or k in wanted]

    def specs(configs_: Sequence[str], twins: bool) -> list[tuple[str, int, bool, str]]:
        out = []
        for scenario in chosen:
            for seed in seeds:
                for twin in (False, True) if twins and scenario.diverging else (False,):
                    out += [(scenario.key, seed, twin, c) for c in configs_]
        return out

    sections = [
        ("ground truth: untracked, unclipped runs and healthy twins", specs(["untracked"], True)),
        ("gradtrack monitor only (clip=None), with and without observe", specs(monitor_keys, True)),
        ("gradtrack clipping configurations", specs(gradtrack_keys, True)),
        ("baseline clippers", specs(baseline_keys, True)),
    ]
    say = print
    heading = "## " if args.markdown else "== "
    say(f"{heading}gradtrack detection and clipping benchmark (issue 11)")
    say(f"{_version()}, torch {torch.__version__}, Python {platform.python_version()}, {platform.machine()}, "
        f"{os.cpu_count()} CPU cores, {args.jobs} worker process(es) x {args.threads} torch thread(s); "
        f"{len(seeds)} seed{'s' * (len(seeds) != 1)}, {len(chosen)} scenarios")  # fmt: skip
    say(f"blow-up: loss non-finite or > {BLOWUP_FACTOR:g} x L0, sustained (median of {SUSTAIN} steps); rescued: final "
        f"<= max({RESCUE_FACTOR:g} x twin, twin + {RESCUE_MARGIN:g} x L0); spike: >= {SPIKE_SIGMA:g} sigma from the "
        f"previous <= {SPIKE_WINDOW} values")  # fmt: skip
    for label, kwargs, note in configs.values():
        if kwargs is None:
            say(f"  {label}: n/a ({note})")
    started = time.perf_counter()
    runs: list[Run] = []
    timings = []
    context = multiprocessing.get_context("fork" if sys.platform == "linux" else "spawn")
    pool = (
        context.Pool(args.jobs, _worker_init, (args.threads, tracker_kwargs, args.max_steps)) if args.jobs > 1 else None
    )
    if pool is None:
        _worker_init(args.threads, tracker_kwargs, args.max_steps)
    try:
        for title, section in sections:
            t0 = time.perf_counter()
            done = run_section(section, pool)
            runs += done
            timings.append((title, len(done), time.perf_counter() - t0, sum(r.seconds for r in done)))
            print(f"   [{title}: {len(done)} runs, {timings[-1][2]:.1f} s]", file=sys.stderr, flush=True)
    finally:
        if pool is not None:
            pool.close()
            pool.join()
    t0 = time.perf_counter()
    report = Report(runs, seeds, configs)
    blocks = [
        ("Ground truth (untracked, unclipped runs)", report.ground_truth,
         "blew up: seeds whose unclipped run blew up (rule above); blow-up step: median [min, max]; L0: the untrained "
         "model's held-out loss; final: held-out loss after the last step (medians); twin: the healthy twin and what "
         "it changes; monitor = untracked: gradtrack monitor runs bitwise the same run as the untracked one."),
        ("Detection: recall on diverging runs, false alarms on healthy runs (stable scenarios and twins)",
         report.detection,
         "recall: diverging runs flagged (divergence tag, or any event); flag <= blow-up: first flag no later than "
         "the blow-up step; lead: blow-up step - first flag (positive: early); false-alarm runs: healthy runs flagged; "
         "events / 1k: per 1,000 healthy steps. A clipper's event: a step it would change (ZClip: its z-score "
         "trigger; AdaGC: a tensor clipped after its warm-up)."),
        ("Detection by scenario: flagged/N and median lead (diverging); false-alarm runs/N and events per 1k "
         "steps (stable)", report.detection_by_scenario, ""),
        ("Protection: rescue of diverging runs, cost on healthy runs, spike scores", report.protection,
         "rescued: diverging seeds whose clipped run ends finite and <= max(2 x twin, twin + 0.1 x L0); < unclipped: "
         "final below the unclipped run's (a finite one beats NaN); final / twin: median ratio; tagged: clipped "
         "runs of diverging seeds gradtrack tagged diverged; false alarms: healthy clipped runs tagged; cost: final "
         "loss against the unclipped run of the same seed in %, mean [max] (negative: clipping helped); spikes: OLMo "
         "2 spike score, stable scenarios / diverging seeds; train s: training seconds of that configuration."),
        ("Protection by scenario: rescued/N and mean cost on the healthy twins (diverging); mean cost (stable)",
         report.protection_by_scenario,
         "Cost is relative to the unclipped run's final held-out loss: a twin that converges to ~0 (lsq-edge: "
         "0.01) makes a small absolute gap a large percentage."),
    ]  # fmt: skip
    print_blocks(say, heading, blocks, args.markdown)
    say(f"\n{heading}Targets (issues 11 and 19)\n")
    for line in report.targets():
        say(("- " if args.markdown else "") + line)
    timings.append(("metrics and detection baselines (replayed on the unclipped traces)", 0,
                    time.perf_counter() - t0, 0.0))  # fmt: skip
    problems = report.warnings + [f"{r.scenario} seed {r.seed} {r.config}: {r.error}" for r in runs if r.error]
    messages = sorted({w for r in runs for w in r.warnings})
    if problems or messages:
        say(f"\n{heading}Warnings\n")
        for line in problems + [f"(raised in some runs) {m}" for m in messages[:20]]:
            say(("- " if args.markdown else "  ") + line)
    say(f"\n{heading}Wall time per section\n")
    rows = [[title, str(n), f"{wall:.1f}", f"{cpu:.1f}" if n else "-"] for title, n, wall, cpu in timings]
    rows.append(
        ["total", str(len(runs)), f"{time.perf_counter() - started:.1f}", f"{sum(r.seconds for r in runs):.1f}"]
    )
    say(table(["section", "runs", "wall s", "training s (all workers)"], rows, args.markdown))


if __name__ == "__main__":
    main()

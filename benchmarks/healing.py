"""Self-healing (issue 19): does ``on_divergence="rollback"`` rescue runs that diverge, leave healthy runs
alone, and what does it cost?

**Runs.** Every scenario of ``benchmarks/_scenarios.py`` (whatever ``SCENARIOS`` holds; ``--scenarios`` for a
subset) on 5 seeds (``--quick``: 2), each diverging scenario with its healthy twin, trained by
``detection.train`` (the plain loop, the loss observed, the same weights and batches for every
configuration of a seed) under:

* untracked, unclipped: the ground truth (``detection.blowup_step``: the loss above 10 x L0, sustained);
* ``clip="norm"`` at 1.0, ``clip="auto"``, ``on_spike="skip"`` with ``clip="norm"`` at 1.0: what protects a
  run without going back in time;
* ``on_divergence="rollback"`` with the default clip (``"norm"`` at 1.0) and with ``clip=None``, a snapshot
  every 10 healthy steps (``--every``), and with the default cadence (100) as well. Why 10: these runs
  last 200 to 300 steps and three scenarios blow up in their first 6; at 100 a run holds two or three
  snapshots in all and a rollback throws away up to a third of the run, where the default cadence in a run
  of 10^4 to 10^6 steps throws away 1% or less. 10 keeps the skipped batches (at most 20 with 2 kept) to a
  few % of these runs, and the learning-rate window (a rollback within 10 snapshot intervals of the
  previous one halves the learning rate) at 100 steps. Budget and ring: the defaults (5 rollbacks, 2 kept).

**Rescued** (the issue's rule): the final held-out loss is finite and keeps at least half of the healthy
twin's progress from the untrained loss L0, ``L0 - final >= (L0 - twin final) / 2``. ``detection.py``'s
rule (final <= ``max(2 x twin, twin + 0.1 x L0)``) is given beside it: it is stricter where the twin
converges far below L0, looser where the twin barely moves (``deep-mlp``'s twin gets from L0 = 2.2 to about 1.6).

**Healthy runs** (stable scenarios and healthy twins, whose untracked run did not blow up): rollbacks (the
target is none), divergence verdicts, whether a run that never rolled back is bitwise the run without the
option (the losses of ``clip="norm"``, or of the untracked run for ``clip=None``), and the final-loss cost
against the untracked run of the same seed.

**Cost** (``benchmarks/snapshot_cost.py``): the 16M-parameter model with Adam on the CPU.

    .venv/bin/python benchmarks/healing.py                     # 1,260 runs (~5 min on 2 workers) + cost (~3 min)
    .venv/bin/python benchmarks/healing.py --quick             # 2 seeds, 1 timed cost block: ~3 min
    .venv/bin/python benchmarks/healing.py --configs gt:auto   # one configuration (and the untracked truth)
    .venv/bin/python benchmarks/healing.py --markdown          # the tables for the docs

(Every run is seeded, so the tables do not depend on ``--jobs``, only the times do.)
"""

from __future__ import annotations

import argparse
import math
import multiprocessing
import os
import platform
import shlex
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import detection
import numpy as np
import torch
from _scenarios import SCENARIOS, Scenario
from detection import COST_HINT, Run, blowup_step, print_blocks, rescued, table
from snapshot_cost import cost_lines, cost_table
from snapshot_cost import measure as measure_cost

import gradtrack
from gradtrack.tracker import DEFAULT_ROLLBACK_BUDGET

RESCUE_TARGET = 0.80  # issue 19: rollback rescues at least 80% of the diverging runs
RESCUE_TARGET_25, HOT_TARGET = 0.85, 0.80  # issue 25: 85% of every diverging run, 80% of the too-hot held-out ones
GROUPS = (("original", lambda s: not s.held_out), ("held out (issue 19)", lambda s: s.held_out and s.group != "hot"),
          ("held out, too hot (issue 25)", lambda s: s.group == "hot"))  # fmt: skip
KEPT_PROGRESS = 0.5  # rescued: at least half of the twin's progress from L0

Key = tuple[str, int, bool]  # (scenario, seed, twin)


def configurations(every: int) -> dict[str, tuple[str, str, dict | None]]:
    """key -> (label, short column name, GradTracker keyword arguments; None: untracked)."""
    rollback = {"on_divergence": "rollback", "rollback_every": every}
    configs: dict[str, tuple[str, str, dict | None]] = {
        "untracked": ("untracked, unclipped", "none", None),
        "gt:norm": ('clip="norm", 1.0', "norm", {"clip": "norm", "max_norm": 1.0}),
        "gt:auto": ('clip="auto"', "auto", {"clip": "auto"}),
        "gt:skip": ('on_spike="skip", clip="norm" 1.0', "skip", {"clip": "norm", "max_norm": 1.0, "on_spike": "skip"}),
        "gt:rollback": (f'rollback every {every}, clip="norm" 1.0', f"rollback/{every}", rollback),
        "gt:rollback-noclip": (f"rollback every {every}, clip=None", f"rollback/{every} no clip",
                               {**rollback, "clip": None}),
    }  # fmt: skip
    if every != 100:
        configs["gt:rollback-100"] = ('rollback every 100 (default), clip="norm" 1.0', "rollback/100",
                                      {"on_divergence": "rollback"})  # fmt: skip
    return configs


ROLLBACKS = ("gt:rollback", "gt:rollback-noclip", "gt:rollback-100")
BITWISE_REFERENCE = {"gt:rollback": "gt:norm", "gt:rollback-100": "gt:norm", "gt:rollback-noclip": "untracked"}


def refused(kwargs: dict) -> str | None:
    """Why GradTracker refuses these options (a policy this version lacks), or None."""
    try:
        gradtrack.GradTracker(torch.nn.Linear(2, 2), **kwargs)
    except (TypeError, ValueError) as error:
        return str(error)
    return None


# -- runs --------------------------------------------------------------------------------------------------


class HealingLog(detection.EventLog):
    """``detection.train``'s event recorder, which also keeps the rollbacks; the newest one is ``latest``."""

    latest: HealingLog | None = None

    def __init__(self) -> None:
        super().__init__()
        self.rollbacks: list[gradtrack.Rollback] = []
        HealingLog.latest = self

    @gradtrack.hookimpl
    def gradtrack_rollback(self, event: gradtrack.Rollback) -> None:
        self.rollbacks.append(event)


@dataclass
class Outcome:
    run: Run
    rollbacks: list[tuple[int, int, float]] = field(default_factory=list)  # (step, restored step, lr scale)


_KWARGS: dict[str, dict | None] = {}


def _worker_init(threads: int, kwargs: dict[str, dict | None]) -> None:
    torch.set_num_threads(threads)
    _KWARGS.update(kwargs)
    # detection.train builds its own recorder from this name: ours keeps the rollback events as well.
    detection.EventLog = HealingLog  # type: ignore[misc]


def _job(spec: tuple[str, int, bool, str]) -> Outcome:
    scenario, seed, twin, config = spec
    HealingLog.latest = None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            run = detection.train(SCENARIOS[scenario], seed, twin, config, _KWARGS[config])
        except Exception as error:  # reported in the tables' warnings, not fatal
            run = Run(scenario, seed, twin, config, np.array([]), np.array([]), math.nan, math.nan, 0.0,
                      error=f"{type(error).__name__}: {error}")  # fmt: skip
    run.warnings = sorted({f"{w.category.__name__}: {w.message}" for w in caught})
    log = HealingLog.latest
    events: list[gradtrack.Rollback] = log.rollbacks if log is not None and run.error is None else []
    return Outcome(run, [(e.step, e.restored_step, e.lr_scale) for e in events])


def run_all(specs: list[tuple[str, int, bool, str]], jobs: int, threads: int, kwargs: dict[str, dict | None],
            progress: Callable[[int, int], None]) -> list[Outcome]:  # fmt: skip
    specs = sorted(specs, key=lambda s: -COST_HINT.get(s[0], 1.0))  # the long runs first: less idle at the end
    done: list[Outcome] = []
    if jobs <= 1:
        _worker_init(threads, kwargs)
        for spec in specs:
            done.append(_job(spec))
            progress(len(done), len(specs))
        return done
    context = multiprocessing.get_context("fork" if sys.platform == "linux" else "spawn")
    with context.Pool(jobs, _worker_init, (threads, kwargs)) as pool:
        for outcome in pool.imap_unordered(_job, specs, chunksize=1):
            done.append(outcome)
            progress(len(done), len(specs))
    return done


# -- metrics -----------------------------------------------------------------------------------------------


def kept_progress(run: Run, twin: Run) -> float:
    """The share of the twin's progress from L0 that the run keeps (NaN when the run ends non-finite)."""
    if not math.isfinite(run.final):
        return math.nan
    return (run.initial - run.final) / (twin.initial - twin.final)


def rescued_issue(run: Run, twin: Run) -> bool:
    return math.isfinite(run.final) and kept_progress(run, twin) >= KEPT_PROGRESS


def _frac(hits: int, total: int) -> str:
    return f"{hits}/{total}" if total else "-"


def _pct(values: Sequence[float]) -> str:
    """Mean and largest, in %."""
    if not values:
        return "-"
    mean, worst = statistics.fmean(values), max(values)
    return f"{mean:+.2f}% [{worst:+.1f}%]" if abs(worst) < 1000 else f"{mean:+.2e}% [{worst:+.1e}%]"


class Report:
    """Every number of the tables, computed from the outcomes."""

    def __init__(self, outcomes: list[Outcome], configs: dict[str, tuple[str, str, dict | None]], budget: int):
        self.configs = configs
        self.budget = budget
        self.by = {(o.run.scenario, o.run.seed, o.run.twin, o.run.config): o for o in outcomes}
        self.truth = {(o.run.scenario, o.run.seed, o.run.twin): blowup_step(o.run.losses, o.run.initial)
                      for o in outcomes if o.run.config == "untracked" and o.run.error is None}  # fmt: skip
        self.warnings = [f"{o.run.scenario} seed {o.run.seed}{' twin' * o.run.twin} {o.run.config}: {o.run.error}"
                         for o in outcomes if o.run.error]  # fmt: skip
        self.diverging: list[Key] = []  # main runs of diverging scenarios that blew up, with a healthy twin
        self.healthy: list[Key] = []
        for key, blowup in sorted(self.truth.items()):
            scenario, seed, twin = key
            expected = SCENARIOS[scenario].diverging and not twin
            if (blowup is not None) != expected:
                self.warnings.append(f"{scenario} seed {seed}{' twin' * twin}: the untracked run "
                                     f"{'blew up' if blowup is not None else 'did not blow up'}; left out")  # fmt: skip
            elif blowup is None:
                self.healthy.append(key)
            elif (scenario, seed, True) in self.truth and self.truth[scenario, seed, True] is None:
                self.diverging.append(key)  # rescue is measured against a healthy twin
        ran = {key[0] for key in self.truth}
        self.scenarios = [s for k, s in SCENARIOS.items() if k in ran]

    def outcome(self, key: Key, config: str) -> Outcome | None:
        found = self.by.get((*key, config))
        return found if found is not None and found.run.error is None else None

    def twin(self, key: Key) -> Run:
        found = self.outcome((key[0], key[1], True), "untracked")
        assert found is not None
        return found.run

    def columns(self) -> list[str]:
        return [k for k, (_, _, kwargs) in self.configs.items() if k == "untracked" or kwargs is not None]

    # -- table 1: rescue -------------------------------------------------------------------------------

    def rescue(self, markdown: bool) -> str:
        columns = self.columns()
        rows, totals, strict = [], dict.fromkeys(columns, 0), dict.fromkeys(columns, 0)
        for scenario in (s for s in self.scenarios if s.diverging):
            keys = [k for k in self.diverging if k[0] == scenario.key]
            steps = [self.truth[k] or 0 for k in keys]
            cells = [scenario.key, scenario.twin,
                     f"{statistics.median(steps):g} [{min(steps)}, {max(steps)}]" if steps else "-"]  # fmt: skip
            for config in columns:
                hits = [(rescued_issue(o.run, self.twin(k)), rescued(o.run, self.twin(k)))
                        for k in keys if (o := self.outcome(k, config)) is not None]  # fmt: skip
                cells.append(f"{_frac(sum(h for h, _ in hits), len(hits))} ({sum(s for _, s in hits)})")
                totals[config] += sum(h for h, _ in hits)
                strict[config] += sum(s for _, s in hits)
            rows.append(cells)
        for name, member in GROUPS:  # each group apart: the held-out ones were not used to tune anything
            hits = [self.rescued_share(c, member) for c in columns]
            if hits and hits[0][1]:
                rows.append([f"= {name}", "", "", *(f"{h}/{n} = {h / n:.0%}" for h, n in hits)])
        n = len(self.diverging)
        rows.append(["total", "", "", *(f"{totals[c]}/{n} = {totals[c] / n:.0%}" if n else "-" for c in columns)])
        rows.append(["total, detection.py's rule", "", "",
                     *(f"{strict[c]}/{n} = {strict[c] / n:.0%}" if n else "-" for c in columns)])  # fmt: skip
        headers = ["scenario", "twin changes", "blow-up step", *(self.configs[c][1] for c in columns)]
        return table(headers, rows, markdown, left=2)

    def rescued_share(self, config: str, member: Callable[[Scenario], bool] | None = None) -> tuple[int, int]:
        keys = [k for k in self.diverging if member is None or member(SCENARIOS[k[0]])]
        hits = [rescued_issue(o.run, self.twin(k)) for k in keys if (o := self.outcome(k, config)) is not None]
        return sum(hits), len(keys)

    def actions(self, markdown: bool) -> str:
        """What each rollback configuration did on the diverging runs."""
        rows = []
        for scenario in (s for s in self.scenarios if s.diverging):
            keys = [k for k in self.diverging if k[0] == scenario.key]
            for config in (c for c in ROLLBACKS if c in self.columns()):
                found = [(k, o) for k in keys if (o := self.outcome(k, config)) is not None]
                counts = [len(o.rollbacks) for _, o in found]
                firsts = [o.rollbacks[0][0] for _, o in found if o.rollbacks]
                restored = [r for _, o in found for _, r, _ in o.rollbacks]
                scales = [o.rollbacks[-1][2] for _, o in found if o.rollbacks]
                rows.append([
                    scenario.key, self.configs[config][1], _frac(sum(c > 0 for c in counts), len(found)),
                    f"{statistics.median(counts):g} [{min(counts)}, {max(counts)}]" if counts else "-",
                    f"{statistics.median(firsts):g}" if firsts else "-",
                    _frac(sum(r == 0 for r in restored), len(restored)),
                    f"{min(scales):g}" if scales else "-",
                    _frac(sum(bool(o.run.diverged) for _, o in found), len(found)),
                    f"{statistics.median(kept_progress(o.run, self.twin(k)) for k, o in found):.2f}" if found else "-",
                    _frac(sum(rescued_issue(o.run, self.twin(k)) for k, o in found), len(found)),
                ])  # fmt: skip
        headers = ["scenario", "configuration", "runs rolled back", "rollbacks: median [min, max]",
                   "first rollback step", "restores to step 0", "lowest lr scale", "judged diverged",
                   "kept progress (median)", "rescued"]  # fmt: skip
        return table(headers, rows, markdown, left=2)

    def why_not(self, key: Key, outcome: Outcome) -> str:
        """One line: why a rollback run was not rescued, from what it did."""
        run, twin, count = outcome.run, self.twin(key), len(outcome.rollbacks)
        done = f"{count} rollback{'s' * (count != 1)}" + (
            f" ({', '.join(f'{s}->{r}' for s, r, _ in outcome.rollbacks)}; lr x{outcome.rollbacks[-1][2]:g})"
            if count else "")  # fmt: skip
        blowup = self.truth[key]
        final = f"final {run.final:.3g} vs twin {twin.final:.3g}, L0 {run.initial:.3g}"
        if run.diverged and count >= self.budget:
            why = f"budget spent: {done}, then judged diverged at step {run.diverged_step}"
        elif run.diverged:
            why = (f"judged diverged at step {run.diverged_step} with budget left and no snapshot older than the "
                   f"trouble: {done}")  # fmt: skip
        elif count == 0:
            why = "never judged diverged: the clip alone kept it finite but far short of the twin"
        elif not math.isfinite(run.final) or run.final > run.initial:
            last = outcome.rollbacks[-1][0]
            again = blowup_step(run.losses[last + 1 :], run.initial)
            what = f"blew up again at step {last + 1 + again}" if again is not None else "climbed back above L0"
            why = (f"{what} after its last rollback, and the run ended at step {len(run.losses)} before the next "
                   f"verdict: {done}")  # fmt: skip
        else:
            why = f"healed ({done}) but kept {kept_progress(run, twin):.0%} of the twin's progress"
        return f"{key[0]} seed {key[1]} (untracked blew up at step {blowup}): {why}; {final}"

    def failures(self) -> list[str]:
        lines = []
        for config in (c for c in ROLLBACKS if c in self.columns()):
            missed = [(k, o) for k in self.diverging if (o := self.outcome(k, config)) is not None
                      and not rescued_issue(o.run, self.twin(k))]  # fmt: skip
            lines.append(f"{self.configs[config][0]}: {len(missed)} not rescued")
            lines += [f"  {self.why_not(k, o)}" for k, o in missed]
        return lines

    # -- table 2: healthy runs --------------------------------------------------------------------------

    def _cost(self, key: Key, outcome: Outcome) -> float:
        reference = self.truth_run(key).final
        return 100.0 * (outcome.run.final - reference) / reference

    def truth_run(self, key: Key) -> Run:
        found = self.outcome(key, "untracked")
        assert found is not None
        return found.run

    def bitwise(self, key: Key, config: str, outcome: Outcome) -> bool | None:
        reference = self.outcome(key, BITWISE_REFERENCE[config]) if config in BITWISE_REFERENCE else None
        if reference is None or outcome.rollbacks:
            return None
        return bool(np.array_equal(outcome.run.losses, reference.run.losses, equal_nan=True)
                    and outcome.run.final == reference.run.final)  # fmt: skip

    def healthy_table(self, markdown: bool) -> str:
        rows = []
        for config in self.columns()[1:]:
            found = [(k, o) for k in self.healthy if (o := self.outcome(k, config)) is not None]
            same = [b for k, o in found if (b := self.bitwise(k, config, o)) is not None]
            stable = [self._cost(k, o) for k, o in found if not k[2]]
            twins = [self._cost(k, o) for k, o in found if k[2]]
            rows.append([
                self.configs[config][0], str(len(found)),
                _frac(sum(bool(o.rollbacks) for _, o in found), len(found)) if config in ROLLBACKS else "-",
                str(sum(len(o.rollbacks) for _, o in found)) if config in ROLLBACKS else "-",
                _frac(sum(bool(o.run.diverged) for _, o in found), len(found)),
                _frac(sum(same), len(same)) if same else "-", _pct(stable), _pct(twins),
            ])  # fmt: skip
        headers = [
            "configuration",
            "healthy runs",
            "runs rolled back",
            "rollbacks",
            "judged diverged",
            "bitwise = same clip without rollback",
            "cost, stable: mean [max]",
            "cost, twins: mean [max]",
        ]
        return table(headers, rows, markdown)

    def healthy_by_scenario(self, markdown: bool) -> str:
        columns = self.columns()[1:]
        rows = []
        for scenario in self.scenarios:
            for twin in (True,) if scenario.diverging else (False,):
                keys = [k for k in self.healthy if k[0] == scenario.key and k[2] == twin]
                cells = [scenario.key + (" twin" if twin else ""), str(len(keys))]
                for config in columns:
                    found = [(k, o) for k in keys if (o := self.outcome(k, config)) is not None]
                    costs = [self._cost(k, o) for k, o in found]
                    cell = f"{statistics.fmean(costs):+.1f}%" if costs else "-"
                    rolled = sum(len(o.rollbacks) for _, o in found)
                    cells.append(cell + (f" ({rolled} rb)" if rolled else ""))
                rows.append(cells)
        return table(["healthy runs of", "seeds", *(self.configs[c][1] for c in columns)], rows, markdown)

    def healthy_rollbacks(self) -> list[str]:
        return [f"{k[0]}{' twin' * k[2]} seed {k[1]}, {self.configs[c][1]}: rolled back at "
                f"{', '.join(f'{s}->{r}' for s, r, _ in o.rollbacks)}"
                for c in ROLLBACKS for k in self.healthy
                if (o := self.outcome(k, c)) is not None and o.rollbacks]  # fmt: skip

    # -- targets -----------------------------------------------------------------------------------------

    def targets(self) -> list[str]:
        lines = []
        for config in (c for c in ROLLBACKS if c in self.columns()):
            hits, total = self.rescued_share(config)
            share = hits / total if total else 0.0
            ok = share >= RESCUE_TARGET
            lines.append(f"{'PASS' if ok else 'FAIL'}  diverging runs rescued by {self.configs[config][0]}: "
                         f"{hits}/{total} = {share:.0%} (target >= {RESCUE_TARGET:.0%})")  # fmt: skip
            if share < RESCUE_TARGET_25:
                lines.append(f"FAIL  issue 25: {hits}/{total} = {share:.0%} rescued by {self.configs[config][0]} "
                             f"(target >= {RESCUE_TARGET_25:.0%})")  # fmt: skip
            hot, hot_total = self.rescued_share(config, GROUPS[2][1])
            if hot_total:
                ok = hot / hot_total >= HOT_TARGET
                lines.append(f"{'PASS' if ok else 'FAIL'}  held-out too-hot runs (issue 25) rescued by "
                             f"{self.configs[config][0]}: {hot}/{hot_total} = {hot / hot_total:.0%} "
                             f"(target >= {HOT_TARGET:.0%})")  # fmt: skip
            found = [o for k in self.healthy if (o := self.outcome(k, config)) is not None]
            rolled = sum(bool(o.rollbacks) for o in found)
            lines.append(f"{'PASS' if rolled == 0 else 'FAIL'}  healthy runs rolled back by "
                         f"{self.configs[config][0]}: {rolled}/{len(found)} (target: none)")  # fmt: skip
        return lines


# -- main ---------------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="2 seeds and 1 timed cost block")
    parser.add_argument("--seeds", type=int, default=None, help="seeds (default 5, --quick 2)")
    parser.add_argument("--scenarios", nargs="+", choices=list(SCENARIOS), default=None, help="a subset")
    parser.add_argument("--configs", nargs="+", default=None, help="a subset of the configurations (untracked "
                        "is always run: it is the ground truth)")  # fmt: skip
    parser.add_argument("--every", type=int, default=10, help="rollback_every of the main rollback configurations")
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), help="worker processes")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    parser.add_argument("--cost-blocks", type=int, default=None, help="timed blocks of 100 steps (default 8, "
                        "--quick 1; 0 skips the cost table)")  # fmt: skip
    parser.add_argument("--markdown", action="store_true", help="markdown tables, for README.md")
    args = parser.parse_args(argv)
    os.environ.setdefault("GRADTRACK_DISABLE_PLUGIN_AUTOLOAD", "1")  # only our in-process event recorder
    torch.set_num_threads(args.threads)
    seeds = list(range(args.seeds if args.seeds is not None else (2 if args.quick else 5)))
    chosen: list[Scenario] = [SCENARIOS[k] for k in (args.scenarios or SCENARIOS)]
    cost_blocks = args.cost_blocks if args.cost_blocks is not None else (1 if args.quick else 8)
    configs = configurations(args.every)
    if args.configs:
        unknown = sorted(set(args.configs) - set(configs))
        if unknown:
            parser.error(f"--configs: unknown {', '.join(unknown)}; accepted: {', '.join(configs)}")
        configs = {k: v for k, v in configs.items() if k == "untracked" or k in args.configs}
    notes = []
    for key, (label, short, kwargs) in list(configs.items()):
        problem = refused(kwargs) if kwargs is not None else None
        if problem:
            configs[key] = (label, short, None if key != "untracked" else kwargs)
            notes.append(f"{label}: n/a ({problem})")
    kwargs_by_key = {k: kwargs for k, (_, _, kwargs) in configs.items()}
    keys = [k for k, kwargs in kwargs_by_key.items() if k == "untracked" or kwargs is not None]
    specs = [(s.key, seed, twin, c) for s in chosen for seed in seeds
             for twin in ((False, True) if s.diverging else (False,)) for c in keys]  # fmt: skip
    say = print
    heading = "## " if args.markdown else "== "
    command = shlex.join(["python", "benchmarks/healing.py", *(sys.argv[1:] if argv is None else argv)])
    say(f"{heading}gradtrack self-healing benchmark (issue 19)")
    say(f"{time.strftime('%Y-%m-%d')}, `{command}`; {detection._version()}, torch {torch.__version__}, Python "
        f"{platform.python_version()}, {os.cpu_count()} CPU cores (load average {os.getloadavg()[0]:.1f}), "
        f"{args.jobs} worker(s) x {args.threads} torch thread(s); {len(seeds)} seeds, {len(chosen)} scenarios, "
        f"{len(specs)} runs")  # fmt: skip
    for note in notes:
        say(f"  {note}")
    started = time.perf_counter()

    def progress(done: int, total: int) -> None:
        if done % 20 == 0 or done == total:
            print(f"   [{done}/{total} runs, {time.perf_counter() - started:.0f} s]", file=sys.stderr, flush=True)

    outcomes = run_all(specs, args.jobs, args.threads, kwargs_by_key, progress)
    runs_seconds = time.perf_counter() - started
    report = Report(outcomes, configs, DEFAULT_ROLLBACK_BUDGET)
    blocks = [
        ("1. Diverging runs rescued (final finite, at least half the twin's progress from L0)", report.rescue,
         "blow-up step: of the untracked run, median [min, max]. In brackets, and in the last row: rescued by "
         "detection.py's rule, final <= max(2 x twin, twin + 0.1 x L0)."),
        ("1b. What the rollback configurations did on the diverging runs", report.actions,
         "lowest lr scale: the learning-rate factor left by the last rollback (halved by each rollback within 10 "
         "snapshot intervals of the previous); kept progress: (L0 - final) / (L0 - twin final)."),
        ("2. Healthy runs (stable scenarios and healthy twins)", report.healthy_table,
         "cost: final held-out loss against the untracked run of the same seed, in % (negative: better). bitwise: "
         "runs that never rolled back whose losses equal those of the same clip without rollback."),
        ("2b. Healthy runs by scenario: mean cost, and rollbacks (rb) if any", report.healthy_by_scenario, ""),
    ]  # fmt: skip
    print_blocks(say, heading, blocks, args.markdown)
    say(f"\n{heading}Diverging runs rollback did not rescue, and why\n")
    for line in report.failures():
        say((("  - " + line.strip()) if line.startswith("  ") else "- " + line) if args.markdown else line)
    rolled = report.healthy_rollbacks()
    if rolled:
        say(f"\n{heading}Healthy runs rolled back\n")
        for line in rolled:
            say(("- " if args.markdown else "  ") + line)
    target_lines = report.targets()
    if cost_blocks > 0:
        say(f"\n{heading}3. Cost on a healthy run\n")
        began = time.perf_counter()
        cost = measure_cost(cost_blocks, threads=args.threads)
        say(f"{cost.title}; load average {os.getloadavg()[0]:.1f}; {time.perf_counter() - began:.0f} s\n")
        say(cost_table(cost, args.markdown))
        target_lines += cost_lines(cost)
    say(f"\n{heading}Targets (issue 19)\n")
    for line in target_lines:
        say(("- " if args.markdown else "") + line)
    problems = report.warnings + sorted({w for o in outcomes for w in o.run.warnings})[:20]
    if problems:
        say(f"\n{heading}Warnings\n")
        for line in problems:
            say(("- " if args.markdown else "  ") + line)
    training = sum(o.run.seconds for o in outcomes)
    say(f"\nruns: {len(outcomes)} in {runs_seconds:.0f} s wall ({training:.0f} s training); "
        f"total {time.perf_counter() - started:.0f} s")  # fmt: skip


if __name__ == "__main__":
    main()

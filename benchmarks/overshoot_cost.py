"""What the overshoot indicator (issue 25) costs a training step, and the memory it holds.

Three copies of one model train on the same batch with SGD under ``GradTracker`` (``clip="norm"``, no backend,
every other option at its default), taking turns block by block (``_timing.interleave``): the indicator off
(``overshoot_every=None``), at its default cadence (every 5 steps, every step while a recent sample is above
the edge: never here, these runs are healthy) and at every step. Per step: wall time, and the process's CPU
time (every torch thread, not only the calling one: the indicator's copies and dot products run on torch's
intra-op threads). The indicator's cost is the difference to the row without it; the target of issue 25 is at
most 2% of the step at the default cadence on the 16M-parameter (100 tensors) and 1,000-tensor models of
``benchmarks/overhead.py``. Memory: the indicator's one buffer against the parameters' bytes.

A model of more than ``gradtrack.judge.overshoot.BUDGET`` elements (2M) is sampled, not read whole;
``--agreement`` trains the models with SGD and Adam at two learning rates each and compares, on every update,
the sampled ratio with the whole model's.

    .venv/bin/python benchmarks/overshoot_cost.py            # both models, ~4 min on 2 shared cores
    .venv/bin/python benchmarks/overshoot_cost.py --quick    # small models, a smoke run
    .venv/bin/python benchmarks/overshoot_cost.py --direct --steps 30     # the indicator's own work, 1 thread
    .venv/bin/python benchmarks/overshoot_cost.py --agreement --steps 40  # sampled against whole, ~2 min
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence

import torch
from _models import MODELS
from _timing import table

from gradtrack import GradTracker

CONFIGS = {"off": None, "default (every 5)": 5, "every step": 1}
TARGET = 0.02


def _steps(model_key: str, quick: bool) -> tuple[str, dict[str, Callable[[], None]], list[GradTracker], int, int]:
    spec = MODELS[model_key]
    base, x, y = spec.make(quick, torch.device("cpu"))
    tasks, trackers = {}, []
    for name, every in CONFIGS.items():
        model = copy.deepcopy(base)
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-4)
        tracker = GradTracker(model, optimizer=optimizer, clip="norm", max_norm=1.0, overshoot_every=every)
        tracker.__enter__()
        trackers.append(tracker)

        def step(model: torch.nn.Module = model, optimizer: torch.optim.Optimizer = optimizer,
                 tracker: GradTracker = tracker) -> None:  # fmt: skip
            optimizer.zero_grad(set_to_none=True)
            loss = torch.nn.functional.mse_loss(model(x), y)
            loss.backward()
            tracker.observe(loss=loss)
            optimizer.step()

        tasks[name] = step
    params = list(base.parameters())
    return spec.title, tasks, trackers, len(params), sum(p.numel() * p.element_size() for p in params)


def _interleave(tasks: dict[str, Callable[[], None]], calls: int, warmup: int, block: int) -> dict[str, tuple]:
    """Blocks of ``block`` calls in turn, starting one later each round; per call wall and process CPU s."""
    wall: dict[str, list[float]] = {name: [] for name in tasks}
    cpu: dict[str, list[float]] = {name: [] for name in tasks}
    names, done, rounds = list(tasks), dict.fromkeys(tasks, -warmup), 0
    while any(done[name] < calls for name in names):
        start = rounds % len(names)
        for name in names[start:] + names[:start]:
            for _ in range(block):
                if done[name] >= calls:
                    break
                begin, begin_cpu = time.perf_counter(), time.process_time()
                tasks[name]()
                elapsed, used = time.perf_counter() - begin, time.process_time() - begin_cpu
                if done[name] >= 0:
                    wall[name].append(elapsed)
                    cpu[name].append(used)
                done[name] += 1
        rounds += 1
    return {name: (statistics.fmean(wall[name]) * 1e3, statistics.fmean(cpu[name]) * 1e3) for name in names}


def direct(model_key: str, quick: bool, rounds: int, budget: int | None) -> tuple[str, float, float, int, int]:
    """The indicator's own work timed apart from the step, interleaved with it, one torch thread, thread CPU
    time (robust to other processes on the machine): the median step (forward, backward, clip, SGD) and the
    median sample (the copy before the update, the subtraction and first dot products after it, the second
    dot products at the next measurement)."""
    from gradtrack.judge.overshoot import OvershootProbe

    spec = MODELS[model_key]
    model, x, y = spec.make(quick, torch.device("cpu"))
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4)
    params = list(model.parameters())
    order, key = list(range(len(params))), tuple(map(id, params))
    probe = OvershootProbe(budget)
    steps, samples = [], []
    for round_ in range(rounds + 2):
        begin = time.thread_time()
        optimizer.zero_grad(set_to_none=True)
        torch.nn.functional.mse_loss(model(x), y).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True)
        grads = [p.grad for p in params]
        middle = time.thread_time()
        probe.arm(params, key, order)  # the indicator: before the update ...
        arm = time.thread_time() - middle
        begin_update = time.thread_time()
        optimizer.step()
        update = time.thread_time() - begin_update
        after = time.thread_time()
        probe.after_update(params, grads)  # ... after it ...
        sample = arm + time.thread_time() - after
        after = time.thread_time()
        probe.dots(grads, key)  # ... and at the next measurement (here on the same gradients: the same work)
        sample += time.thread_time() - after
        if round_ >= 2:
            steps.append(middle - begin + update)
            samples.append(sample)
    param_bytes = sum(p.numel() * p.element_size() for p in params)
    return spec.title, statistics.median(steps) * 1e3, statistics.median(samples) * 1e3, probe.nbytes, param_bytes


AGREEMENT_RUNS = {
    "SGD lr 0.05": (torch.optim.SGD, 0.05),
    "SGD lr 0.5": (torch.optim.SGD, 0.5),
    "Adam lr 1e-4": (torch.optim.Adam, 1e-4),
    "Adam lr 3e-3": (torch.optim.Adam, 3e-3),
}


def agreement(model_key: str, quick: bool, steps: int, budget: int | None) -> list[list[str]]:
    """The sampled ratio (``BUDGET`` elements a sample) against the whole model's on the same updates: each
    step of a real training run armed in two probes, one reading the model whole."""
    from gradtrack.judge.overshoot import BUDGET, EDGE, PERSIST, WINDOW, OvershootProbe, ratios

    rows = []
    for name, (kind, lr) in AGREEMENT_RUNS.items():
        torch.manual_seed(0)
        model, x, y = MODELS[model_key].make(quick, torch.device("cpu"))
        optimizer = kind(model.parameters(), lr=lr)
        params = list(model.parameters())
        order, key = list(range(len(params))), tuple(map(id, params))
        elements = budget or (BUDGET if not quick else sum(p.numel() for p in params) // 8)  # quick: sampled too
        sampled, whole = OvershootProbe(elements), OvershootProbe(1 << 62)
        pairs = []
        for _ in range(steps):
            optimizer.zero_grad(set_to_none=True)
            torch.nn.functional.mse_loss(model(x), y).backward()
            grads = [p.grad for p in params]
            values = []
            for probe in (sampled, whole):
                dots = probe.dots(grads, key)
                if dots is not None:
                    values.append(ratios(dots[0].numpy(), dots[1].numpy(), 1.0)[0])
                probe.arm(params, key, order)
            if len(values) == 2 and all(map(math.isfinite, values)):
                pairs.append((values[0], values[1]))
            optimizer.step()
            for probe in (sampled, whole):
                probe.after_update(params, grads)
        errors = [abs(a / b - 1) for a, b in pairs]
        flips = sum((a > EDGE) != (b > EDGE) for a, b in pairs)
        # what the warning acts on: PERSIST of the last WINDOW samples above the edge, by either ratio
        judged = [[sum(pair[side] > EDGE for pair in pairs[end - WINDOW : end]) >= PERSIST for side in (0, 1)]
                  for end in range(WINDOW, len(pairs) + 1)]  # fmt: skip
        persistent = sum(whole for _, whole in judged)
        disagree = sum(mine != whole for mine, whole in judged)
        rows.append([name, f"{len(pairs)}", f"{statistics.median(b for _, b in pairs):.3g}",
                     f"{statistics.median(errors):.2%}", f"{max(errors):.2%}", f"{flips}",
                     f"{disagree} of {len(judged)} ({persistent})",
                     f"{sampled.nbytes / 2**20:.1f} / {whole.nbytes / 2**20:.1f} MiB"])  # fmt: skip
    return rows


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small models, few steps")
    parser.add_argument("--models", nargs="+", default=["wide", "many"], choices=list(MODELS))
    parser.add_argument("--steps", type=int, default=None, help="timed steps per configuration (default 150)")
    parser.add_argument("--block", type=int, default=10, help="steps per block (a multiple of 5 is fair)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--markdown", action="store_true")
    parser.add_argument("--direct", action="store_true", help="only the indicator's own work against the step's, "
                        "one torch thread, thread CPU time (robust on a loaded machine)")  # fmt: skip
    parser.add_argument("--agreement", action="store_true", help="the sampled ratio against the whole model's")
    parser.add_argument("--budget", type=int, default=None, help="elements a sample reads (default: the library's "
                        "BUDGET): to weigh a sample's cost against its accuracy")  # fmt: skip
    args = parser.parse_args(argv)
    os.environ.setdefault("GRADTRACK_DISABLE_PLUGIN_AUTOLOAD", "1")
    torch.set_num_threads(1 if args.direct else args.threads)
    steps = args.steps or (20 if args.quick else 150)
    command = " ".join(["python", "benchmarks/overshoot_cost.py", *(sys.argv[1:] if argv is None else argv)])
    print(f"{time.strftime('%Y-%m-%d')}, `{command}`; torch {torch.__version__}, Python {platform.python_version()}, "
          f"{os.cpu_count()} CPU cores (load average {os.getloadavg()[0]:.1f}), "
          f"{torch.get_num_threads()} torch thread(s), "
          f"{steps} timed steps per configuration in blocks of {args.block}\n")  # fmt: skip
    rows, verdicts = [], []
    if args.agreement:
        for key in args.models:
            print(f"{MODELS[key].title}, {steps} steps a run:\n")
            headers = ["run", "samples", "whole: median ratio", "sampled vs whole: median error", "max error",
                       "either side of 2 alone", "persistent overshoot judged alone (whole: judged)",
                       "buffer sampled / whole"]  # fmt: skip
            print(table(headers, agreement(key, args.quick, steps, args.budget), args.markdown))
            print()
        return
    if args.direct:
        torch.set_num_threads(1)
        for key in args.models:
            title, step, sample, buffer, param_bytes = direct(key, args.quick, steps, args.budget)
            share = sample / 5 / step
            rows.append([title, f"{step:.2f}", f"{sample:.2f}", f"{share:.2%}", f"{sample / step:.1%}",
                         f"{buffer / 2**20:.1f} MiB = {buffer / param_bytes:.2f} x"])  # fmt: skip
            verdicts.append(f"{'PASS' if share <= TARGET else 'FAIL'}  {title}: the indicator at its default "
                            f"cadence (a sample every 5 steps) costs {share:.2%} of the step "
                            f"(target <= {TARGET:.0%})")  # fmt: skip
        print(table(["model", "step CPU ms", "one sample CPU ms", "every 5 steps", "every step", "buffer"], rows,
                    args.markdown))  # fmt: skip
        print()
        for line in verdicts:
            print(("- " if args.markdown else "") + line)
        return
    for key in args.models:
        title, tasks, trackers, tensors, param_bytes = _steps(key, args.quick)
        try:
            times = _interleave(tasks, steps, warmup=args.block, block=args.block)
            buffer = max(t._pipeline.probe.nbytes for t in trackers)
        finally:
            for tracker in trackers:
                tracker.__exit__(None, None, None)
        off_wall, off_cpu = times["off"]
        for name, (wall, cpu) in times.items():
            rows.append([f"{title}" if name == "off" else "", name, f"{wall:.2f}", f"{wall / off_wall - 1:+.1%}",
                         f"{cpu:.2f}", f"{cpu / off_cpu - 1:+.1%}"])  # fmt: skip
        wall, cpu = times["default (every 5)"]
        extra = cpu / off_cpu - 1
        verdicts.append(f"{'PASS' if extra <= TARGET else 'FAIL'}  {title}: the indicator at its default cadence "
                        f"costs {extra:+.1%} of the step's CPU time ({wall / off_wall - 1:+.1%} wall; target <= "
                        f"{TARGET:.0%})")  # fmt: skip
        verdicts.append(f"NOTE  {title}: {tensors:,} tensors; its buffer holds {buffer / 2**20:.1f} MiB = "
                        f"{buffer / param_bytes:.2f} x the parameters' {param_bytes / 2**20:.1f} MiB "
                        "(target: <= 1)")  # fmt: skip
    headers = ["model", "overshoot indicator", "step ms", "vs off", "process CPU ms", "vs off"]
    print(table(headers, rows, args.markdown))
    print()
    for line in verdicts:
        print(("- " if args.markdown else "") + line)


if __name__ == "__main__":
    main()

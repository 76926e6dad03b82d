"""gradtrack's overhead against what users would otherwise run (issues 5 and 17); ``make bench`` runs it.

Every configuration trains its own identical copy of the model on the same batch; configurations take
turns block by block (A B C A B C ...), warm-up steps are dropped, and means over every timed call are
compared, so the rarer steps (per-layer norms every ``layer_every``, the weights' norms every
``weight_every``) count as often as they happen. Two kinds of numbers:

* **hook**: the gradient handling alone on the same gradients (restored before every call, untimed):
  ``clip_grad_norm_`` for (2), the seed's loop for (3), ``tracker.step()`` for gradtrack, which is
  exactly the work its optimizer hook does (statistics, clipping, detection, hand-over); given as the
  calling thread's CPU time (``time.thread_time``: what it costs the training thread, whatever else the
  machine's cores do) beside wall time;
* **step**: the whole training step (forward, backward, handling, SGD step), wall time.

``drain`` is the time spent after each block waiting for a backend to empty gradtrack's queue (not
part of the step time; large values mean the backend cannot keep up with one record per step).

    .venv/bin/python benchmarks/overhead.py --quick        # < 1 minute: the 1,000-tensor model, small, no server
    .venv/bin/python benchmarks/overhead.py                # the full tables (a few minutes)
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import os
import platform
import shutil
import sys
import tempfile
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from _configs import CONFIGS, Config, Tracked, TrackedMlflowHttp, backend_problem
from _models import MODELS, tensor_list
from _timing import Clock, Samples, count_syncs, interleave, table

from gradtrack import GradTracker
from gradtrack_testing.mlflow_server import MlflowServer
from gradtrack_testing.seed import detect_exploding_gradients

LABELS = {
    "bare": "1", "clip": "2", "seed": "3", "watch": "4", "gradtrack": "5", "gradtrack-l10": "5b",
    "mlflow-http": "6a", "mlflow-sqlite": "6b", "mlflow-sqlite-l10": "6c", "wandb": "7",
}  # fmt: skip
OPEN_LAST = ("watch",)  # the W&B backend must start before wandb.watch's run is the active one


@dataclass
class ModelResult:
    key: str
    title: str
    steps: dict[str, Samples] = field(default_factory=dict)
    hooks: dict[str, Samples] = field(default_factory=dict)
    syncs: dict[str, int | None] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def step_ratio(self, key: str, base: str) -> float | None:
        """Mean wall time of a whole step against ``base``'s (per-layer steps included)."""
        if key in self.steps and base in self.steps:
            return self.steps[key].mean_ms / self.steps[base].mean_ms
        return None

    def hook_ratio(self, key: str, base: str = "clip", cpu: bool = True) -> float | None:
        """Mean thread CPU time (or wall time) of the gradient handling against ``base``'s."""
        if key in self.hooks and base in self.hooks:
            mine, theirs = self.hooks[key], self.hooks[base]
            return mine.cpu_mean_ms / theirs.cpu_mean_ms if cpu else mine.mean_ms / theirs.mean_ms
        return None


def _x(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def _ms(samples: Samples | None, cpu: bool = False) -> str:
    if samples is None:
        return "-"
    return f"{samples.cpu_mean_ms if cpu else samples.mean_ms:.3f}"


def _restore(params: Sequence[torch.nn.Parameter], reference: Sequence[torch.Tensor]) -> None:
    for param, grad in zip(params, reference, strict=True):
        if param.grad is None:
            param.grad = grad.clone()
    torch._foreach_copy_([p.grad for p in params], list(reference))  # type: ignore[misc]


def bench_model(model_key: str, keys: list[str], args: argparse.Namespace, workdir: Path, uri: str) -> ModelResult:
    spec = MODELS[model_key]
    device, clock = torch.device(args.device), Clock(torch.device(args.device))
    base, x, y = spec.make(args.quick, device)
    tensors, numel = len(list(base.parameters())), sum(p.numel() for p in base.parameters())
    result = ModelResult(model_key, f"{spec.title}: {tensors:,} tensors, {numel / 1e6:.2f}M parameters")
    configs: dict[str, Config] = {}
    for key in sorted(keys, key=lambda k: k in OPEN_LAST):
        config = CONFIGS[key](copy.deepcopy(base), x, y, workdir / model_key / key)
        config.workdir.mkdir(parents=True, exist_ok=True)
        if isinstance(config, TrackedMlflowHttp) and key == "mlflow-http":
            config.uri = uri
        try:
            config.open()
        except Exception as exc:
            result.notes.append(f"({LABELS[key]}) skipped: could not start: {type(exc).__name__}: {exc}")
            continue
        configs[key] = config
    configs = {key: configs[key] for key in keys if key in configs}
    try:
        settle = {k: c.settle for k, c in configs.items()}
        result.steps = interleave(
            {k: c.train_step for k, c in configs.items()}, clock, args.steps, args.warmup, args.block,
            settle=settle, limits={"watch": args.slow_steps, "seed": args.slow_steps},
        )  # fmt: skip
        torch.nn.functional.mse_loss(base(x), y).backward()
        reference = [p.grad.detach().clone() for p in base.parameters()]  # type: ignore[union-attr]
        hooked = {k: c for k, c in configs.items() if c.has_hook and not (k == "seed" and args.skip_seed_hook)}
        prepare = {k: (lambda c=c: _restore(c.params, reference)) for k, c in hooked.items()}
        result.hooks = interleave(
            {k: c.hook for k, c in hooked.items()}, clock, args.hook_calls, args.warmup, args.block,
            prepare=prepare, settle={k: settle[k] for k in hooked},
        )  # fmt: skip
        for key, config in hooked.items():
            if isinstance(config, Tracked):
                prepare[key]()
                result.syncs[key] = count_syncs(config.hook, device)
    finally:
        for config in reversed(configs.values()):
            try:
                config.close()
            except Exception as exc:
                result.notes.append(f"closing {config.title} failed: {type(exc).__name__}: {exc}")
    return result


def model_table(result: ModelResult, markdown: bool) -> str:
    headers = ["configuration", "step ms", "vs (1)", "vs (2)", "hook CPU ms", "vs (2)", "hook wall ms", "vs (2)",
               "drain ms/step"]  # fmt: skip
    if any(v is not None for v in result.syncs.values()):
        headers.append("syncs/step")
    rows = []
    for key, samples in result.steps.items():
        row = [
            f"({LABELS[key]}) {CONFIGS[key].title}",
            _ms(samples),
            _x(result.step_ratio(key, "bare")),
            _x(result.step_ratio(key, "clip")),
            _ms(result.hooks.get(key), cpu=True),
            _x(result.hook_ratio(key)),
            _ms(result.hooks.get(key)),
            _x(result.hook_ratio(key, cpu=False)),
            f"{samples.settle_ms_per_call:.2f}" if issubclass(CONFIGS[key], Tracked) else "-",
        ]
        if len(headers) > 9:
            row.append(str(result.syncs.get(key, "-")))
        rows.append(row)
    return table(headers, rows, markdown)


def _scaling_row(count: int, args: argparse.Namespace) -> list[str]:
    device, clock = torch.device(args.device), Clock(torch.device(args.device))
    owners = {key: tensor_list(count, args.numel, device) for key in ("clip", "gt1", "gt10", "seed")}
    reference = [p.grad.detach().clone() for p in owners["clip"]]  # type: ignore[union-attr]
    with contextlib.ExitStack() as stack:
        gt1 = stack.enter_context(GradTracker(owners["gt1"], clip="norm", layer_every=1))
        gt10 = stack.enter_context(GradTracker(owners["gt10"], clip="norm", layer_every=10))
        clip_params = list(owners["clip"])
        tasks = {
            "clip": lambda: torch.nn.utils.clip_grad_norm_(clip_params, 1.0, foreach=True),
            "gt1": gt1.step,
            "gt10": gt10.step,
        }
        if not (args.quick and count > 1000):
            tasks["seed"] = lambda: detect_exploding_gradients(owners["seed"])
        prepare = {k: (lambda k=k: _restore(list(owners[k]), reference)) for k in tasks}
        calls = max(5, args.hook_calls // (4 if count >= 10_000 else 1))
        samples = interleave(tasks, clock, calls, args.warmup, args.block, prepare=prepare)
    clip_ms = samples["clip"].cpu_mean_ms
    row = [f"{count:,}", f"{clip_ms:.3f}"]
    for key in ("gt1", "gt10", "seed"):
        ms = samples[key].cpu_mean_ms if key in samples else None
        row += ["-", "-"] if ms is None else [f"{ms:.3f}", f"{ms / clip_ms:.2f}x"]
    row.append(f"{samples['gt10'].cpu_mean_ms * 1e3 / count:.2f}")
    return row


def scaling(args: argparse.Namespace) -> list[list[str]]:
    """Hook cost per step as the number of tensors grows, each tensor ``args.numel`` elements."""
    return [_scaling_row(count, args) for count in args.tensors]


# Issue 17's targets for gradtrack's own work at default options, by model: its hook's thread CPU time
# against clip_grad_norm_'s (mean over every step, per-layer ones included).
HOOK_TARGETS = {"wide": 1.0, "many": 1.0, "rnn": 1.3}


def targets(results: list[ModelResult]) -> list[str]:
    lines = []

    def line(ok: bool, model: str, what: str, value: float, target: str) -> None:
        lines.append(f"[{'PASS' if ok else 'FAIL'}] {model}: {what} = {value:.2f}x; target {target}")

    for r in results:
        ratio = r.hook_ratio("gradtrack-l10")
        if ratio is not None and r.key in HOOK_TARGETS:
            bound = HOOK_TARGETS[r.key]
            line(ratio <= bound, r.key, "hook CPU (5b) default / hook CPU (2)", ratio, f"<= {bound:.2f}x")
        ratio = r.step_ratio("gradtrack-l10", "clip")
        if ratio is not None:
            line(ratio <= 1.02, r.key, "step (5b) default / step (2)", ratio, "<= 1.02x")
        ratio = r.hook_ratio("gradtrack")
        if ratio is not None:
            line(ratio <= 1.3, r.key, "hook CPU (5) layer_every=1 / hook CPU (2)", ratio, "<= 1.30x")
        ratio = r.hook_ratio("mlflow-sqlite-l10")  # issue 5: a backend at the default cadence
        if ratio is not None:
            line(ratio <= 1.15, r.key, "hook CPU (6c) / hook CPU (2)", ratio, "<= 1.15x")
    for r in results:
        for key in ("gradtrack", "wandb"):
            if r.key == "many" and "watch" in r.steps and key in r.steps:
                speedup = r.steps["watch"].mean_ms / r.steps[key].mean_ms
                line(speedup >= 15, r.key, f"step (4) / step ({LABELS[key]})", speedup, ">= 15x")
    return lines


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small models and few steps (< 1 minute)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--models", default=None, help=f"comma-separated, of {list(MODELS)} (--quick: many)")
    parser.add_argument("--configs", default=None, help=f"comma-separated, of {list(CONFIGS)} (default: all)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per configuration and model")
    parser.add_argument("--slow-steps", type=int, default=None, help="timed steps of (3) and (4), which are slow")
    parser.add_argument("--hook-calls", type=int, default=None, help="timed hook calls per configuration")
    parser.add_argument("--warmup", type=int, default=None, help="untimed calls per configuration first")
    parser.add_argument("--block", type=int, default=None, help="consecutive calls of one configuration")
    parser.add_argument("--tensors", default=None, help="scaling table sizes (default 10,100,1000,10000; '' skips)")
    parser.add_argument("--numel", type=int, default=256, help="elements per tensor in the scaling table")
    parser.add_argument("--no-server", action="store_true", help="skip (6a), the MLflow server (default in --quick)")
    parser.add_argument("--skip-seed-hook", action="store_true", help="do not time the seed loop's hook alone")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--markdown", action="store_true", help="print GitHub markdown tables")
    args = parser.parse_args(argv)
    quick = args.quick
    args.steps = args.steps or (6 if quick else 60)
    args.slow_steps = args.slow_steps or (3 if quick else 15)
    args.hook_calls = args.hook_calls or (20 if quick else 200)
    args.warmup = args.warmup if args.warmup is not None else (2 if quick else 5)
    args.block = args.block or (2 if quick else 5)
    tensors = args.tensors if args.tensors is not None else ("10,100,1000" if quick else "10,100,1000,10000")
    args.tensors = [int(t) for t in tensors.split(",") if t]
    args.models = [m for m in (args.models or ("many" if quick else ",".join(MODELS))).split(",") if m]
    args.configs = [c for c in args.configs.split(",") if c] if args.configs else list(CONFIGS)
    if quick:
        args.no_server = True
    for name, known in (("model", MODELS), ("config", CONFIGS)):
        unknown = set(getattr(args, f"{name}s")) - set(known)
        if unknown:
            parser.error(f"unknown {name}(s) {sorted(unknown)}; choose from {list(known)}")
    return args


def machine(device: torch.device) -> str:
    load = os.getloadavg() if hasattr(os, "getloadavg") else ("?",)
    gpu = f", {torch.cuda.get_device_name(device)}" if device.type == "cuda" else ""
    return (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs (torch threads "
        f"{torch.get_num_threads()}){gpu}; torch {torch.__version__}; Python {platform.python_version()}; "
        f"load average {' '.join(f'{v:.2f}' for v in load)}"  # type: ignore[union-attr]
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("WANDB_SILENT", "true")
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(f"gradtrack overhead benchmark on {device}: {machine(device)}")
    print(
        f"{'quick' if args.quick else 'full'} run: {args.steps} timed steps and {args.hook_calls} hook calls per "
        f"configuration, {args.warmup} warm-up, interleaved in blocks of {args.block}; means over every timed call\n"
    )
    keys, notes = [], []
    for key in args.configs:
        problem = backend_problem(key)
        if problem is None:
            keys.append(key)
        else:
            notes.append(f"({LABELS[key]}) {CONFIGS[key].title}: skipped, {problem}")
    if args.no_server and "mlflow-http" in keys:
        keys.remove("mlflow-http")
        notes.append(f"({LABELS['mlflow-http']}) skipped: no MLflow server in this run (--quick / --no-server)")
    workdir = Path(tempfile.mkdtemp(prefix="gradtrack-bench-"))
    results: list[ModelResult] = []
    try:
        with contextlib.ExitStack() as stack:
            uri = ""
            if "mlflow-http" in keys:
                try:
                    uri = stack.enter_context(MlflowServer(workdir / "mlflow-server")).uri
                except Exception as exc:
                    keys.remove("mlflow-http")
                    notes.append(f"(6a) skipped: MLflow server did not start: {exc}")
            for model_key in args.models:
                began = time.monotonic()
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", DeprecationWarning)
                    result = bench_model(model_key, keys, args, workdir, uri)
                results.append(result)
                print(f"## {result.title} ({time.monotonic() - began:.0f} s)\n")
                print(model_table(result, args.markdown))
                for note in result.notes:
                    print(f"  note: {note}")
                print(flush=True)
        if args.tensors:
            rows = scaling(args)
            print(f"## Scaling: hook cost per step vs number of tensors ({args.numel} elements each)\n")
            headers = ["tensors", "(2) clip ms", "(5) gradtrack ms", "vs (2)", "(5b) layer_every=10 ms", "vs (2)",
                       "(3) seed ms", "vs (2)", "(5b) us/tensor"]  # fmt: skip
            print(table(headers, rows, args.markdown) + "\n")
        print("## Targets (issues 5 and 17)\n")
        for line in targets(results):
            print(line)
        for note in notes:
            print(f"note: {note}")
        print(f"\nload average at the end: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    finally:
        if "wandb" in sys.modules:
            sys.modules["wandb"].teardown()
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""gradtrack inside DeepSpeed engines (issue 24): ZeRO 1, 2 and 3 on 2 gloo ranks, against the same engine alone.

(Not named ``deepspeed.py``: run as a script, it would shadow the ``deepspeed`` package.)

For each stage and model, two identical engines with DeepSpeed's own clipping on (``gradient_clipping=1.0``) train
the same batches; one is tracked (``GradTracker(engine)``, default options, no backend: what the training process
pays). They take turns block by block (A B A B ...), the first block of each dropped; each step is timed on both
ranks between barriers (the slower rank's time counts, wall and the training thread's CPU time). Reported:

* the step time of the tracked engine over the untracked one (median of per-step ratios' numerators and
  denominators: median tracked / median bare), wall and thread CPU;
* collectives per step, counted by wrapping ``torch.distributed``'s collectives during one step of each engine:
  gradtrack's extra is the difference;
* the agreement of ``grad/total_norm`` with the norm an untracked engine computes itself
  (``engine.get_global_grad_norm()``) on the same batches: the largest relative difference over 8 steps. (A
  tracked engine's own ``get_global_grad_norm()`` is gradtrack's norm: at ZeRO 1-3 gradtrack answers
  DeepSpeed's norm all-reduce, so that comparison would be exact by construction.)

Targets: <= 1.05x the engine's step, <= 1 extra collective per step, agreement within 1e-5 relative.

    .venv/bin/python benchmarks/deepspeed_zero.py                      # ZeRO 1-3, a 100-tensor and a 10-tensor model
    .venv/bin/python benchmarks/deepspeed_zero.py --stages 2 --steps 40
"""

from __future__ import annotations

import argparse
import functools
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn


def _model(layers: int, width: int) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(*[nn.Sequential(nn.Linear(width, width), nn.Tanh()) for _ in range(layers)])


def _step(engine: Any, x: torch.Tensor) -> None:
    engine.backward(engine(x).square().mean())
    engine.step()


def _case(stage: int, layers: int, width: int, args: argparse.Namespace) -> dict[str, Any]:
    import torch.distributed as dist

    from gradtrack import GradTracker
    from gradtrack_testing import ranks
    from gradtrack_testing.deepspeed import config, engine
    from gradtrack_testing.recording import RecordingBackend

    ds_config = config(stage, clip=1.0, micro_batch=args.batch)
    rank = dist.get_rank()
    generator = torch.Generator().manual_seed(rank)
    batches = [torch.randn(args.batch, width, generator=generator) for _ in range(8)]
    bare, tracked = engine(_model(layers, width), ds_config), engine(_model(layers, width), ds_config)
    result: dict[str, Any] = {"stage": stage, "tensors": 2 * layers, "width": width}
    # agreement: gradtrack's norm (which DeepSpeed then uses instead of its own all-reduce) against the norm an
    # untracked engine computes itself, on the same batches from the same start
    checked, alone = engine(_model(layers, width), ds_config), engine(_model(layers, width), ds_config)
    recorder = RecordingBackend()
    ds_norms = []
    with GradTracker(checked, backend=recorder):
        for x in batches:
            _step(checked, x)
            _step(alone, x)
            ds_norms.append(float(alone.get_global_grad_norm()))
    ours = [s.total_norm for s in recorder.of("step")]
    result["agreement"] = None  # only rank 0 reports: its recording is the run's
    if rank == 0:
        if len(ours) != len(ds_norms):
            raise RuntimeError(f"gradtrack recorded {len(ours)} steps of {len(ds_norms)}")
        result["agreement"] = max(abs(a - b) / b for a, b in zip(ours, ds_norms, strict=True))
    times: dict[str, list[float]] = {"bare": [], "tracked": []}
    cpu: dict[str, list[float]] = {"bare": [], "tracked": []}
    with GradTracker(tracked):
        for name, built in (("bare", bare), ("tracked", tracked)):
            _step(built, batches[0])  # warm
            with ranks.collectives() as count:
                _step(built, batches[1])
            result[f"collectives_{name}"] = count[0]
        for block in range(args.steps // args.block + 1):
            for name, built in (("bare", bare), ("tracked", tracked)):
                for index in range(args.block):
                    x = batches[index % len(batches)]
                    dist.barrier()
                    start, start_cpu = time.perf_counter(), time.thread_time()
                    _step(built, x)
                    elapsed, elapsed_cpu = time.perf_counter() - start, time.thread_time() - start_cpu
                    if block:  # the first block of each is warm-up
                        times[name].append(elapsed)
                        cpu[name].append(elapsed_cpu)
    result["times"], result["cpu"] = times, cpu
    return result


def _worker(args: argparse.Namespace, rank: int, world: int) -> dict[str, Any]:
    cases = []
    for stage in args.stages:
        for layers, width in args.models:
            cases.append(_case(stage, layers, width, args))
    return {"cases": cases}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stages", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--models", type=str, nargs="+", default=["50x256", "5x16"],
                        help="LAYERSxWIDTH: Linear layers (2 tensors each) of WIDTH")  # fmt: skip
    parser.add_argument("--steps", type=int, default=60, help="timed steps per engine")
    parser.add_argument("--block", type=int, default=10)
    parser.add_argument("--batch", type=int, default=32)
    args = parser.parse_args()
    args.models = [tuple(int(v) for v in model.split("x")) for model in args.models]
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from gradtrack_testing.deepspeed import spawn

    with tempfile.TemporaryDirectory() as out:
        ranks = spawn(functools.partial(_worker, args), 2, Path(out))
    import deepspeed

    print(f"DeepSpeed {deepspeed.__version__}, torch {torch.__version__}, 2 gloo ranks on {os.cpu_count()} CPUs "
          f"({platform.processor() or platform.machine()}); DeepSpeed clips at 1.0, gradtrack watches with its "
          f"defaults, no backend; {args.steps} timed steps per engine in blocks of {args.block}")  # fmt: skip
    header = (f"{'ZeRO':>4} {'tensors':>7} {'width':>5} {'bare ms':>8} {'gradtrack ms':>12} {'wall x':>7} "
              f"{'thread CPU x':>12} {'collectives':>11} {'extra':>5} {'norm rel diff':>13}")  # fmt: skip
    print(header)
    print("-" * len(header))
    for case0, case1 in zip(ranks[0]["cases"], ranks[1]["cases"], strict=True):
        slowest = {name: [max(a, b) for a, b in zip(case0["times"][name], case1["times"][name], strict=True)]
                   for name in ("bare", "tracked")}  # fmt: skip
        bare, tracked = statistics.median(slowest["bare"]), statistics.median(slowest["tracked"])
        cpu_bare = statistics.median(case0["cpu"]["bare"] + case1["cpu"]["bare"])
        cpu_tracked = statistics.median(case0["cpu"]["tracked"] + case1["cpu"]["tracked"])
        extra = case0["collectives_tracked"] - case0["collectives_bare"]
        print(f"{case0['stage']:>4} {case0['tensors']:>7} {case0['width']:>5} {bare * 1e3:8.2f} {tracked * 1e3:12.2f} "
              f"{tracked / bare:6.3f}x {cpu_tracked / cpu_bare:11.3f}x {case0['collectives_tracked']:>11} "
              f"{extra:>5} {case0['agreement']:13.1e}")  # fmt: skip


if __name__ == "__main__":
    main()

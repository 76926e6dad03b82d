"""gradtrack on FSDP2 against torch's own clipping of DTensor gradients, two ranks over gloo.

Every configuration handles the same sharded gradients (computed once, restored before each call):

* (1) ``torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)`` on the DTensor gradients: torch's
  FSDP2 recipe, whose one all-reduce happens when the partial total norm is redistributed;
* (2) the per-parameter ``full_tensor()`` norms gradtrack used before (one collective per tensor);
* (3) ``tracker.step()``: gradtrack's local norms, one all-reduce, clipping, one host transfer,
  detection and the step record, with per-layer norms every step and no backend.

Configurations take turns in blocks, warm-up dropped; medians over both ranks' slowest. Collectives
per call are counted with ``CommDebugMode``. Usage: ``python benchmarks/fsdp2.py [--layers 48] [--calls 60]``
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn


def _model(layers: int, width: int) -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Sequential(nn.Linear(width, width), nn.Tanh()) for _ in range(layers)])
    for block in model:
        fully_shard(block)
    fully_shard(model)
    return model


def _worker(rank: int, world: int, args: argparse.Namespace, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{out}/rendezvous", rank=rank, world_size=world)
    torch.set_num_threads(1)
    from torch.distributed.tensor.debug import CommDebugMode

    from gradtrack import GradTracker

    model = _model(args.layers, args.width)
    torch.manual_seed(rank)
    model(torch.randn(32, args.width)).square().mean().backward()
    params = list(model.parameters())
    saved = [p.grad.to_local().clone() for p in params]

    def restore() -> None:
        for p, grad in zip(params, saved, strict=True):
            p.grad.to_local().copy_(grad)

    def torch_clip() -> None:
        torch.nn.utils.clip_grad_norm_(params, 1.0)

    def full_tensor_norms() -> None:
        norms = [torch.linalg.vector_norm(p.grad.full_tensor()) for p in params]
        torch.linalg.vector_norm(torch.stack(norms)).item()

    tracker = GradTracker(model, clip="norm", max_norm=1.0, layer_every=1)
    configs: dict[str, Callable[[], None]] = {
        "(1) clip_grad_norm_ on DTensor grads": torch_clip,
        "(2) full_tensor() per parameter": full_tensor_norms,
        "(3) gradtrack tracker.step()": tracker.step,
    }
    with tracker:
        collectives = {}
        for name, call in configs.items():
            restore()
            with CommDebugMode() as comm:
                call()
            collectives[name] = comm.get_total_counts()
        times: dict[str, list[float]] = {name: [] for name in configs}
        for block in range(args.calls // args.block + 1):
            for name, call in configs.items():
                for _ in range(args.block):
                    restore()
                    dist.barrier()
                    start = time.perf_counter()
                    call()
                    elapsed = time.perf_counter() - start
                    if block:  # the first block of each is warm-up
                        times[name].append(elapsed)
    Path(out, f"rank{rank}.json").write_text(json.dumps({"times": times, "collectives": collectives}))
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=48, help="Linear layers (2 tensors each)")
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--calls", type=int, default=60)
    parser.add_argument("--block", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as out:
        mp.spawn(_worker, args=(2, args, out), nprocs=2, join=True)
        ranks = [json.loads(Path(out, f"rank{rank}.json").read_text()) for rank in range(2)]
    print(
        f"FSDP2 over gloo, 2 ranks on {os.cpu_count()} CPUs, torch {torch.__version__}: {args.layers} Linear "
        f"layers of {args.width} ({2 * args.layers} sharded tensors), {args.calls} timed calls each"
    )
    print(f"{'configuration':<40} {'ms/call':>8} {'vs (1)':>7} {'collectives':>12}")
    baseline = None
    for name in ranks[0]["times"]:
        slowest = [max(a, b) for a, b in zip(ranks[0]["times"][name], ranks[1]["times"][name], strict=True)]
        median = statistics.median(slowest) * 1e3
        baseline = baseline or median
        print(f"{name:<40} {median:8.3f} {median / baseline:6.2f}x {ranks[0]['collectives'][name]:12d}")


if __name__ == "__main__":
    main()

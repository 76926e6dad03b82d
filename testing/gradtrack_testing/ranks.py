"""Gloo ranks on the CPU for the tests and benchmarks: spawned once, results back as JSON.

Starting processes is most of the cost of a distributed test, so each test spawns its ranks once and runs
several cases in them. A file rendezvous needs no port, so parallel tests never race for one.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

__all__ = ["COLLECTIVES", "collectives", "spawn"]

COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter", "reduce_scatter_tensor",
               "broadcast", "reduce", "all_to_all_single", "barrier")  # fmt: skip


def spawn(
    worker: Callable[[int, int], dict[str, Any]],
    world: int,
    out: Path,
    *,
    env: Mapping[str, str] | None = None,
    after_init: Callable[[], None] | None = None,
) -> list[dict[str, Any]]:
    """Run ``worker(rank, world)`` on ``world`` gloo ranks; the JSON-able dicts they returned, by rank.

    ``env``: set in each rank before the process group starts (beside RANK, WORLD_SIZE, LOCAL_RANK and
    LOCAL_WORLD_SIZE, which frameworks that adopt a running group read); ``after_init``: called in each rank once
    the group is up (a framework's own initialisation).
    """
    import torch.multiprocessing as mp

    mp.spawn(_run, args=(worker, world, str(out), dict(env or {}), after_init), nprocs=world, join=True)
    return [json.loads((out / f"rank{rank}.json").read_text()) for rank in range(world)]


def _run(
    rank: int,
    worker: Callable[[int, int], dict[str, Any]],
    world: int,
    out: str,
    env: dict[str, str],
    after_init: Callable[[], None] | None,
) -> None:
    import torch.distributed as dist

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", **env)  # fmt: skip
    dist.init_process_group("gloo", init_method=f"file://{out}/rendezvous", rank=rank, world_size=world)
    try:
        if after_init is not None:
            after_init()
        result = worker(rank, world)
        Path(out, f"rank{rank}.json").write_text(json.dumps(result))
        dist.barrier()  # no rank tears its connections down while another still talks over them
    finally:
        dist.destroy_process_group()


@contextlib.contextmanager
def collectives() -> Iterator[list[int]]:
    """Counts every ``torch.distributed`` collective called meanwhile, by anyone (frameworks' comm layers call these
    functions too; ``CommDebugMode`` sees only DTensor's)."""
    import torch.distributed as dist

    count = [0]
    originals = {name: getattr(dist, name) for name in COLLECTIVES if hasattr(dist, name)}

    def wrap(original: Callable[..., Any]) -> Callable[..., Any]:
        def counted(*args: Any, **kwargs: Any) -> Any:
            count[0] += 1
            return original(*args, **kwargs)

        return counted

    for name, original in originals.items():
        setattr(dist, name, wrap(original))
    try:
        yield count
    finally:
        for name, original in originals.items():
            setattr(dist, name, original)

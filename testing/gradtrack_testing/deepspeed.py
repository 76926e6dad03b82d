"""DeepSpeed on the CPU for the tests and benchmarks: ranks started once, engines built alike.

DeepSpeed runs here with ``DS_ACCELERATOR=cpu`` over gloo, with a client ``torch.optim.AdamW`` (DeepSpeed's own
Adam compiles a C++ op). Its CPU accelerator declares no fp16, although torch's CPU kernels run it:
``allow_fp16()`` lifts that declaration so that the real fp16 path (DeepSpeed's dynamic loss scaler and its
overflow skips) can be tested on the CPU.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = ["allow_fp16", "config", "engine", "spawn"]


def spawn(worker: Callable[[int, int], dict[str, Any]], world: int, out: Path) -> list[dict[str, Any]]:
    """Run ``worker(rank, world)`` on ``world`` gloo ranks with DeepSpeed's CPU accelerator, initialised over the
    ranks' process group; their JSON results."""
    import os

    from gradtrack_testing import ranks

    os.environ.setdefault("DS_ACCELERATOR", "cpu")  # read when DeepSpeed first picks its accelerator
    return ranks.spawn(worker, world, out, env={"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}, after_init=_init)


def _init() -> None:
    import deepspeed

    torch.set_num_threads(1)
    deepspeed.init_distributed(dist_backend="gloo")  # adopts the running process group


def allow_fp16() -> None:
    """Let DeepSpeed's CPU accelerator run fp16 (it declares none; torch's CPU kernels have it)."""
    from deepspeed.accelerator import get_accelerator

    get_accelerator().is_fp16_supported = lambda: True


def config(stage: int, *, clip: float = 0.0, dtype: str = "fp32", accumulation: int = 1, micro_batch: int = 4,
           **extra: Any) -> dict[str, Any]:  # fmt: skip
    """A DeepSpeed config: ZeRO ``stage``, its ``gradient_clipping``, precision (fp32, bf16, fp16 with a dynamic
    loss scale starting at 2**8), gradient accumulation."""
    result: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": accumulation,
        "gradient_clipping": clip,
        "zero_optimization": {"stage": stage},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if dtype == "bf16":
        result["bf16"] = {"enabled": True}
    elif dtype == "fp16":
        result["fp16"] = {"enabled": True, "initial_scale_power": 8, "loss_scale_window": 100}
    elif dtype != "fp32":
        raise ValueError(f"dtype must be 'fp32', 'bf16' or 'fp16', got {dtype!r}")
    result.update(extra)
    return result


def engine(model: nn.Module, ds_config: dict[str, Any], lr: float = 1e-2) -> Any:
    """``deepspeed.initialize`` with a client AdamW over ``model``; the engine."""
    import deepspeed

    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    built, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    return built

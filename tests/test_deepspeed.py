"""Inside DeepSpeed engines on 2 gloo ranks (issue 24): ZeRO stages 0 to 3, bf16 and fp16, accumulation.

``GradTracker(engine)`` measures each rank's part of every gradient before any clipping, combines the per-layer
sums in one collective per step, and clips once: DeepSpeed clips when its ``gradient_clipping`` is set (gradtrack
reports its coefficient), gradtrack clips the partitions DeepSpeed steps on when it is 0. The references are
DeepSpeed's own: ``engine.get_global_grad_norm()``, ``safe_get_full_grad`` per parameter (called by the test only),
and the parameters of the same engine trained with DeepSpeed's own clipping.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

pytest.importorskip("deepspeed")

MAX_NORM = 0.05  # binds at every step of these runs: the clip is exercised, not only reported
STEPS, ACCUMULATION = 4, 2


def _batches(rank: int, dtype: torch.dtype = torch.float32) -> list[tuple[torch.Tensor, torch.Tensor]]:
    from gradtrack_testing.models import regression_batches

    return [(x.to(dtype), y.to(dtype)) for x, y in regression_batches(STEPS * ACCUMULATION, seed=rank, batch=4)]


def _model(dtype: torch.dtype = torch.float32) -> nn.Module:
    from gradtrack_testing.models import mlp

    return mlp(seed=0).to(dtype)


def _train(engine: Any, batches: list[tuple[torch.Tensor, torch.Tensor]], poison: int | None = None
           ) -> tuple[list[float], list[dict[str, float]]]:  # fmt: skip
    """The loop DeepSpeed users write; returns DeepSpeed's own norm of each step and, taken by the test before each
    step, the per-layer norms of the full gradients (``safe_get_full_grad``: one collective per parameter)."""
    from deepspeed.utils import safe_get_full_grad

    norms, layers = [], []
    for index, (x, y) in enumerate(batches):
        loss = nn.functional.mse_loss(engine(x).squeeze(-1).float(), y.float())
        if index == poison:
            loss = loss * math.nan
        engine.backward(loss)
        if engine.is_gradient_accumulation_boundary():
            full = {
                name: safe_get_full_grad(p) if engine.zero_optimization() else p.grad
                for name, p in engine.module.named_parameters()
            }
            layers.append({name: torch.linalg.vector_norm(g.float()).item() for name, g in full.items()})
        engine.step()
        if (index + 1) % ACCUMULATION == 0:
            value = engine.get_global_grad_norm()
            norms.append(math.nan if value is None else float(value))
    return norms, layers


def _parameters(engine: Any) -> list[list[float]]:
    """The full parameters on every rank (ZeRO-3 gathers them)."""
    import deepspeed

    params = list(engine.module.parameters())
    with deepspeed.zero.GatheredParameters(params, enabled=engine.zero_optimization_stage() == 3):
        return [p.detach().float().flatten().tolist() for p in params]


def _tracked(engine: Any, batches: list[tuple[torch.Tensor, torch.Tensor]], poison: int | None = None,
             **options: Any) -> dict[str, Any]:  # fmt: skip
    from gradtrack import GradTracker
    from gradtrack_testing.recording import RecordingBackend

    recorder = RecordingBackend()
    with GradTracker(engine, backend=recorder, layer_every=1, **options) as tracker:
        reduction = tracker._pipeline.topology.reduction
        collectives = [0]
        if reduction is not None:
            original = reduction._all_reduce

            def counted(tensor: torch.Tensor, op: str) -> None:
                collectives[0] += 1
                original(tensor, op)

            reduction._all_reduce = counted  # type: ignore[method-assign]
        ds_norms, full_layers = _train(engine, batches, poison)
    steps = recorder.of("step")
    return {
        "steps": [
            {"total": s.total_norm, "coef": s.clip_coef, "loss": s.loss, "layers": dict(s.layer_norms or {}),
             "overflow": s.amp_overflow, "skipped": s.skipped, "nonfinite": s.nonfinite}
            for s in steps
        ],  # fmt: skip
        "explosions": len(recorder.of("explosion")),
        "config": recorder.of("run_start")[0].config if recorder.of("run_start") else None,
        "calls": len(recorder.calls),
        "summary_steps": tracker.summary().steps,
        "ds_norms": ds_norms,
        "full_layers": full_layers,
        "collectives": collectives[0],
        "params": _parameters(engine),
    }


# -- ZeRO 0 to 3, fp32 -----------------------------------------------------------------------------


def _stages(rank: int, world: int) -> dict[str, Any]:
    from gradtrack_testing.deepspeed import config, engine

    batches = _batches(rank)
    out: dict[str, Any] = {}
    for stage in (0, 1, 2, 3):
        ds_config = config(stage, accumulation=ACCUMULATION)
        clipping_ds = config(stage, clip=MAX_NORM, accumulation=ACCUMULATION)
        reference = engine(_model(), clipping_ds)
        _train(reference, batches)
        out[f"zero{stage}"] = {
            "gradtrack_clips": _tracked(engine(_model(), ds_config), batches, max_norm=MAX_NORM),
            "deepspeed_clips": _tracked(engine(_model(), clipping_ds), batches),
            "reference_params": _parameters(reference),
        }
    return out


@pytest.mark.slow
def test_zero_stages_measure_before_clipping_with_one_collective_and_clip_once(tmp_path: Path) -> None:
    from gradtrack_testing.deepspeed import spawn

    rank0, rank1 = spawn(_stages, 2, tmp_path)
    for stage in (0, 1, 2, 3):
        for mode in ("gradtrack_clips", "deepspeed_clips"):
            run, other = rank0[f"zero{stage}"][mode], rank1[f"zero{stage}"][mode]
            where = f"ZeRO-{stage}, {mode}"
            assert run["summary_steps"] == other["summary_steps"] == STEPS, where  # one step per engine step
            assert len(run["steps"]) == STEPS and other["calls"] == 0, where  # only rank 0 reports
            assert run["config"]["strategy"] == f"deepspeed-zero{stage}" and run["config"]["world_size"] == 2, where
            assert run["collectives"] == STEPS, where  # gradtrack's own: one per step
            for step, full in zip(run["steps"], run["full_layers"], strict=True):
                # per layer, what each rank holds combined: the norms of the full gradients DeepSpeed gathers
                assert step["layers"].keys() == full.keys(), where
                for name, norm in full.items():
                    assert step["layers"][name] == pytest.approx(norm, rel=1e-5), (where, name)
                rss = math.sqrt(sum(value**2 for value in step["layers"].values()))
                assert step["total"] == pytest.approx(rss, rel=1e-6), where
                assert step["coef"] == pytest.approx(min(1.0, MAX_NORM / (step["total"] + 1e-6)), rel=1e-6), where
                assert step["coef"] < 1.0 and step["loss"] is not None, where
            if stage > 0:  # DeepSpeed's own norm is the pre-clip one at ZeRO 1-3 (None at ZeRO-0 in fp32)
                for step, ds_norm in zip(run["steps"], run["ds_norms"], strict=True):
                    assert step["total"] == pytest.approx(ds_norm, rel=1e-5), where
            assert run["params"] == other["params"], where  # every rank stepped alike
        follow = rank0[f"zero{stage}"]["deepspeed_clips"]
        assert follow["config"]["clipped_by"] == "deepspeed" and follow["config"]["max_norm"] == MAX_NORM
        # DeepSpeed clipped, gradtrack only watched: the very same parameters as DeepSpeed alone
        assert follow["params"] == rank0[f"zero{stage}"]["reference_params"]
        # gradtrack clipped the partitions DeepSpeed steps on, with the same coefficient: the same update
        clipped = rank0[f"zero{stage}"]["gradtrack_clips"]
        assert "clipped_by" not in clipped["config"]
        for mine, theirs in zip(clipped["params"], rank0[f"zero{stage}"]["reference_params"], strict=True):
            assert mine == pytest.approx(theirs, rel=1e-5, abs=1e-7), f"ZeRO-{stage}"

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

# The 2-rank cases run in one pair of ranks started once for the module (a rank's start, torch and DeepSpeed
# imported, is 5-6 s of CPU), building three dozen engines (about a minute here; more on a loaded machine, and the
# first engine of a fresh machine JIT-builds DeepSpeed's CPU communication op unless make did).
pytestmark = pytest.mark.timeout(900)

Ranks = list[dict[str, Any]]  # what each rank returned, by rank
MAX_NORM = 0.05  # binds at every step of these runs: the clip is exercised, not only reported
STEPS, ACCUMULATION = 4, 2


def _batches(rank: int, dtype: torch.dtype = torch.float32) -> list[tuple[torch.Tensor, torch.Tensor]]:
    from gradtrack_testing.models import regression_batches

    return [(x.to(dtype), y.to(dtype)) for x, y in regression_batches(STEPS * ACCUMULATION, seed=rank, batch=4)]


def _model(dtype: torch.dtype = torch.float32) -> nn.Module:
    from gradtrack_testing.models import mlp

    return mlp(seed=0).to(dtype)


def _train(engine: Any, batches: list[tuple[torch.Tensor, torch.Tensor]], poison: int | None = None,
           counted: list[int] | None = None) -> tuple[list[float], list[dict[str, float]]]:  # fmt: skip
    """The loop DeepSpeed users write; returns DeepSpeed's own norm of each step and, taken by the test before each
    step, the per-layer norms of the full gradients (``safe_get_full_grad``: one collective per parameter).
    ``counted``: gets the collectives of the training (``engine.backward`` and ``engine.step``) added."""
    from deepspeed.utils import safe_get_full_grad

    from gradtrack_testing import ranks

    norms, layers = [], []
    for index, (x, y) in enumerate(batches):
        loss = nn.functional.mse_loss(engine(x).squeeze(-1).float(), y.float())
        if index == poison:
            loss = loss * math.nan
        with ranks.collectives() as count:
            engine.backward(loss)
        if counted is not None:
            counted[0] += count[0]
        if engine.is_gradient_accumulation_boundary():
            full = {
                name: safe_get_full_grad(p) if engine.zero_optimization() else p.grad
                for name, p in engine.module.named_parameters()
            }
            layers.append({name: torch.linalg.vector_norm(g.float()).item() for name, g in full.items()})
        with ranks.collectives() as count:
            engine.step()
        if counted is not None:
            counted[0] += count[0]
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
        training = [0]
        ds_norms, full_layers = _train(engine, batches, poison, training)
    steps = recorder.of("step")
    return {
        "steps": [
            {"total": s.total_norm, "coef": s.clip_coef, "loss": s.loss, "layers": dict(s.layer_norms or {}),
             "overflow": s.amp_overflow, "skipped": s.skipped, "nonfinite": s.nonfinite}
            for s in steps
        ],
        "explosions": len(recorder.of("explosion")),
        "config": recorder.of("run_start")[0].config if recorder.of("run_start") else None,
        "calls": len(recorder.calls),
        "summary_steps": tracker.summary().steps,
        "ds_norms": ds_norms,
        "full_layers": full_layers,
        "collectives": collectives[0],
        "training_collectives": training[0],
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
        reference_collectives = [0]
        _train(reference, batches, counted=reference_collectives)
        out[f"zero{stage}"] = {
            "reference_collectives": reference_collectives[0],
            "gradtrack_clips": _tracked(engine(_model(), ds_config), batches, max_norm=MAX_NORM),
            "deepspeed_clips": _tracked(engine(_model(), clipping_ds), batches),
            "reference_params": _parameters(reference),
        }
    return out


@pytest.mark.slow
def test_zero_stages_measure_before_clipping_with_one_collective_and_clip_once(two_ranks: Ranks) -> None:
    rank0, rank1 = (rank["stages"] for rank in two_ranks)
    for stage in (0, 1, 2, 3):
        for mode in ("gradtrack_clips", "deepspeed_clips"):
            run, other = rank0[f"zero{stage}"][mode], rank1[f"zero{stage}"][mode]
            where = f"ZeRO-{stage}, {mode}"
            assert run["summary_steps"] == other["summary_steps"] == STEPS, where  # one step per engine step
            assert len(run["steps"]) == STEPS and other["calls"] == 0, where  # only rank 0 reports
            assert run["config"]["strategy"] == f"deepspeed-zero{stage}" and run["config"]["world_size"] == 2, where
            assert run["collectives"] == STEPS, where  # gradtrack's own: one per step
            # ... which replaces DeepSpeed's norm all-reduce at ZeRO 1-3: no collective more than DeepSpeed clipping
            # alone (at ZeRO-0 it carries only the loss; when gradtrack clips, DeepSpeed's clipping has none to do)
            extra = run["training_collectives"] - rank0[f"zero{stage}"]["reference_collectives"]
            assert extra <= (STEPS if stage == 0 else 0), where
            if mode == "deepspeed_clips":
                assert extra == (STEPS if stage == 0 else 0), where
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
        reference = rank0[f"zero{stage}"]["reference_params"]
        if stage == 0:  # DeepSpeed clipped, gradtrack only watched: the very same parameters as DeepSpeed alone
            assert follow["params"] == reference
        else:  # DeepSpeed clipped with gradtrack's norm (its own all-reduce saved): the same within fp32 rounding
            for mine, theirs in zip(follow["params"], reference, strict=True):
                assert mine == pytest.approx(theirs, rel=1e-5, abs=1e-7), f"ZeRO-{stage}"
        # gradtrack clipped the partitions DeepSpeed steps on, with the same coefficient: the same update
        clipped = rank0[f"zero{stage}"]["gradtrack_clips"]
        assert "clipped_by" not in clipped["config"]
        for mine, theirs in zip(clipped["params"], reference, strict=True):
            assert mine == pytest.approx(theirs, rel=1e-5, abs=1e-7), f"ZeRO-{stage}"


# -- precision, overflow, non-finite gradients, refusals -----------------------------------------------------


def _precision_and_faults(rank: int, world: int) -> dict[str, Any]:
    from gradtrack import GradTracker
    from gradtrack_testing.deepspeed import allow_fp16, config, engine

    out: dict[str, Any] = {}
    for stage in (2, 3):  # bf16: the fragments are bf16, their norms fp32; DeepSpeed's own norm agrees
        out[f"bf16_zero{stage}"] = _tracked(engine(_model(), config(stage, dtype="bf16", accumulation=ACCUMULATION)),
                                            _batches(rank, torch.bfloat16), max_norm=MAX_NORM)  # fmt: skip
    allow_fp16()
    # fp16 with DeepSpeed's dynamic loss scaler: a NaN loss at the second step overflows; DeepSpeed skips it
    out["fp16_overflow"] = _tracked(engine(_model(torch.float16), config(2, dtype="fp16", accumulation=ACCUMULATION)),
                                    _batches(rank, torch.float16), poison=3, max_norm=MAX_NORM)  # fmt: skip
    # bf16 has no loss scaler: DeepSpeed would step the NaN; gradtrack's on_nonfinite="skip" keeps it out
    nan_engine = engine(_model(), config(1, accumulation=ACCUMULATION))
    out["nonfinite_skip"] = _tracked(nan_engine, _batches(rank), poison=3, max_norm=MAX_NORM)
    out["nonfinite_params_finite"] = all(math.isfinite(v) for p in out["nonfinite_skip"]["params"] for v in p)
    # DeepSpeed's own optimizer, built from its config (torch's AdamW under it: DeepSpeed's Adam compiles an op)
    import deepspeed

    own_config = {**config(2, accumulation=ACCUMULATION),
                  "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "torch_adam": True}}}  # fmt: skip
    own_model = _model()
    own, *_ = deepspeed.initialize(model=own_model, model_parameters=own_model.parameters(), config=own_config)
    out["own_optimizer"] = _tracked(own, _batches(rank), max_norm=MAX_NORM)
    # refusals, each with what to do instead
    refused = {}
    clipping = engine(_model(), config(2, clip=1.0))
    for name, attempt in {
        "twice": lambda: GradTracker(clipping, max_norm=0.5),
        "value_twice": lambda: GradTracker(clipping, clip="value", clip_value=0.1),
        "rollback": lambda: GradTracker(clipping, on_divergence="rollback"),
        "agc": lambda: GradTracker(engine(_model(), config(2)), clip="agc"),
        "module": lambda: GradTracker(clipping.module).__enter__(),
        "offload": lambda: GradTracker(engine(_model(), config(2, zero_force_ds_cpu_optimizer=False, zero_optimization={
            "stage": 2, "offload_optimizer": {"device": "cpu"}}))),
        "norm_type": lambda: GradTracker(engine(_model(), config(2)), norm_type="inf"),
    }.items():
        try:
            attempt()
            refused[name] = None
        except (ValueError, TypeError) as exc:
            refused[name] = str(exc)
    out["refused"] = refused
    # resume: a second tracker on the same engine goes on from the first one's state
    from gradtrack_testing.recording import RecordingBackend

    resumed = engine(_model(), config(2, accumulation=ACCUMULATION))
    with GradTracker(resumed, backend=RecordingBackend()) as first:
        _train(resumed, _batches(rank)[:4])
    state = first.state_dict()
    second_recorder = RecordingBackend()
    second = GradTracker(resumed, backend=second_recorder)
    second.load_state_dict(state)
    with second:
        _train(resumed, _batches(rank)[4:])
    out["resumed_steps"] = [s.step for s in second_recorder.of("step")]
    return out


@pytest.mark.slow
def test_precision_overflow_nonfinite_and_refusals(two_ranks: Ranks) -> None:
    rank0, rank1 = (rank["precision"] for rank in two_ranks)
    for stage in (2, 3):
        run = rank0[f"bf16_zero{stage}"]
        assert len(run["steps"]) == STEPS and run["collectives"] == STEPS
        for step, ds_norm, full in zip(run["steps"], run["ds_norms"], run["full_layers"], strict=True):
            assert step["total"] == pytest.approx(ds_norm, rel=1e-5)  # DeepSpeed sums bf16 fragments in fp32 too
            for name, norm in full.items():
                assert step["layers"][name] == pytest.approx(norm, rel=1e-5)
        assert run["params"] == rank1[f"bf16_zero{stage}"]["params"]
    overflow = rank0["fp16_overflow"]
    assert [s["overflow"] for s in overflow["steps"]] == [False, True, False, False]  # the loss scaler's skip
    assert overflow["explosions"] == 0  # an overflow is never an explosion
    for step, ds_norm in zip(overflow["steps"], overflow["ds_norms"], strict=True):
        if not step["overflow"]:  # measured with the loss scale divided out: DeepSpeed's unscaled norm
            assert step["total"] == pytest.approx(ds_norm, rel=1e-3)
    skip = rank0["nonfinite_skip"]
    assert [s["skipped"] for s in skip["steps"]] == [False, True, False, False]
    assert skip["steps"][1]["nonfinite"] > 0 and skip["explosions"] == 1
    assert rank0["nonfinite_params_finite"] and rank1["nonfinite_params_finite"]  # the NaN update never happened
    own = rank0["own_optimizer"]
    assert len(own["steps"]) == STEPS and all(s["coef"] < 1.0 for s in own["steps"])
    for step, ds_norm in zip(own["steps"], own["ds_norms"], strict=True):
        assert step["total"] == pytest.approx(ds_norm, rel=1e-6)
    assert own["params"] == rank1["own_optimizer"]["params"]
    refused = rank0["refused"]
    assert "gradient_clipping=1 would clip the gradients twice" in refused["twice"]
    assert '"gradient_clipping": 0.0' in refused["twice"]
    assert "clip='value'" in refused["value_twice"]
    assert "on_divergence='rollback' is not supported inside a DeepSpeed engine" in refused["rollback"]
    assert "clip='agc' cannot clip inside a DeepSpeed engine" in refused["agc"]
    assert "pass the engine" in refused["module"] and "not engine.module" in refused["module"]
    assert "does not support DeepSpeed's optimizer or parameter offload" in refused["offload"]
    assert "norm_type must be 2 inside a DeepSpeed engine" in refused["norm_type"]
    assert rank0["resumed_steps"] == [2, 3]


# -- the Hugging Face Trainer with deepspeed= (accelerate's DeepSpeed plugin) ----------------------------------


def _trainer_run(tmp: str, max_grad_norm: float, **options: Any) -> dict[str, Any]:
    from accelerate.state import AcceleratorState, GradientState
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from gradtrack.integrations.transformers import GradTrackerCallback
    from gradtrack_testing.hf import tiny_gpt2, token_data
    from gradtrack_testing.recording import RecordingBackend

    class Logs(TrainerCallback):
        def __init__(self) -> None:
            self.grad_norms: list[float] = []

        def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kwargs: Any) -> None:
            if "grad_norm" in (logs or {}):
                self.grad_norms.append(float(logs["grad_norm"]))

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    zero = {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
            "gradient_clipping": "auto", "zero_optimization": {"stage": 2}}  # fmt: skip
    recorder, logs = RecordingBackend(), Logs()
    callback = GradTrackerCallback(backend=recorder, layer_every=1, **options)
    args = TrainingArguments(output_dir=tmp, max_steps=STEPS, per_device_train_batch_size=4,
                             gradient_accumulation_steps=ACCUMULATION, learning_rate=1e-3, logging_steps=1,
                             save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True, deepspeed=zero,
                             max_grad_norm=max_grad_norm)  # fmt: skip
    trainer = Trainer(model=tiny_gpt2(), args=args, train_dataset=token_data(), callbacks=[logs, callback])
    trainer.train()
    steps = recorder.of("step")
    model = trainer.model_wrapped.module
    return {
        "totals": [s.total_norm for s in steps],
        "coefs": [s.clip_coef for s in steps],
        "losses": [s.loss for s in steps],
        "trainer_norms": logs.grad_norms,
        "config": recorder.of("run_start")[0].config if steps else None,
        "calls": len(recorder.calls),
        "params": [p.detach().flatten().tolist()[:64] for p in model.parameters()],
    }


def _accelerate_run(rank: int) -> dict[str, Any]:
    """A plain accelerate loop with accelerate's DeepSpeed plugin: the prepared model is the engine."""
    from accelerate import Accelerator, DeepSpeedPlugin
    from accelerate.state import AcceleratorState, GradientState

    from gradtrack import GradTracker
    from gradtrack_testing.recording import RecordingBackend

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    plugin = DeepSpeedPlugin(hf_ds_config={"train_micro_batch_size_per_gpu": 4, "gradient_clipping": MAX_NORM,
                                           "gradient_accumulation_steps": ACCUMULATION,
                                           "zero_optimization": {"stage": 2}})  # fmt: skip
    # not cpu=True: accelerate then ignores the plugin; with no GPU here the device is the CPU all the same
    accelerator = Accelerator(deepspeed_plugin=plugin, gradient_accumulation_steps=ACCUMULATION)
    model = _model()
    data = torch.utils.data.TensorDataset(*[torch.cat(parts) for parts in zip(*_batches(0), strict=True)])
    loader = torch.utils.data.DataLoader(data, batch_size=4)
    model, optimizer, loader = accelerator.prepare(model, torch.optim.AdamW(model.parameters(), lr=1e-2), loader)
    recorder, ds_norms = RecordingBackend(), []
    with GradTracker(model, backend=recorder, layer_every=1):
        for x, y in loader:
            with accelerator.accumulate(model):
                accelerator.backward(nn.functional.mse_loss(model(x).squeeze(-1), y))
                optimizer.step()
                optimizer.zero_grad()
            if accelerator.sync_gradients:
                ds_norms.append(float(model.get_global_grad_norm()))
    steps = recorder.of("step")
    return {
        "totals": [s.total_norm for s in steps],
        "coefs": [s.clip_coef for s in steps],
        "ds_norms": ds_norms,
        "config": recorder.of("run_start")[0].config if steps else None,
        "engine": type(model).__name__,
    }


def _trainer(rank: int, world: int) -> dict[str, Any]:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        return {
            "deepspeed_clips": _trainer_run(tmp, 0.5),
            "gradtrack_clips": _trainer_run(tmp, 0.0, max_norm=0.5),
            "accelerate": _accelerate_run(rank),
        }


@pytest.mark.slow
def test_trainer_and_accelerate_with_deepspeed_zero2(two_ranks: Ranks) -> None:
    pytest.importorskip("transformers")
    rank0, rank1 = (rank["trainer"] for rank in two_ranks)
    follow = rank0["deepspeed_clips"]
    assert follow["config"]["strategy"] == "deepspeed-zero2" and follow["config"]["clipped_by"] == "deepspeed"
    assert len(follow["totals"]) == STEPS and rank1["deepspeed_clips"]["calls"] == 0
    # the Trainer logs DeepSpeed's pre-clip norm: gradtrack's is the same
    assert follow["totals"] == pytest.approx(follow["trainer_norms"], rel=1e-5)
    assert follow["coefs"] == pytest.approx([min(1.0, 0.5 / (n + 1e-6)) for n in follow["totals"]], rel=1e-6)
    assert max(follow["coefs"]) < 1.0  # every step clipped: the clip decides the parameters compared below
    assert all(loss is not None and loss > 0 for loss in follow["losses"])
    own = rank0["gradtrack_clips"]
    assert "clipped_by" not in own["config"] and own["config"]["max_norm"] == 0.5
    assert own["totals"] == pytest.approx(own["trainer_norms"], rel=1e-5)  # DeepSpeed's norm stays pre-clip
    for mine, theirs in zip(own["params"], follow["params"], strict=True):  # clipped once, by either, alike
        assert mine == pytest.approx(theirs, rel=1e-4, abs=1e-6)
    loop = rank0["accelerate"]
    assert loop["engine"] == "DeepSpeedEngine" and loop["config"]["strategy"] == "deepspeed-zero2"
    assert len(loop["totals"]) == len(loop["ds_norms"]) >= 2  # one gradtrack step per accumulation boundary
    assert loop["totals"] == pytest.approx(loop["ds_norms"], rel=1e-6)
    assert loop["coefs"] == pytest.approx([min(1.0, MAX_NORM / (n + 1e-6)) for n in loop["totals"]], rel=1e-6)


# -- the 2-rank cases, in one pair of ranks ----------------------------------------------------------------------


def _two_rank_cases(rank: int, world: int) -> dict[str, Any]:
    """Every 2-rank case in turn, in the same ranks, the precision cases last (their ``allow_fp16()`` stays in
    force). A case that fails fails the spawn, and with it every 2-rank test, with its traceback."""
    import importlib.util

    out = {"stages": _stages(rank, world)}
    if importlib.util.find_spec("transformers") is not None:
        out["trainer"] = _trainer(rank, world)
    out["precision"] = _precision_and_faults(rank, world)
    return out


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory: pytest.TempPathFactory) -> Ranks:
    from gradtrack_testing.deepspeed import spawn

    return spawn(_two_rank_cases, 2, tmp_path_factory.mktemp("deepspeed"))


# -- one process ----------------------------------------------------------------------------------------------


def _single(rank: int, world: int) -> dict[str, Any]:
    from gradtrack_testing.deepspeed import config, engine

    out = {}
    for stage in (0, 2, 3):
        reference = engine(_model(), config(stage, clip=MAX_NORM, accumulation=ACCUMULATION))
        ds_norms, _ = _train(reference, _batches(rank))
        tracked = _tracked(engine(_model(), config(stage, clip=MAX_NORM, accumulation=ACCUMULATION)), _batches(rank))
        out[f"zero{stage}"] = {"tracked": tracked, "reference_norms": ds_norms,
                               "reference_params": _parameters(reference)}  # fmt: skip
    return out


@pytest.mark.slow
def test_one_process_engine(tmp_path: Path) -> None:
    from gradtrack_testing.deepspeed import spawn

    (result,) = spawn(_single, 1, tmp_path)
    for stage in (0, 2, 3):
        case = result[f"zero{stage}"]
        run = case["tracked"]
        assert run["config"]["strategy"] == f"deepspeed-zero{stage}" and run["config"]["world_size"] == 1
        assert run["collectives"] == 0 and len(run["steps"]) == STEPS  # nothing to combine
        if stage:  # DeepSpeed's own norm, untracked, on the same batches
            assert [s["total"] for s in run["steps"]] == pytest.approx(case["reference_norms"], rel=1e-6)
        for step, full in zip(run["steps"], run["full_layers"], strict=True):
            for name, norm in full.items():
                assert step["layers"][name] == pytest.approx(norm, rel=1e-5)
        for mine, theirs in zip(run["params"], case["reference_params"], strict=True):
            assert mine == pytest.approx(theirs, rel=1e-5, abs=1e-7)

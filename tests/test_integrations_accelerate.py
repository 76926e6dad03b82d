"""gradtrack in an accelerate loop (issue 24): ``accelerator.clip_grad_norm_`` replaced by ``GradTracker(max_norm=)``.

Real accelerate on the CPU (``Accelerator(cpu=True, gradient_accumulation_steps=2)``, ``accelerator.accumulate``,
``accelerator.backward``), in one process and on 2 gloo ranks: the loop that clips with accelerate and the same loop
with gradtrack clipping instead train bitwise the same parameters, gradtrack makes one step per optimizer step (per
accumulation boundary), and its ``grad/total_norm`` is the pre-clip norm ``accelerator.clip_grad_norm_`` returned.
With ``log_with="mlflow"`` / ``"wandb"``, gradtrack logs into the run accelerate opened. No gradtrack integration
module is involved: the plain ``GradTracker`` hooks the torch optimizer under accelerate's ``AcceleratedOptimizer``.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Collection, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

pytest.importorskip("accelerate")

from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState

from gradtrack import GradTracker
from gradtrack_testing import ranks
from gradtrack_testing.models import mlp, regression_batches
from gradtrack_testing.recording import CONTRACT_METRICS, RecordingBackend

pytestmark = [pytest.mark.filterwarnings("ignore::DeprecationWarning")]

ACCUMULATE = 2
MICRO_BATCHES = 16  # 8 optimizer steps in one process; accelerate's sharded loader gives each of 2 ranks 4
STEPS = MICRO_BATCHES // ACCUMULATE
MAX_NORM = 0.5  # below every pre-clip norm of this run: each step is clipped, so clipping decides the parameters


def fresh_accelerator(**options: Any) -> Accelerator:
    """A new ``Accelerator``: accelerate keeps its state in process-wide singletons, so each loop resets them first
    (the process group, if any, stays: accelerate finds it initialized and uses it)."""
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    return Accelerator(cpu=True, gradient_accumulation_steps=ACCUMULATE, **options)


@pytest.fixture(autouse=True)
def _no_accelerate_state_left() -> Iterator[None]:
    """The next test module's ``Trainer`` builds its own ``Accelerator``: leave it no state of ours."""
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def loader() -> torch.utils.data.DataLoader[tuple[torch.Tensor, ...]]:
    xs, ys = zip(*regression_batches(MICRO_BATCHES, seed=0, batch=8), strict=True)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.cat(xs), torch.cat(ys)), batch_size=8)


@dataclass
class Trained:
    """What one run of the loop left: the parameters, and what accelerate did at each accumulation boundary."""

    params: list[torch.Tensor] = field(default_factory=list, repr=False)
    clip_norms: list[float] = field(default_factory=list)  # accelerator.clip_grad_norm_'s return, per boundary
    micro_losses: list[float] = field(default_factory=list)
    boundaries: int = 0  # micro-batches with accelerator.sync_gradients
    inner_steps: int = 0  # steps of the torch optimizer under accelerate's AcceleratedOptimizer
    skipped: list[bool] = field(default_factory=list)  # optimizer.step_was_skipped (an fp16 overflow), per boundary
    model_class: str = ""

    def step_losses(self) -> list[float]:
        """The mean micro-batch loss of each optimizer step."""
        losses = self.micro_losses
        return [sum(losses[i : i + ACCUMULATE]) / ACCUMULATE for i in range(0, len(losses), ACCUMULATE)]


def train(
    accelerator: Accelerator,
    *,
    accelerate_clips: bool,
    gradtrack: Mapping[str, Any] | None = None,
    poison: Collection[int] = (),
    prepare: Callable[[Accelerator], None] | None = None,
) -> Trained:
    """The loop of accelerate's documentation on ``mlp()``, SGD, 16 micro-batches.

    ``accelerate_clips``: ``accelerator.clip_grad_norm_(model.parameters(), MAX_NORM)`` at each accumulation
    boundary. ``gradtrack``: the loop inside ``with GradTracker(model, **gradtrack)``. ``poison``: boundaries whose
    first gradient is made inf (an fp16 overflow). ``prepare``: called before ``accelerator.prepare``.
    """
    if prepare is not None:
        prepare(accelerator)
    model = mlp(seed=0)
    model, optimizer, data = accelerator.prepare(model, torch.optim.SGD(model.parameters(), lr=0.1), loader())
    trained = Trained(model_class=type(model).__name__)

    def count_step(*_: Any) -> None:
        trained.inner_steps += 1

    optimizer.optimizer.register_step_pre_hook(count_step)
    tracker = GradTracker(model, **gradtrack) if gradtrack is not None else None
    with tracker if tracker is not None else contextlib.nullcontext():
        for x, y in data:
            with accelerator.accumulate(model):
                loss = nn.functional.mse_loss(model(x).squeeze(-1), y)
                accelerator.backward(loss)
                trained.micro_losses.append(loss.item())
                if tracker is not None:
                    tracker.observe(loss)
                boundary = trained.boundaries
                if accelerator.sync_gradients:
                    if boundary in poison:
                        next(model.parameters()).grad[0, 0] = math.inf
                    if accelerate_clips:
                        trained.clip_norms.append(accelerator.clip_grad_norm_(model.parameters(), MAX_NORM).item())
                optimizer.step()
                optimizer.zero_grad()
                if accelerator.sync_gradients:
                    trained.skipped.append(optimizer.step_was_skipped)
                    accelerator.log({"train_loss": loss.item()}, step=boundary)  # a no-op without log_with=
                    trained.boundaries += 1
    trained.params = [p.detach().clone() for p in model.parameters()]
    return trained


def bitwise_equal(first: Trained, second: Trained) -> bool:
    return all(torch.equal(a, b) for a, b in zip(first.params, second.params, strict=True))


def check_contract(
    recorder: RecordingBackend, reference: Trained, tracked: Trained, steps: int, losses: list[float] | None = None
) -> None:
    """What the core promises its backends for a run of ``steps`` optimizer steps clipped at ``MAX_NORM``; ``losses``:
    the loss of each step, by default the mean of its micro-batch losses."""
    hooks = [name for name, _ in recorder.calls]
    assert hooks[0] == "run_start" and hooks[-1] == "run_end" and hooks.count("step") == steps
    recorded = recorder.of("step")
    assert [s.step for s in recorded] == list(range(steps))  # one gradtrack step per optimizer step
    assert tracked.inner_steps == tracked.boundaries == steps
    # grad/total_norm is the pre-clip norm accelerate's clip_grad_norm_ returned, to the bit
    assert [s.total_norm for s in recorded] == reference.clip_norms
    assert min(reference.clip_norms) > MAX_NORM  # so every step was clipped
    assert all(s.clipped for s in recorded)
    assert [s.clip_coef for s in recorded] == pytest.approx([MAX_NORM / (n + 1e-6) for n in reference.clip_norms],
                                                            rel=1e-6)  # fmt: skip
    assert [s.loss for s in recorded] == pytest.approx(losses or tracked.step_losses(), rel=1e-6)
    (end,) = recorder.of("run_end")
    assert end.status == "finished" and end.summary.steps == steps and end.summary.clipped_steps == steps


# -- one process --------------------------------------------------------------------------------------


@pytest.mark.parametrize("mixed_precision", ["no", "bf16"])
def test_gradtrack_in_place_of_accelerators_clip_trains_bitwise_the_same(mixed_precision: str) -> None:
    reference = train(fresh_accelerator(mixed_precision=mixed_precision), accelerate_clips=True)
    recorder = RecordingBackend()
    options = {"backend": recorder, "max_norm": MAX_NORM, "layer_every": 1}
    tracked = train(fresh_accelerator(mixed_precision=mixed_precision), accelerate_clips=False, gradtrack=options)
    unclipped = train(fresh_accelerator(mixed_precision=mixed_precision), accelerate_clips=False)

    assert bitwise_equal(tracked, reference)
    assert not bitwise_equal(unclipped, reference)  # the clipping mattered: the equality above says something
    assert reference.boundaries == reference.inner_steps == STEPS
    check_contract(recorder, reference, tracked, STEPS)
    assert sorted(recorder.of("step")[0].layer_norms or {}) == ["0.bias", "0.weight", "2.bias", "2.weight", "4.bias",
                                                               "4.weight"]  # fmt: skip
    config = recorder.of("run_start")[0].config
    assert (config["clip"], config["max_norm"], config["strategy"], config["world_size"]) == ("norm", MAX_NORM,
                                                                                              "single", 1)  # fmt: skip


def _scaler_as_on_a_gpu(accelerator: Accelerator) -> None:
    """accelerate 1.16 makes no GradScaler on the CPU (``mixed_precision="fp16"`` there trains in fp32): give the
    Accelerator the one its ``__init__`` makes on a GPU, so its fp16 path runs here (fp16 autocast on the CPU, the
    loss scaled in ``backward``, ``scaler.step`` and ``scaler.update`` in the ``AcceleratedOptimizer``)."""
    assert accelerator.scaler is None and accelerator.mixed_precision == "fp16"
    accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    accelerator.native_amp = True


def test_fp16_with_accelerates_scaler_trains_bitwise_the_same_and_an_overflow_is_amp_overflow() -> None:
    reference = train(fresh_accelerator(mixed_precision="fp16"), accelerate_clips=True, poison={2},
                      prepare=_scaler_as_on_a_gpu)  # fmt: skip
    recorder = RecordingBackend()
    accelerator = fresh_accelerator(mixed_precision="fp16")
    _scaler_as_on_a_gpu(accelerator)
    options = {"backend": recorder, "max_norm": MAX_NORM, "scaler": accelerator.scaler}
    tracked = train(accelerator, accelerate_clips=False, gradtrack=options, poison={2})

    assert bitwise_equal(tracked, reference)
    assert reference.skipped == tracked.skipped == [step == 2 for step in range(STEPS)]
    assert tracked.inner_steps == STEPS - 1  # the scaler skipped the overflow step's optimizer.step()
    recorded = recorder.of("step")
    assert [s.step for s in recorded] == list(range(STEPS))  # the skipped step still has its place
    assert [s.amp_overflow for s in recorded] == [step == 2 for step in range(STEPS)]
    assert reference.clip_norms[2] == math.inf
    kept = [step for step in range(STEPS) if step != 2]
    assert [recorded[step].total_norm for step in kept] == [reference.clip_norms[step] for step in kept]
    summary = recorder.of("run_end")[0].summary
    assert summary.amp_overflow_steps == 1 and summary.explosions == 0 and summary.nonfinite_steps == 0


def test_beside_accelerators_clip_a_monitor_only_tracker_sees_the_clipped_norm(recorder: RecordingBackend) -> None:
    """What the guide warns of: gradtrack measures inside ``optimizer.step()``, after ``accelerator.clip_grad_norm_``
    scaled the gradients, so a ``clip=None`` tracker beside it reports the clipped norm, not the one to watch."""
    trained = train(fresh_accelerator(), accelerate_clips=True, gradtrack={"backend": recorder, "clip": None})

    totals = [s.total_norm for s in recorder.of("step")]
    assert len(totals) == STEPS and min(trained.clip_norms) > MAX_NORM
    assert totals == pytest.approx([MAX_NORM] * STEPS, rel=1e-5)


# -- two ranks: DDP by accelerator.prepare ------------------------------------------------------------


def _spawn(worker: Callable[[int, int], dict[str, Any]], world: int, out: Path) -> list[dict[str, Any]]:
    """What torchrun sets (which accelerate reads to choose MULTI_CPU with gloo) on ranks whose group is already up:
    accelerate finds it initialized and uses it. OMP_NUM_THREADS keeps it from resizing torch's thread pool."""
    return ranks.spawn(worker, world, out, env={"OMP_NUM_THREADS": "1"})


def _ddp(rank: int, world: int) -> dict[str, Any]:
    import traceback

    reference_accelerator = fresh_accelerator()
    reference = train(reference_accelerator, accelerate_clips=True)
    recorder = RecordingBackend()
    options = {"backend": recorder, "max_norm": MAX_NORM, "layer_every": 1}
    tracked = train(fresh_accelerator(), accelerate_clips=False, gradtrack=options)
    losses = torch.tensor(tracked.step_losses())
    torch.distributed.all_reduce(losses)  # gradtrack's loss under DDP: the mean over the ranks
    contract = ""
    if rank == 0:
        try:
            check_contract(recorder, reference, tracked, STEPS // world, (losses / world).tolist())
        except AssertionError:
            contract = traceback.format_exc()
    return {
        "distributed_type": str(reference_accelerator.distributed_type),
        "model_class": tracked.model_class,
        "bitwise": bitwise_equal(tracked, reference),
        "clip_norms": reference.clip_norms,
        "totals": [s.total_norm for s in recorder.of("step")],
        "layers": sorted(recorder.of("step")[0].layer_norms or {}) if recorder.calls else [],
        "config": recorder.of("run_start")[0].config if recorder.calls else None,
        "calls": len(recorder.calls),
        "contract": contract,
        "params": [p.flatten().tolist() for p in tracked.params],
        "micro_losses": tracked.micro_losses,
    }


@pytest.mark.slow
def test_two_ranks_ddp_bitwise_the_same_and_only_rank0_reports(tmp_path: Path) -> None:
    rank0, rank1 = _spawn(_ddp, 2, tmp_path)
    steps = STEPS // 2  # accelerate's loader gives each rank half the micro-batches
    for rank in (rank0, rank1):
        assert rank["distributed_type"] == "DistributedType.MULTI_CPU"
        assert rank["model_class"] == "DistributedDataParallel"
        assert rank["bitwise"]
        assert len(rank["clip_norms"]) == steps
    assert rank0["contract"] == ""  # check_contract passed on rank 0
    assert rank0["totals"] == rank0["clip_norms"] and len(rank0["totals"]) == steps
    assert rank1["calls"] == 0  # only rank 0 reports
    assert rank0["clip_norms"] == rank1["clip_norms"]  # the gradients were all-reduced before either clipped
    assert rank0["params"] == rank1["params"]
    assert rank0["micro_losses"] != rank1["micro_losses"]  # ... though each rank saw its own batches
    assert rank0["layers"][0] == "0.bias"  # DDP's "module." prefix is gone
    assert rank0["config"]["strategy"] == "ddp" and rank0["config"]["world_size"] == 2


# -- accelerate's own trackers: log_with= ---------------------------------------------------------------


@pytest.mark.slow
def test_log_with_mlflow_gradtrack_logs_into_the_run_accelerate_opened(
    tmp_path: Path,
    tmp_path_factory: pytest.TempPathFactory,
    monkeypatch: pytest.MonkeyPatch,
    request: pytest.FixtureRequest,
) -> None:
    mlflow = pytest.importorskip("mlflow")
    from mlflow import MlflowClient

    root = tmp_path_factory.getbasetemp() / "integrations-mlflow"  # shared with the Lightning and Trainer tests:
    root.mkdir(exist_ok=True)  # the schema of a new sqlite store costs seconds
    uri = f"sqlite:///{root / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)  # accelerate's MLflowTracker prefers it
    monkeypatch.setattr(mlflow.tracking._tracking_service.utils, "_tracking_uri", None)
    request.addfinalizer(mlflow.end_run)  # a failure before end_training() leaves no active run to later tests
    reference = train(fresh_accelerator(), accelerate_clips=True)

    accelerator = fresh_accelerator(log_with="mlflow")
    # logging_dir: the new experiment's artifact location (else ./mlruns in the working directory)
    accelerator.init_trackers("accelerate-mlflow", config={"lr": 0.1, "max_norm": MAX_NORM},
                              init_kwargs={"mlflow": {"logging_dir": str(tmp_path / "artifacts")}})  # fmt: skip
    opened = accelerator.get_tracker("mlflow", unwrap=True).info.run_id
    assert mlflow.active_run().info.run_id == opened
    options = {"backend": "mlflow", "max_norm": MAX_NORM, "layer_every": 2, "close_timeout": 120}
    tracked = train(accelerator, accelerate_clips=False, gradtrack=options)
    accelerator.end_training()  # after the tracker's with block: gradtrack has sent everything

    assert bitwise_equal(tracked, reference)
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("accelerate-mlflow")
    assert experiment is not None
    runs = client.search_runs([experiment.experiment_id])
    assert [run.info.run_id for run in runs] == [opened]  # one run: accelerate's
    run = runs[0]
    assert run.info.status == "FINISHED"  # ended by accelerate's end_training, not by gradtrack

    def history(key: str) -> list[tuple[int, float]]:
        return [(m.step, m.value) for m in sorted(client.get_metric_history(opened, key), key=lambda m: m.step)]

    assert history("grad/total_norm") == list(enumerate(reference.clip_norms))
    assert [value for _, value in history("gradtrack/loss")] == pytest.approx(tracked.step_losses(), rel=1e-6)
    assert [step for step, _ in history("train_loss")] == list(range(STEPS))  # accelerate's own, in the same run
    assert len(history("grad_norm/0.weight")) == STEPS // 2
    assert set(CONTRACT_METRICS) <= set(run.data.metrics)
    assert "loss" not in run.data.metrics  # the run is accelerate's: gradtrack's loss key is gradtrack/loss
    assert run.data.params["lr"] == "0.1"  # accelerate's store_init_configuration
    assert run.data.params["gradtrack.clip"] == "norm"
    assert run.data.tags["diverged"] == "false"
    assert run.data.metrics["gradtrack.summary.steps"] == STEPS
    artifacts = {Path(a.path).name for a in client.list_artifacts(opened, "gradtrack")}
    assert {"summary.json", "norms.png"} <= artifacts
    assert (tmp_path / "artifacts").is_dir()


@pytest.mark.slow
def test_log_with_wandb_gradtrack_logs_into_the_run_accelerate_opened(wandb_dir: Path) -> None:
    import wandb

    from gradtrack_testing.wandb_files import WandbRun, run_files

    reference = train(fresh_accelerator(), accelerate_clips=True)
    accelerator = fresh_accelerator(log_with="wandb")
    accelerator.init_trackers("accelerate-wandb", config={"lr": 0.1}, init_kwargs={"wandb": {"dir": str(wandb_dir)}})
    opened = accelerator.get_tracker("wandb", unwrap=True).id
    options = {"backend": "wandb", "max_norm": MAX_NORM, "close_timeout": 120}
    tracked = train(accelerator, accelerate_clips=False, gradtrack=options)
    accelerator.end_training()
    wandb.teardown()

    assert bitwise_equal(tracked, reference)
    files = run_files(wandb_dir)
    assert len(files) == 1, files  # one run: accelerate's
    run = WandbRun.read(files[0])
    assert run.run_id == opened and run.exit_code == 0
    rows = run.rows_with("grad/total_norm")
    assert [row["gradtrack/step"] for row in rows] == list(range(STEPS))
    assert [row["grad/total_norm"] for row in rows] == reference.clip_norms
    assert [row["gradtrack/loss"] for row in run.rows_with("gradtrack/loss")] == pytest.approx(tracked.step_losses(),
                                                                                             rel=1e-6)  # fmt: skip
    assert len(run.rows_with("train_loss")) == STEPS  # accelerate's own rows
    assert run.config["lr"] == 0.1 and run.config["gradtrack"]["clip"] == "norm"
    assert run.summary["gradtrack"]["diverged"] is False and run.summary["gradtrack"]["steps"] == STEPS

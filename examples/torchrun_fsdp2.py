"""A small language model sharded with FSDP2 (or DDP), trained under torchrun, logged once to MLflow.

Every rank enters the same ``GradTracker``: each measures its local shards, one all-reduce per step
makes the norms global, every rank clips with the same coefficient, and only global rank 0 talks to
the tracking server. Runs on CPUs (gloo) or GPUs (NCCL, one per process).

One machine, two processes, the local MLflow store:

    torchrun --nproc_per_node=2 examples/torchrun_fsdp2.py

Several nodes against one shared tracking server (run the same command on every node):

    MLFLOW_TRACKING_URI=http://mlflow.internal:5000 torchrun --nnodes=2 --nproc_per_node=8 \\
        --rdzv_backend=c10d --rdzv_endpoint=node0.internal:29500 examples/torchrun_fsdp2.py --steps 1000

Options: ``--strategy ddp`` wraps the model in DDP instead; ``--backend console`` prints instead of
logging to MLflow; ``--bf16`` keeps the parameters in bf16.
"""

from __future__ import annotations

import argparse
import os
import warnings

import torch
import torch.distributed as dist
from torch import nn

from gradtrack import GradTracker

VOCAB, WIDTH, CONTEXT = 64, 64, 32


class TinyLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, WIDTH)
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(WIDTH, nhead=4, dim_feedforward=128, batch_first=True) for _ in range(2)
        )
        self.head = nn.Linear(WIDTH, VOCAB)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        mask = nn.Transformer.generate_square_subsequent_mask(tokens.shape[1], device=tokens.device)
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x, src_mask=mask, is_causal=True)
        return self.head(x)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--strategy", choices=["fsdp2", "ddp"], default="fsdp2")
    parser.add_argument("--backend", default="mlflow", help="gradtrack backend on rank 0 (default: mlflow)")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--bf16", action="store_true", help="bf16 parameters (FSDP2 only)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    # nn.Linear on 3-D input returns a view; FSDP2 warns about in-place ops on it, which this loop never does
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module")
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, local_rank = dist.get_rank(), int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    torch.manual_seed(0)  # the same initial weights on every rank
    model: nn.Module = TinyLM().to(device)
    if args.strategy == "fsdp2":
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16) if args.bf16 else MixedPrecisionPolicy()
        for block in model.blocks:  # type: ignore[union-attr]
            fully_shard(block, mp_policy=policy)
        fully_shard(model, mp_policy=policy)
    else:
        model = nn.parallel.DistributedDataParallel(model, device_ids=[local_rank] if cuda else None)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    pattern = torch.arange(CONTEXT + 1, device=device) % 7
    generator = torch.Generator(device=device).manual_seed(1000 + rank)  # each rank its own batches
    options = {"mlflow": {"experiment_name": "gradtrack-torchrun", "run_name": args.strategy}}
    with GradTracker(
        model,
        backend=args.backend,
        backend_options=options if args.backend == "mlflow" else None,
        max_norm=1.0,
    ) as tracker:
        for _ in range(args.steps):
            offsets = torch.randint(0, VOCAB - 7, (16, 1), device=device, generator=generator)
            tokens = pattern + offsets
            logits = model(tokens[:, :-1])
            loss = nn.functional.cross_entropy(logits.reshape(-1, VOCAB).float(), tokens[:, 1:].reshape(-1))
            optimizer.zero_grad()
            loss.backward()
            tracker.observe(loss)  # averaged across ranks in the step's one collective
            optimizer.step()
    summary = tracker.summary()
    if rank == 0:
        print(
            f"{args.strategy} on {dist.get_world_size()} ranks: {summary.steps} steps, "
            f"clipped {summary.clipped_steps}, median norm {summary.norm_median:.3g}, diverged {summary.diverged}"
        )
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

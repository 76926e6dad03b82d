"""Inside torch.distributed (DDP over gloo on the CPU): every rank clips alike, only rank 0 reports."""

from __future__ import annotations

import json
import os
import socket
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).parent))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _worker(rank: int, world: int, port: int, out: str) -> None:
    import torch.distributed as dist
    from conftest import RecordingBackend, mlp, regression_batches
    from torch import nn

    from gradtrack import GradTracker

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model = nn.parallel.DistributedDataParallel(mlp(seed=0))
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        recorder = RecordingBackend()
        with GradTracker(model, backend=recorder, max_norm=0.5, layer_every=1) as tracker:
            for x, y in regression_batches(5, seed=rank):  # each rank sees different data
                optimizer.zero_grad()
                nn.functional.mse_loss(model(x).squeeze(-1), y).backward()
                optimizer.step()
        result = {
            "norms": [s.total_norm for s in recorder.of("step")],
            "summary_norm_max": tracker.summary().norm_max,
            "layers": sorted(recorder.of("step")[0].layer_norms or {}) if recorder.of("step") else [],
            "calls": len(recorder.calls),
            "params": [p.detach().flatten().tolist() for p in model.parameters()],
        }
        Path(out, f"rank{rank}.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_ddp_ranks_clip_identically_and_only_rank0_reports(tmp_path: Path) -> None:
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    rank0 = json.loads((tmp_path / "rank0.json").read_text())
    rank1 = json.loads((tmp_path / "rank1.json").read_text())
    assert rank0["calls"] == 7 and len(rank0["norms"]) == 5  # start, 5 steps, end
    assert rank1["calls"] == 0
    assert rank0["layers"][0] == "0.bias"  # the DDP "module." prefix is gone
    assert rank0["summary_norm_max"] == rank1["summary_norm_max"]  # gradients were all-reduced first
    assert rank0["params"] == rank1["params"]

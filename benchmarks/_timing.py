"""Interleaved timing (A B A B ...), medians, sync counting and table printing."""

from __future__ import annotations

import statistics
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch

__all__ = ["Clock", "Samples", "count_syncs", "interleave", "table"]


class Clock:
    """``perf_counter`` that first waits for queued device work, so a timing covers it."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def __call__(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()


@dataclass
class Samples:
    """Per-call wall and thread-CPU seconds of one configuration, plus the untimed settle time after its blocks.

    Thread CPU time (``time.thread_time``) counts only what the calling thread itself computed: it is what a
    configuration costs the training thread, unaffected by whatever else the machine's cores were doing.
    """

    times: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)
    settle: float = 0.0

    @property
    def median_ms(self) -> float:
        return statistics.median(self.times) * 1e3

    @property
    def mean_ms(self) -> float:
        return statistics.fmean(self.times) * 1e3

    @property
    def cpu_mean_ms(self) -> float:
        return statistics.fmean(self.cpu) * 1e3

    @property
    def settle_ms_per_call(self) -> float:
        return self.settle * 1e3 / max(1, len(self.times))


def interleave(
    tasks: Mapping[str, Callable[[], object]],
    clock: Clock,
    calls: int,
    warmup: int,
    block: int,
    prepare: Mapping[str, Callable[[], object]] | None = None,
    settle: Mapping[str, Callable[[], object]] | None = None,
    limits: Mapping[str, int] | None = None,
) -> dict[str, Samples]:
    """Time each task ``calls`` times after ``warmup`` untimed calls, in blocks of ``block`` calls.

    Tasks take turns block by block (A B C A B C ...), starting one later each round, so drift in the
    machine's load hits every task alike. ``prepare[name]`` runs untimed before every call (e.g. to
    restore the gradients); ``settle[name]`` runs after every block, timed separately (e.g. to drain a
    backend's queue, so its backlog is not paid by the next task). ``limits[name]`` caps the timed
    calls of a slow task.
    """
    prepare, settle = prepare or {}, settle or {}
    names = list(tasks)
    samples = {name: Samples() for name in names}
    done = dict.fromkeys(names, -warmup)
    wanted = {name: min(calls, (limits or {}).get(name, calls)) for name in names}
    rounds = 0
    while any(done[name] < wanted[name] for name in names):
        start = rounds % len(names)
        for name in names[start:] + names[:start]:
            for _ in range(block):
                if done[name] >= wanted[name]:
                    break
                if name in prepare:
                    prepare[name]()
                begin, begin_cpu = clock(), time.thread_time()
                tasks[name]()
                elapsed, cpu = clock() - begin, time.thread_time() - begin_cpu
                if done[name] >= 0:
                    samples[name].times.append(elapsed)
                    samples[name].cpu.append(cpu)
                done[name] += 1
            if name in settle:
                begin = clock()
                settle[name]()
                samples[name].settle += clock() - begin
        rounds += 1
    return samples


def count_syncs(fn: Callable[[], object], device: torch.device) -> int | None:
    """Host synchronisations during ``fn`` (CUDA only), as ``set_sync_debug_mode("warn")`` reports them."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchronizing" in str(w.message) for w in caught)


def table(headers: Sequence[str], rows: Sequence[Sequence[str]], markdown: bool) -> str:
    """Right-aligned text table, or a GitHub markdown table."""
    if markdown:
        lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---:" for _ in headers) + "|"]
        lines[1] = "|:---" + lines[1][5:]
        lines += ["| " + " | ".join(row) + " |" for row in rows]
        return "\n".join(lines)
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]

    def fmt(cells: Sequence[str]) -> str:
        padded = [c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True))]
        return "  ".join(padded)

    return "\n".join([fmt(headers), "  ".join("-" * w for w in widths), *(fmt(r) for r in rows)])

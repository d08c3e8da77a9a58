"""What the one-GPU micro-benchmarks share: the command line (``--tokens``, ``--iters``, ``--out``) and timing a
callable with CUDA events (median over calls after warmup, peak memory above the starting allocation)."""

from __future__ import annotations

import argparse
import statistics
from typing import Any, Callable

import torch


def parse_args(doc: str, tokens: str, iters: int, extra: Callable[[argparse.ArgumentParser], None] | None = None):
    """The script's arguments, or None (after saying so) when there is no GPU."""
    ap = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    ap.add_argument("--tokens", default=tokens)
    ap.add_argument("--iters", type=int, default=iters)
    ap.add_argument("--out", default=None, help="path prefix: writes PREFIX.json")
    if extra:
        extra(ap)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("needs CUDA")
        return None
    return args


def timed(fn: Callable[[], Any], iters: int, warmup: int = 3) -> tuple[float, float, Any]:
    """(median ms, peak GiB above the allocation before the timed calls, the last result) of ``fn()``."""
    for _ in range(warmup):
        out = fn()
    del out
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    times = []
    for i in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        out = fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
        if i < iters - 1:
            del out
    return statistics.median(times), (torch.cuda.max_memory_allocated() - base) / 2**30, out

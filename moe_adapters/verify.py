"""Prove two checkpoints hold the same weights: canonical (published HF) views compared tensor by tensor, bitwise.

Both sides are streamed as byte ranges in chunks, whatever their layouts, so verification runs at disk speed in
flat memory. Key sets, dtypes and shapes are compared first; then bytes.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from .converters import ByteTensor
from .checkpoint import open_checkpoint
from .execute import CHUNK, _Sources, default_workers, run_parallel
from .layout import canonical_view
from .manifest import check_files


@dataclass
class VerifyResult:
    a: str
    b: str
    tensors: int
    bytes_compared: int
    seconds: float
    only_in_a: list[str] = field(default_factory=list)
    only_in_b: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)  # "name: what differs"

    @property
    def identical(self) -> bool:
        return not (self.only_in_a or self.only_in_b or self.mismatched)

    def as_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["identical"] = self.identical
        return d


def _chunks(t: ByteTensor, sources: _Sources, buf: memoryview):
    """Fixed-size chunks of a tensor's bytes (so two sides with different segmentations line up)."""
    filled = 0
    for seg in t.segments:
        fd = sources.fd(seg.source)
        pos = seg.start
        while pos < seg.stop:
            n = min(len(buf) - filled, seg.stop - pos)
            got = os.preadv(fd, [buf[filled : filled + n]], pos)
            if got <= 0:
                raise EOFError(seg.source)
            pos += got
            filled += got
            if filled == len(buf):
                yield buf
                filled = 0
    if filled:
        yield buf[:filled]


_local = threading.local()


def same_bytes(x: ByteTensor, y: ByteTensor, progress=None) -> bool:
    bufs = getattr(_local, "bufs", None)
    if bufs is None:
        bufs = _local.bufs = (memoryview(bytearray(CHUNK // 2)), memoryview(bytearray(CHUNK // 2)))
    bx, by = bufs
    sx, sy = _Sources(), _Sources()
    try:
        for cx, cy in zip(_chunks(x, sx, bx), _chunks(y, sy, by)):
            if cx != cy:
                return False
            if progress:
                progress(len(cx))
        return True
    finally:
        sx.close()
        sy.close()


def verify(a: str, b: str, *, workers: int | None = None, reporter=None, max_report: int = 20) -> VerifyResult:
    t0 = time.perf_counter()
    ca, cb = open_checkpoint(a), open_checkpoint(b)
    check_files(ca, checksums=False)
    check_files(cb, checksums=False)
    va, _ = canonical_view(ca)
    vb, _ = canonical_view(cb)
    res = VerifyResult(ca.root, cb.root, 0, 0, 0.0)
    res.only_in_a = sorted(set(va) - set(vb))
    res.only_in_b = sorted(set(vb) - set(va))
    common = [n for n in va if n in vb]
    to_compare = []
    for n in common:
        x, y = va[n], vb[n]
        if x.dtype != y.dtype or x.shape != y.shape:
            res.mismatched.append(f"{n}: {x.dtype}{list(x.shape)} vs {y.dtype}{list(y.shape)}")
        else:
            to_compare.append(n)
    total = sum(va[n].nbytes for n in to_compare)
    if reporter:
        reporter.begin("verify", total)
    adv = reporter.advance if reporter else None
    results = run_parallel(
        [lambda n=n: (n, same_bytes(va[n], vb[n], adv)) for n in to_compare], workers or default_workers()
    )
    if reporter:
        reporter.end()
    res.mismatched += [f"{n}: bytes differ" for n, ok in results if not ok]  # type: ignore[misc]
    res.tensors = len(common)
    res.bytes_compared = total
    res.seconds = time.perf_counter() - t0
    return res

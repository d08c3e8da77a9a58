"""Prove two checkpoints hold the same weights: canonical (published HF) views compared tensor by tensor, bitwise.

Both sides are streamed as byte ranges in chunks, whatever their layouts, so verification runs at disk speed in
flat memory. Key sets, dtypes and shapes are compared first; then bytes.

A fused side is also checked against its own manifest: sizes up front, and the sha256 of every file, hashed in the
same worker pool as the comparison. So `verify` reports a fused folder changed after conversion even when the
other side has the same change (e.g. two copies of one damaged folder), at the cost of reading fused files twice
(the second read mostly from the page cache).
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from .converters import ByteTensor
from .checkpoint import open_checkpoint
from .errors import CheckpointError
from .execute import CHUNK, _Sources, default_workers, run_parallel
from .layout import canonical_view
from .manifest import check_files, checksum_jobs


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
    checksum_failures: list[str] = field(default_factory=list)  # fused files whose sha256 differs from the manifest

    @property
    def identical(self) -> bool:
        return not (self.only_in_a or self.only_in_b or self.mismatched or self.checksum_failures)

    def problems(self) -> list[str]:
        """Every difference, one line each (for the CLI)."""
        return (
            [f"only in {self.a}: {n}" for n in self.only_in_a]
            + [f"only in {self.b}: {n}" for n in self.only_in_b]
            + self.mismatched
            + [f"{p}: sha256 differs from its manifest" for p in self.checksum_failures]
        )

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
                raise CheckpointError(f"file ended early at byte {pos} (truncated while verifying?)", file=seg.source)
            pos += got
            filled += got
            if filled == len(buf):
                yield buf
                filled = 0
    if filled:
        yield buf[:filled]


_local = threading.local()


def same_bytes(x: ByteTensor, y: ByteTensor, progress=None, sources: _Sources | None = None) -> bool:
    bufs = getattr(_local, "bufs", None)
    if bufs is None:
        bufs = _local.bufs = (memoryview(bytearray(CHUNK // 2)), memoryview(bytearray(CHUNK // 2)))
    bx, by = bufs
    own = sources is None
    src = sources or _Sources()
    try:
        for cx, cy in zip(_chunks(x, src, bx), _chunks(y, src, by)):
            if cx != cy:
                return False
            if progress:
                progress(len(cx))
        return True
    finally:
        if own:
            src.close()


def _batches(names: list[str], sizes: dict[str, int], max_bytes: int = 64 << 20, max_count: int = 1024):
    """Group tensors into jobs of bounded bytes and count: ~92k tiny tensors must not be 92k thread-pool jobs."""
    batch: list[str] = []
    size = 0
    for n in names:
        if batch and (size + sizes[n] > max_bytes or len(batch) >= max_count):
            yield batch
            batch, size = [], 0
        batch.append(n)
        size += sizes[n]
    if batch:
        yield batch


def _compare_batch(names: list[str], va, vb, progress) -> list[tuple[str, bool]]:
    sources = _Sources()  # one set of open files per job, not per tensor
    try:
        return [(n, same_bytes(va[n], vb[n], progress, sources)) for n in names]
    finally:
        sources.close()


def verify(a: str, b: str, *, workers: int | None = None, reporter=None, family: str | None = None) -> VerifyResult:
    """`family`: for checkpoints whose config.json does not name a registered family (as `convert --family`)."""
    t0 = time.perf_counter()
    ca, cb = open_checkpoint(a, family), open_checkpoint(b, family)
    check_files(ca)
    check_files(cb)
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
    adv = reporter.advance if reporter else None
    # fused sides against their manifests, in the same pool (once per file when both sides are one folder)
    hash_jobs = list(dict(checksum_jobs(ca, adv) + checksum_jobs(cb, adv)).items())
    if reporter:
        reporter.begin("verify", total + sum(os.path.getsize(p) for p, _ in hash_jobs))
    sizes = {n: va[n].nbytes for n in to_compare}
    jobs = [lambda b=b: _compare_batch(b, va, vb, adv) for b in _batches(to_compare, sizes)]
    done = run_parallel([job for _, job in hash_jobs] + jobs, workers or default_workers())
    results = [r for batch in done[len(hash_jobs) :] for r in batch]  # type: ignore[union-attr]
    if reporter:
        reporter.end()
    res.checksum_failures = [p for (p, _), ok in zip(hash_jobs, done) if not ok]
    res.mismatched += [f"{n}: bytes differ" for n, ok in results if not ok]  # type: ignore[misc]
    res.tensors = len(common)
    res.bytes_compared = total
    res.seconds = time.perf_counter() - t0
    return res

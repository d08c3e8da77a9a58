"""Execute plans: copy byte ranges into new files, hashing what is written, in bounded memory.

Each worker thread owns one reusable buffer; a file is written by one worker from its first byte to its last, so
the output is sequential and the sha256 is computed on the way. Reads and hashing release the GIL, so threads give
real parallel I/O.
"""

from __future__ import annotations

import bisect
import hashlib
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Iterable

from .converters import Segment
from .errors import CheckpointError, DestinationError
from . import computed
from .plan import OutFile

CHUNK = 2 * 1024 * 1024  # small enough that hashing finds the bytes still in CPU cache (2x faster than 16 MB)
Progress = Callable[[int], None]


def default_workers() -> int:
    return max(2, min(8, (os.cpu_count() or 2) * 2))


class _Sources:
    """Per-thread cache of read-only file descriptors for source files."""

    def __init__(self) -> None:
        self.fds: dict[str, int] = {}

    def fd(self, path: str) -> int:
        fd = self.fds.get(path)
        if fd is None:
            try:
                fd = os.open(path, os.O_RDONLY)
            except OSError as e:
                raise CheckpointError(f"cannot open: {e.strerror}", file=path) from None
            self.fds[path] = fd
        return fd

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()


_local = threading.local()


def _buffer() -> memoryview:
    buf = getattr(_local, "buf", None)
    if buf is None:
        buf = _local.buf = memoryview(bytearray(CHUNK))
    return buf


def iter_bytes(segments: Iterable[Segment], sources: _Sources) -> Iterable[memoryview]:
    """The bytes of `segments` in order, in chunks of at most CHUNK (views into this thread's one buffer)."""
    buf = _buffer()
    for seg in segments:
        if computed.is_computed(seg.source):
            data, base = computed.bytes_of(seg.source, seg.start, seg.stop)
            for pos in range(seg.start, seg.stop, CHUNK):
                yield data[pos - base : min(pos + CHUNK, seg.stop) - base]
            continue
        fd = sources.fd(seg.source)
        pos = seg.start
        while pos < seg.stop:
            n = min(CHUNK, seg.stop - pos)
            got = os.preadv(fd, [buf[:n]], pos)
            if got <= 0:
                raise CheckpointError(f"file ended early at byte {pos} (truncated or changed while reading?)", file=seg.source)
            yield buf[:got]
            pos += got


@dataclass
class Written:
    name: str
    size: int
    sha256: str  # of the whole file
    tensor_sha256: dict[str, str] = field(default_factory=dict)  # per tensor, when asked for


class SourceTensorHashes:
    """sha256 of each source tensor, computed from the bytes as they stream past during a copy.

    A conversion reads every source tensor exactly once. A per-expert tensor is read front to back (stacking, gate/up
    concatenation and EP slicing never cut inside it), so hashing it on the way costs no extra read of the source.
    An already-stacked `[E, ...]` tensor is cut by EP rank into slices that different files (threads) may write in
    any order: a slice that arrives ahead of the hash is remembered as a range and read again from the source (the
    page cache, usually) once the bytes before it have been hashed. Together with the recorded raw headers this pins
    every source file down exactly.
    """

    def __init__(self, tensors: dict[str, list[tuple[int, int, str]]]) -> None:
        # path -> sorted [(start, stop, name)] in absolute file offsets
        self._ranges = {path: sorted(r) for path, r in tensors.items()}
        self._starts = {path: [r[0] for r in rs] for path, rs in self._ranges.items()}
        self._state: dict[tuple[str, str], list] = {}  # (path, name) -> [hasher, next expected offset]
        self._lock = threading.Lock()

    def feed(self, path: str, pos: int, data: memoryview) -> None:
        ranges = self._ranges.get(path)
        if not ranges:
            return
        end = pos + len(data)
        i = max(0, bisect.bisect_right(self._starts[path], pos) - 1)
        while i < len(ranges) and ranges[i][0] < end:
            start, stop, name = ranges[i]
            a, b = max(start, pos), min(stop, end)
            if a < b:
                key = (path, name)
                st = self._state.get(key)
                if st is None:
                    with self._lock:  # [hasher, next offset to hash, ranges ahead {start: stop}, lock]
                        st = self._state.setdefault(key, [hashlib.sha256(), start, {}, threading.Lock()])
                with st[3]:
                    if st[1] == a:
                        st[0].update(data[a - pos : b - pos])
                        st[1] = b
                        self._catch_up(path, st)
                    elif a > st[1] and a not in st[2]:
                        st[2][a] = b  # ahead of the hash (another EP slice of a stacked tensor): re-read later
                    else:
                        raise RuntimeError(f"{path}: {name} read twice ({a} after {st[1]})")
            i += 1

    @staticmethod
    def _catch_up(path: str, st: list) -> None:
        """Hash remembered ranges that now continue the hashed prefix, re-reading them from the source."""
        if st[1] not in st[2]:
            return
        fd = os.open(path, os.O_RDONLY)
        try:
            while st[1] in st[2]:
                stop = st[2].pop(st[1])
                pos = st[1]
                while pos < stop:
                    got = os.pread(fd, min(CHUNK, stop - pos), pos)
                    if not got:
                        raise CheckpointError(f"file ended early at byte {pos} (changed while reading?)", file=path)
                    st[0].update(got)
                    pos += len(got)
                st[1] = stop
        finally:
            os.close(fd)

    def missing_from(self, known: dict[str, dict[str, str]]) -> dict[str, dict[str, str]]:
        """sha256 of the tensors that `known` lacks, read from the source now. A conversion split across processes
        needs it: no one process reads a stacked tensor whose EP slices other processes wrote."""
        out: dict[str, dict[str, str]] = {}
        sources = _Sources()
        try:
            for path, ranges in self._ranges.items():
                for start, stop, name in ranges:
                    if name not in known.get(path, {}):
                        h = hashlib.sha256()
                        for chunk in iter_bytes([Segment(path, start, stop)], sources):
                            h.update(chunk)
                        out.setdefault(path, {})[name] = h.hexdigest()
        finally:
            sources.close()
        return out

    def result(self) -> dict[str, dict[str, str]]:
        """path -> {tensor name: sha256} for tensors read completely."""
        out: dict[str, dict[str, str]] = {}
        for path, ranges in self._ranges.items():
            for start, stop, name in ranges:
                st = self._state.get((path, name))
                if stop == start:
                    out.setdefault(path, {})[name] = hashlib.sha256(b"").hexdigest()
                elif st is not None and st[1] == stop:
                    out.setdefault(path, {})[name] = st[0].hexdigest()
        return out


def write_file(
    out_dir: str,
    f: OutFile,
    progress: Progress | None,
    watch: SourceTensorHashes | None = None,
    per_tensor: bool = False,
) -> Written:
    """Write one planned file; sha256 of the file, and of each tensor when `per_tensor`."""
    path = os.path.join(out_dir, f.name)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    h = hashlib.sha256()
    tensor_hashes: dict[str, str] = {}
    sources = _Sources()
    try:
        with open(path, "xb", buffering=0) as out:
            head = len(f.header).to_bytes(8, "little") + f.header
            out.write(head)
            h.update(head)
            for name, t in f.parts:
                th = hashlib.sha256() if per_tensor else None
                for seg in t.segments:
                    pos = seg.start
                    for chunk in iter_bytes((seg,), sources):
                        h.update(chunk)
                        if th is not None:
                            th.update(chunk)
                        if watch is not None:
                            watch.feed(seg.source, pos, chunk)
                        pos += len(chunk)
                        view = chunk
                        while view:
                            n = out.write(view)
                            view = view[n:]
                        if progress:
                            progress(len(chunk))
                if th is not None:
                    tensor_hashes[name] = th.hexdigest()
    except OSError as e:
        raise DestinationError(f"cannot write: {e.strerror or e}", file=path) from None
    finally:
        sources.close()
    size = os.path.getsize(path)
    if size != f.size:
        raise DestinationError(f"wrote {size} bytes, planned {f.size}", file=path)
    return Written(f.name, size, h.hexdigest(), tensor_hashes)


def hash_file(path: str, progress: Progress | None = None) -> str:
    h = hashlib.sha256()
    sources = _Sources()
    try:
        for chunk in iter_bytes([Segment(path, 0, os.path.getsize(path))], sources):
            h.update(chunk)
            if progress:
                progress(len(chunk))
    finally:
        sources.close()
    return h.hexdigest()


def run_parallel(jobs: list[Callable[[], object]], workers: int) -> list[object]:
    """Run jobs on a thread pool; the first failure cancels what has not started and is raised."""
    if workers <= 1 or len(jobs) <= 1:
        return [j() for j in jobs]
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="moe-adapters") as pool:
        futures = [pool.submit(j) for j in jobs]
        try:
            return [fu.result() for fu in futures]
        except BaseException:
            for fu in futures:
                fu.cancel()
            raise


def write_files(
    out_dir: str,
    files: list[OutFile],
    workers: int,
    progress: Progress | None = None,
    watch: SourceTensorHashes | None = None,
    per_tensor: bool = False,
) -> dict[str, Written]:
    order = sorted(files, key=lambda f: -f.size)  # largest first: better balance across workers
    results = run_parallel([lambda f=f: write_file(out_dir, f, progress, watch, per_tensor) for f in order], workers)
    return {w.name: w for w in results}  # type: ignore[union-attr]

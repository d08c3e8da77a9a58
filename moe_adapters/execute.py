"""Execute plans: copy byte ranges into new files, hashing what is written, in bounded memory.

Each worker thread owns one reusable buffer; a file is written by one worker from its first byte to its last, so
the output is sequential and the sha256 is computed on the way. Reads and hashing release the GIL, so threads give
real parallel I/O.
"""

from __future__ import annotations

import hashlib
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Iterable

from .converters import Segment
from .errors import CheckpointError, DestinationError
from .plan import OutFile

CHUNK = 16 * 1024 * 1024
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
    sha256: str


def write_file(out_dir: str, f: OutFile, progress: Progress | None) -> Written:
    path = os.path.join(out_dir, f.name)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    h = hashlib.sha256()
    sources = _Sources()
    try:
        with open(path, "xb", buffering=0) as out:
            head = len(f.header).to_bytes(8, "little") + f.header
            out.write(head)
            h.update(head)
            for _, t in f.parts:
                for chunk in iter_bytes(t.segments, sources):
                    h.update(chunk)
                    view = chunk
                    while view:
                        n = out.write(view)
                        view = view[n:]
                    if progress:
                        progress(len(chunk))
    except OSError as e:
        raise DestinationError(f"cannot write: {e.strerror or e}", file=path) from None
    finally:
        sources.close()
    size = os.path.getsize(path)
    if size != f.size:
        raise DestinationError(f"wrote {size} bytes, planned {f.size}", file=path)
    return Written(f.name, size, h.hexdigest())


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


def write_files(out_dir: str, files: list[OutFile], workers: int, progress: Progress | None = None) -> dict[str, Written]:
    order = sorted(files, key=lambda f: -f.size)  # largest first: better balance across workers
    results = run_parallel([lambda f=f: write_file(out_dir, f, progress) for f in order], workers)
    return {w.name: w for w in results}  # type: ignore[union-attr]

"""Tensors whose bytes must be computed (dequantized, cast) rather than copied.

Such a tensor is registered under a virtual source name; a `ByteTensor` over that name takes part in the layout ops
(stack, concat, EP split) exactly like bytes of a file, so a transform composes with any conversion. The bytes are
produced when a writer reaches them, one tensor at a time per worker thread, and dropped after use.

A producer may also compute a range of rows (along dim 0, e.g. experts of a stacked `[E, ...]` weight): then an EP
rank's file, which needs only its experts' rows, computes only those, instead of the whole tensor once per rank.
"""

from __future__ import annotations

import itertools
import threading
from typing import Callable

from .converters import ByteTensor

PREFIX = "computed://"
Producer = Callable[[], memoryview]
RowsProducer = Callable[[int, int], memoryview]  # rows [r0, r1) along dim 0, row-major

_producers: dict[str, Producer] = {}
_row_producers: dict[str, tuple[RowsProducer, int]] = {}  # source -> (producer, bytes per row)
_ids = itertools.count()
_local = threading.local()


def register(
    dtype: str, shape: tuple[int, ...], produce: Producer, label: str = "", produce_rows: RowsProducer | None = None
) -> ByteTensor:
    """A ByteTensor whose bytes `produce()` returns (row-major, exactly dtype x shape); `produce_rows(r0, r1)`, when
    given, returns the bytes of rows [r0, r1) along dim 0 alone."""
    key = f"{PREFIX}{next(_ids)}/{label}"
    _producers[key] = produce
    t = ByteTensor.contiguous(dtype, shape, key, 0)
    if produce_rows is not None and len(shape) > 1 and shape[0] > 1:
        _row_producers[key] = (produce_rows, t.row_bytes(0))
    return t


def is_computed(source: str) -> bool:
    return source.startswith(PREFIX)


def bytes_of(source: str, start: int = 0, stop: int | None = None) -> tuple[memoryview, int]:
    """Produced bytes covering [start, stop) of a virtual source, and the source offset they begin at. The last
    result is kept per thread (a tensor is read in several chunks). Whole rows only where the producer can."""
    rows = _row_producers.get(source)
    if rows is not None and stop is not None:
        produce_rows, rb = rows
        r0, r1 = start // rb, -(-stop // rb)
        key, base, make = (source, r0, r1), r0 * rb, (lambda: produce_rows(r0, r1))
    else:
        key, base, make = (source, None, None), 0, _producers[source]
    cached = getattr(_local, "last", None)
    if cached is not None and cached[0] == key:
        return cached[1], cached[2]
    data = make()
    _local.last = (key, data, base)
    return data, base


def release(tensors: list[ByteTensor]) -> None:
    """Forget producers once a conversion is done."""
    for t in tensors:
        for s in t.segments:
            _producers.pop(s.source, None)
            _row_producers.pop(s.source, None)
    _local.last = None

"""Tensors whose bytes must be computed (dequantized, cast) rather than copied.

Such a tensor is registered under a virtual source name; a `ByteTensor` over that name takes part in the layout ops
(stack, concat, EP split) exactly like bytes of a file, so a transform composes with any conversion. The bytes are
produced when a writer reaches them, one tensor at a time per worker thread, and dropped after use.
"""

from __future__ import annotations

import itertools
import threading
from typing import Callable

from .converters import ByteTensor

PREFIX = "computed://"
Producer = Callable[[], memoryview]

_producers: dict[str, Producer] = {}
_ids = itertools.count()
_local = threading.local()


def register(dtype: str, shape: tuple[int, ...], produce: Producer, label: str = "") -> ByteTensor:
    """A ByteTensor whose bytes `produce()` returns (row-major, exactly dtype x shape)."""
    key = f"{PREFIX}{next(_ids)}/{label}"
    _producers[key] = produce
    return ByteTensor.contiguous(dtype, shape, key, 0)


def is_computed(source: str) -> bool:
    return source.startswith(PREFIX)


def bytes_of(source: str) -> memoryview:
    """The produced bytes of a virtual source; the last one is kept per thread (a tensor is read in several chunks)."""
    cached = getattr(_local, "last", None)
    if cached is not None and cached[0] == source:
        return cached[1]
    data = _producers[source]()
    _local.last = (source, data)
    return data


def release(tensors: list[ByteTensor]) -> None:
    """Forget producers once a conversion is done."""
    for t in tensors:
        for s in t.segments:
            _producers.pop(s.source, None)
    _local.last = None

"""Tensors as byte ranges.

A safetensors tensor is a row-major run of bytes inside one file. Every conversion we ship first (stacking experts,
fusing gate and up, slicing by expert-parallel rank) only reorders such runs, so a converted tensor is fully
described by an ordered list of byte ranges of its sources. Planning works on these descriptions; nothing is read
until a plan is executed.
"""

from __future__ import annotations

from dataclasses import dataclass
from math import prod

# safetensors dtype name -> bytes per element. Sub-byte dtypes (F4, F6_*) have no byte-aligned rows and are refused.
DTYPE_SIZES: dict[str, int] = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "F8_E8M0": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "I64": 8,
    "U64": 8,
    "F64": 8,
    "C64": 8,
}


class LayoutError(ValueError):
    """Tensors that an op cannot combine (shapes or dtypes that disagree, a split that does not add up)."""


def itemsize(dtype: str) -> int:
    try:
        return DTYPE_SIZES[dtype]
    except KeyError:
        raise LayoutError(f"unsupported dtype {dtype!r}") from None


@dataclass(frozen=True)
class Segment:
    """Bytes [start, stop) of one source (a file path, or any key a reader knows)."""

    source: str
    start: int
    stop: int

    @property
    def nbytes(self) -> int:
        return self.stop - self.start


def _merged(segments: list[Segment]) -> tuple[Segment, ...]:
    """Join neighbours that continue each other in the same source; drop empty ranges."""
    out: list[Segment] = []
    for s in segments:
        if s.stop == s.start:
            continue
        if out and out[-1].source == s.source and out[-1].stop == s.start:
            out[-1] = Segment(s.source, out[-1].start, s.stop)
        else:
            out.append(s)
    return tuple(out)


@dataclass(frozen=True)
class ByteTensor:
    """A tensor described as dtype, shape and the ordered byte ranges that hold its row-major data."""

    dtype: str
    shape: tuple[int, ...]
    segments: tuple[Segment, ...]

    def __post_init__(self) -> None:
        want = prod(self.shape) * itemsize(self.dtype)
        have = sum(s.nbytes for s in self.segments)
        if want != have:
            raise LayoutError(f"{self.dtype}{list(self.shape)} needs {want} bytes, its ranges hold {have}")

    @classmethod
    def contiguous(cls, dtype: str, shape: tuple[int, ...] | list[int], source: str, start: int) -> "ByteTensor":
        shape = tuple(int(d) for d in shape)
        n = prod(shape) * itemsize(dtype)
        return cls(dtype, shape, _merged([Segment(source, start, start + n)]))

    @property
    def nbytes(self) -> int:
        return prod(self.shape) * itemsize(self.dtype)

    def byte_range(self, start: int, stop: int) -> tuple[Segment, ...]:
        """The ranges holding bytes [start, stop) of this tensor's data."""
        out: list[Segment] = []
        pos = 0
        for s in self.segments:
            lo, hi = pos, pos + s.nbytes
            pos = hi
            if hi <= start:
                continue
            if lo >= stop:
                break
            a = s.start + max(0, start - lo)
            b = s.start + min(s.nbytes, stop - lo)
            out.append(Segment(s.source, a, b))
        return tuple(out)

    def row_bytes(self, dim: int) -> int:
        """Bytes of one step along `dim` (the product of the trailing dims times the item size)."""
        return prod(self.shape[dim + 1 :]) * itemsize(self.dtype)

    def is_contiguous_in_one_source(self) -> bool:
        return len(self.segments) <= 1


def build(dtype: str, shape: tuple[int, ...], segments: list[Segment]) -> ByteTensor:
    return ByteTensor(dtype, tuple(shape), _merged(segments))

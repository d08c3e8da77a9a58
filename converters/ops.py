"""Small reversible ops that family declarations compose.

Each op turns a list of tensors into a list of tensors and knows its exact inverse (`op.inverse()`). The
layout-only ops (Stack, Unstack, Concat, Split) work on `ByteTensor`s, i.e. they only reorder byte ranges, so
they run on headers alone and stay exact by construction. Ops that must move bytes (Transpose) work on real
torch tensors, one tensor at a time. Renames act on names.

A one-way op (Dequantize) says so: its `inverse()` raises, because no exact inverse exists.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from math import prod
from typing import Any, Sequence

from .refs import ByteTensor, LayoutError, Segment, build


class NotReversible(LayoutError):
    """Raised by `inverse()` of a one-way op."""


# --- names ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Rename:
    """Replace literal text `old` by `new` in a key; `anchored` replaces only a leading prefix.

    Literal (not regex) so that the inverse is obvious: swap `old` and `new`. Whether a rename really is a bijection on
    a given checkpoint's keys is checked by the planner (forward then inverse must return the key).
    """

    old: str
    new: str
    anchored: bool = False

    def apply(self, name: str) -> str:
        if self.anchored:
            return self.new + name[len(self.old) :] if name.startswith(self.old) else name
        return name.replace(self.old, self.new)

    def inverse(self) -> "Rename":
        return Rename(self.new, self.old, self.anchored)


def rename_all(renames: Sequence[Rename], name: str) -> str:
    for r in renames:
        name = r.apply(name)
    return name


def unrename_all(renames: Sequence[Rename], name: str) -> str:
    for r in reversed(renames):
        name = r.inverse().apply(name)
    return name


# --- layout ops on byte ranges -------------------------------------------------------------------------------------


def _same_dtype(ts: Sequence[ByteTensor]) -> str:
    dtypes = {t.dtype for t in ts}
    if len(dtypes) != 1:
        raise LayoutError(f"cannot combine dtypes {sorted(dtypes)}")
    return dtypes.pop()


@dataclass(frozen=True)
class Stack:
    """N tensors of one shape -> one tensor [N, *shape] (a new leading dim). Inverse: Unstack."""

    def apply(self, ts: Sequence[ByteTensor]) -> list[ByteTensor]:
        if not ts:
            raise LayoutError("nothing to stack")
        dtype = _same_dtype(ts)
        shapes = {t.shape for t in ts}
        if len(shapes) != 1:
            raise LayoutError(f"cannot stack shapes {sorted(shapes)}")
        segs = [s for t in ts for s in t.segments]
        return [build(dtype, (len(ts), *ts[0].shape), segs)]

    def inverse(self) -> "Unstack":
        return Unstack()


@dataclass(frozen=True)
class Unstack:
    """One tensor [N, *shape] -> N tensors of `shape`. Inverse: Stack."""

    def apply(self, ts: Sequence[ByteTensor]) -> list[ByteTensor]:
        (t,) = ts
        if not t.shape:
            raise LayoutError("cannot unstack a scalar")
        step = t.row_bytes(0)
        return [build(t.dtype, t.shape[1:], list(t.byte_range(i * step, (i + 1) * step))) for i in range(t.shape[0])]

    def inverse(self) -> Stack:
        return Stack()


@dataclass(frozen=True)
class Concat:
    """Join tensors along `dim` (all other dims equal). Inverse: Split with the input sizes.

    In row-major order the result is, for each index of the dims before `dim`, each input's block in turn.
    """

    dim: int
    sizes: tuple[int, ...] | None = None  # the input sizes on `dim`, when known in advance (needed by inverse())

    def apply(self, ts: Sequence[ByteTensor]) -> list[ByteTensor]:
        if not ts:
            raise LayoutError("nothing to concatenate")
        if self.sizes is not None and tuple(t.shape[self.dim] for t in ts) != self.sizes:
            raise LayoutError(f"expected sizes {list(self.sizes)} on dim {self.dim}")
        dtype = _same_dtype(ts)
        d = self.dim
        rank = len(ts[0].shape)
        if not 0 <= d < rank:
            raise LayoutError(f"concat dim {d} out of range for rank {rank}")
        for t in ts:
            if len(t.shape) != rank or t.shape[:d] != ts[0].shape[:d] or t.shape[d + 1 :] != ts[0].shape[d + 1 :]:
                raise LayoutError(f"cannot concatenate shapes {[list(x.shape) for x in ts]} on dim {d}")
        outer = prod(ts[0].shape[:d])
        blocks = [t.shape[d] * t.row_bytes(d) for t in ts]
        segs: list[Segment] = []
        for i in range(outer):
            for t, b in zip(ts, blocks):
                segs.extend(t.byte_range(i * b, (i + 1) * b))
        shape = list(ts[0].shape)
        shape[d] = sum(t.shape[d] for t in ts)
        return [build(dtype, tuple(shape), segs)]

    def inverse(self) -> "Split":
        if self.sizes is None:
            raise LayoutError("Concat.inverse() needs the input sizes: use Concat(dim, sizes)")
        return Split(self.dim, self.sizes)


@dataclass(frozen=True)
class Split:
    """Cut one tensor along `dim` into pieces of `sizes`. Inverse: Concat on the same dim.

    Splitting dim 0 into equal blocks is how a fused expert tensor is sliced by expert-parallel rank.
    """

    dim: int
    sizes: tuple[int, ...]

    def apply(self, ts: Sequence[ByteTensor]) -> list[ByteTensor]:
        (t,) = ts
        d = self.dim
        if not 0 <= d < len(t.shape):
            raise LayoutError(f"split dim {d} out of range for shape {list(t.shape)}")
        if sum(self.sizes) != t.shape[d] or any(s < 0 for s in self.sizes):
            raise LayoutError(f"sizes {list(self.sizes)} do not split dim {d} of {list(t.shape)}")
        outer = prod(t.shape[:d])
        row = t.row_bytes(d)
        block = t.shape[d] * row
        outs = []
        start = 0
        for size in self.sizes:
            segs: list[Segment] = []
            for i in range(outer):
                segs.extend(t.byte_range(i * block + start * row, i * block + (start + size) * row))
            shape = list(t.shape)
            shape[d] = size
            outs.append(build(t.dtype, tuple(shape), segs))
            start += size
        return outs

    def inverse(self) -> Concat:
        return Concat(self.dim, self.sizes)


def even_split(n: int, parts: int) -> tuple[int, ...]:
    """Sizes of `parts` contiguous equal blocks of `n` (n must divide evenly: an expert belongs to one rank)."""
    if parts <= 0 or n % parts:
        raise LayoutError(f"{n} cannot be split into {parts} equal blocks")
    return (n // parts,) * parts


# --- ops that move bytes (real tensors) ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Transpose:
    """Swap two dims of a real tensor (materialises one tensor). Its own inverse."""

    dim0: int
    dim1: int

    def apply_tensors(self, ts: Sequence[Any]) -> list[Any]:
        return [t.transpose(self.dim0, self.dim1).contiguous() for t in ts]

    def inverse(self) -> "Transpose":
        return self


@dataclass(frozen=True)
class Dequantize:
    """Block-scaled FP8 -> a wide dtype: w * scale_inv broadcast over `block` tiles of the last two dims.

    One way: rounding to the target dtype loses the FP8 code, so there is no exact inverse.
    """

    block: tuple[int, int] = (128, 128)
    dtype: str = "bfloat16"

    def apply_tensors(self, ts: Sequence[Any]) -> list[Any]:
        import torch

        w, scale = ts
        bm, bn = self.block
        m, n = w.shape[-2], w.shape[-1]
        s = scale.to(torch.float32)
        s = s.repeat_interleave(bm, dim=-2)[..., :m, :].repeat_interleave(bn, dim=-1)[..., :n]
        return [(w.to(torch.float32) * s).to(getattr(torch, self.dtype))]

    def inverse(self) -> "Dequantize":
        raise NotReversible("dequantization rounds: it has no exact inverse")


# The 16 values of an FP4 (E2M1) code, as the OCP MX spec and transformers' integrations/mxfp4.py list them.
FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


@dataclass(frozen=True)
class DequantizeMXFP4:
    """MXFP4 (gpt-oss) -> a wide dtype: `blocks [..., R, G, 16]` (U8, two FP4 codes per byte, low nibble first) and
    `scales [..., R, G]` (U8, a power-of-two exponent biased by 127, one per 32 values) -> `[..., R, G * 32]`, then,
    with `transpose`, dims 1 and 2 swapped (gpt-oss stores `[E, out, in]` blocks for a `[E, in, out]` weight).

    The same operations in the same order as transformers' `integrations/mxfp4.py` `_convert_moe_packed_tensors`
    (look-up table in the target dtype, `ldexp` in place), so the result is bitwise what transformers computes. One
    way: the FP4 codes are not recoverable from a rounded wide tensor in general.
    """

    dtype: str = "bfloat16"
    transpose: bool = True
    rows_per_chunk: int = 1 << 20

    def apply_tensors(self, ts: Sequence[Any]) -> list[Any]:
        import torch

        blocks, scales = ts
        if blocks.dtype != torch.uint8 or scales.dtype != torch.uint8:
            raise LayoutError(f"MXFP4 blocks and scales must be uint8, got {blocks.dtype} and {scales.dtype}")
        if tuple(blocks.shape[:-1]) != tuple(scales.shape):
            raise LayoutError(f"MXFP4 blocks {list(blocks.shape)} do not match scales {list(scales.shape)}")
        dtype = getattr(torch, self.dtype)
        lut = torch.tensor(FP4_VALUES, dtype=dtype)
        *prefix, G, B = blocks.shape
        rows = prod(prefix) * G
        blk = blocks.reshape(rows, B)
        exp = scales.to(torch.int32).reshape(rows, 1) - 127
        out = torch.empty(rows, B * 2, dtype=dtype)
        for r0 in range(0, rows, self.rows_per_chunk):
            r1 = min(r0 + self.rows_per_chunk, rows)
            sub = out[r0:r1]
            sub[:, 0::2] = lut[(blk[r0:r1] & 0x0F).to(torch.int)]
            sub[:, 1::2] = lut[(blk[r0:r1] >> 4).to(torch.int)]
            torch.ldexp(sub, exp[r0:r1], out=sub)
        out = out.reshape(*prefix, G * B * 2)
        return [out.transpose(1, 2).contiguous() if self.transpose else out]

    def inverse(self) -> "DequantizeMXFP4":
        raise NotReversible("MXFP4 dequantization has no exact inverse")


def check_pattern(pattern: str) -> re.Pattern[str]:
    """Compile a declaration template such as 'model.layers.{L}.mlp.experts.{E}.{proj}' into a regex."""
    rx = re.escape(pattern)
    for field, sub in (("L", r"(?P<L>\d+)"), ("E", r"(?P<E>\d+)"), ("proj", r"(?P<proj>[A-Za-z0-9_]+)")):
        rx = rx.replace(re.escape("{" + field + "}"), sub)
    return re.compile(rx)

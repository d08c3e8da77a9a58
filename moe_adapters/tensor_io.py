"""Read tensors of any checkpoint layout under v5 names, reading only the bytes asked for.

The runtime uses this to give each EP rank just its experts: a fused parameter's rows [start, stop) on the expert
dim are a sub-list of byte ranges, whether the checkpoint is HF (per-expert tensors), packed or fused at any EP
size. FP8 block-scaled weights can be dequantized on the fly, one tensor at a time.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from .converters import ByteTensor, Dequantize, DequantizeMXFP4, Split
from .checkpoint import Checkpoint, open_checkpoint
from .errors import ModelError
from .execute import _Sources, iter_bytes
from .layout import ExpertMap, canonical_view, full_fused_view

if TYPE_CHECKING:
    import torch

TORCH_DTYPES = {
    "BOOL": "bool",
    "U8": "uint8",
    "I8": "int8",
    "I16": "int16",
    "U16": "uint16",
    "I32": "int32",
    "U32": "uint32",
    "I64": "int64",
    "U64": "uint64",
    "F16": "float16",
    "BF16": "bfloat16",
    "F32": "float32",
    "F64": "float64",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
    "F8_E8M0": "float8_e8m0fnu",
}


def torch_dtype(name: str) -> "torch.dtype":
    import torch

    return getattr(torch, TORCH_DTYPES[name])


def materialize(t: ByteTensor) -> "torch.Tensor":
    """Read a ByteTensor's bytes into a new torch tensor (its own memory, writable)."""
    import torch

    buf = bytearray(t.nbytes)
    view = memoryview(buf)
    pos = 0
    sources = _Sources()
    try:
        for chunk in iter_bytes(t.segments, sources):
            view[pos : pos + len(chunk)] = chunk
            pos += len(chunk)
    finally:
        sources.close()
    if not buf:
        return torch.empty(t.shape, dtype=torch_dtype(t.dtype))
    return torch.frombuffer(buf, dtype=torch_dtype(t.dtype)).reshape(t.shape)


class WeightReader:
    """v5-named tensors of a checkpoint (any layout), read lazily by byte range."""

    def __init__(self, ckpt: Checkpoint | str, family: str | None = None) -> None:
        self.ckpt = ckpt if isinstance(ckpt, Checkpoint) else open_checkpoint(ckpt, family)
        canonical, self.emap = canonical_view(self.ckpt)
        self.tensors: dict[str, ByteTensor] = full_fused_view(canonical, self.emap)

    @property
    def family(self):
        return self.ckpt.family

    @property
    def config(self) -> dict:
        return self.ckpt.config

    @property
    def expert_map(self) -> ExpertMap:
        return self.emap

    def fused_names(self) -> list[str]:
        return list(self.tensors)

    def is_expert_param(self, name: str) -> bool:
        return name in self.emap.param_by_name

    def ref(self, name: str, expert_range: tuple[int, int] | None = None) -> ByteTensor:
        try:
            t = self.tensors[name]
        except KeyError:
            raise ModelError("no such tensor", file=self.ckpt.root, tensor=name) from None
        if expert_range is None:
            return t
        if name not in self.emap.param_by_name:
            raise ModelError("expert_range given for a tensor that is not a fused expert parameter", tensor=name)
        a, b = expert_range
        E = t.shape[0]
        if not 0 <= a <= b <= E:
            raise ModelError(f"expert range {expert_range} outside 0..{E}", tensor=name)
        return Split(0, (a, b - a, E - b)).apply([t])[1]

    def read(self, name: str, expert_range: tuple[int, int] | None = None) -> "torch.Tensor":
        return materialize(self.ref(name, expert_range))

    def read_dequantized(
        self, name: str, expert_range: tuple[int, int] | None = None, dtype: "torch.dtype | None" = None
    ) -> "torch.Tensor":
        """A weight in `dtype`; FP8 weights are multiplied by their 128x128 block scales (`*_scale_inv`)."""
        import torch

        dtype = dtype or torch.bfloat16
        w = self.read(name, expert_range)
        scale_name = _scale_name(name)
        if w.dtype not in (torch.float8_e4m3fn, torch.float8_e5m2) or scale_name not in self.tensors:
            return w.to(dtype)
        s = self.read(scale_name, expert_range if expert_range and scale_name in self.emap.param_by_name else None)
        block = tuple((self.config.get("quantization_config") or {}).get("weight_block_size") or (128, 128))
        deq = Dequantize(block=(int(block[0]), int(block[1])), dtype=str(dtype).removeprefix("torch."))
        p = self.emap.param_by_name.get(name)
        n = len(p.projs) if p and p.projs else 1
        if n == 1:
            return deq.apply_tensors([w, s])[0]
        # A fused gate_up: each projection has its own block grid, so dequantize the parts separately.
        ws, ss = w.chunk(n, dim=-2), s.chunk(n, dim=-2)
        return torch.cat([deq.apply_tensors([wi, si])[0] for wi, si in zip(ws, ss)], dim=-2)


    def read_mxfp4(
        self, name: str, expert_range: tuple[int, int] | None = None, dtype: "torch.dtype | None" = None
    ) -> "torch.Tensor":
        """The weight `name` from its MXFP4 `name_blocks` + `name_scales` (gpt-oss's published form), dequantized as
        transformers does (``DequantizeMXFP4``), in the declared orientation; `expert_range` reads only those experts'
        rows of blocks and scales."""
        import torch

        blocks = self.read(name + "_blocks", expert_range)
        scales = self.read(name + "_scales", expert_range)
        ex = self.family.experts
        op = DequantizeMXFP4(dtype=str(dtype or torch.bfloat16).removeprefix("torch."), transpose=ex.transposed)
        return op.apply_tensors([blocks, scales])[0]


def _scale_name(name: str) -> str:
    return name[: -len(".weight")] + ".weight_scale_inv" if name.endswith(".weight") else name + "_scale_inv"


def open_reader(path: str | os.PathLike, family: str | None = None) -> WeightReader:
    return WeightReader(str(path), family)

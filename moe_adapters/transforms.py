"""Lossy transforms a user asks for explicitly: FP8 block and MXFP4 dequantization, and dtype casts.

They act on the canonical (published HF) tensors before any layout is planned, replacing a tensor's byte ranges by
a computed tensor (see `computed`), so they compose with every conversion and EP size. Each computed tensor is
produced on demand, one at a time per worker. The default conversion never uses them: it is lossless.
"""

from __future__ import annotations

from typing import Any

from .computed import register
from .converters import ByteTensor, Dequantize, DequantizeMXFP4
from .converters.refs import build
from .errors import ModelError
from .tensor_io import TORCH_DTYPES, materialize, torch_dtype

DTYPE_NAMES = {"bf16": "BF16", "bfloat16": "BF16", "fp16": "F16", "float16": "F16", "fp32": "F32", "float32": "F32"}
FLOAT_DTYPES = {"F16", "BF16", "F32", "F64"}
FP8_DTYPES = {"F8_E4M3", "F8_E5M2"}


def dtype_name(text: str) -> str:
    try:
        return DTYPE_NAMES[text.lower()]
    except KeyError:
        raise ModelError(f"unsupported dtype {text!r} (use one of: {', '.join(sorted(DTYPE_NAMES))})") from None


def _as_bytes(t: Any) -> memoryview:
    import torch

    return memoryview(t.contiguous().view(torch.uint8).numpy()).cast("B")


def _rows(t: ByteTensor, r0: int, r1: int) -> ByteTensor:
    """Rows [r0, r1) of `t` along dim 0 (e.g. some experts of a stacked weight), as byte ranges: nothing is read."""
    rb = t.row_bytes(0)
    return build(t.dtype, (r1 - r0, *t.shape[1:]), list(t.byte_range(r0 * rb, r1 * rb)))


def dequantize_fp8(
    canonical: dict[str, ByteTensor], config: dict[str, Any], dtype: str
) -> tuple[dict[str, ByteTensor], dict[str, Any]]:
    """Every FP8 `X.weight` with a `X.weight_scale_inv` becomes a `dtype` `X.weight` (w * scale over 128x128 blocks,
    or the block size in quantization_config); the scales and `quantization_config` are dropped consistently."""
    qc = config.get("quantization_config") or {}
    block = tuple(int(b) for b in (qc.get("weight_block_size") or (128, 128)))
    if len(block) != 2:
        raise ModelError(f"weight_block_size {list(block)} is not two block dims", file="config.json")
    target = dtype_name(dtype)
    op = Dequantize(block=(block[0], block[1]), dtype=TORCH_DTYPES[target])
    out: dict[str, ByteTensor] = {}
    used_scales = set()
    for name, t in canonical.items():
        scale_name = name + "_scale_inv" if name.endswith(".weight") else None
        if t.dtype in FP8_DTYPES and scale_name in canonical:
            w_ref, s_ref = t, canonical[scale_name]
            used_scales.add(scale_name)
            need = tuple(-(-d // b) for d, b in zip(t.shape[-2:], block))  # one scale per block, partial ones too
            if len(t.shape) != 2 or len(s_ref.shape) != 2 or any(h < n for h, n in zip(s_ref.shape, need)):
                raise ModelError(
                    f"scale grid {list(s_ref.shape)} does not cover weight {list(t.shape)} in {block[0]}x{block[1]} "
                    f"blocks (needs at least {list(need)})",
                    tensor=scale_name,
                )

            def produce(w_ref: ByteTensor = w_ref, s_ref: ByteTensor = s_ref) -> memoryview:
                return _as_bytes(op.apply_tensors([materialize(w_ref), materialize(s_ref)])[0])

            out[name] = register(target, t.shape, produce, name)
        elif t.dtype in FP8_DTYPES:
            raise ModelError("FP8 weight without a weight_scale_inv: cannot dequantize", tensor=name)
        else:
            out[name] = t
    for s in used_scales:
        del out[s]
    new_config = {k: v for k, v in config.items() if k != "quantization_config"}
    for key in ("torch_dtype", "dtype"):
        if key in new_config:
            new_config[key] = TORCH_DTYPES[target]
    return out, new_config


MXFP4_SUFFIXES = ("_blocks", "_scales")


def dequantize(
    canonical: dict[str, ByteTensor], config: dict[str, Any], dtype: str, *, transposed: bool = True
) -> tuple[dict[str, ByteTensor], dict[str, Any]]:
    """`--dequantize DTYPE`: MXFP4 when config.json's quantization_config says so (or the checkpoint holds
    `*_blocks`/`*_scales` pairs), else FP8 block-scaled."""
    qc = config.get("quantization_config") or {}
    method = qc.get("quant_method") if isinstance(qc, dict) else None
    if method == "mxfp4" or (method is None and any(n.endswith("_blocks") for n in canonical)):
        return dequantize_mxfp4(canonical, config, dtype, transposed=transposed)
    return dequantize_fp8(canonical, config, dtype)


def dequantize_mxfp4(
    canonical: dict[str, ByteTensor], config: dict[str, Any], dtype: str, *, transposed: bool = True
) -> tuple[dict[str, ByteTensor], dict[str, Any]]:
    """Every `X_blocks` (U8 [..., R, G, 16]) with its `X_scales` (U8 [..., R, G]) becomes a `dtype` tensor `X`
    computed as transformers computes it (`DequantizeMXFP4`): [E, in, out] when `transposed` (gpt-oss declares its
    experts so), else [E, out, in]. The pair is replaced in place (X takes the blocks' position); the scales and
    `quantization_config` are dropped."""
    target = dtype_name(dtype)
    op = DequantizeMXFP4(dtype=TORCH_DTYPES[target], transpose=transposed)
    out: dict[str, ByteTensor] = {}
    for name, t in canonical.items():
        if name.endswith("_scales") and name[: -len("_scales")] + "_blocks" in canonical:
            continue  # consumed with its blocks
        if not name.endswith("_blocks"):
            out[name] = t
            continue
        base = name[: -len("_blocks")]
        s = canonical.get(base + "_scales")
        if s is None:
            raise ModelError("MXFP4 blocks without their _scales: cannot dequantize", tensor=name)
        if t.dtype != "U8" or s.dtype != "U8" or len(t.shape) < 3 or t.shape[:-1] != s.shape:
            raise ModelError(
                f"not MXFP4: blocks {t.dtype}{list(t.shape)}, scales {s.dtype}{list(s.shape)} (want U8 [..., R, G, 16] "
                "and U8 [..., R, G])",
                tensor=name,
            )
        if base in canonical:
            raise ModelError("both MXFP4 blocks and a plain weight of the same name", tensor=base)
        shape = (*t.shape[:-2], t.shape[-2] * t.shape[-1] * 2)
        if transposed:
            if len(shape) < 3:
                raise ModelError(f"cannot transpose a rank-{len(shape)} MXFP4 weight", tensor=name)
            shape = (shape[0], shape[2], shape[1], *shape[3:])

        def produce(b_ref: ByteTensor = t, s_ref: ByteTensor = s) -> memoryview:
            return _as_bytes(op.apply_tensors([materialize(b_ref), materialize(s_ref)])[0])

        def produce_rows(r0: int, r1: int, b_ref: ByteTensor = t, s_ref: ByteTensor = s) -> memoryview:
            # experts are independent: an EP rank's file dequantizes only its experts' blocks
            return _as_bytes(op.apply_tensors([materialize(_rows(b_ref, r0, r1)), materialize(_rows(s_ref, r0, r1))])[0])

        rows = produce_rows if len(t.shape) > 3 else None  # [E, R, G, 16]: dim 0 is the expert
        out[base] = register(target, shape, produce, base, produce_rows=rows)
    new_config = {k: v for k, v in config.items() if k != "quantization_config"}
    for key in ("torch_dtype", "dtype"):
        if key in new_config:
            new_config[key] = TORCH_DTYPES[target]
    return out, new_config


def cast(
    canonical: dict[str, ByteTensor], config: dict[str, Any], dtype: str, keep: set[str] | None = None
) -> tuple[dict[str, ByteTensor], dict[str, Any]]:
    """Cast floating-point tensors (not FP8 codes or their scales, not names in `keep`) to `dtype`."""
    target = dtype_name(dtype)
    keep = keep or set()
    out: dict[str, ByteTensor] = {}
    for name, t in canonical.items():
        if t.dtype in FLOAT_DTYPES and t.dtype != target and name not in keep and not name.endswith("_scale_inv"):

            def produce(ref: ByteTensor = t) -> memoryview:
                return _as_bytes(materialize(ref).to(torch_dtype(target)))

            def produce_rows(r0: int, r1: int, ref: ByteTensor = t) -> memoryview:
                return _as_bytes(materialize(_rows(ref, r0, r1)).to(torch_dtype(target)))

            out[name] = register(target, t.shape, produce, name, produce_rows=produce_rows)
        else:
            out[name] = t
    new_config = dict(config)
    for key in ("torch_dtype", "dtype"):
        if key in new_config:
            new_config[key] = TORCH_DTYPES[target]
    return out, new_config

"""``out[r] = sum_j src[index[r, j]]``: the unpermute of the MoE block, as one pass over memory and without atomics.

Both ends of the expert computation add rows that are spread over a sorted buffer back into token order: the block's
combine (each token's ``k`` expert outputs), the input gradient of the permute (the same sum, backward), and the EP
combine (each token's partial sums from up to ``ep`` ranks). ``index`` holds, per output row, the positions of its
source rows, ``-1`` where a slot has none (a remote expert, a rank the token did not go to).

Eager torch does this as a gather into a ``[R, k, H]`` tensor and a sum (two passes, one of them writing ``k`` times
the output), or, once slots are dropped, as an fp32 ``index_add`` with atomics (a full fp32 copy of the source, then
scattered adds in no fixed order). On CUDA with Triton importable, one kernel reads each valid source row once,
adds in fp32 in ``j`` order and writes the output once; masked loads skip the ``-1`` slots, so dropped slots cost no
memory traffic. Anywhere else the torch code below computes the same sum in the same order (for dropped slots;
where every slot is present, torch's own reduction over ``k``); neither uses atomics, so both are deterministic.

The kernel runs only on CUDA: CI has no GPU, so it is tested on the device (``tests/test_runtime_gpu.py``, bitwise
against a per-slot fp32 loop). ``MOE_ADAPTERS_NO_TRITON=1`` turns it off. Measured on an H200
(``benchmarks/gpu_combine.py``, 8,192 tokens, Qwen3-30B-A3B widths): 2.6x faster than the gather and sum at EP=1,
8-11x faster than the fp32 ``index_add`` at EP=2-8.
"""

from __future__ import annotations

from typing import Any

import torch

from .compiled import triton_warps, use_triton

_KERNEL: Any = None


def _kernel() -> Any:
    global _KERNEL
    if _KERNEL is None:
        import triton  # noqa: PLC0415
        import triton.language as tl  # noqa: PLC0415

        @triton.jit
        def gather_sum_kernel(src, index, out, H, K: tl.constexpr, BLOCK_H: tl.constexpr):
            r = tl.program_id(0).to(tl.int64)
            cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
            in_row = cols < H
            acc = tl.zeros([BLOCK_H], dtype=tl.float32)
            for j in tl.static_range(K):
                i = tl.load(index + r * K + j).to(tl.int64)
                acc += tl.load(src + i * H + cols, mask=in_row & (i >= 0), other=0.0).to(tl.float32)
            tl.store(out + r * H + cols, acc.to(out.dtype.element_ty), mask=in_row)

        _KERNEL = (triton, gather_sum_kernel)
    return _KERNEL


def _gather_sum_kernel(src: torch.Tensor, index: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    R, K = index.shape
    H = src.shape[-1]
    out = torch.empty(R, H, dtype=out_dtype, device=src.device)
    if R == 0 or H == 0:
        return out.zero_()
    triton, kernel = _kernel()
    block = min(triton.next_power_of_2(H), 2048)
    grid = (R, triton.cdiv(H, block))
    kernel[grid](src.contiguous(), index.contiguous(), out, H, K=K, BLOCK_H=block, num_warps=triton_warps(block))
    return out


def gather_sum_reference(
    src: torch.Tensor, index: torch.Tensor, out_dtype: torch.dtype, complete: bool = False
) -> torch.Tensor:
    """The torch version. ``complete``: the caller knows no entry is -1 (one gather, a sum over ``k``)."""
    R, K = index.shape
    H = src.shape[-1]
    if complete:
        if K == 1:
            return src.index_select(0, index.reshape(-1)).to(out_dtype)
        return src.index_select(0, index.reshape(-1)).view(R, K, H).sum(1, dtype=torch.float32).to(out_dtype)
    acc = torch.zeros(R, H, dtype=torch.float32, device=src.device)
    for j in range(K):  # j order, as the kernel adds (no atomics, so deterministic on any device)
        col = index[:, j]
        acc += torch.where((col >= 0).unsqueeze(1), src.index_select(0, col.clamp(min=0)).float(), 0.0)
    return acc.to(out_dtype)


def gather_sum(
    src: torch.Tensor, index: torch.Tensor, out_dtype: torch.dtype | None = None, complete: bool = False
) -> torch.Tensor:
    """``[R, H]``: row ``r`` is the fp32 sum of ``src[index[r, j]]`` over ``j`` with ``index[r, j] >= 0``, in
    `out_dtype` (``src``'s by default). ``src [N, H]``, ``index [R, K]`` integer. No autograd (see
    :class:`GatherSum`)."""
    out_dtype = out_dtype or src.dtype
    if use_triton(src):
        return _gather_sum_kernel(src, index, out_dtype)
    return gather_sum_reference(src, index, out_dtype, complete)


class GatherSum(torch.autograd.Function):
    """:func:`gather_sum` with its gradient, for sources whose rows each feed exactly one output row (the EP combine):
    ``owner[i]`` is the output row of source row ``i``, so the backward is one gather ``d_out[owner]``."""

    @staticmethod
    def forward(ctx, src, index, owner, out_dtype):  # type: ignore[override]
        ctx.save_for_backward(owner)
        ctx.src_dtype = src.dtype
        return gather_sum(src, index, out_dtype)

    @staticmethod
    def backward(ctx, d_out):  # type: ignore[override]
        (owner,) = ctx.saved_tensors
        return d_out.index_select(0, owner).to(ctx.src_dtype), None, None, None


__all__ = ["GatherSum", "gather_sum", "gather_sum_reference"]

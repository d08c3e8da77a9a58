"""The experts' activation (with the routing weight folded in), forward and backward, as one Triton kernel each.

Between the two grouped GEMMs of the backward sits everything elementwise: from the saved gate/up output ``gu`` and
``d_hu = W_down^T d_row`` it makes the weighted activation for the down-weight gradient, the gradient of ``gu`` and
the routing weight's gradient (a dot product per row). Inductor compiles that math
(``experts.fused_act_backward_math``) into two kernels, a reduction and a pointwise pass, each reading the inputs;
this kernel does it in one pass, one row per program (in chunks of 2048 columns for wide experts): ``gu`` and
``d_hu`` are read once, ``hw`` and ``d_gu`` written once. The math is the same fp32 formulas (``experts._act_f32``),
rounded once. The forward is one pass under inductor too; as a plain kernel it skips the compiled function's guard
checks on every call (host time, which a lone block step waits on).

Runs on CUDA when Triton imports (:func:`.compiled.use_triton`); tested on the device against the eager fp32 math
(``tests/test_runtime_gpu.py``). Measured on an H200: ``benchmarks/gpu_act.py``.
"""

from __future__ import annotations

from typing import Any

import torch

from .compiled import triton_warps

_KERNEL: Any = None
KERNEL_ACTS = ("silu", "swish", "relu2")


def _kernel() -> Any:
    global _KERNEL
    if _KERNEL is None:
        import triton  # noqa: PLC0415
        import triton.language as tl  # noqa: PLC0415

        @triton.jit
        def act_backward_kernel(gu, w, d_hu, hw, d_gu, d_w, I, GATED: tl.constexpr, RELU2: tl.constexpr,
                                BLOCK: tl.constexpr):
            r = tl.program_id(0).to(tl.int64)
            width = 2 * I if GATED else I
            wr = tl.load(w + r)
            dot = tl.zeros([BLOCK], dtype=tl.float32)
            for start in range(0, I, BLOCK):  # one chunk of the row at a time (one for I <= BLOCK)
                c = start + tl.arange(0, BLOCK)
                m = c < I
                g = tl.load(gu + r * width + c, mask=m, other=0.0).to(tl.float32)
                dh = tl.load(d_hu + r * I + c, mask=m, other=0.0).to(tl.float32)
                if RELU2:
                    rl = tl.where(g < 0, 0.0, g)  # relu that keeps NaN, as torch's
                    s = rl * rl
                    ds = 2 * rl
                else:
                    sig = tl.sigmoid(g)
                    s = g * sig
                    ds = sig * (1 + g * (1 - sig))
                if GATED:
                    u = tl.load(gu + r * width + I + c, mask=m, other=0.0).to(tl.float32)
                    a = s * u
                else:
                    a = s
                dot += dh * a
                da = dh * wr
                tl.store(hw + r * I + c, (a * wr).to(hw.dtype.element_ty), mask=m)
                if GATED:
                    tl.store(d_gu + r * width + c, (da * u * ds).to(d_gu.dtype.element_ty), mask=m)
                    tl.store(d_gu + r * width + I + c, (da * s).to(d_gu.dtype.element_ty), mask=m)
                else:
                    tl.store(d_gu + r * width + c, (da * ds).to(d_gu.dtype.element_ty), mask=m)
            tl.store(d_w + r, tl.sum(dot, axis=0))

        @triton.jit
        def act_forward_kernel(gu, w, h, I, GATED: tl.constexpr, RELU2: tl.constexpr, BLOCK: tl.constexpr):
            r = tl.program_id(0).to(tl.int64)
            c = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
            m = c < I
            width = 2 * I if GATED else I
            g = tl.load(gu + r * width + c, mask=m, other=0.0).to(tl.float32)
            if RELU2:
                rl = tl.where(g < 0, 0.0, g)  # relu that keeps NaN, as torch's
                s = rl * rl
            else:
                s = g * tl.sigmoid(g)
            if GATED:
                s = s * tl.load(gu + r * width + I + c, mask=m, other=0.0).to(tl.float32)
            tl.store(h + r * I + c, (s * tl.load(w + r)).to(h.dtype.element_ty), mask=m)

        _KERNEL = (triton, act_forward_kernel, act_backward_kernel)
    return _KERNEL


def act_backward(
    name: str, gu: torch.Tensor, gated: bool, w: torch.Tensor, d_hu: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(a * w`` in ``gu``'s dtype, ``d gu``, ``d w`` fp32) for ``gu [N, 2I]`` (gated: gate half, up half) or
    ``[N, I]``, ``w [N]`` fp32, ``d_hu [N, I]``: what ``experts.fused_act_backward_math`` returns."""
    _check(name)
    N, I = d_hu.shape
    gu, d_hu, w = gu.contiguous(), d_hu.contiguous(), w.contiguous()
    hw = torch.empty(N, I, dtype=gu.dtype, device=gu.device)
    d_gu = torch.empty_like(gu)
    d_w = torch.empty(N, dtype=torch.float32, device=gu.device)
    if N:
        triton, _, kernel = _kernel()
        block = _block(triton, I)
        kernel[(N,)](gu, w, d_hu, hw, d_gu, d_w, I, GATED=gated, RELU2=name == "relu2", BLOCK=block,
                     num_warps=triton_warps(block))
    return hw, d_gu, d_w


def act_forward(name: str, gu: torch.Tensor, gated: bool, w: torch.Tensor) -> torch.Tensor:
    """``act(gate) * up * w`` (gated) or ``act(gu) * w``, computed in fp32 and rounded once to ``gu``'s dtype: what
    ``experts.fused_act_forward_math`` returns (one pass; no compile guards to check on each call)."""
    _check(name)
    N = gu.shape[0]
    I = gu.shape[1] // 2 if gated else gu.shape[1]
    gu, w = gu.contiguous(), w.contiguous()
    h = torch.empty(N, I, dtype=gu.dtype, device=gu.device)
    if N:
        triton, kernel, _ = _kernel()
        block = _block(triton, I)
        kernel[(N, triton.cdiv(I, block))](gu, w, h, I, GATED=gated, RELU2=name == "relu2", BLOCK=block,
                                           num_warps=triton_warps(block))
    return h


def _block(triton: Any, width: int) -> int:
    """Columns per step: the whole row up to 2048 (Qwen3's 768, Nemotron's 1856), chunks of 2048 beyond (Mixtral's
    14,336), so a program never holds more than a few 2048-wide fp32 vectors."""
    return min(triton.next_power_of_2(width), 2048)


def _check(name: str) -> None:
    if name not in KERNEL_ACTS:
        raise ValueError(f"no activation kernel for {name!r}; one of {', '.join(KERNEL_ACTS)}")


__all__ = ["KERNEL_ACTS", "act_backward", "act_forward"]

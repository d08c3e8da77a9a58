"""Kernels for CUDA only: one torch.compile'd function per math function, and whether hand-written Triton runs.

The elementwise stages around the GEMMs (activation, RMSNorm) run as several full passes over memory in eager
torch; inductor turns each into one kernel. The same plain functions are what CPU runs (and what the tests check),
so compiling changes speed, not the math. ``MOE_ADAPTERS_NO_COMPILE=1`` turns it off.

Where inductor does not find the one-pass kernel (a gather-sum that skips dropped slots, the activation's backward
with its per-row reduction), a Triton kernel is written by hand (:mod:`.gather_sum`, :mod:`.act_kernel`), used on
CUDA when Triton imports (the CPU build of torch ships without it), ``MOE_ADAPTERS_NO_TRITON=1`` turns them off.
"""

from __future__ import annotations

import os
from typing import Any, Callable

import torch

_COMPILED: dict[str, Callable] = {}


def compiled(fn: Callable) -> Callable:
    """``torch.compile(fn)`` (one graph), built once per function, called with only the row count symbolic: every
    tensor argument's first dimension may vary between calls (tokens, slots), the others (widths) are constants.
    Measured on an H200 (``benchmarks/gpu_act.py``): the activation's kernels run 1.35-1.7x faster than compiled
    with every dimension symbolic."""
    key = f"{fn.__module__}.{fn.__qualname__}"
    if key not in _COMPILED:
        graph = torch.compile(fn, fullgraph=True)

        def call(*args: Any) -> Any:
            for a in args:
                if isinstance(a, torch.Tensor) and a.dim() >= 1:
                    torch._dynamo.maybe_mark_dynamic(a, 0)
            return graph(*args)

        _COMPILED[key] = call
    return _COMPILED[key]


_TRITON: bool | None = None


def triton_available() -> bool:
    """Whether Triton imports (asked once)."""
    global _TRITON
    if _TRITON is None:
        try:
            import triton.language  # noqa: F401, PLC0415

            _TRITON = True
        except Exception:  # ImportError, or a broken install (a missing compiler shows only at the first launch)
            _TRITON = False
    return _TRITON


def use_triton(t: torch.Tensor) -> bool:
    """Run the hand-written Triton kernels for this CUDA tensor (unless ``MOE_ADAPTERS_NO_TRITON`` is set)."""
    return t.is_cuda and not os.environ.get("MOE_ADAPTERS_NO_TRITON") and triton_available()


def triton_warps(block: int) -> int:
    """Warps for a Triton program over ``block`` columns: 256 columns (8 bf16 per thread, 16-byte loads) per warp,
    1 to 8."""
    return max(1, min(8, block // 256))


def use_compiled(t: torch.Tensor) -> bool:
    """Compile for CUDA tensors unless ``MOE_ADAPTERS_NO_COMPILE`` is set (CPU runs the plain functions)."""
    return t.is_cuda and not os.environ.get("MOE_ADAPTERS_NO_COMPILE")

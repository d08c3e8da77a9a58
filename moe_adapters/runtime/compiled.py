"""One torch.compile'd function per math function, used on CUDA only.

The elementwise stages around the GEMMs (activation, RMSNorm) run as several full passes over memory in eager
torch; inductor turns each into one kernel. The same plain functions are what CPU runs (and what the tests check),
so compiling changes speed, not the math. ``MOE_ADAPTERS_NO_COMPILE=1`` turns it off.
"""

from __future__ import annotations

import os
from typing import Callable

import torch

_COMPILED: dict[str, Callable] = {}


def compiled(fn: Callable) -> Callable:
    """``torch.compile(fn)``, built once per function (dynamic shapes, one graph)."""
    key = f"{fn.__module__}.{fn.__qualname__}"
    if key not in _COMPILED:
        _COMPILED[key] = torch.compile(fn, dynamic=True, fullgraph=True)
    return _COMPILED[key]


def use_compiled(t: torch.Tensor) -> bool:
    """Compile for CUDA tensors unless ``MOE_ADAPTERS_NO_COMPILE`` is set (CPU runs the plain functions)."""
    return t.is_cuda and not os.environ.get("MOE_ADAPTERS_NO_COMPILE")

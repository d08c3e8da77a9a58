"""Reversible ops on tensors described as byte ranges; no knowledge of models."""

from .ops import (
    Concat,
    Dequantize,
    DequantizeMXFP4,
    FP4_VALUES,
    NotReversible,
    Rename,
    Split,
    Stack,
    Transpose,
    Unstack,
    even_split,
    rename_all,
    unrename_all,
)
from .refs import DTYPE_SIZES, ByteTensor, LayoutError, Segment, itemsize

__all__ = [
    "ByteTensor",
    "Concat",
    "DTYPE_SIZES",
    "Dequantize",
    "DequantizeMXFP4",
    "FP4_VALUES",
    "LayoutError",
    "NotReversible",
    "Rename",
    "Segment",
    "Split",
    "Stack",
    "Transpose",
    "Unstack",
    "even_split",
    "itemsize",
    "rename_all",
    "unrename_all",
]

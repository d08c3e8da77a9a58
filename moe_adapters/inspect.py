"""What a checkpoint is: family, layout, EP size, experts, MoE layers, tensors and bytes (headers only)."""

from __future__ import annotations

from collections import Counter
from typing import Any

from .checkpoint import open_checkpoint
from .layout import ExpertMap, canonical_view, fuse
from .manifest import check_files


def describe(path: str, family: str | None = None) -> dict[str, Any]:
    ckpt = open_checkpoint(path, family)
    check_files(ckpt)
    m = ckpt.manifest or {}
    emap = ExpertMap(ckpt.family, ckpt.config, num_experts=m.get("num_experts"), moe_layers=m.get("moe_layers"))
    if ckpt.layout != "fused":  # plan the fusion (headers only): a family that does not fit fails as convert would
        canonical, cmap = canonical_view(ckpt)
        fuse(canonical, cmap, 1)
    dtypes = Counter(e.dtype for h in ckpt.headers.values() for e in h.tensors)
    return {
        "path": ckpt.root,
        "family": ckpt.family.name,
        "layout": ckpt.layout,
        "ep_size": ckpt.ep_size,
        "num_experts": emap.num_experts,
        "moe_layers": emap.moe_layers,
        "tensors": ckpt.num_tensors,
        "files": len(ckpt.headers),
        "bytes": ckpt.total_bytes,
        "dtypes": dict(dtypes.most_common()),
        "expert_ranges": m.get("expert_ranges") or [[0, emap.num_experts]],
        "source_layout": (m.get("source") or {}).get("layout"),
    }

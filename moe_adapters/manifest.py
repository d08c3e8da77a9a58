"""The manifest of a fused folder (`moe_adapters.json`).

It records what the fused folder is (family, EP size, expert ranges, its files with sizes and sha256) and the
source it came from, written down exactly: each source file's name, size, sha256 and raw header (which fixes the
tensor order and padding), and the raw index JSON. With it, the way back rebuilds the source byte for byte.
"""

from __future__ import annotations

import json
import os
from typing import Any

from .checkpoint import MANIFEST_NAME, Checkpoint
from .errors import ManifestError
from .execute import Written, hash_file

FORMAT_VERSION = 1


def source_record(ckpt: Checkpoint, hashes: dict[str, str]) -> dict[str, Any]:
    """What rebuilding `ckpt` exactly needs (or, for a fused input, the source its own manifest recorded)."""
    if ckpt.manifest is not None:
        return ckpt.manifest.get("source") or {}
    return {
        "layout": ckpt.layout,
        "files": [
            {"name": rel, "size": h.size, "sha256": hashes.get(rel), "header": h.header_text.decode("utf-8")}
            for rel, h in ckpt.headers.items()
        ],
        "index": (
            {"name": ckpt.index_name, "text": ckpt.index_text.decode("utf-8")}
            if ckpt.index_name and ckpt.index_text is not None
            else None
        ),
    }


def build_manifest(
    *,
    family: str,
    ep_size: int,
    num_experts: int,
    moe_layers: list[int],
    expert_ranges: list[tuple[int, int]],
    files: list[tuple[str, int | None, list[str]]],
    written: dict[str, Written],
    source: dict[str, Any],
    index: str | None,
) -> dict[str, Any]:
    return {
        "moe_adapters_manifest": FORMAT_VERSION,
        "layout": "fused",
        "family": family,
        "ep_size": ep_size,
        "num_experts": num_experts,
        "moe_layers": moe_layers,
        "expert_ranges": [list(r) for r in expert_ranges],
        "files": [
            {"name": name, "rank": rank, "size": written[name].size, "sha256": written[name].sha256, "tensors": len(t)}
            for name, rank, t in files
        ],
        "index": index,  # the fused folder's own index (EP=1 only: then plain transformers loads the folder)
        "source": source,
    }


def write_manifest(folder: str, manifest: dict[str, Any]) -> None:
    with open(os.path.join(folder, MANIFEST_NAME), "x") as f:
        json.dump(manifest, f, indent=1)
        f.write("\n")


def check_files(ckpt: Checkpoint, *, checksums: bool, progress=None) -> None:
    """A fused folder's files must match its manifest: sizes always, sha256 when `checksums`."""
    if ckpt.manifest is None:
        return
    mpath = os.path.join(ckpt.root, MANIFEST_NAME)
    for f in ckpt.manifest["files"]:
        h = ckpt.headers.get(f["name"])
        if h is None:
            raise ManifestError("manifest lists a file that is missing", file=os.path.join(ckpt.root, f["name"]))
        if h.size != f.get("size"):
            raise ManifestError(f"size {h.size} differs from the manifest's {f.get('size')}", file=h.path)
        if checksums and f.get("sha256") and hash_file(h.path, progress) != f["sha256"]:
            raise ManifestError(f"sha256 differs from the manifest ({mpath})", file=h.path)

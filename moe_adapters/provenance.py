"""Where a checkpoint came from, written down so that `push` can prove a folder before publishing it.

Two records, both plain JSON:

* `origin` (inside the fused manifest's `source` record): where the HF checkpoint that was converted to the fused
  layout lived. A folder inside the Hugging Face cache (`.../models--ORG--NAME/snapshots/<commit>/`, which is what a
  Hub id resolves to) is recorded as the Hub repo id and the exact commit; any other folder by its absolute path.
* `.moe_adapters_provenance.json`, written by `convert` into every HF folder it produces (fused -> hf): what the
  folder was converted from (the fused folder, its EP size), the original source (`origin` plus each source file's
  name and size and how it was fingerprinted in the manifest), each written file's size and sha256, and the checks
  `convert` passed (every rebuilt tensor equal to the source's recorded sha256, headers the source's own).

The provenance file is a dot-file on purpose: conversion does not carry dot-files into a new folder (so a stale
record never travels), and `push` never uploads it (it holds local paths). It holds no secrets.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

PROVENANCE_NAME = ".moe_adapters_provenance.json"
FORMAT_VERSION = 1
_COMMIT = re.compile(r"^[0-9a-f]{40}$")


def origin_of(root: str) -> dict[str, Any]:
    """`{"path": ...}` plus, for a Hugging Face cache snapshot, `{"repo_id": "ORG/NAME", "revision": "<commit>"}`."""
    path = os.path.abspath(root)
    out: dict[str, Any] = {"path": path}
    parts = path.split(os.sep)
    for i in range(len(parts) - 2, 0, -1):
        if parts[i] == "snapshots" and _COMMIT.match(parts[i + 1]) and parts[i - 1].startswith("models--"):
            names = parts[i - 1].split("--")[1:]  # Hub repo ids cannot contain "--", so this split is exact
            if 1 <= len(names) <= 2 and all(names):
                out["repo_id"] = "/".join(names)
                out["revision"] = parts[i + 1]
                out["subfolder"] = "/".join(parts[i + 2 :]) or None
            break
    return out


def build_provenance(
    *,
    family: str,
    converted_from: dict[str, Any],
    source: dict[str, Any] | None,
    written: dict[str, Any],
    checks: list[str],
) -> dict[str, Any]:
    from . import __version__

    src = source or {}
    return {
        "moe_adapters_provenance": FORMAT_VERSION,
        "tool": f"moe-adapters {__version__}",
        "family": family,
        "converted_from": converted_from,
        "source": {
            "origin": src.get("origin"),
            "layout": src.get("layout"),
            "files": [  # the source's recorded fingerprints: whole-file sha256 and/or per-tensor sha256 (counted)
                {
                    "name": f["name"],
                    "size": f.get("size"),
                    "sha256": f.get("sha256"),
                    "tensors_hashed": len(f.get("tensor_sha256") or {}),
                }
                for f in src.get("files") or []
            ],
        }
        if src
        else None,
        "files": [{"name": n, "size": w.size, "sha256": w.sha256} for n, w in sorted(written.items())],
        "checks": list(checks),
    }


def write_provenance(folder: str, record: dict[str, Any]) -> None:
    with open(os.path.join(folder, PROVENANCE_NAME), "x", encoding="utf-8") as f:
        json.dump(record, f, indent=1)
        f.write("\n")


def read_provenance(folder: str) -> dict[str, Any] | None:
    """The folder's provenance record, or None when it has none."""
    path = os.path.join(folder, PROVENANCE_NAME)
    if not os.path.isfile(path):
        return None
    from .errors import CheckpointError

    try:
        with open(path, encoding="utf-8") as f:
            rec = json.load(f)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"unreadable provenance record ({type(e).__name__}: {e})", file=path) from None
    if not isinstance(rec, dict) or rec.get("moe_adapters_provenance") != FORMAT_VERSION:
        raise CheckpointError("not a provenance record this version of moe-adapters can read", file=path)
    return rec

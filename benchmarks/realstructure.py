"""Build a checkpoint with a real model's complete key structure at tiny dims.

Reads a real weight-name list (`name<TAB>[shape]<TAB>DTYPE`, from ../shared/realmodels/) and, where available, the
real index's shard map, then writes every tensor with each dimension divided by `shrink` (at least 1), so names,
dtypes, ranks, shard names and counts are the real ones while the bytes fit in a test. Written with our own
header encoder (plain safetensors format), no torch needed.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import random
import re
import shutil
from math import prod

from moe_adapters.converters import itemsize
from moe_adapters.safetensors_file import encode_header

SHARED = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..", "shared", "realmodels")


SIZE_KEYS = (
    "hidden_size",
    "intermediate_size",
    "moe_intermediate_size",
    "shared_expert_intermediate_size",
    "moe_shared_expert_intermediate_size",
)


def read_weight_names(model_dir: str) -> list[tuple[str, tuple[int, ...], str]]:
    path = os.path.join(model_dir, "weight_names.txt")
    opener = open
    if not os.path.exists(path):
        path += ".gz"
        opener = gzip.open  # type: ignore[assignment]
    out = []
    with opener(path, "rt") as f:
        for line in f:
            if not line.strip():
                continue
            name, shape, dtype = line.rstrip("\n").split("\t")
            out.append((name, tuple(json.loads(shape)), dtype))
    return out


def _shrunk(shape: tuple[int, ...], shrink: int) -> tuple[int, ...]:
    """Large dims divided by `shrink`; small ones (expert counts, block sizes, scale grids) kept as they are."""
    return tuple(d // shrink if d >= 256 else d for d in shape)


def _default_shards(names: list[str], n_files: int) -> dict[str, str]:
    """Real-looking shard names `model-000NN-of-000MM.safetensors`, tensors in model order, split evenly."""
    per = -(-len(names) // n_files)
    return {n: f"model-{i // per + 1:05d}-of-{n_files:05d}.safetensors" for i, n in enumerate(names)}


def build(model: str, out: str, *, shrink: int = 256, shards: int | None = None, seed: int = 0) -> dict:
    """Write the tiny checkpoint of `model` (a folder name under realmodels/) to `out`; returns counts."""
    src = os.path.join(SHARED, model)
    weights = read_weight_names(src)
    index_path = next((os.path.join(src, f) for f in os.listdir(src) if f.endswith(".index.json") or ".index." in f), None)
    if index_path:
        weight_map = json.load(open(index_path))["weight_map"]
    else:
        weight_map = _default_shards([w[0] for w in weights], shards or 16)
    if os.path.exists(out):
        shutil.rmtree(out)
    os.makedirs(out)
    config = json.load(open(os.path.join(src, "config.json")))
    for key in SIZE_KEYS:  # the config describes the shrunk tensors, so shape checks hold
        if isinstance(config.get(key), int) and config[key] >= 256:
            config[key] = config[key] // shrink
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    by_file: dict[str, list[tuple[str, tuple[int, ...], str]]] = {}
    for name, shape, dtype in weights:
        by_file.setdefault(weight_map[name], []).append((name, _shrunk(shape, shrink), dtype))
    rng = random.Random(seed)
    total = 0
    for fname, tensors in by_file.items():
        tensors.sort(key=lambda t: t[0])  # safetensors (and transformers) write tensors in name order
        entries, pos = [], 0
        for name, shape, dtype in tensors:
            n = prod(shape) * itemsize(dtype)
            entries.append((name, dtype, shape, pos, pos + n))
            pos += n
        header = encode_header(entries, {"format": "pt"})
        with open(os.path.join(out, fname), "wb") as f:
            f.write(len(header).to_bytes(8, "little") + header)
            f.write(rng.randbytes(pos))
        total += 8 + len(header) + pos
    weight_map_sorted = dict(sorted({n: f for f, ts in by_file.items() for n, _, _ in ts}.items()))
    with open(os.path.join(out, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map_sorted}, f, indent=2)
    return {"tensors": len(weights), "files": len(by_file), "bytes": total}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("model", help="folder name under shared/realmodels, e.g. DeepSeek-V3")
    ap.add_argument("out")
    ap.add_argument("--shrink", type=int, default=256)
    args = ap.parse_args()
    print(build(args.model, args.out, shrink=args.shrink))


if __name__ == "__main__":
    main()

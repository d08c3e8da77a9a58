#!/usr/bin/env python3
"""`convert --dequantize bf16` of gpt-oss at EP 1 and EP 8: the work must not grow with EP.

Builds gpt-oss-20b's first `--layers` layers with their real names, dtypes and expert dims (32 experts, MXFP4
blocks/scales of 2880 x 2880 weights; vocabulary cut to 1024) from ../shared/realmodels, random codes and sane
scales, then times `moe-adapters convert SRC DST --dequantize bf16 --ep N` for each N in one run (caches warm) and
reports seconds and peak RSS. Each EP rank's file dequantizes only its experts' rows; before that fix every rank's
file dequantized every whole stacked weight (EP 8: 271 s / 12.5 GB against 48 s / 3.4 GB at EP 1 on 2 layers).

    PYTHONPATH=. python benchmarks/dequant_ep.py [--layers 2] [--eps 1,8] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
from math import prod

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import realstructure as rs  # noqa: E402

from moe_adapters.converters import itemsize  # noqa: E402
from moe_adapters.safetensors_file import encode_header  # noqa: E402

VOCAB = 1024


def build(out: str, layers: int) -> int:
    src = os.path.join(rs.SHARED, "gpt-oss-20b")
    keep = []
    for name, shape, dtype in rs.read_weight_names(src):
        m = re.match(r"model\.layers\.(\d+)\.", name)
        if m and int(m.group(1)) >= layers:
            continue
        keep.append((name, tuple(VOCAB if d == 201088 else d for d in shape), dtype))
    cfg = json.load(open(os.path.join(src, "config.json")))
    cfg.update(num_hidden_layers=layers, vocab_size=VOCAB)
    if "layer_types" in cfg:
        cfg["layer_types"] = cfg["layer_types"][:layers]
    os.makedirs(out)
    json.dump(cfg, open(os.path.join(out, "config.json"), "w"), indent=2)
    entries, pos = [], 0
    for name, shape, dtype in sorted(keep):
        n = prod(shape) * itemsize(dtype)
        entries.append((name, dtype, shape, pos, pos + n))
        pos += n
    header = encode_header(entries, {"format": "pt"})
    rng = random.Random(0)
    with open(os.path.join(out, "model.safetensors"), "wb") as f:
        f.write(len(header).to_bytes(8, "little") + header)
        for name, _, _, a, b in entries:
            if name.endswith("_scales"):  # exponents near 2^0 (127 is 2^0 in E8M0): sane bf16 values
                f.write(bytes([122 + rng.randrange(6)]) * (b - a))
            else:
                f.write(os.urandom(b - a))
    return pos


# a fresh wrapper per run: RUSAGE_CHILDREN's peak is then this conversion's alone
_WRAP = (
    "import resource, subprocess, sys, time; t = time.perf_counter(); subprocess.run(sys.argv[1:], check=True); "
    "print(time.perf_counter() - t, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"
)


def run(src: str, dst: str, ep: int) -> tuple[float, float]:
    cmd = [sys.executable, "-m", "moe_adapters", "-q", "convert", src, dst, "--dequantize", "bf16", "--ep", str(ep)]
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run([sys.executable, "-c", _WRAP, *cmd], check=True, env=env, capture_output=True, text=True)
    seconds, peak_kib = out.stdout.split()[-2:]
    return float(seconds), float(peak_kib) / 1024


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--eps", default="1,8")
    ap.add_argument("--keep", default=None, help="build the source here and keep it")
    args = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="dequant_ep-")
    src = args.keep or os.path.join(tmp, "src")
    try:
        if not os.path.exists(os.path.join(src, "model.safetensors")):
            size = build(src, args.layers)
        else:
            size = os.path.getsize(os.path.join(src, "model.safetensors"))
        print(f"gpt-oss-20b structure, {args.layers} layers, real expert dims: {size / 1e9:.2f} GB MXFP4 source")
        print("| EP | seconds | peak RSS (MiB) |\n|---:|---:|---:|")
        for ep in (int(e) for e in args.eps.split(",")):
            seconds, peak = run(src, os.path.join(tmp, f"ep{ep}"), ep)
            print(f"| {ep} | {seconds:.1f} | {peak:,.0f} |", flush=True)
            shutil.rmtree(os.path.join(tmp, f"ep{ep}"))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

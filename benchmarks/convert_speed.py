"""Conversion at disk speed: moe-adapters vs `cp -r` vs transformers, side by side in one run.

Builds Qwen3-30B-A3B-shaped checkpoints (real hidden size 2048, 128 experts, moe_intermediate_size 768, the real
config with fewer layers, bf16, ~4 GB shards like the real ones) at two sizes, then for each size measures, in
the same page-cache state (source cached, caches dropped where permitted):

- `cp -r SRC DST` (the floor: the same bytes read and written, no work), and `cp -r` followed by `sync` (convert
  fsyncs every file before renaming DST into place, so this is the like-for-like floor);
- `moe-adapters convert SRC DST --ep 8` (HF -> fused EP=8, sha256 of every written and every source file);
- transformers: `AutoModelForCausalLM.from_pretrained(SRC)` + `save_pretrained(DST)` (largest size only, unless
  --transformers-all), the way one converts with transformers alone;

and also the full-structure runs (DeepSeek-V3: 91,991 tensors in 163 files, FP8 + MTP; Qwen3-235B-A22B: 36,945
tensors) at tiny dims: inspect + convert to EP=16 + back + verify.

Each command runs in a child process; wall time from the parent, peak RSS from the child's rusage (os.wait4).
Writes a Markdown table to docs/benchmarks.md (section between markers) and prints it.

    python benchmarks/convert_speed.py --workdir /path/with/20GB/free
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

from moe_adapters.safetensors_file import encode_header  # noqa: E402
from realstructure import SHARED, build as build_structure, read_weight_names  # noqa: E402

MB = 1000**2


def build_qwen3_30b_shape(out: str, layers: int, shard_bytes: int = 4 * 1000**3) -> int:
    """Real Qwen3-30B-A3B names/shapes/dtypes for the first `layers` layers, random bf16 bytes, real-style shards."""
    src = os.path.join(SHARED, "Qwen3-30B-A3B")
    weights = [
        w for w in read_weight_names(src) if not w[0].startswith("model.layers.") or int(w[0].split(".")[2]) < layers
    ]
    cfg = json.load(open(os.path.join(src, "config.json")))
    cfg["num_hidden_layers"] = layers
    cfg["max_window_layers"] = layers
    if os.path.exists(out):
        shutil.rmtree(out)
    os.makedirs(out)
    json.dump(cfg, open(os.path.join(out, "config.json"), "w"), indent=2)
    groups: list[list[tuple[str, tuple[int, ...], str]]] = [[]]
    size = 0
    for w in weights:
        n = 2 * int.__mul__(*w[1]) if len(w[1]) == 2 else 2 * w[1][0]
        if groups[-1] and size + n > shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(w)
        size += n
    total = 0
    weight_map = {}
    chunk = os.urandom(64 * MB)
    for i, g in enumerate(groups):
        fname = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        g.sort(key=lambda w: w[0])
        entries, pos = [], 0
        for name, shape, dtype in g:
            n = 2
            for d in shape:
                n *= d
            entries.append((name, dtype, shape, pos, pos + n))
            pos += n
            weight_map[name] = fname
        header = encode_header(entries, {"format": "pt"})
        with open(os.path.join(out, fname), "wb") as f:
            f.write(len(header).to_bytes(8, "little") + header)
            left = pos
            while left:
                k = min(left, len(chunk))
                f.write(chunk[:k])
                left -= k
        total += 8 + len(header) + pos
    with open(os.path.join(out, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, f, indent=2)
    return total


def folder_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def drop_caches() -> bool:
    try:
        subprocess.run(["sync"], check=True)
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def warm(path: str) -> None:
    """Read the source once so every contender starts from the same (cached) state."""
    for d, _, fs in os.walk(path):
        for f in fs:
            with open(os.path.join(d, f), "rb") as fh:
                while fh.read(64 * MB):
                    pass


def run_measured(cmd: list[str]) -> tuple[float, int, str]:
    """Run through a tiny wrapper that reports the child's peak RSS via os.wait4."""
    wrapper = (
        "import os,sys,time,json\n"
        "t=time.perf_counter(); pid=os.fork()\n"
        "if pid==0:\n"
        "    os.execvp(sys.argv[1], sys.argv[1:])\n"
        "_,st,ru=os.wait4(pid,0)\n"
        "print(json.dumps({'wall':time.perf_counter()-t,'rss':ru.ru_maxrss*1024,'rc':os.waitstatus_to_exitcode(st)}),"
        "file=sys.stderr)\n"
    )
    p = subprocess.run([sys.executable, "-c", wrapper, *cmd], capture_output=True, text=True)
    stats = json.loads(p.stderr.strip().splitlines()[-1])
    if stats["rc"]:
        raise RuntimeError(f"{cmd} failed: {p.stderr[-3000:]}")
    return stats["wall"], stats["rss"], p.stdout


TRANSFORMERS_SNIPPET = (
    "import sys, torch\n"
    "from transformers import AutoModelForCausalLM\n"
    "m = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.bfloat16)\n"
    "m.save_pretrained(sys.argv[2])\n"
)


def moe(*args: str) -> list[str]:
    return [sys.executable, "-m", "moe_adapters", "--quiet", *args]


def bench_size(work: str, layers: int, with_transformers: bool, workers: int | None) -> list[dict]:
    src = os.path.join(work, f"qwen3-30b-shape-{layers}L")
    if not os.path.exists(os.path.join(src, "model.safetensors.index.json")):
        print(f"building {src} ...", flush=True)
        build_qwen3_30b_shape(src, layers)
    size = folder_bytes(src)
    rows = []
    contenders = [
        ("cp -r", lambda dst: ["cp", "-r", src, dst]),
        # what convert does before its rename: the bytes are on disk, not only in the page cache
        ("cp -r && sync", lambda dst: ["sh", "-c", 'cp -r "$0" "$1" && sync', src, dst]),
    ]
    wflag = ["--workers", str(workers)] if workers else []
    contenders.append(("moe-adapters convert --ep 8", lambda dst: moe("convert", src, dst, "--ep", "8", *wflag)))
    if with_transformers:
        contenders.append(
            ("transformers from_pretrained + save_pretrained", lambda dst: [sys.executable, "-c", TRANSFORMERS_SNIPPET, src, dst])
        )
    for name, make in contenders:
        dst = os.path.join(work, "out")
        shutil.rmtree(dst, ignore_errors=True)
        dropped = drop_caches()
        warm(src)
        wall, rss, _ = run_measured(make(dst))
        rows.append({"size": size, "layers": layers, "tool": name, "seconds": wall, "rss": rss, "dropped": dropped})
        print(f"  {name:50s} {size / 1e9:6.2f} GB  {wall:7.2f} s  {size / wall / 1e9:5.2f} GB/s  RSS {rss / 2**20:7.0f} MiB", flush=True)
        shutil.rmtree(dst, ignore_errors=True)
    return rows


def bench_structure(work: str, model: str, ep: int) -> dict:
    src = os.path.join(work, f"{model}-tiny")
    info = build_structure(model, src)
    fused, back = os.path.join(work, f"{model}-ep{ep}"), os.path.join(work, f"{model}-back")
    for p in (fused, back):
        shutil.rmtree(p, ignore_errors=True)
    steps = [
        ("inspect", moe("inspect", src, "--json")),
        (f"convert EP={ep}", moe("convert", src, fused, "--ep", str(ep))),
        ("convert back", moe("convert", fused, back)),
        ("verify", moe("verify", src, fused)),
    ]
    times, rss = {}, 0
    for label, cmd in steps:
        wall, r, _ = run_measured(cmd)
        times[label] = wall
        rss = max(rss, r)
    identical = all(
        open(os.path.join(src, f), "rb").read() == open(os.path.join(back, f), "rb").read()
        for f in os.listdir(src)
    )
    for p in (fused, back, src):
        shutil.rmtree(p, ignore_errors=True)
    return {"model": model, **info, "times": times, "total": sum(times.values()), "rss": rss, "identical": identical}


def markdown(rows: list[dict], structures: list[dict], meta: dict) -> str:
    lines = [
        "<!-- convert_speed:begin -->",
        f"### Conversion speed ({meta['date']}, `python benchmarks/convert_speed.py`)",
        "",
        f"Machine: {meta['machine']}. Page cache: {meta['cache']}. transformers {meta['transformers']}, "
        f"torch {meta['torch']}.",
        "",
        "| checkpoint | tool | seconds | GB/s | peak RSS | time / cp |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for size in sorted({r["size"] for r in rows}):
        group = [r for r in rows if r["size"] == size]
        cp = next(r["seconds"] for r in group if r["tool"] == "cp -r")
        for r in group:
            lines.append(
                f"| Qwen3-30B-A3B shape, {r['layers']} layers, {size / 1e9:.2f} GB | {r['tool']} | {r['seconds']:.2f} | "
                f"{size / r['seconds'] / 1e9:.2f} | {r['rss'] / 2**20:,.0f} MiB | {r['seconds'] / cp:.2f}x |"
            )
    lines += [
        "",
        "Full real key structure at tiny dims (every tensor name, dtype and shard of the real checkpoint):",
        "",
        "| model | tensors | files | inspect | convert | back | verify | total | peak RSS | byte-identical |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for s in structures:
        t = list(s["times"].values())
        lines.append(
            f"| {s['model']} | {s['tensors']:,} | {s['files']} | {t[0]:.1f} s | {t[1]:.1f} s | {t[2]:.1f} s | "
            f"{t[3]:.1f} s | {s['total']:.1f} s | {s['rss'] / 2**20:,.0f} MiB | {s['identical']} |"
        )
    lines.append("<!-- convert_speed:end -->")
    return "\n".join(lines) + "\n"


def write_doc(section: str) -> None:
    path = os.path.join(ROOT, "docs", "benchmarks.md")
    text = open(path).read() if os.path.exists(path) else "# Benchmarks\n\n"
    begin, end = "<!-- convert_speed:begin -->", "<!-- convert_speed:end -->"
    if begin in text:
        text = text[: text.index(begin)] + section + text[text.index(end) + len(end) + 1 :]
    else:
        text += "\n" + section
    os.makedirs(os.path.dirname(path), exist_ok=True)
    open(path, "w").write(text)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default="/tmp/moe-adapters-bench")
    ap.add_argument("--layers", default="2,4", help="layer counts of the Qwen3-30B-shaped checkpoints")
    ap.add_argument("--transformers-all", action="store_true", help="run transformers at every size")
    ap.add_argument("--no-transformers", action="store_true")
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--keep", action="store_true", help="keep the built checkpoints")
    args = ap.parse_args()
    os.makedirs(args.workdir, exist_ok=True)
    import torch
    import transformers

    layer_counts = [int(x) for x in args.layers.split(",")]
    rows = []
    for i, layers in enumerate(layer_counts):
        with_tf = not args.no_transformers and (args.transformers_all or i == len(layer_counts) - 1)
        rows += bench_size(args.workdir, layers, with_tf, args.workers)
        if not args.keep:
            shutil.rmtree(os.path.join(args.workdir, f"qwen3-30b-shape-{layers}L"), ignore_errors=True)
    structures = []
    for model, ep in (("DeepSeek-V3", 16), ("Qwen3-235B-A22B", 16)):
        s = bench_structure(args.workdir, model, ep)
        structures.append(s)
        print(f"  {model}: {s['tensors']:,} tensors, {s['files']} files: {s['times']} total {s['total']:.1f} s, identical={s['identical']}")
    meta = {
        "date": dt.date.today().isoformat(),
        "machine": f"{os.cpu_count()} cores, {platform.machine()}, Python {platform.python_version()}",
        "cache": "dropped before each run, then the source read once (warm) for every contender"
        if rows and rows[0]["dropped"]
        else "could not drop caches here; the source is read once before each contender (warm for all)",
        "transformers": transformers.__version__,
        "torch": torch.__version__,
    }
    section = markdown(rows, structures, meta)
    write_doc(section)
    print(section)


if __name__ == "__main__":
    main()

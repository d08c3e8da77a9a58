"""Bar chart of per-GPU training tokens/s and peak memory by setup from gpu_train.py result JSONs (PNG for the docs):
the multi-GPU runs at the deepest depth found.

    python benchmarks/plot_gpu_train.py docs/gpu_train_tokens.png docs/results/gpu_train_h200x4_batch2_2026-11-28.json \
        docs/results/gpu_train_h200x4_batch1_2026-11-28.json
    python benchmarks/plot_gpu_train.py docs/gpu_train_tokens_x2.png docs/results/gpu_train_h200x2_L24_2026-11-29.json
"""

from __future__ import annotations

import json
import sys


def main(dst: str, *sources: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = []
    for src in sources:
        with open(src) as f:
            results += [r for r in json.load(f)["results"] if not r.get("error") and r.get("world", 1) >= 2]
    layers = max(r["layers"] for r in results)  # the deepest multi-GPU runs (the scaling runs are shallower)
    chosen = [r for r in results if r["layers"] == layers]
    runs = [(f"{r['setup']}\nbatch {r['batch']}", r["tok_s_per_gpu"], r["peak_gib_per_gpu"]) for r in chosen]
    gpus = "/".join(str(w) for w in sorted({r["world"] for r in chosen}))
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4))
    labels = [r[0] for r in runs]
    colors = ["tab:green" if lab.startswith("ours") else "tab:gray" for lab in labels]
    a.bar(labels, [r[1] for r in runs], color=colors)
    a.set_ylabel("tokens/s per GPU")
    a.set_title(f"Qwen3-30B-A3B, {layers} layers, seq 4096, fwd+bwd+AdamW, {gpus}x H200")
    b.bar(labels, [r[2] for r in runs], color=colors)
    b.set_ylabel("peak GiB per GPU")
    for ax in (a, b):
        ax.tick_params(axis="x", labelsize=7, labelrotation=25)
        ax.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(dst, dpi=110)


if __name__ == "__main__":
    main(*sys.argv[1:])

"""Bar chart of per-GPU training tokens/s and peak memory by setup from gpu_train.py result JSONs (PNG for the docs).

    python benchmarks/plot_gpu_train.py docs/gpu_train_tokens.png docs/results/gpu_train_h200x4_batch2_2026-11-28.json \
        docs/results/gpu_train_h200x4_batch1_2026-11-28.json
"""

from __future__ import annotations

import json
import sys


def main(dst: str, *sources: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = []  # (label, tok/s/GPU, peak GiB) for the full-depth multi-GPU runs
    for src in sources:
        with open(src) as f:
            data = json.load(f)
        for r in data["results"]:
            if r.get("error") or r.get("world", 1) < 2 or r.get("layers") != 48:
                continue
            runs.append((f"{r['setup']}\nbatch {r['batch']}", r["tok_s_per_gpu"], r["peak_gib_per_gpu"]))
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4))
    labels = [r[0] for r in runs]
    colors = ["tab:green" if lab.startswith("ours") else "tab:gray" for lab in labels]
    a.bar(labels, [r[1] for r in runs], color=colors)
    a.set_ylabel("tokens/s per GPU")
    a.set_title("Qwen3-30B-A3B, 48 layers, seq 4096, fwd+bwd+AdamW, 4x H200")
    b.bar(labels, [r[2] for r in runs], color=colors)
    b.set_ylabel("peak GiB per GPU")
    for ax in (a, b):
        ax.tick_params(axis="x", labelsize=7, labelrotation=25)
        ax.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(dst, dpi=110)


if __name__ == "__main__":
    main(*sys.argv[1:])

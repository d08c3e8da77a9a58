"""Plot tokens/s by implementation and token count from a gpu_block.py JSON result (PNG for docs/benchmarks.md).

    python benchmarks/plot_gpu_block.py docs/results/gpu_block_h200_2026-11-28.json docs/gpu_block_tokens.png
"""

from __future__ import annotations

import json
import sys


def main(src: str, dst: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = json.load(open(src))
    rows = [r for r in data["rows"] if r.get("tok_s")]
    models = sorted({r["model"] for r in rows})
    fig, axes = plt.subplots(1, len(models), figsize=(5.5 * len(models), 4), squeeze=False)
    for ax, model in zip(axes[0], models):
        for impl in sorted({r["impl"] for r in rows if r["model"] == model}):
            pts = sorted((r["tokens"], r["tok_s"]) for r in rows if r["model"] == model and r["impl"] == impl)
            ax.plot([p[0] for p in pts], [p[1] / 1e3 for p in pts], marker="o", label=impl)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("tokens per step")
        ax.set_ylabel("thousand tokens/s (fwd+bwd, one MoE block)")
        env = data["env"]
        ax.set_title(f"{model} block, {env.get('gpu', '')}, bf16, transformers {env.get('transformers', '?')}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(dst, dpi=110)


if __name__ == "__main__":
    main(*sys.argv[1:3])

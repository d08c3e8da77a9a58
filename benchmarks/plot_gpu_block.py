"""Plot tokens/s by implementation and token count from a gpu_block.py JSON result (PNG for docs/benchmarks.md).

    python benchmarks/plot_gpu_block.py RUN.json OUT.png [EARLIER.json:IMPL=LABEL ...]

Each extra argument adds one implementation's points from another run under a new label (e.g. the TE backend, or
ours before a change), so a plot can show what was measured in different runs; the label should say which run.
"""

from __future__ import annotations

import json
import sys


def main(src: str, dst: str, *extra: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = json.load(open(src))
    rows = [r for r in data["rows"] if r.get("tok_s")]
    for spec in extra:
        path, _, pick = spec.rpartition(":")
        impl, _, label = pick.partition("=")
        rows += [dict(r, impl=label or impl) for r in json.load(open(path))["rows"] if r.get("tok_s") and r["impl"] == impl]
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
    main(*sys.argv[1:])

#!/usr/bin/env python3
"""Token permutation alone, ours against TransformerEngine's fused ``moe_permute`` / ``moe_unpermute`` (fwd+bwd).

What is timed, for each side, from the router's output (``topk_idx [T, k]``, ``topk_w [T, k]`` fp32) to the
combined ``[T, H]`` and back through autograd:

  ours  ``plan_slots`` (one stable sort + searchsorted, no host sync), permute = ``x.index_select(0, rows)``,
        unpermute = one gather by ``inv`` + the weighted sum over the ``k`` slots in fp32 (what our block does
        around its GEMMs; there the weight is folded into the activation instead), autograd for the backward.
  te    ``routing_map`` (a [T, E] int32 mask, built from ``topk_idx``), ``moe_permute(x, routing_map,
        num_out_tokens=T*k)``, ``moe_unpermute(y, row_id_map, merging_probs=[T, E] fp32 probs)``.

The "expert" between them is the identity, so both sides must give the same rows: the permuted rows are compared
bitwise (both order slots by expert, tokens ascending inside an expert), the combined output and input gradient
with the stated bf16 tolerance (the two sum the k weighted rows in different orders).

Run on a CUDA machine with TransformerEngine importable: ``python3 benchmarks/gpu_permute.py`` (prints a table; with
``OUT`` set writes ``$OUT/gpu_permute.json`` and ``.md``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402

from moe_adapters.runtime.experts import plan_slots  # noqa: E402

SHAPES = {"qwen3": (2048, 128, 8), "nemotron": (2688, 128, 6)}  # hidden, experts, top-k


def ours_step(x, idx, w, E):
    plan = plan_slots(idx, E, assume_local=True)
    xs = x.index_select(0, plan.rows)  # permute
    T, k = idx.shape
    y = xs.index_select(0, plan.inv).view(T, k, -1).float()  # unpermute: back to slot order
    out = (y * w.unsqueeze(-1)).sum(1).to(x.dtype)
    return xs, out


def te_step(x, idx, w, E):
    from transformer_engine.pytorch import moe_permute, moe_unpermute

    T, k = idx.shape
    routing_map = torch.zeros(T, E, dtype=torch.int32, device=x.device).scatter_(1, idx, 1)
    probs = torch.zeros(T, E, dtype=torch.float32, device=x.device).scatter_(1, idx, w)
    xs, row_id_map = moe_permute(x, routing_map, num_out_tokens=T * k)
    out = moe_unpermute(xs, row_id_map, merging_probs=probs, restore_shape=x.shape)
    return xs, out


def timed(fn, x, idx, w, E, go, iters: int) -> list[float]:
    times = []
    for i in range(iters + 3):
        xx = x.detach().requires_grad_(True)
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        _, out = fn(xx, idx, w, E)
        out.backward(go)
        b.record()
        b.synchronize()
        if i >= 3:
            times.append(a.elapsed_time(b))
    return times


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", default="4096,16384,65536")
    ap.add_argument("--iters", type=int, default=20)
    args = ap.parse_args(argv)
    dev = torch.device("cuda")
    rows = []
    for name, (H, E, k) in SHAPES.items():
        for T in (int(t) for t in args.tokens.split(",")):
            g = torch.Generator(device=dev).manual_seed(T)
            x = torch.randn(T, H, device=dev, dtype=torch.bfloat16, generator=g)
            idx = torch.rand(T, E, device=dev, generator=g).topk(k, dim=1).indices
            w = torch.rand(T, k, device=dev, generator=g).softmax(-1)
            go = torch.randn(T, H, device=dev, dtype=torch.bfloat16, generator=g)
            res = {}
            grads = {}
            for side, fn in (("ours", ours_step), ("te", te_step)):
                xx = x.detach().requires_grad_(True)
                xs, out = fn(xx, idx, w, E)
                out.backward(go)
                res[side] = (xs.detach(), out.detach())
                grads[side] = xx.grad
            same_perm = torch.equal(res["ours"][0], res["te"][0])
            d_out = (res["ours"][1].float() - res["te"][1].float()).abs().max().item()
            d_grad = (grads["ours"].float() - grads["te"].float()).abs().max().item()
            t_ours = statistics.median(timed(ours_step, x, idx, w, E, go, args.iters))
            t_te = statistics.median(timed(te_step, x, idx, w, E, go, args.iters))
            row = dict(shape=name, tokens=T, hidden=H, experts=E, top_k=k, ours_ms=t_ours, te_ms=t_te,
                       te_over_ours=t_te / t_ours, permuted_rows_bitwise=same_perm, max_abs_diff_out=d_out,
                       max_abs_diff_grad=d_grad)
            rows.append(row)
            print(json.dumps(row), flush=True)
    md = ["| shape | tokens | ours ms (fwd+bwd) | TE ms | TE / ours | permuted rows bitwise | max abs diff out / grad |",
          "|---|---:|---:|---:|---:|---|---|"]
    for r in rows:
        md.append(f"| {r['shape']} | {r['tokens']:,} | {r['ours_ms']:.3f} | {r['te_ms']:.3f} | {r['te_over_ours']:.2f} | "
                  f"{r['permuted_rows_bitwise']} | {r['max_abs_diff_out']:.2g} / {r['max_abs_diff_grad']:.2g} |")
    print("\n".join(md))
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "gpu_permute.json"), "w") as f:
            json.dump({"torch": torch.__version__, "gpu": torch.cuda.get_device_name(), "rows": rows}, f, indent=1)
        with open(os.path.join(os.environ["OUT"], "gpu_permute.md"), "w") as f:
            f.write("\n".join(md) + "\n")
    bad = [r for r in rows if not r["permuted_rows_bitwise"] or r["max_abs_diff_out"] > 0.0625]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())

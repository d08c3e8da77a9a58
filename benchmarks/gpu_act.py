#!/usr/bin/env python3
"""The expert activation between the two grouped GEMMs (SwiGLU with the routing weight folded in), compiled by
inductor in a few ways, forward and backward, on one GPU: which compile setting gives the fastest kernels.

Shapes: Qwen3-30B-A3B's block at 16k tokens (N = 131,072 slots, I = 768) and 64k. Variants:

  dynamic      ``torch.compile(dynamic=True)``: every dimension symbolic (what the block used)
  rows_dynamic only the row count is symbolic (``mark_dynamic(t, 0)``), the width is a constant
  (either) + ``concat``: the backward's ``cat([d gate, d up])`` as a concat kernel instead of a masked pointwise
  Triton kernel  our hand-written one-pass kernels (``moe_adapters.runtime.act_kernel``)

and Nemotron-3-Nano's non-gated squared ReLU (I = 1856, top-6), rows_dynamic against the Triton kernel.

    python3 benchmarks/gpu_act.py [--tokens 16384,65536] [--out PREFIX]
"""

from __future__ import annotations

import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402

from benchmarks.cuda_timing import parse_args, timed  # noqa: E402
from moe_adapters.runtime.act_kernel import act_backward, act_forward  # noqa: E402
from moe_adapters.runtime.experts import fused_act_backward_math, fused_act_forward_math  # noqa: E402

CONCAT = {k: 0 for k in ("max_pointwise_cat_inputs", "max_complex_pointwise_cat_inputs")}


def variant(fn, dynamic: bool, concat: bool):
    import torch._inductor.config as cfg

    opts = {k: v for k, v in CONCAT.items() if hasattr(cfg, k)} if concat else None
    compiled = torch.compile(fn, dynamic=True if dynamic else None, fullgraph=True, options=opts)

    def call(*args):
        if not dynamic:
            for a in args:
                if isinstance(a, torch.Tensor) and a.dim() >= 1:
                    torch._dynamo.mark_dynamic(a, 0)
        return compiled(*args)

    return call


def main() -> int:
    args = parse_args(__doc__, "16384,65536", 20)
    if args is None:
        return 1
    rows = []
    print("| tokens | act | variant | fwd ms | bwd ms | fwd GB/s | bwd GB/s | max diff vs first variant |")
    print("|---:|---|---|---:|---:|---:|---:|---:|")
    for T in (int(t) for t in args.tokens.split(",")):
        for act, gated, k, I in (("silu", True, 8, 768), ("relu2", False, 6, 1856)):
            N = T * k
            g = torch.Generator("cuda").manual_seed(T)
            gu = torch.randn(N, 2 * I if gated else I, device="cuda", generator=g).to(torch.bfloat16)
            gate, up = gu.chunk(2, dim=-1) if gated else (gu, None)
            w = torch.rand(N, device="cuda", generator=g)
            d_hu = torch.randn(N, I, device="cuda", generator=g).to(torch.bfloat16)
            fwd_bytes = gu.numel() * 2 + N * I * 2
            bwd_bytes = gu.numel() * 2 * 2 + d_hu.numel() * 2 * 2
            base = None
            variants = [("dynamic", True, False), ("dynamic + concat", True, True),
                        ("rows_dynamic", False, False), ("rows_dynamic + concat", False, True)]
            for name, dyn, cat in (variants if gated else variants[2:3]) + [("Triton kernel", False, False)]:
                if name == "Triton kernel":
                    fwd = lambda a, g_, u_, w_: act_forward(a, gu, gated, w_)  # noqa: E731
                    bwd = lambda a, g_, u_, w_, d_: act_backward(a, gu, gated, w_, d_)  # noqa: E731
                else:
                    fwd = variant(fused_act_forward_math, dyn, cat)
                    bwd = variant(fused_act_backward_math, dyn, cat)
                try:
                    out = (fwd(act, gate, up, w), *bwd(act, gate, up, w, d_hu))
                    f_ms = timed(lambda: fwd(act, gate, up, w), args.iters)[0]
                    b_ms = timed(lambda: bwd(act, gate, up, w, d_hu), args.iters)[0]
                except Exception as e:  # a setting this torch does not take
                    print(f"| {T} | {act} | {name} | error: {e!r:.120} | | | | |")
                    continue
                base = base or out
                # bf16 outputs: largest difference in units of the reference's magnitude; d w (fp32): relative
                diff = max(float((a.float() - b.float()).abs().max() / b.float().abs().max())
                           for a, b in zip(out, base))
                rows.append({"tokens": T, "act": act, "variant": name, "fwd_ms": f_ms, "bwd_ms": b_ms,
                             "max_rel_diff": diff})
                print(f"| {T} | {act} | {name} | {f_ms:.3f} | {b_ms:.3f} | {fwd_bytes / f_ms / 1e6:.0f} | "
                      f"{bwd_bytes / b_ms / 1e6:.0f} | {diff:.1e} |", flush=True)
                torch._dynamo.reset()
    if args.out:
        with open(args.out + ".json", "w") as f:
            json.dump({"torch": torch.__version__, "gpu": torch.cuda.get_device_name(), "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

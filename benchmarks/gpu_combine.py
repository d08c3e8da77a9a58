#!/usr/bin/env python3
"""The per-token sum of expert outputs (the unpermute), on one GPU: the eager torch versions, a ``torch.compile``d
masked gather-sum, and our Triton kernel (``moe_adapters.runtime.gather_sum``), side by side in one run.

The workload is one rank's of Qwen3-30B-A3B with ``--tokens`` tokens per GPU (k = 8, 128 experts, H = 2048, bf16
expert outputs sorted by expert), at EP = 1 (every slot local) and EP = 2, 4, 8 (a received token row carries ``k``
ids of which only the local ones are valid, so slots are dropped). The same operation runs three times per block
step: the combine in forward, the permute's input gradient in backward, and (EP) the all_to_all combine.

Eager torch, before the kernel: EP = 1 one gather into ``[R, k, H]`` and a sum over ``k``; EP > 1 an fp32
``index_add`` (an fp32 copy of the rows, then atomic adds). Timed: median of ``--iters`` calls.

    python3 benchmarks/gpu_combine.py [--tokens 8192] [--ep 1,2,4,8]
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


def received_ids(tokens: int, ep: int, experts: int, k: int, gen: torch.Generator) -> torch.Tensor:
    """Local expert ids [R, k] (-1 where not local) of the rows one rank receives: every rank's tokens that chose at
    least one of this rank's experts (uniform random routing)."""
    local = experts // ep
    scores = torch.rand(tokens * ep, experts, generator=gen, device="cuda")
    top = scores.topk(k, dim=-1).indices
    ids = torch.where(top < local, top, -1)
    return ids[(ids >= 0).any(-1)]


def eager_before(y: torch.Tensor, plan, R: int, k: int) -> torch.Tensor:
    """What the block ran before the kernel."""
    if plan.n == R * k:
        return y.index_select(0, plan.inv).view(R, k, -1).sum(1)
    acc = torch.zeros(R, y.shape[-1], dtype=torch.float32, device=y.device)
    return acc.index_add_(0, plan.rows, y.float()).to(y.dtype)


def masked_gather_sum(y: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    valid = (index >= 0).unsqueeze(-1)
    rows = y[index.clamp(min=0)].float() * valid
    return rows.sum(1).to(y.dtype)


def main() -> int:
    args = parse_args(__doc__, "8192", 20, lambda ap: ap.add_argument("--ep", default="1,2,4,8"))
    if args is None:
        return 1
    from moe_adapters.runtime.experts import plan_slots
    from moe_adapters.runtime.gather_sum import gather_sum, gather_sum_reference

    compiled = torch.compile(masked_gather_sum, dynamic=True, fullgraph=True)
    rows = []
    print(f"# unpermute, {args.tokens} tokens per GPU, k 8, H 2048, bf16 ({torch.cuda.get_device_name()}, "
          f"torch {torch.__version__})\n")
    print("| EP | rows | valid slots | implementation | ms | GB/s (valid rows read + output written) | "
          "max abs diff vs fp32 slot loop |")
    print("|---|---:|---:|---|---:|---:|---:|")
    for ep in [int(e) for e in str(args.ep).split(",")]:
        gen = torch.Generator("cuda").manual_seed(ep)
        if ep == 1:
            ids = torch.rand(int(args.tokens), 128, generator=gen, device="cuda").topk(8, dim=-1).indices
        else:
            ids = received_ids(int(args.tokens), ep, 128, 8, gen)
        R, k = ids.shape
        plan = plan_slots(ids, 128 // ep, assume_local=ep == 1)
        y = torch.randn(plan.n, 2048, device="cuda", generator=gen).to(torch.bfloat16)
        index = plan.inv.view(R, k)
        want = gather_sum_reference(y.float(), index, torch.float32).to(torch.bfloat16)  # fp32, slot order
        impls = {
            "eager torch (before)": lambda: eager_before(y, plan, R, k),
            "masked gather-sum, torch.compile": lambda: compiled(y, index),
            "Triton kernel (ours now)": lambda: gather_sum(y, index),
        }
        for name, fn in impls.items():
            ms, _, out = timed(fn, args.iters)
            gbs = (y.numel() * 2 + R * 2048 * 2) / ms / 1e6
            diff = float((out.float() - want.float()).abs().max())
            rows.append({"ep": ep, "rows": R, "valid_slots": plan.n, "impl": name, "ms": ms, "gb_s": gbs,
                         "max_abs_diff": diff})
            print(f"| {ep} | {R} | {plan.n} | {name} | {ms:.3f} | {gbs:.0f} | {diff:.2e} |", flush=True)
    if args.out:
        with open(args.out + ".json", "w") as f:
            json.dump({"tokens": int(args.tokens), "results": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

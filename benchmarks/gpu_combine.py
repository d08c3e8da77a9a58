#!/usr/bin/env python3
"""The per-row sum of an expert-parallel rank's expert outputs, on one GPU: fp32 ``index_add`` (what the EP path
uses, ``experts._gather_sum``) against a gather-sum without atomics, compiled into one kernel by inductor.

On an EP rank a received token row carries ``k`` expert ids of which only the local ones are valid (-1 elsewhere),
so slots are dropped and the plain gather-sum (one gather by the inverse permutation, a sum over ``k``) does not
apply. The workload is that of Qwen3-30B-A3B at EP=4 with 2 x 4096 tokens per GPU: ~29.5k received rows, k = 8,
32 local experts of 128, H = 2048, bf16 expert outputs sorted by expert. Timed: median of ``--iters`` calls, both
directions of use in the block (the combine in forward, the input gradient in backward, are the same operation).

Measured on one H200 (docs/benchmarks.md): the compiled gather-sum is slower at EP 4 and 8 (it loads every slot,
masked, and ~72% of an EP=4 rank's slots are dropped) and even at EP 2, so the library keeps ``index_add``.

    python3 benchmarks/gpu_combine.py [--tokens 8192] [--ep 4]
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


def main() -> int:
    args = parse_args(__doc__, "8192", 20, lambda ap: ap.add_argument("--ep", type=int, default=4))
    if args is None:
        return 1
    from moe_adapters.runtime.experts import _gather_sum, plan_slots

    def masked_gather_sum(y: torch.Tensor, inv: torch.Tensor, num_rows: int, k: int) -> torch.Tensor:
        valid = (inv >= 0).unsqueeze(-1)
        rows = y[inv.clamp(min=0)].float() * valid
        return rows.view(num_rows, k, y.shape[-1]).sum(1).to(torch.bfloat16)

    gen = torch.Generator("cuda").manual_seed(0)
    ids = received_ids(int(args.tokens), args.ep, 128, 8, gen)
    plan = plan_slots(ids, 128 // args.ep)
    y = torch.randn(plan.n, 2048, device="cuda", generator=gen).to(torch.bfloat16)
    R = ids.shape[0]
    inv = torch.full((R * 8,), -1, dtype=torch.long, device="cuda")  # each slot's sorted position, -1 if dropped
    inv.scatter_(0, plan.perm, torch.arange(plan.n, device="cuda"))
    compiled = torch.compile(masked_gather_sum, dynamic=True, fullgraph=True)

    impls = {"index_add fp32 (ours: _gather_sum)": lambda: _gather_sum(y, plan, torch.bfloat16),
             "masked gather-sum, compiled": lambda: compiled(y, inv, R, 8)}
    want = _gather_sum(y, plan, torch.bfloat16)
    rows = []
    print(f"# EP={args.ep} combine, {R} received rows, {plan.n} valid slots of {R * 8}, H 2048, bf16 "
          f"({torch.cuda.get_device_name()}, torch {torch.__version__})\n")
    print("| implementation | ms | GB/s (valid rows read + output written) | max abs diff vs index_add |")
    print("|---|---:|---:|---:|")
    for name, fn in impls.items():
        ms, _, out = timed(fn, args.iters)
        gbs = (y.numel() * 2 + R * 2048 * 2) / ms / 1e6
        diff = float((out.float() - want.float()).abs().max())
        rows.append({"impl": name, "ms": ms, "gb_s": gbs, "max_abs_diff": diff})
        print(f"| {name} | {ms:.3f} | {gbs:.0f} | {diff:.2e} |", flush=True)
    if args.out:
        with open(args.out + ".json", "w") as f:
            json.dump({"rows_received": R, "valid_slots": plan.n, "results": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

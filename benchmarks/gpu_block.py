#!/usr/bin/env python3
"""One MoE block, forward + backward, bf16: transformers v5's own block against ours, same weights.

    python3 benchmarks/gpu_block.py                      # H200: Qwen3-30B-A3B and Nemotron-3-Nano dims, 4k/16k/64k
    python3 benchmarks/gpu_block.py --smoke              # tiny dims, few tokens; runs on CPU in seconds
    python3 benchmarks/gpu_block.py --out results/block  # also writes results/block.json and results/block.md

Blocks (``--models``):
  qwen3     Qwen3-30B-A3B:   H 2048, 128 experts, top-8, I 768, SwiGLU, softmax + norm_topk_prob
  nemotron  Nemotron-3-Nano: H 2688, 128 experts, top-6, I 1856, relu2, shared expert I 3712, sigmoid routing with
            a correction bias, n_group 1, topk_group 1, routed_scaling_factor 2.5 (router kept in fp32, as v5 does)

Implementations (``--impls``):
  v5_grouped_mm  v5's block (built from its config class via the decoder layer's ``mlp`` / ``mixer``) with
                 ``config._experts_implementation = "grouped_mm"`` (v5's default experts implementation)
  v5_eager       the same with ``"eager"`` (the per-expert loop); only at the smallest token count (it is slow)
  ours           ``moe_adapters.runtime.layer.build_moe_block(..., backend="grouped_mm")``, weights copied from v5's
  ours_te        the same with ``backend="te"`` (only when transformer_engine imports)

Each implementation gets its own copy of one set of random weights (a CPU master copy, moved to the GPU while it
runs), so peak memory is that block alone: its weights, its gradients, the input and the output gradient.

Measured per (block, implementation, tokens): median of ``--iters`` fwd+bwd steps timed with CUDA events after
``--warmup`` steps (parameter and input gradients set to None before each step, outside the timed region); tokens/s;
expert TFLOP/s = 6 * tokens * top_k * M * H * I / time, M = 3 matmuls of H x I per slot for gated (SwiGLU: gate, up,
down) and 2 for non-gated (relu2: up, down) experts, 6 = 2 flops per multiply-add x 3 GEMMs per matmul (forward,
input gradient, weight gradient); routed experts only (the router and Nemotron's shared expert are not counted);
peak memory (``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``, one step from a state with no
gradients); the memory held between forward and backward; GPU ops per step and host syncs per step (torch's sync
debug mode). Correctness (at the smallest token count): v5's block in fp32 with eager experts on the same weights
is the reference; for ours and v5-bf16, ``rel_l2 = ||a - ref|| / ||ref||`` and ``rel_max = max|a - ref| / max|ref|``
of the output, of the input gradient and (worst of) the expert weight gradients; ``ok`` applies the repo's GPU test
rule (ours rel_max <= 2 * v5's + 1e-3). Our block's time is broken down by timing its stages (the same internal
functions, same shapes) one by one with events: router, slot sort, permute, expert GEMMs (with their own TFLOP/s),
activation, combine, shared expert; ``other`` = measured step - sum of stages.

Any configuration that fails prints an error row; the rest continues. ``--budget-s`` stops starting new
configurations after that many seconds. Results: a compact table last on stdout; JSON + Markdown to ``$OUT`` (when
set) and to ``--out``.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import math
import os
import platform
import statistics
import sys
import time
import traceback
import warnings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402

GiB = 1024**3

MODELS = {
    "qwen3": dict(family="qwen3_moe", H=2048, E=128, k=8, I=768, shared=0, gated=True),
    "nemotron": dict(family="nemotron_h", H=2688, E=128, k=6, I=1856, shared=3712, gated=False),
}
SMOKE_MODELS = {
    "qwen3": dict(family="qwen3_moe", H=64, E=8, k=2, I=32, shared=0, gated=True),
    "nemotron": dict(family="nemotron_h", H=64, E=8, k=2, I=32, shared=64, gated=False),
}


# --- building the blocks -------------------------------------------------------------------------------------------


def make_config(model: str, dims: dict):
    if model == "qwen3":
        from transformers import Qwen3MoeConfig

        return Qwen3MoeConfig(
            hidden_size=dims["H"], num_experts=dims["E"], num_experts_per_tok=dims["k"],
            moe_intermediate_size=dims["I"], norm_topk_prob=True, num_hidden_layers=1, mlp_only_layers=[],
            decoder_sparse_step=1, num_attention_heads=32 if dims["H"] >= 1024 else 2,
            num_key_value_heads=4 if dims["H"] >= 1024 else 1, head_dim=128 if dims["H"] >= 1024 else 32,
            intermediate_size=4 * dims["H"], vocab_size=1024,
        )
    from transformers import NemotronHConfig

    big = dims["H"] >= 1024
    return NemotronHConfig(
        hidden_size=dims["H"], n_routed_experts=dims["E"], num_experts_per_tok=dims["k"],
        moe_intermediate_size=dims["I"], moe_shared_expert_intermediate_size=dims["shared"], mlp_hidden_act="relu2",
        n_group=1, topk_group=1, routed_scaling_factor=2.5, norm_topk_prob=True, hybrid_override_pattern="E",
        num_hidden_layers=1, intermediate_size=dims["I"], num_attention_heads=32 if big else 2,
        num_key_value_heads=2 if big else 1, head_dim=128 if big else 32, mamba_num_heads=64 if big else 4,
        mamba_head_dim=64 if big else 8, ssm_state_size=128 if big else 8, n_groups=8 if big else 2,
        chunk_size=128 if big else 8, vocab_size=1024,
    )


def v5_block_class_instance(model: str, cfg):
    """v5's MoE block exactly as its decoder layer builds it (on the meta device: no memory)."""
    with torch.device("meta"):
        if model == "qwen3":
            from transformers.models.qwen3_moe import modeling_qwen3_moe as m

            return m.Qwen3MoeDecoderLayer(cfg, 0).mlp
        from transformers.models.nemotron_h import modeling_nemotron_h as m

        try:
            return m.NemotronHBlock(cfg, 0).mixer
        except Exception:  # a transformers whose block type lookup differs: the mixer class directly
            return m.NemotronHMoE(cfg, layer_idx=0)


def fp32_router(model: str) -> bool:
    return model == "nemotron"  # v5 keeps NemotronH's router weight in fp32 (and computes its logits in fp32)


def master_weights(model: str, cfg, seed: int = 0) -> dict[str, torch.Tensor]:
    """One set of random weights (CPU, fp32), keyed as v5's block state dict."""
    block = v5_block_class_instance(model, cfg)
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, t in block.state_dict().items():
        if name.endswith("e_score_correction_bias"):
            out[name] = torch.randn(t.shape, generator=g) * 0.01
        elif t.is_floating_point():
            std = 0.02
            out[name] = torch.randn(t.shape, generator=g) * std
        else:
            out[name] = torch.zeros(t.shape, dtype=t.dtype)
    return out


def build_v5(model: str, cfg, weights, device, dtype, impl: str):
    cfg._experts_implementation = impl  # what v5's @use_experts_implementation forward reads on every call
    block = v5_block_class_instance(model, cfg).to_empty(device=device)
    block.load_state_dict({k: v.to(dtype) if v.is_floating_point() else v for k, v in weights.items()})
    block.to(dtype)
    if fp32_router(model):
        block.gate.float()
        if hasattr(block.gate, "e_score_correction_bias"):
            block.gate.e_score_correction_bias.data = weights[next(k for k in weights if "e_score" in k)].float().to(
                device
            )
    for sub in block.modules():  # v5's experts module keeps a reference to the config it was built with
        c = getattr(sub, "config", None)
        if c is not None and c is not cfg:
            c._experts_implementation = impl
    return block


def build_ours(model: str, cfg, weights, device, dtype, backend: str):
    from moe_adapters.families import detect
    from moe_adapters.runtime.layer import build_moe_block, copy_block_weights

    template = build_v5(model, cfg, weights, device, dtype, "grouped_mm")
    d = cfg.to_dict()
    fam = detect(d)
    layer = fam.moe_layer_ids(d)[0]
    ours = build_moe_block(fam, d, layer, backend=backend, template=template, device=device)
    copy_block_weights(ours, template)
    del template
    return ours


# --- measuring -----------------------------------------------------------------------------------------------------


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def zero_grads(block, x):
    x.grad = None
    for p in block.parameters():
        p.grad = None


def step(block, x, go):
    out = block(x)
    out.backward(go)
    return out


def time_steps(block, x, go, warmup: int, iters: int, device) -> list[float]:
    """Milliseconds per fwd+bwd step (CUDA events on GPU, perf_counter on CPU)."""
    for _ in range(warmup):
        zero_grads(block, x)
        step(block, x, go)
    sync(device)
    times = []
    for _ in range(iters):
        zero_grads(block, x)
        if device.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            step(block, x, go)
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b))
        else:
            t0 = time.perf_counter()
            step(block, x, go)
            times.append((time.perf_counter() - t0) * 1e3)
    return times


def memory_profile(block, x, go, device) -> dict:
    """Peak of one step from a gradient-free state, and what the forward leaves for the backward."""
    if device.type != "cuda":
        return {}
    zero_grads(block, x)
    gc.collect()
    sync(device)
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    out = block(x)
    sync(device)
    after_fwd = torch.cuda.memory_allocated(device)
    fwd_peak = torch.cuda.max_memory_allocated(device)
    out.backward(go)
    del out
    sync(device)
    peak = torch.cuda.max_memory_allocated(device)
    out_bytes = x.numel() * x.element_size()
    return {
        "peak_gib": peak / GiB,
        "static_gib": base / GiB,
        "peak_above_static_gib": (peak - base) / GiB,
        "fwd_peak_above_static_gib": (fwd_peak - base) / GiB,
        "held_for_backward_gib": max(after_fwd - base - out_bytes, 0) / GiB,
    }


def count_gpu_ops_and_syncs(block, x, go, device) -> dict:
    res = {}
    if device.type != "cuda":
        return res
    try:
        from torch.autograd import DeviceType
        from torch.profiler import ProfilerActivity, profile

        zero_grads(block, x)
        sync(device)
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            step(block, x, go)
            sync(device)
        evs = [e for e in prof.events() if getattr(e, "device_type", None) == DeviceType.CUDA]
        res["gpu_ops"] = len(evs)
    except Exception as e:  # the profiler is optional
        res["gpu_ops_error"] = repr(e)[:200]
    try:
        zero_grads(block, x)
        sync(device)
        prev = torch.cuda.get_sync_debug_mode()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                step(block, x, go)
            finally:
                torch.cuda.set_sync_debug_mode(prev)
        res["host_syncs"] = sum("synchroniz" in str(w.message).lower() for w in caught)
    except Exception as e:
        res["host_syncs_error"] = repr(e)[:200]
    return res


def kernel_profile(block, x, go, path: str) -> dict:
    """One step under torch.profiler: the top kernels by GPU time (written to ``path``) and how busy the GPU was
    (kernel time / wall time of the step): below 1, the step waits on the host (launches, syncs). The GPU's idle
    gaps are listed too, each with the host op that launched the kernel after it (what the GPU was waiting for)."""
    import tempfile

    from torch.profiler import ProfilerActivity, profile

    zero_grads(block, x)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        step(block, x, go)
        torch.cuda.synchronize()
    wall_ms = (time.perf_counter() - t0) * 1e3
    avg = prof.key_averages()
    table = avg.table(sort_by="self_cuda_time_total", row_limit=30, max_name_column_width=70)
    with tempfile.TemporaryDirectory() as tmp:
        trace = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(trace)
        gaps, idle_ms = idle_gaps(json.load(open(trace)))
    with open(path, "w") as f:
        f.write(table)
        f.write(f"\nGPU idle between the first and last kernel: {idle_ms:.3f} ms; "
                "largest gaps (us, op launching next):\n")
        f.writelines(f"{g:10.1f}  {name}\n" for g, name in gaps[:25])
    from torch.autograd import DeviceType

    kernel_us = sum(e.device_time_total for e in prof.events() if getattr(e, "device_type", None) == DeviceType.CUDA)
    return {"profile_kernel_ms": kernel_us / 1e3, "profile_wall_ms": wall_ms, "profile_idle_ms": idle_ms}


def idle_gaps(trace: dict, min_us: float = 5.0) -> tuple[list[tuple[float, str]], float]:
    """From a chrome trace: the GPU's idle gaps (>= ``min_us``) between kernels, largest first, each named by the
    innermost host op around the launch of the kernel that ended it; and the total idle time in ms."""
    ev = trace.get("traceEvents", [])
    gpu = sorted((e for e in ev if e.get("cat") in ("kernel", "gpu_memset", "gpu_memcpy")), key=lambda e: e["ts"])
    launch = {e["args"].get("correlation"): e["ts"] for e in ev if e.get("cat") == "cuda_runtime" and "args" in e}
    ops = sorted((e for e in ev if e.get("cat") == "cpu_op"), key=lambda e: e["ts"])
    gaps, idle, end = [], 0.0, None
    for k in gpu:
        if end is not None and k["ts"] - end >= min_us:
            gap = k["ts"] - end
            idle += gap
            t = launch.get(k.get("args", {}).get("correlation"))
            around = [o for o in ops if t is not None and o["ts"] <= t <= o["ts"] + o.get("dur", 0)]
            name = min(around, key=lambda o: o.get("dur", 0))["name"] if around else k["name"][:60]
            gaps.append((gap, name))
        end = max(end or 0.0, k["ts"] + k.get("dur", 0))
    return sorted(gaps, reverse=True), idle / 1e3


def expert_flops(dims: dict, tokens: int) -> float:
    mats = 3 if dims["gated"] else 2
    return 6.0 * tokens * dims["k"] * mats * dims["H"] * dims["I"]


def rel_errs(a: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    a, ref = a.detach().double(), ref.detach().double()
    d = a - ref
    l2 = (d.norm() / ref.norm().clamp_min(1e-30)).item()
    mx = (d.abs().max() / ref.abs().max().clamp_min(1e-30)).item()
    return l2, mx


def expert_grads(block) -> dict[str, torch.Tensor]:
    return {n: p.grad for n, p in block.named_parameters() if n.split(".")[0] == "experts" and p.grad is not None}


# --- our block's stages, timed one by one --------------------------------------------------------------------------


def stage_breakdown(block, x2d, go2d, iters: int, device) -> dict:
    """Times the stages our grouped_mm block runs (same internal functions, same shapes), each fwd + bwd."""
    from moe_adapters.runtime import experts as ex

    def timed(fn, n=iters):
        fn()
        sync(device)
        ts = []
        for _ in range(n):
            if device.type == "cuda":
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                fn()
                b.record()
                b.synchronize()
                ts.append(a.elapsed_time(b))
            else:
                t0 = time.perf_counter()
                fn()
                ts.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(ts)

    E_mod = block.routed_experts
    router = block.router
    out = {}
    with torch.no_grad():
        _, w, idx = router(x2d)
    plan = ex.plan_slots(idx, E_mod.num_local_experts, True)
    rows, offs = plan.rows, plan.offs
    w_slot = w.reshape(-1)[plan.perm].float()
    W1, W2 = E_mod.in_proj.detach(), E_mod.down_proj.detach()
    dt = W1.dtype

    def router_step():
        xr = x2d.detach().requires_grad_()
        logits, ww, _ = router(xr)
        torch.autograd.backward([ww], [torch.ones_like(ww)])

    out["router"] = timed(router_step)
    out["slot_sort"] = timed(lambda: ex.plan_slots(idx, E_mod.num_local_experts, True))

    xs = x2d.index_select(0, rows).to(dt)
    gu = ex._gmm(xs, W1.transpose(-2, -1), offs)
    gated = E_mod.gated
    g, u = gu.chunk(2, dim=-1) if gated else (gu, None)
    fold = x2d.dtype not in (torch.float32, torch.float64)
    h = ex.act_mul_forward(E_mod.act_name, g, u, w_slot if fold else None)
    y = ex._gmm(h, W2.transpose(-2, -1), offs)
    d_rows = go2d.to(dt).index_select(0, rows)
    d_hu = ex._gmm(d_rows, W2, offs)
    d_gu = torch.empty_like(gu)

    def permute():
        a = x2d.index_select(0, rows)  # forward gather
        b = ex._gather_sum(xs, plan, x2d.dtype)  # backward: gather-sum of the permuted input gradient
        c = x2d.index_select(0, rows)  # backward: regather for the weight gradient
        return a, b, c

    out["permute"] = timed(permute)

    def gemms_fwd():
        return ex._gmm(xs, W1.transpose(-2, -1), offs), ex._gmm(h, W2.transpose(-2, -1), offs)

    def gemms_bwd():
        return (
            ex._gmm(d_rows, W2, offs), ex._gmm(d_rows.t(), h, offs), ex._gmm(d_gu, W1, offs),
            ex._gmm(d_gu.t(), xs, offs),
        )

    out["expert_gemm_fwd"] = timed(gemms_fwd)
    out["expert_gemm_bwd"] = timed(gemms_bwd)

    def act_fwd_bwd():
        ex.act_mul_forward(E_mod.act_name, g, u, w_slot if fold else None)  # forward
        s = ex._act(E_mod.act_name, g)  # backward: recompute, routing-weight grad, weighted copy, act grads
        a = s * u if gated else s
        (d_hu * a).sum(-1, dtype=torch.float32)
        ex._mul_rounded(a, w_slot)
        dd = ex._mul_rounded(d_hu, w_slot)
        if gated:
            I = g.shape[-1]
            torch.mul(dd, s, out=d_gu[:, I:])
            ex._act_backward(E_mod.act_name, g, dd.mul_(u), d_gu[:, :I])
        else:
            ex._act_backward(E_mod.act_name, g, dd, d_gu)

    out["activation"] = timed(act_fwd_bwd)

    def combine():
        a = ex._gather_sum(y, plan, x2d.dtype) if fold else None
        b = go2d.to(dt).index_select(0, rows)
        return a, b

    out["combine"] = timed(combine)
    shared = getattr(block, block._shared_name) if getattr(block, "_shared_name", None) else None
    if shared is not None:
        def shared_step():
            xr = x2d.detach().requires_grad_()
            shared(xr).backward(go2d)

        out["shared_expert"] = timed(shared_step)
    fl = 6.0 * plan.n * (W1.shape[1] * W1.shape[2] + W2.shape[1] * W2.shape[2])
    out["_expert_gemm_tflops"] = fl / ((out["expert_gemm_fwd"] + out["expert_gemm_bwd"]) * 1e-3) / 1e12
    for p in block.parameters():
        p.grad = None
    return out


# --- driver --------------------------------------------------------------------------------------------------------


def env_info(device) -> dict:
    import transformers

    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "device": str(device),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    try:
        from moe_adapters.runtime.experts import te_available

        info["transformer_engine"] = te_available()
    except Exception:
        info["transformer_engine"] = False
    return info


def fmt(v, spec=".1f", none="-"):
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return none
    return format(v, spec)


def markdown(rows: list[dict], breakdowns: list[dict], info: dict) -> str:
    lines = [
        f"# MoE block fwd+bwd ({info.get('gpu', info['device'])}, torch {info['torch']}, transformers "
        f"{info['transformers']}, {info['date']})",
        "",
        "| block | tokens | impl | ms | tok/s | expert TFLOP/s | vs v5 grouped_mm | peak GiB | peak vs v5 | held fwd->bwd "
        "GiB | GPU ops | host syncs | out rel_l2 | out rel_max | dW rel_l2 | ok |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r.get("error"):
            lines.append(f"| {r['model']} | {r['tokens']} | {r['impl']} | ERROR: {r['error'][:120]} |" + " |" * 12)
            continue
        lines.append(
            "| {model} | {tokens} | {impl} | {ms} | {tps} | {tf} | {sp} | {pk} | {pr} | {held} | {ops} | {syncs} | "
            "{ol2} | {omx} | {dw} | {ok} |".format(
                model=r["model"], tokens=r["tokens"], impl=r["impl"], ms=fmt(r.get("ms"), ".2f"),
                tps=fmt(r.get("tok_s"), ",.0f"), tf=fmt(r.get("expert_tflops"), ".0f"),
                sp=fmt(r.get("speedup_vs_v5"), ".2f") + ("x" if r.get("speedup_vs_v5") else ""),
                pk=fmt(r.get("peak_gib"), ".2f"), pr=fmt(r.get("peak_vs_v5"), ".2f"),
                held=fmt(r.get("held_for_backward_gib"), ".2f"), ops=fmt(r.get("gpu_ops"), "d"),
                syncs=fmt(r.get("host_syncs"), "d"), ol2=fmt(r.get("out_rel_l2"), ".1e"),
                omx=fmt(r.get("out_rel_max"), ".1e"), dw=fmt(r.get("dW_rel_l2"), ".1e"),
                ok={True: "yes", False: "NO", None: "-"}[r.get("ok")],
            )
        )
    if breakdowns:
        keys = ["router", "slot_sort", "permute", "expert_gemm_fwd", "expert_gemm_bwd", "activation", "combine",
                "shared_expert", "other"]
        lines += ["", "Our block, time by stage (ms, fwd+bwd; `other` = measured step - sum of stages):", "",
                  "| block | tokens | step | " + " | ".join(keys) + " | GEMM TFLOP/s |",
                  "|---|---|---|" + "---|" * (len(keys) + 1)]
        for b in breakdowns:
            if b.get("error"):
                lines.append(f"| {b['model']} | {b['tokens']} | ERROR: {b['error'][:120]} |" + " |" * len(keys))
                continue
            lines.append(
                f"| {b['model']} | {b['tokens']} | {fmt(b.get('step'), '.2f')} | "
                + " | ".join(fmt(b.get(k), ".2f") for k in keys)
                + f" | {fmt(b.get('_expert_gemm_tflops'), '.0f')} |"
            )
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny dims and token counts (CPU-friendly)")
    ap.add_argument("--models", default="qwen3,nemotron")
    ap.add_argument("--tokens", default=None, help="comma-separated token counts (default 4096,16384,65536)")
    ap.add_argument("--impls", default="v5_grouped_mm,ours,ours_te,v5_eager")
    ap.add_argument("--warmup", type=int, default=None)
    ap.add_argument("--iters", type=int, default=None)
    ap.add_argument("--device", default=None)
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    ap.add_argument("--no-check", action="store_true", help="skip the fp32 reference / correctness check")
    ap.add_argument("--no-breakdown", action="store_true")
    ap.add_argument("--profile", action="store_true", help="one profiled step per configuration: kernel tables")
    ap.add_argument("--budget-s", type=float, default=225.0, help="start no configuration after this many seconds")
    ap.add_argument("--out", default=None, help="path prefix: writes PREFIX.json and PREFIX.md")
    args = ap.parse_args(argv)
    t_start = time.time()

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    dims_all = SMOKE_MODELS if args.smoke else MODELS
    tokens = [int(t) for t in (args.tokens or ("64,256" if args.smoke else "4096,16384,65536")).split(",")]
    warmup = args.warmup if args.warmup is not None else (1 if args.smoke else 3)
    iters = args.iters if args.iters is not None else (3 if args.smoke else 10)
    impls = [s.strip() for s in args.impls.split(",") if s.strip()]
    info = env_info(device)
    if "ours_te" in impls and not info.get("transformer_engine"):
        impls.remove("ours_te")
        print("ours_te: transformer_engine does not import here; skipped")
    print("env:", json.dumps(info))
    if device.type == "cuda":
        torch.cuda.set_device(torch.device(device).index or 0)

    rows: list[dict] = []
    breakdowns: list[dict] = []
    for model in [m.strip() for m in args.models.split(",") if m.strip()]:
        dims = dims_all[model]
        try:
            cfg = make_config(model, dims)
            weights = master_weights(model, cfg)
        except Exception as e:
            traceback.print_exc()
            rows.append(dict(model=model, tokens=0, impl="(config)", error=repr(e)))
            continue
        check_tokens = min(tokens)
        ref = None
        if not args.no_check:
            try:  # the fp32 reference: v5's block, eager experts, fp32, at the smallest token count
                g = torch.Generator(device="cpu").manual_seed(1)
                x32 = torch.randn(1, check_tokens, dims["H"], generator=g).to(device)
                go32 = torch.randn(1, check_tokens, dims["H"], generator=g).to(device)
                b32 = build_v5(model, cfg, weights, device, torch.float32, "eager")
                xr = x32.clone().requires_grad_()
                o32 = b32(xr)
                o32.backward(go32)
                ref = dict(x=x32, go=go32, out=o32.detach(), dx=xr.grad.detach(), dW=expert_grads(b32))
                del b32, xr, o32
            except Exception as e:
                traceback.print_exc()
                rows.append(dict(model=model, tokens=check_tokens, impl="fp32 reference", error=repr(e)))
                ref = None
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
        v5_at: dict[int, dict] = {}
        for impl in impls:
            if time.time() - t_start > args.budget_s:
                rows.append(dict(model=model, tokens=0, impl=impl, error="skipped: time budget"))
                continue
            block = None
            try:
                if impl.startswith("v5_"):
                    block = build_v5(model, cfg, weights, device, dtype, impl[3:])
                else:
                    block = build_ours(model, cfg, weights, device, dtype, "te" if impl == "ours_te" else "grouped_mm")
                block.train()
            except Exception as e:
                traceback.print_exc()
                rows.append(dict(model=model, tokens=0, impl=impl, error=f"build: {e!r}"))
                continue
            for T in tokens:
                if impl == "v5_eager" and T != min(tokens):
                    continue
                if time.time() - t_start > args.budget_s:
                    rows.append(dict(model=model, tokens=T, impl=impl, error="skipped: time budget"))
                    continue
                row = dict(model=model, tokens=T, impl=impl)
                x = go = None
                try:
                    g = torch.Generator(device="cpu").manual_seed(T)
                    x = torch.randn(1, T, dims["H"], generator=g).to(device=device, dtype=dtype).requires_grad_()
                    go = torch.randn(1, T, dims["H"], generator=g).to(device=device, dtype=dtype)
                    n_it = iters if impl != "v5_eager" else max(2, iters // 3)
                    times = time_steps(block, x, go, warmup if impl != "v5_eager" else 1, n_it, device)
                    ms = statistics.median(times)
                    row.update(ms=ms, ms_min=min(times), tok_s=T / (ms * 1e-3),
                               expert_tflops=expert_flops(dims, T) / (ms * 1e-3) / 1e12)
                    row.update(memory_profile(block, x, go, device))
                    if T == min(tokens):
                        row.update(count_gpu_ops_and_syncs(block, x, go, device))
                    if args.profile and device.type == "cuda":
                        prefix = args.out or os.path.join(os.environ.get("OUT", "."), "block")
                        row.update(kernel_profile(block, x, go, f"{prefix}_profile_{model}_{impl}_{T}.txt"))
                    if ref is not None and T == check_tokens:
                        zero_grads(block, x)
                        xc = ref["x"].to(dtype).clone().requires_grad_()
                        oc = block(xc)
                        oc.backward(ref["go"].to(dtype))
                        row["out_rel_l2"], row["out_rel_max"] = rel_errs(oc, ref["out"])
                        row["dx_rel_l2"], row["dx_rel_max"] = rel_errs(xc.grad, ref["dx"])
                        dws = [rel_errs(gr, ref["dW"][n]) for n, gr in expert_grads(block).items() if n in ref["dW"]]
                        if dws:
                            row["dW_rel_l2"] = max(a for a, _ in dws)
                            row["dW_rel_max"] = max(b for _, b in dws)
                        del xc, oc
                    if impl == "v5_grouped_mm":
                        v5_at[T] = row
                    base = v5_at.get(T)
                    if base is not None and base is not row and base.get("ms"):
                        row["speedup_vs_v5"] = base["ms"] / ms
                        if base.get("peak_gib") and row.get("peak_gib"):
                            row["peak_vs_v5"] = row["peak_gib"] / base["peak_gib"]
                        if base.get("out_rel_max") is not None and row.get("out_rel_max") is not None:
                            row["ok"] = row["out_rel_max"] <= 2 * base["out_rel_max"] + 1e-3
                    if impl == "ours" and not args.no_breakdown:
                        try:
                            bd = stage_breakdown(block, x.detach().reshape(T, -1), go.reshape(T, -1), iters, device)
                            bd["step"] = ms
                            bd["other"] = ms - sum(v for k, v in bd.items() if not k.startswith("_") and k != "step")
                            breakdowns.append(dict(model=model, tokens=T, **bd))
                        except Exception as e:
                            traceback.print_exc()
                            breakdowns.append(dict(model=model, tokens=T, error=repr(e)))
                except Exception as e:
                    traceback.print_exc()
                    row["error"] = repr(e)[:300]
                finally:
                    if block is not None:
                        zero_grads(block, x) if x is not None else None
                    del x, go
                    gc.collect()
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
                rows.append(row)
                print(
                    f"  {model:9s} {impl:14s} T={T:6d} "
                    + (f"ERROR {row['error'][:100]}" if row.get("error") else
                       f"{row['ms']:8.2f} ms {row['tok_s']:12,.0f} tok/s {row['expert_tflops']:6.0f} TFLOP/s "
                       f"peak {fmt(row.get('peak_gib'), '.2f')} GiB"),
                    flush=True,
                )
            del block
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
        del ref, weights

    md = markdown(rows, breakdowns, info)
    result = {"env": info, "args": vars(args), "rows": rows, "breakdown": breakdowns,
              "wall_s": time.time() - t_start}
    targets = []
    if os.environ.get("OUT"):
        targets.append(os.path.join(os.environ["OUT"], "gpu_block"))
    if args.out:
        targets.append(args.out)
    for prefix in targets:
        try:
            os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)
            with open(prefix + ".json", "w") as f:
                json.dump(result, f, indent=1, default=str)
            with open(prefix + ".md", "w") as f:
                f.write(md)
        except Exception as e:
            print(f"could not write {prefix}: {e!r}")
    print()
    print(md)
    print(f"wall {time.time() - t_start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Full training step (forward + backward + AdamW) of Qwen3-30B-A3B, random weights, on 1 or 4 GPUs: ours with
expert parallelism against transformers v5's native setups.

Run it (from the repository root, on ``nvidia-h200-x4``):

    python3 benchmarks/gpu_train.py --all --gpus 4 --layers 48            # every setup, one torchrun each, a table
    python3 benchmarks/gpu_train.py --all --gpus 4 --layers 48 --setups ours,v5_fsdp
    torchrun --nproc-per-node 4 benchmarks/gpu_train.py --setup ours --layers 48 --ckpt /tmp/q3_L48  # one setup

``--all`` first writes one random checkpoint (``--ckpt``, default ``/tmp/qwen3_30b_a3b_random_L{layers}``; created
once on GPU 0 with v5's own ``save_pretrained``, about 61 GB at 48 layers: the disk of the x4 machine holds it), so
every setup trains the same weights from the same files, then runs each setup in its own ``torchrun`` (fresh
processes, fresh memory) and prints the comparison. Setups (``--setups``):

  ours            ``moe_adapters.AutoModelForCausalLM.from_pretrained(ckpt, ep_size=WORLD)`` (experts_backend
                  grouped_mm; dispatcher ``auto``: DeepEP when ``deep_ep`` imports, else all_to_all), dense
                  parameters replicated, ``sync_gradients`` after backward
  v5_fsdp         ``transformers.AutoModelForCausalLM.from_pretrained(ckpt, distributed_config=
                  DistributedConfig(fsdp_size=WORLD))``, default experts (grouped_mm)
  v5_fsdp_ep      ``DistributedConfig(fsdp_size=WORLD, ep_size=WORLD, ep_implementation="all_to_all")`` (transformers
                  >= 5.23; skipped, with the reason, on older ones: the device image has 5.17, so carry the pinned
                  wheel and put it first on PYTHONPATH to run this one)
  v5_fsdp_eager   as v5_fsdp with ``experts_implementation="eager"``
  ours_ep1 / v5_single   one GPU, for the EP-scaling check (use a depth that fits one GPU: ``--scaling-layers``)

Model: the real Qwen3-30B-A3B config (``--config``, default ``../shared/realmodels/Qwen3-30B-A3B/config.json``; the
same values are built in, used when that file is absent) with ``num_hidden_layers = --layers``; bf16 parameters,
AdamW (lr 1e-5, states in the parameter dtype, ``--optimizer fused`` by default, the same for every setup), SDPA
attention, no activation checkpointing. Ours loads with ``fused_rms_norm`` and ``fused_cross_entropy``
(``--no-lean``: v5's own norms and loss, setup names ``ours_plain`` / ``ours_ep1_plain``). Data: ``--batch``
sequences of ``--seq`` random token ids per GPU (different per rank), labels = ids.

Reported per setup (rank 0 gathers every rank): median step time over ``--steps`` steps after ``--warmup``; tokens/s
per GPU; model TFLOP/s per GPU = tokens/s x (6 x active parameters + 6 x layers x seq x heads x head_dim) / 1e12
(active = everything but the embedding table, with top_k of num_experts experts per layer; the attention term is
causal QK^T and AV, forward + backward); peak memory per GPU (max over ranks of ``max_memory_allocated``, reset
after warmup); the first step's loss (same weights and data across setups, so the losses should agree to bf16
noise). The driver adds ratios: ours vs the best native v5 setup (target >= 2x), vs v5 eager (>= 3.7x), memory
vs the best native (<= 0.68x), per-GPU tokens/s vs NeMo AutoModel's published 12,040 tok/s/GPU; and, with
``--scaling-layers``, per-GPU tokens/s at EP=WORLD vs one GPU (target >= 80%).

Results: one ``RESULT {json}`` line per setup on stdout, ``$OUT/gpu_train_<setup>.json`` when ``OUT`` is set, and
with ``--all`` a Markdown table (``$OUT/gpu_train.md`` and ``--out PREFIX.md/.json``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402

NEMO_TOK_S_PER_GPU = 12040  # NeMo AutoModel, Qwen3-30B-A3B, 8x H100, EP=8 (published)
QWEN3_30B_A3B = {  # /work/shared/realmodels/Qwen3-30B-A3B/config.json
    "architectures": ["Qwen3MoeForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "bos_token_id": 151643, "decoder_sparse_step": 1, "eos_token_id": 151645, "head_dim": 128, "hidden_act": "silu",
    "hidden_size": 2048, "initializer_range": 0.02, "intermediate_size": 6144, "max_position_embeddings": 40960,
    "max_window_layers": 48, "mlp_only_layers": [], "model_type": "qwen3_moe", "moe_intermediate_size": 768,
    "norm_topk_prob": True, "num_attention_heads": 32, "num_experts": 128, "num_experts_per_tok": 8,
    "num_hidden_layers": 48, "num_key_value_heads": 4, "output_router_logits": False, "rms_norm_eps": 1e-06,
    "rope_scaling": None, "rope_theta": 1000000.0, "router_aux_loss_coef": 0.001, "sliding_window": None,
    "tie_word_embeddings": False, "torch_dtype": "bfloat16", "use_cache": False, "use_sliding_window": False,
    "vocab_size": 151936,
}
SETUPS = ("ours", "v5_fsdp", "v5_fsdp_ep", "v5_fsdp_eager", "ours_ep1", "v5_single")
MULTI = ("ours", "v5_fsdp", "v5_fsdp_ep", "v5_fsdp_eager")


def load_config_dict(path: str | None, layers: int) -> dict:
    cfg = dict(QWEN3_30B_A3B)
    candidates = [path] if path else [os.path.join(ROOT, "..", "shared", "realmodels", "Qwen3-30B-A3B", "config.json"),
                                      "/work/shared/realmodels/Qwen3-30B-A3B/config.json"]
    for c in candidates:
        if c and os.path.isfile(c):
            with open(c) as f:
                cfg = json.load(f)
            break
    cfg["num_hidden_layers"] = layers
    cfg["use_cache"] = False
    return cfg


def hf_config(cfg: dict):
    from transformers import AutoConfig

    d = {k: v for k, v in cfg.items() if k not in ("model_type", "architectures", "transformers_version")}
    return AutoConfig.for_model(cfg["model_type"], **d)


def flops_per_token(cfg: dict, seq: int) -> float:
    H, L, I, E, k = (cfg[n] for n in ("hidden_size", "num_hidden_layers", "moe_intermediate_size", "num_experts",
                                      "num_experts_per_tok"))
    heads, kv, hd, V = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"], cfg["vocab_size"]
    attn = H * heads * hd + 2 * H * kv * hd + heads * hd * H  # q, k, v, o
    moe_active = k * 3 * H * I + H * E  # top-k experts + router
    active = L * (attn + moe_active) + H * V  # + lm_head (the embedding lookup is not a matmul)
    return 6.0 * active + 6.0 * L * seq * heads * hd


# --- checkpoint ----------------------------------------------------------------------------------------------------


def make_checkpoint(cfg: dict, path: str, seed: int = 0) -> None:
    """A random-weight checkpoint written by v5's own save_pretrained (built on GPU 0: fast)."""
    import transformers

    if os.path.isfile(os.path.join(path, "config.json")):
        print(f"checkpoint {path} exists; reused", flush=True)
        return
    t0 = time.time()
    config = hf_config(cfg)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    dev = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    model.to_empty(device=dev)
    g = torch.Generator(device=dev).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, cfg.get("initializer_range", 0.02), generator=g)
    model.save_pretrained(path, max_shard_size="5GB")
    print(f"checkpoint {path} written in {time.time() - t0:.0f} s", flush=True)
    del model
    torch.cuda.empty_cache()


# --- one setup under torchrun --------------------------------------------------------------------------------------


def build(setup: str, ckpt: str, world: int, device: torch.device, dispatcher: str = "auto", lean: bool = True):
    """(model, after_backward) for this setup; after_backward runs between backward and the optimizer step."""
    if setup in ("ours", "ours_ep1"):
        import moe_adapters
        from moe_adapters.runtime.integration import sync_gradients

        model = moe_adapters.AutoModelForCausalLM.from_pretrained(
            ckpt, ep_size=world, dtype=torch.bfloat16, device=device, experts_backend="grouped_mm",
            dispatcher=dispatcher if world > 1 else "auto", fused_rms_norm=lean, fused_cross_entropy=lean,
        )
        desc = f"EP={world}, dispatcher={model.moe_ep.dispatcher}" + ("" if lean else ", plain norms and loss")
        return model, (lambda: sync_gradients(model)), desc
    import transformers

    kw: dict = {"dtype": torch.bfloat16}
    if setup == "v5_fsdp_eager":
        kw["experts_implementation"] = "eager"
    if setup == "v5_single":
        model = transformers.AutoModelForCausalLM.from_pretrained(ckpt, **kw).to(device)
        return model, (lambda: None), "1 GPU"
    try:
        from transformers import DistributedConfig
    except ImportError as e:
        raise RuntimeError(f"transformers {transformers.__version__} has no DistributedConfig") from e
    fields = getattr(DistributedConfig, "__dataclass_fields__", {})
    if setup == "v5_fsdp_ep":
        if "ep_size" not in fields:
            raise RuntimeError(
                f"transformers {transformers.__version__}: DistributedConfig has no ep_size (native EP needs >= 5.23)"
            )
        dc = DistributedConfig(fsdp_size=world, ep_size=world, ep_implementation="all_to_all")
    else:
        dc = DistributedConfig(fsdp_size=world)
    model = transformers.AutoModelForCausalLM.from_pretrained(ckpt, distributed_config=dc, **kw)
    set_fields = {"fsdp_size": dc.fsdp_size}
    if (getattr(dc, "ep_size", None) or 1) > 1:
        set_fields.update(ep_size=dc.ep_size, ep_implementation=dc.ep_implementation)
    desc = "DistributedConfig(" + ", ".join(f"{k}={v!r}" for k, v in set_fields.items()) + ")"
    return model, (lambda: None), desc + (", eager experts" if setup == "v5_fsdp_eager" else "")


def run_setup(args) -> dict:
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:  # a CPU dry run (gloo) with a small --config: checks the script end to end without a GPU
        device = torch.device("cpu")
    if world > 1 or args.setup not in ("ours_ep1", "v5_single"):
        if cuda:
            dist.init_process_group("nccl", device_id=device)
        else:
            dist.init_process_group("gloo")
    cfg = load_config_dict(args.config, args.layers)
    name = args.setup + ("_deepep" if args.setup.startswith("ours") and args.dispatcher == "deepep" else "")
    name += "" if args.lean or not args.setup.startswith("ours") else "_plain"
    name += "" if args.optimizer == "fused" else f"_{args.optimizer}"
    result = {"setup": name, "world": world, "layers": args.layers, "seq": args.seq, "batch": args.batch}
    try:
        import transformers

        result.update(torch=torch.__version__, transformers=transformers.__version__,
                      gpu=torch.cuda.get_device_name(device) if cuda else "cpu")
        t0 = time.time()
        model, after_backward, desc = build(args.setup, args.ckpt, world, device, args.dispatcher, args.lean)
        desc += f", AdamW {args.optimizer}"
        result["desc"], result["load_s"] = desc, time.time() - t0
        if rank == 0:
            print(f"loaded in {result['load_s']:.0f} s: {desc}", flush=True)
        model.train()
        if hasattr(model.config, "use_cache"):
            model.config.use_cache = False
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=args.optimizer == "fused",
                                foreach=args.optimizer == "foreach")
        g = torch.Generator(device="cpu").manual_seed(1000 + rank)
        ids = torch.randint(0, cfg["vocab_size"], (args.batch, args.seq), generator=g).to(device)
        times, losses = [], []
        for i in range(args.warmup + args.steps):
            if i == args.warmup and cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats(device)
            if dist.is_initialized():
                dist.barrier()
            if cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            loss = train_step(model, ids, after_backward, opt)
            if cuda:
                torch.cuda.synchronize()
            if i >= args.warmup:
                times.append((time.perf_counter() - t0) * 1e3)
            losses.append(float(loss.detach()))
            if rank == 0:
                print(f"step {i}: {(time.perf_counter() - t0) * 1e3:.0f} ms, loss {losses[-1]:.4f}, "
                      f"max allocated {torch.cuda.max_memory_allocated(device) / 2**30 if cuda else 0:.1f} GiB",
                      flush=True)
        ms = statistics.median(times)
        peak = torch.cuda.max_memory_allocated(device) / 1024**3 if cuda else 0.0  # before any profiled step
        if os.environ.get("GPU_TRAIN_PROFILE") or os.path.exists(f"/tmp/gpu_train_profile_{name}"):
            profile_step(model, ids, after_backward, opt, rank, name, cuda)
        mine = torch.tensor([ms, peak, losses[0]], device=device, dtype=torch.float64)
        if dist.is_initialized():
            allv = [torch.zeros_like(mine) for _ in range(world)]
            dist.all_gather(allv, mine)
        else:
            allv = [mine]
        allv = torch.stack(allv).cpu()
        step_ms = float(allv[:, 0].max())  # the step ends when the slowest rank ends
        tok = args.batch * args.seq
        result.update(
            step_ms=step_ms, tok_s_per_gpu=tok / (step_ms * 1e-3),
            tflops_per_gpu=tok / (step_ms * 1e-3) * flops_per_token(cfg, args.seq) / 1e12,
            peak_gib_per_gpu=float(allv[:, 1].max()), first_loss_rank0=float(allv[0, 2]),
            losses_rank0=losses,
        )
    except Exception as e:
        traceback.print_exc()
        result["error"] = repr(e)[:500]
    if rank == 0:
        print("RESULT " + json.dumps(result), flush=True)
        if os.environ.get("OUT"):
            with open(os.path.join(os.environ["OUT"], f"gpu_train_{name}_w{world}_L{args.layers}.json"), "w") as f:
                json.dump(result, f, indent=1)
    if dist.is_initialized():
        dist.destroy_process_group()
    return result


def train_step(model, ids, after_backward, opt) -> torch.Tensor:
    """One training step, the same for every setup: forward, backward, the setup's gradient sync, AdamW."""
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    after_backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss


def profile_step(model, ids, after_backward, opt, rank: int, name: str, cuda: bool) -> None:
    """One more step under torch.profiler: where the time goes (rank 0 prints and saves the table)."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=acts) as prof:
        train_step(model, ids, after_backward, opt)
        if cuda:
            torch.cuda.synchronize()
    if rank == 0:
        avg = prof.key_averages()
        table = ""
        for key in (("self_device_time_total", "self_cuda_time_total") if cuda else ()) + ("self_cpu_time_total",):
            try:
                table = avg.table(sort_by=key, row_limit=45, max_name_column_width=70)
                break
            except Exception:  # sort keys were renamed across torch versions
                continue
        print(table, flush=True)
        if os.environ.get("OUT"):
            with open(os.path.join(os.environ["OUT"], f"profile_{name}.txt"), "w") as f:
                f.write(table)


# --- driver --------------------------------------------------------------------------------------------------------


def launch(setup: str, nproc: int, layers: int, args) -> dict:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           os.path.abspath(__file__), "--setup", setup, "--layers", str(layers), "--seq", str(args.seq),
           "--batch", str(args.batch), "--steps", str(args.steps), "--warmup", str(args.warmup),
           "--ckpt", ckpt_path(args, layers), "--dispatcher", args.dispatcher, "--optimizer", args.optimizer,
           "--lean" if args.lean else "--no-lean"]
    if args.config:
        cmd += ["--config", args.config]
    env = dict(os.environ, NCCL_NVLS_ENABLE="0", TORCH_SYMM_MEM_DISABLE_MULTICAST="1", NVSHMEM_DISABLE_NVLS="1")
    print("$ " + " ".join(cmd), flush=True)
    t0 = time.time()
    # output streams through (progress is visible while it runs); the whole process group dies at the timeout
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         start_new_session=True)
    timed_out = []
    timer = threading.Timer(args.setup_timeout, lambda: (timed_out.append(1), os.killpg(p.pid, signal.SIGKILL)))
    timer.start()
    lines = []
    for line in p.stdout:  # type: ignore[union-attr]
        lines.append(line.rstrip("\n"))
        if not line.startswith("RESULT "):
            print(f"  [{setup}] {line}", end="", flush=True)
    p.wait()
    timer.cancel()
    for line in lines:
        if line.startswith("RESULT "):
            r = json.loads(line[len("RESULT "):])
            r["wall_s"] = time.time() - t0
            return r
    why = f"timeout after {args.setup_timeout:.0f} s" if timed_out else f"no result (rc {p.returncode})"
    tail = "\n".join(lines[-15:])
    return {"setup": setup, "world": nproc, "layers": layers, "error": f"{why}: {tail[-300:]}"}


def ckpt_path(args, layers: int) -> str:
    if args.ckpt and layers == args.layers:
        return args.ckpt
    return os.path.join(args.ckpt_dir, f"qwen3_30b_a3b_random_L{layers}")


def _ratio(a: float, b: float) -> float:
    return a / b if b else float("nan")  # peak memory is 0 in a CPU dry run


def table(results: list[dict], args) -> str:
    lines = [f"# Qwen3-30B-A3B training step, seq {args.seq} x batch {args.batch} per GPU "
             f"({datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')})", "",
             "| setup | GPUs | layers | step ms | tok/s/GPU | TFLOP/s/GPU | peak GiB/GPU | first loss | notes |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        if r.get("error"):
            lines.append(f"| {r['setup']} | {r.get('world')} | {r.get('layers')} | ERROR: {r['error'][:150]} | | | | | |")
            continue
        lines.append(
            f"| {r['setup']} | {r['world']} | {r['layers']} | {r['step_ms']:.0f} | {r['tok_s_per_gpu']:,.0f} | "
            f"{r['tflops_per_gpu']:.0f} | {r['peak_gib_per_gpu']:.1f} | {r['first_loss_rank0']:.4f} | "
            f"{r.get('desc', '')[:80]} |"
        )
    ok = {r["setup"]: r for r in results if not r.get("error") and r.get("layers") == args.layers}
    ours_runs = [ok[s] for s in ("ours", "ours_deepep") if s in ok]
    ours = max(ours_runs, key=lambda r: r["tok_s_per_gpu"]) if ours_runs else None
    natives = [ok[s] for s in ("v5_fsdp", "v5_fsdp_ep") if s in ok]
    lines.append("")
    if ours:
        if natives:
            best = max(natives, key=lambda r: r["tok_s_per_gpu"])
            lowest = min(natives, key=lambda r: r["peak_gib_per_gpu"])
            lines.append(f"- {ours['setup']} vs best native v5 ({best['setup']}): {_ratio(ours['tok_s_per_gpu'], best['tok_s_per_gpu']):.2f}x "
                         f"tokens/s (target >= 2x); memory {_ratio(ours['peak_gib_per_gpu'], lowest['peak_gib_per_gpu']):.2f}x "
                         f"of {lowest['setup']} (target <= 0.68x)")
        if "v5_fsdp_eager" in ok:
            lines.append(f"- ours vs v5 eager experts: {_ratio(ours['tok_s_per_gpu'], ok['v5_fsdp_eager']['tok_s_per_gpu']):.2f}x "
                         "(target >= 3.7x)")
        nemo = f"- ours vs NeMo AutoModel's 12,040 tok/s/GPU: {ours['tok_s_per_gpu'] / NEMO_TOK_S_PER_GPU:.2f}x"
        if ours["layers"] != 48:  # NeMo's figure is the full 48-layer model: a shallower one does less per token
            nemo += f" (not comparable: {ours['layers']} layers against NeMo's 48)"
        lines.append(nemo)
    single = {r["setup"]: r for r in results if not r.get("error") and r.get("world") == 1}
    for mine, theirs in (("ours_ep1", "v5_single"), ("ours_ep1_plain", "v5_single"),
                         ("ours_ep1_plain_foreach", "v5_single_foreach")):
        if mine in single and theirs in single and single[mine]["layers"] == single[theirs]["layers"]:
            one, v5 = single[mine], single[theirs]
            lines.append(f"- one GPU, {one['layers']} layers, {mine} vs {theirs}: "
                         f"{_ratio(one['tok_s_per_gpu'], v5['tok_s_per_gpu']):.2f}x tokens/s, "
                         f"{_ratio(one['peak_gib_per_gpu'], v5['peak_gib_per_gpu']):.2f}x peak memory")
    sc = {(r["setup"], r["world"]): r for r in results
          if not r.get("error") and args.scaling_layers and r.get("layers") == args.scaling_layers}
    if args.gpus > 1 and ("ours_ep1", 1) in sc and ("ours", args.gpus) in sc:
        lines.append(f"- EP scaling at {args.scaling_layers} layers: per-GPU tokens/s at EP={args.gpus} is "
                     f"{_ratio(sc[('ours', args.gpus)]['tok_s_per_gpu'], sc[('ours_ep1', 1)]['tok_s_per_gpu']):.0%} of EP=1 "
                     "(target >= 80%)")
    return "\n".join(lines) + "\n"


def write_report(results: list[dict], args) -> None:
    seqs = {r.get("seq") for r in results if r.get("seq")}
    if len(seqs) == 1:  # a merge takes seq and batch from the results
        args.seq = seqs.pop()
        args.batch = next(r["batch"] for r in results if r.get("batch"))
    if args.out:  # the raw results first: a failure in the table loses nothing
        with open(args.out + ".json", "w") as f:
            json.dump({"args": vars(args), "results": results}, f, indent=1)
    md = table(results, args)
    print(md)
    for prefix in ([os.path.join(os.environ["OUT"], "gpu_train")] if os.environ.get("OUT") else []) + (
        [args.out] if args.out else []
    ):
        with open(prefix + ".md", "w") as f:
            f.write(md)
        with open(prefix + ".json", "w") as f:
            json.dump({"args": vars(args), "results": results}, f, indent=1)


def merge(args) -> int:
    """One table from the result files of several ``--all`` runs (``--merge A.json B.json ...``)."""
    results: list[dict] = []
    for path in args.merge:
        with open(path) as f:
            data = json.load(f)
        results += data["results"] if isinstance(data, dict) and "results" in data else [data]
    write_report(results, args)
    return 0


def drive(args) -> int:
    setups = [s.strip() for s in args.setups.split(",") if s.strip()]
    results = []
    if setups:
        make_checkpoint(load_config_dict(args.config, args.layers), ckpt_path(args, args.layers))
    for s in setups:  # ours_ep1 / v5_single listed here run on one GPU at --layers
        results.append(launch(s, args.gpus if s in MULTI else 1, args.layers, args))
    if args.scaling_layers:
        make_checkpoint(load_config_dict(args.config, args.scaling_layers), ckpt_path(args, args.scaling_layers))
        results.append(launch("ours_ep1", 1, args.scaling_layers, args))
        results.append(launch("ours", args.gpus, args.scaling_layers, args))
        if "v5_single" in setups:
            results.append(launch("v5_single", 1, args.scaling_layers, args))
    write_report(results, args)
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--all", action="store_true", help="driver: make the checkpoint, run every setup via torchrun")
    ap.add_argument("--setup", choices=SETUPS, help="run one setup (under torchrun)")
    ap.add_argument("--setups", default="ours,v5_fsdp,v5_fsdp_ep,v5_fsdp_eager")
    ap.add_argument("--gpus", type=int, default=4)
    ap.add_argument("--layers", type=int, default=48)
    ap.add_argument("--scaling-layers", type=int, default=0, help="also run EP=1 vs EP=gpus at this depth")
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--config", default=None, help="Qwen3-30B-A3B config.json (built-in values when absent)")
    ap.add_argument("--ckpt", default=None, help="random checkpoint dir (default CKPT_DIR/qwen3_30b_a3b_random_L{layers})")
    ap.add_argument("--ckpt-dir", default="/tmp", help="where random checkpoints are written")
    ap.add_argument("--setup-timeout", type=float, default=900.0)
    ap.add_argument("--out", default=None)
    ap.add_argument("--dispatcher", default="auto", choices=("auto", "all_to_all", "deepep"),
                    help="ours: how tokens reach the experts (auto: DeepEP when it imports)")
    ap.add_argument("--optimizer", default="fused", choices=("fused", "foreach"),
                    help="AdamW implementation, the same for every setup (fused: one kernel per dtype group)")
    ap.add_argument("--lean", action=argparse.BooleanOptionalAction, default=True,
                    help="ours: fused_rms_norm and fused_cross_entropy (--no-lean: v5's norms and loss)")
    ap.add_argument("--merge", nargs="+", default=None, help="only print one table from these result JSON files")
    args = ap.parse_args(argv)
    if args.merge:
        return merge(args)
    if args.all:
        return drive(args)
    if not args.setup:
        ap.error("--setup or --all")
    if not args.ckpt:
        args.ckpt = ckpt_path(args, args.layers)
    run_setup(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Helpers for the runtime tests: tiny fp32 checkpoints written by transformers, a gloo process launcher, and the
per-rank worker that loads with EP, runs forward/backward, takes a training step and saves.

Workers live here (not in a test module) so that torch.multiprocessing's spawn can import them by name.
"""

from __future__ import annotations

import os
import tempfile
from typing import Any, Callable

import torch

# E = 8 everywhere so that EP = 1, 2, 4 all divide it; dims are multiples of 16 bytes so torch's CPU grouped GEMM
# (and its backward) takes them; routing knobs set so that every code path runs (norm on/off, groups, scaling).
TINY: dict[str, dict[str, Any]] = {
    "qwen3_moe": dict(
        hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_experts=8, num_experts_per_tok=2,
        num_hidden_layers=2, mlp_only_layers=[0], num_attention_heads=2, num_key_value_heads=1, head_dim=16,
        vocab_size=64, norm_topk_prob=False,
    ),
    "mixtral": dict(
        hidden_size=32, intermediate_size=16, num_local_experts=8, num_experts_per_tok=2, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, head_dim=16, vocab_size=64,
    ),
    "deepseek_v3": dict(
        hidden_size=32, intermediate_size=64, moe_intermediate_size=16, n_routed_experts=8, num_experts_per_tok=3,
        n_group=4, topk_group=2, n_shared_experts=1, first_k_dense_replace=1, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, kv_lora_rank=16, q_lora_rank=16, qk_nope_head_dim=8,
        qk_rope_head_dim=8, v_head_dim=8, vocab_size=64, routed_scaling_factor=2.5, norm_topk_prob=True,
    ),
    "nemotron_h": dict(
        hidden_size=32, intermediate_size=16, moe_intermediate_size=16, moe_shared_expert_intermediate_size=32,
        n_routed_experts=8, num_experts_per_tok=2, n_group=2, topk_group=1, num_hidden_layers=4,
        hybrid_override_pattern="ME*E", num_attention_heads=2, num_key_value_heads=1, head_dim=16,
        mamba_num_heads=4, mamba_head_dim=8, ssm_state_size=8, n_groups=2, vocab_size=64, chunk_size=8,
        routed_scaling_factor=1.5, norm_topk_prob=True,
    ),
    "qwen2_moe": dict(
        hidden_size=32, intermediate_size=64, moe_intermediate_size=16, shared_expert_intermediate_size=32,
        num_experts=8, num_experts_per_tok=2, num_hidden_layers=2, mlp_only_layers=[0], num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, vocab_size=64, norm_topk_prob=False,
    ),
    "qwen3_next": dict(
        hidden_size=32, intermediate_size=64, moe_intermediate_size=16, shared_expert_intermediate_size=32,
        num_experts=8, num_experts_per_tok=2, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
        head_dim=16, vocab_size=64, norm_topk_prob=True, layer_types=["linear_attention", "full_attention"],
        linear_num_value_heads=2, linear_num_key_heads=2, linear_key_head_dim=8, linear_value_head_dim=8,
    ),
    "olmoe": dict(
        hidden_size=32, intermediate_size=16, num_experts=8, num_experts_per_tok=2, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, vocab_size=64, norm_topk_prob=True, eos_token_id=2,
    ),
    "glm4_moe": dict(
        hidden_size=32, intermediate_size=64, moe_intermediate_size=16, n_routed_experts=8, num_experts_per_tok=3,
        n_group=4, topk_group=2, n_shared_experts=1, first_k_dense_replace=1, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, head_dim=16, vocab_size=64, routed_scaling_factor=2.5,
        norm_topk_prob=True,
    ),
    "deepseek_v2": dict(
        hidden_size=32, intermediate_size=64, moe_intermediate_size=16, n_routed_experts=8, num_experts_per_tok=3,
        n_group=4, topk_group=2, topk_method="group_limited_greedy", n_shared_experts=2, first_k_dense_replace=1,
        num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2, kv_lora_rank=16, q_lora_rank=None,
        qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, vocab_size=64, routed_scaling_factor=1.5,
    ),
    "dots1": dict(
        hidden_size=32, intermediate_size=64, moe_intermediate_size=16, n_routed_experts=8, num_experts_per_tok=2,
        n_group=2, topk_group=1, n_shared_experts=1, first_k_dense_replace=1, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, head_dim=16, vocab_size=64, routed_scaling_factor=2.0,
        norm_topk_prob=True,
    ),
    "ernie4_5_moe": dict(
        hidden_size=32, intermediate_size=64, moe_intermediate_size=16, moe_num_experts=8, moe_k=2,
        moe_num_shared_experts=1, moe_layer_start_index=1, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, vocab_size=64, tie_word_embeddings=False,
    ),
    "hunyuan_v1_moe": dict(
        hidden_size=32, intermediate_size=16, num_experts=8, moe_topk=2, num_shared_expert=1, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, head_dim=16, vocab_size=64,
    ),
    "granitemoe": dict(
        hidden_size=32, intermediate_size=16, num_local_experts=8, num_experts_per_tok=2, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, vocab_size=64,
    ),
    "phimoe": dict(
        hidden_size=32, intermediate_size=16, num_local_experts=8, num_experts_per_tok=2, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, vocab_size=64, input_jitter_noise=0.01,
    ),
    "minimax": dict(
        hidden_size=32, intermediate_size=16, num_local_experts=8, num_experts_per_tok=2, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, head_dim=16, vocab_size=64,
        layer_types=["linear_attention", "full_attention"], block_size=8, router_jitter_noise=0.02,
    ),
    "llama4_text": dict(
        hidden_size=32, intermediate_size=16, intermediate_size_mlp=64, num_local_experts=8, num_experts_per_tok=1,
        num_hidden_layers=2, moe_layers=[1], num_attention_heads=2, num_key_value_heads=1, head_dim=16,
        vocab_size=64,
    ),
    "gpt_oss": dict(
        hidden_size=32, intermediate_size=32, num_local_experts=8, num_experts_per_tok=4, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, head_dim=16, vocab_size=64,
        layer_types=["sliding_attention", "full_attention"], sliding_window=4, swiglu_limit=0.2,
    ),
}
FAMILIES = list(TINY)
# the multi-process EP tests (gloo; each family costs ~10 s per configuration on 2 cores): the first four families
# plus the two whose experts differ most (stacked, transposed, interleaved, biased, clamped: gpt-oss; weights scaling
# the input, a block that returns a pair: Llama 4). Families that sample or jitter in training (PhiMoE, MiniMax
# here) cannot match a single-process reference draw for draw across ranks, so they are checked in one process.
EP_FAMILIES = ["qwen3_moe", "mixtral", "deepseek_v3", "nemotron_h", "gpt_oss", "llama4_text"]
VOCAB = 64
SEQ = 8
BATCH = 2  # per rank


def tiny_config(family: str, **overrides: Any):
    from transformers import AutoConfig

    return AutoConfig.for_model(family, **{**TINY[family], **overrides})


def randomize_(model: torch.nn.Module, seed: int = 0) -> None:
    """Random non-trivial values in every parameter and persistent float buffer (router correction biases
    included: zero biases would leave the selection-only path untested)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            # a router's logit bias (gpt-oss) at 1/10 scale: at full scale it would outweigh the tiny logits and
            # send every token to the same experts
            scale = 0.01 if name.endswith("router.bias") else 0.1
            p.copy_((torch.randn(p.shape, generator=g) * scale).to(p.dtype))
        for name, b in list(model.named_buffers()) + [
            (n, p) for n, p in model.named_parameters() if not p.requires_grad  # ERNIE's bias: a frozen parameter
        ]:
            if name.endswith("e_score_correction_bias"):
                b.copy_((torch.randn(b.shape, generator=g) * 0.01).to(b.dtype))


def v5_block(family: str, **overrides: Any):
    """(family declaration, config dict, first MoE layer, v5's block there): a tiny fp32 v5 model, eager experts,
    random weights (seed 3)."""
    from transformers import AutoModelForCausalLM

    from moe_adapters.families import detect
    from moe_adapters.runtime.layer import block_prefix

    cfg = tiny_config(family, **overrides)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32, experts_implementation="eager")
    randomize_(model, seed=3)
    d = cfg.to_dict()
    fam = detect(d)
    layer = fam.moe_layer_ids(d)[0]
    return fam, d, layer, model.get_submodule(block_prefix(fam, layer))


def build_checkpoint(family: str, path: str, seed: int = 0, **overrides: Any) -> str:
    """A transformers-written fp32 checkpoint in several small shards."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, **overrides), dtype=torch.float32)
    randomize_(model, seed)
    model.save_pretrained(path, max_shard_size="20KB")
    return path


def rank_inputs(world: int, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(input_ids, labels) for each rank: different tokens per rank, so ranks route different loads."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(world):
        ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=g)
        out.append((ids, ids.clone()))
    return out


def reference_model(path: str):
    """Plain transformers v5, eager experts (v5's reference loop), fp32."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, experts_implementation="eager", dtype=torch.float32)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b| (0 when both are 0)."""
    a, b = a.detach().double(), b.detach().double()
    scale = b.abs().max().item()
    diff = (a - b).abs().max().item() if a.numel() else 0.0
    return diff / scale if scale else diff


# --- processes -----------------------------------------------------------------------------------------------------


def _entry(rank: int, world: int, init_file: str, fn: Callable, args: tuple, backend: str = "gloo") -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    if backend == "nccl":
        torch.cuda.set_device(rank)
    dist.init_process_group(backend, init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        fn(rank, world, *args)
    finally:
        dist.destroy_process_group()


def spawn(fn: Callable, world: int, *args: Any, backend: str = "gloo") -> None:
    """Run ``fn(rank, world, *args)`` in `world` fresh processes joined in a process group (real collectives;
    gloo by default, NCCL with one GPU per rank for the GPU tests)."""
    import torch.multiprocessing as mp

    fd, init_file = tempfile.mkstemp(prefix="gloo-init-")
    os.close(fd)
    os.unlink(init_file)
    try:
        mp.spawn(_entry, args=(world, init_file, fn, args, backend), nprocs=world, join=True)
    finally:
        if os.path.exists(init_file):
            os.unlink(init_file)


# --- the EP worker -------------------------------------------------------------------------------------------------

LR = 0.5


def ep_worker(
    rank: int, world: int, ckpts: dict[str, str], out_dir: str, save_dir: str | None, ep_size: int | None = None
) -> None:
    """Per family: load with EP = `ep_size` (default: world), count the expert bytes read, forward + backward on this
    rank's micro-batch (raw gradients recorded), sync gradients, one SGD step (parameters recorded); then, when
    `save_dir` is given, a fresh load saved with ``save_pretrained`` (no training in between)."""
    import moe_adapters
    from moe_adapters import tensor_io
    from moe_adapters.runtime.integration import (
        ExpertParallel,
        clip_grad_norm_,
        expert_parameters,
        resident_expert_bytes,
    )

    ids, labels = rank_inputs(world)[rank]
    for family, path in ckpts.items():
        expert_bytes_read = 0
        original_read = tensor_io.WeightReader.read

        def spy_read(self, name, expert_range=None, _orig=original_read):
            nonlocal expert_bytes_read
            out = _orig(self, name, expert_range)
            if self.is_expert_param(name):
                expert_bytes_read += out.numel() * out.element_size()
                reads.append((name, expert_range))
            return out

        reads: list[tuple[str, Any]] = []
        tensor_io.WeightReader.read = spy_read
        try:
            model = moe_adapters.AutoModelForCausalLM.from_pretrained(
                path, ep_size=ep_size, dtype=torch.float32, device="cpu"
            )
        finally:
            tensor_io.WeightReader.read = original_read
        model.train()
        wrapped = ExpertParallel(model)
        out = wrapped(input_ids=ids, labels=labels)
        out.loss.backward()
        raw_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        wrapped.finish_backward()  # sync_gradients: dense averaged, experts scaled (and summed over EP replicas)
        grad_norm = clip_grad_norm_(model, float("inf"))  # the whole model's gradient norm; scales by 1 here
        opt = torch.optim.SGD(model.parameters(), lr=LR)
        opt.step()
        result = {
            "logits": out.logits.detach(),
            "loss": out.loss.detach(),
            "raw_grads": raw_grads,
            "params": {n: p.detach().clone() for n, p in model.named_parameters()},
            "expert_names": [n for n, _ in expert_parameters(model)],
            "resident_expert_bytes": resident_expert_bytes(model),
            "grad_norm": grad_norm,
            "expert_bytes_read": expert_bytes_read,
            "expert_reads": reads,
            "ep": (model.moe_ep.ep_size, model.moe_ep.ep_rank, model.moe_ep.dispatcher, model.moe_ep.experts_backend),
        }
        torch.save(result, os.path.join(out_dir, f"{family}.rank{rank}.pt"))
        del model, wrapped, opt
        if save_dir is not None:
            fresh = moe_adapters.AutoModelForCausalLM.from_pretrained(
                path, ep_size=ep_size, dtype=torch.float32, device="cpu"
            )
            fresh.save_pretrained(os.path.join(save_dir, family))


def gpu_ep_worker(rank: int, world: int, path: str, out_dir: str, dispatcher: str, backend: str) -> None:
    """bf16 on cuda:rank over NCCL: logits, loss and the expert gradients of this rank's micro-batch."""
    import moe_adapters
    from moe_adapters.runtime.integration import expert_parameters

    ids, labels = rank_inputs(world)[rank]
    model = moe_adapters.AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.bfloat16, device=f"cuda:{rank}", dispatcher=dispatcher, experts_backend=backend
    )
    model.train()
    out = model(input_ids=ids.cuda(), labels=labels.cuda())
    out.loss.backward()
    torch.save(
        {
            "logits": out.logits.detach().float().cpu(),
            "expert_grads": {n: p.grad.float().cpu() for n, p in expert_parameters(model)},
            "ep": (model.moe_ep.ep_size, model.moe_ep.dispatcher),
        },
        os.path.join(out_dir, f"rank{rank}.pt"),
    )


def ep_checkpointing_worker(rank: int, world: int, path: str, out_dir: str) -> None:
    """EP = world, fp32: the raw gradients of this rank's micro-batch without and then with v5's activation
    checkpointing (the backward recomputes each layer, its all-to-all exchanges included), fused loss on."""
    import moe_adapters

    ids, labels = rank_inputs(world)[rank]
    model = moe_adapters.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, fused_cross_entropy=True)
    model.train()
    grads = []
    for checkpointing in (False, True):
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.zero_grad(set_to_none=True)
        model(input_ids=ids, labels=labels).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    torch.save(grads, os.path.join(out_dir, f"rank{rank}.pt"))

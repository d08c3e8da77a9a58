"""Tiny real checkpoints for tests, written by transformers itself (real key names, dtypes and shards).

Each family gets small dims, several shards (experts of one layer split across files), and an expert count that
EP=3 does not divide. Variants add tied embeddings, FP8 block-scaled weights with an MTP layer (DeepSeek-V3's
published form, built from a transformers-written checkpoint) and v5's packed save format.
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch

TINY: dict[str, dict[str, Any]] = {
    "qwen3_moe": dict(
        hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_experts=8, num_experts_per_tok=2,
        num_hidden_layers=3, mlp_only_layers=[1], num_attention_heads=2, num_key_value_heads=1, head_dim=16,
        vocab_size=96, norm_topk_prob=True,
    ),
    "mixtral": dict(
        hidden_size=32, intermediate_size=16, num_local_experts=8, num_experts_per_tok=2, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, head_dim=16, vocab_size=96,
    ),
    "deepseek_v3": dict(
        hidden_size=32, intermediate_size=64, moe_intermediate_size=16, n_routed_experts=8, num_experts_per_tok=2,
        n_group=2, topk_group=1, n_shared_experts=1, first_k_dense_replace=1, num_hidden_layers=3,
        num_attention_heads=2, num_key_value_heads=2, kv_lora_rank=16, q_lora_rank=16, qk_nope_head_dim=8,
        qk_rope_head_dim=8, v_head_dim=8, vocab_size=96, routed_scaling_factor=2.5,
    ),
    "nemotron_h": dict(
        hidden_size=32, intermediate_size=16, moe_intermediate_size=16, moe_shared_expert_intermediate_size=32,
        n_routed_experts=8, num_experts_per_tok=2, n_group=1, topk_group=1, num_hidden_layers=4,
        hybrid_override_pattern="ME*E", num_attention_heads=2, num_key_value_heads=1, head_dim=16,
        mamba_num_heads=4, mamba_head_dim=8, ssm_state_size=8, n_groups=2, vocab_size=96, chunk_size=8,
    ),
    "qwen2_moe": dict(
        hidden_size=32, intermediate_size=64, moe_intermediate_size=16, shared_expert_intermediate_size=24,
        num_experts=8, num_experts_per_tok=2, num_hidden_layers=3, mlp_only_layers=[1], num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, vocab_size=96,
    ),
    "qwen3_next": dict(
        hidden_size=32, intermediate_size=64, moe_intermediate_size=16, shared_expert_intermediate_size=24,
        num_experts=8, num_experts_per_tok=2, num_hidden_layers=3, mlp_only_layers=[0], num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, vocab_size=96,
        layer_types=["linear_attention", "full_attention", "linear_attention"], linear_num_value_heads=2,
        linear_num_key_heads=2, linear_key_head_dim=8, linear_value_head_dim=8,
    ),
    "olmoe": dict(
        hidden_size=32, intermediate_size=16, num_experts=8, num_experts_per_tok=2, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, vocab_size=96, eos_token_id=2,
    ),
    "glm4_moe": dict(
        hidden_size=32, intermediate_size=64, moe_intermediate_size=16, n_routed_experts=8, num_experts_per_tok=2,
        n_group=2, topk_group=1, n_shared_experts=1, first_k_dense_replace=1, num_hidden_layers=3,
        num_attention_heads=2, num_key_value_heads=1, head_dim=16, vocab_size=96, routed_scaling_factor=2.5,
    ),
    "deepseek_v2": dict(  # DeepSeek-V2-Lite's shape: no q_lora (q_proj), no selection bias, 2 shared experts
        hidden_size=32, intermediate_size=64, moe_intermediate_size=16, n_routed_experts=8, num_experts_per_tok=2,
        n_group=2, topk_group=1, topk_method="group_limited_greedy", n_shared_experts=2, first_k_dense_replace=1,
        num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=2, kv_lora_rank=16, q_lora_rank=None,
        qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, vocab_size=96,
    ),
    "dots1": dict(
        hidden_size=32, intermediate_size=64, moe_intermediate_size=16, n_routed_experts=8, num_experts_per_tok=2,
        n_shared_experts=1, first_k_dense_replace=1, num_hidden_layers=3, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, vocab_size=96,
    ),
    "ernie4_5_moe": dict(  # MoE layers 1 and 2 of 4 (start 1, end 2): layer 3 is dense again
        hidden_size=32, intermediate_size=64, moe_intermediate_size=16, moe_num_experts=8, moe_k=2,
        moe_num_shared_experts=1, moe_layer_start_index=1, moe_layer_end_index=2, num_hidden_layers=4,
        num_attention_heads=2, num_key_value_heads=1, head_dim=16, vocab_size=96,
    ),
    "hunyuan_v1_moe": dict(
        hidden_size=32, intermediate_size=16, num_experts=8, moe_topk=2, num_shared_expert=1, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, head_dim=16, vocab_size=96,
    ),
    "granitemoe": dict(
        hidden_size=32, intermediate_size=16, num_local_experts=8, num_experts_per_tok=2, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, vocab_size=96,
    ),
    "phimoe": dict(
        hidden_size=32, intermediate_size=16, num_local_experts=8, num_experts_per_tok=2, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, vocab_size=96,
    ),
    "minimax": dict(
        hidden_size=32, intermediate_size=16, num_local_experts=8, num_experts_per_tok=2, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, head_dim=16, vocab_size=96,
        layer_types=["linear_attention", "full_attention"], block_size=8,
    ),
    "llama4_text": dict(  # H == 2I: gate_up_proj [E, 32, 32] is square
        hidden_size=32, intermediate_size=16, intermediate_size_mlp=64, num_local_experts=8, num_experts_per_tok=1,
        num_hidden_layers=4, interleave_moe_layer_step=2, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
        vocab_size=96,
    ),
    "gpt_oss": dict(  # H == I (as in gpt-oss-20b): down_proj [E, 32, 32] is square
        hidden_size=32, intermediate_size=32, num_local_experts=8, num_experts_per_tok=2, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, head_dim=16, vocab_size=96,
        layer_types=["sliding_attention", "full_attention"], sliding_window=8,
    ),
}
FAMILIES = list(TINY)
SHARD = "12KB"  # small enough that every MoE layer's experts span several files


def config_for(family: str, **overrides: Any):
    from transformers import AutoConfig

    kw = dict(TINY[family])
    kw.update(overrides)
    return AutoConfig.for_model(family, **kw)


def build(family: str, path: str, *, dtype: torch.dtype = torch.bfloat16, seed: int = 0, packed: bool = False,
          **overrides: Any) -> str:
    """`AutoModelForCausalLM.from_config(cfg).save_pretrained(path, max_shard_size=small)`."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config_for(family, **overrides), dtype=dtype)
    with torch.no_grad():  # random, non-trivial values everywhere (norm weights are all ones by default)
        for p in model.parameters():
            p.copy_(torch.randn_like(p, dtype=torch.float32).to(p.dtype) * 0.05)
    model.save_pretrained(path, max_shard_size=SHARD, save_original_format=not packed)
    return path


def _quantize_blockwise(w: torch.Tensor, block: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    m, n = w.shape
    sm, sn = -(-m // block), -(-n // block)
    scale = torch.empty(sm, sn, dtype=torch.float32)
    q = torch.empty(m, n, dtype=torch.float8_e4m3fn)
    for i in range(sm):
        for j in range(sn):
            tile = w[i * block : (i + 1) * block, j * block : (j + 1) * block].float()
            s = tile.abs().max().clamp(min=1e-12) / 448.0
            scale[i, j] = s
            q[i * block : (i + 1) * block, j * block : (j + 1) * block] = (tile / s).to(torch.float8_e4m3fn)
    return q, scale


def build_deepseek_fp8(path: str, *, mtp: bool = True) -> str:
    """DeepSeek-V3's published form at tiny dims: FP8 (e4m3) linear weights with `weight_scale_inv` block scales,
    bf16 norms/embeddings/router, fp32 `e_score_correction_bias`, plus an MTP layer (`model.layers.<n>.*`, beyond
    num_hidden_layers) — written from a transformers-built checkpoint, keeping its shard names."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    src = path + ".bf16"
    build("deepseek_v3", src)
    cfg = json.load(open(os.path.join(src, "config.json")))
    n = cfg["num_hidden_layers"]
    index = json.load(open(os.path.join(src, "model.safetensors.index.json")))
    os.makedirs(path, exist_ok=True)
    shards: dict[str, dict[str, torch.Tensor]] = {}
    for name, fname in index["weight_map"].items():
        with safe_open(os.path.join(src, fname), "pt") as f:
            t = f.get_tensor(name)
        out = shards.setdefault(fname, {})
        if name.endswith("e_score_correction_bias"):
            out[name] = t.float()
        elif name.endswith(".weight") and t.dim() == 2 and "proj" in name:
            q, s = _quantize_blockwise(t)
            out[name], out[name + "_scale_inv"] = q, s
        else:
            out[name] = t
    if mtp:  # the multi-token-prediction layer: a copy of the last MoE layer + eh_proj/enorm/hnorm, which
        # transformers drops on load and which must pass through conversion untouched
        extra: dict[str, torch.Tensor] = {}
        prefix = f"model.layers.{n - 1}."
        for fname, tensors in shards.items():
            for name, t in tensors.items():
                if name.startswith(prefix):
                    extra[name.replace(prefix, f"model.layers.{n}.")] = t.clone()
        h = cfg["hidden_size"]
        extra[f"model.layers.{n}.eh_proj.weight"] = torch.randn(h, 2 * h).to(torch.bfloat16)
        extra[f"model.layers.{n}.enorm.weight"] = torch.ones(h, dtype=torch.bfloat16)
        extra[f"model.layers.{n}.hnorm.weight"] = torch.ones(h, dtype=torch.bfloat16)
        shards["model-mtp.safetensors"] = extra
    weight_map = {}
    for fname, tensors in shards.items():
        save_file(tensors, os.path.join(path, fname), metadata={"format": "pt"})
        weight_map.update({k: fname for k in tensors})
    total = sum(t.numel() * t.element_size() for ts in shards.values() for t in ts.values())
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, f, indent=2)
    cfg["quantization_config"] = {
        "activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "weight_block_size": [128, 128]
    }
    cfg["num_nextn_predict_layers"] = 1 if mtp else 0
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    return path


def _quantize_mxfp4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[..., R, C] -> MXFP4 `blocks [..., R, C/32, 16]` (two E2M1 codes per byte, low nibble first) and `scales [...,
    R, C/32]` (power-of-two exponents + 127), nearest value per element: the published gpt-oss encoding."""
    from moe_adapters.converters import FP4_VALUES

    *prefix, R, C = w.shape
    g = w.float().reshape(*prefix, R, C // 32, 32)
    amax = g.abs().amax(-1)
    e = torch.ceil(torch.log2(amax.clamp(min=2.0**-120) / 6.0)).clamp(-127, 127).to(torch.int32)
    scaled = g / torch.ldexp(torch.ones_like(amax), e).unsqueeze(-1)
    mags = torch.tensor(FP4_VALUES[:8])
    code = (scaled.abs().unsqueeze(-1) - mags).abs().argmin(-1) | ((scaled < 0).to(torch.int64) << 3)
    code = code.to(torch.uint8).reshape(*prefix, R, C // 32, 16, 2)
    return code[..., 0] | (code[..., 1] << 4), (e + 127).to(torch.uint8)


def build_gpt_oss_mxfp4(path: str, **overrides: Any) -> str:
    """gpt-oss's published form at tiny dims (H = I = 64, two 32-value blocks per row): each expert weight of a
    transformers-written bf16 checkpoint (`gate_up_proj [E, H, 2I]`, `down_proj [E, I, H]`) replaced, in its shard, by
    `*_blocks [E, out, in/32, 16]` + `*_scales [E, out, in/32]` (U8) as in openai/gpt-oss-20b; biases, router,
    attention and embeddings stay bf16; config.json gets gpt-oss-20b's quantization_config."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    src = path + ".bf16"
    build("gpt_oss", src, **{"hidden_size": 64, "intermediate_size": 64, **overrides})
    index = json.load(open(os.path.join(src, "model.safetensors.index.json")))
    os.makedirs(path, exist_ok=True)
    shards: dict[str, dict[str, torch.Tensor]] = {}
    for name, fname in index["weight_map"].items():
        with safe_open(os.path.join(src, fname), "pt") as f:
            t = f.get_tensor(name)
        out = shards.setdefault(fname, {})
        if name.endswith((".experts.gate_up_proj", ".experts.down_proj")):
            out[name + "_blocks"], out[name + "_scales"] = _quantize_mxfp4(t.transpose(1, 2))
        else:
            out[name] = t
    weight_map = {}
    for fname, tensors in shards.items():
        save_file(tensors, os.path.join(path, fname), metadata={"format": "pt"})
        weight_map.update({k: fname for k in tensors})
    total = sum(t.numel() * t.element_size() for ts in shards.values() for t in ts.values())
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, f, indent=2)
    cfg = json.load(open(os.path.join(src, "config.json")))
    cfg["quantization_config"] = {
        "modules_to_not_convert": [
            "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"
        ],
        "quant_method": "mxfp4",
    }
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    return path


def tensors_of(folder: str) -> dict[str, torch.Tensor]:
    """Every tensor of every safetensors file in `folder` (tests only: loads them all)."""
    from safetensors import safe_open

    out = {}
    for name in sorted(os.listdir(folder)):
        if name.endswith(".safetensors"):
            with safe_open(os.path.join(folder, name), "pt") as f:
                out.update({k: f.get_tensor(k) for k in f.keys()})
    return out

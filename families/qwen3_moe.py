"""Qwen3-MoE (Qwen3-30B-A3B, Qwen3-235B-A22B): gated SiLU experts, softmax top-k router, no shared expert."""

from .declaration import Experts, Family, Router, SparseStep

FAMILY = Family(
    name="qwen3_moe",
    model_types=("qwen3_moe",),
    architectures=("Qwen3MoeForCausalLM",),
    num_experts=("num_experts", "num_local_experts"),
    moe_layers=SparseStep(step="decoder_sparse_step", skip="mlp_only_layers"),
    experts=Experts(prefix="model.layers.{L}.mlp.experts", gate="gate_proj", up="up_proj", down="down_proj"),
    router=Router(weight="model.layers.{L}.mlp.gate.weight", scoring="softmax", norm_topk_prob="norm_topk_prob"),
    description="Qwen3-MoE: 128 gated SiLU experts per layer, softmax top-k routing",
    examples=("Qwen/Qwen3-30B-A3B", "Qwen/Qwen3-235B-A22B"),
)

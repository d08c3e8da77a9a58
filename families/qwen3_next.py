"""Qwen3-Next (Qwen3-Next-80B-A3B): hybrid linear/full attention; Qwen2-MoE's expert block (softmax top-k, one
shared expert behind a sigmoid gate). The published multi-token-prediction weights (`mtp.*`) pass through."""

from .declaration import Experts, Family, Router, SharedExperts, SparseStep

FAMILY = Family(
    name="qwen3_next",
    model_types=("qwen3_next",),
    architectures=("Qwen3NextForCausalLM",),
    num_experts=("num_experts",),
    moe_layers=SparseStep(step="decoder_sparse_step", skip="mlp_only_layers"),
    experts=Experts(prefix="model.layers.{L}.mlp.experts", gate="gate_proj", up="up_proj", down="down_proj"),
    router=Router(weight="model.layers.{L}.mlp.gate.weight", scoring="softmax", norm_topk_prob="norm_topk_prob"),
    shared=SharedExperts(
        prefix="model.layers.{L}.mlp.shared_expert",
        intermediate_size="shared_expert_intermediate_size",
        count=None,
        output_gate="model.layers.{L}.mlp.shared_expert_gate.weight",
    ),
    description="Qwen3-Next: 512 gated SiLU experts + 1 gated shared expert, softmax top-10, linear-attention hybrid",
    examples=("Qwen/Qwen3-Next-80B-A3B-Instruct",),
)

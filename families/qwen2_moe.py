"""Qwen2-MoE (Qwen1.5-MoE-A2.7B, Qwen2-57B-A14B): gated SiLU experts, softmax top-k, and one shared expert whose
output is scaled by a sigmoid gate (`shared_expert_gate`)."""

from .declaration import Experts, Family, Router, SharedExperts, SparseStep

FAMILY = Family(
    name="qwen2_moe",
    model_types=("qwen2_moe",),
    architectures=("Qwen2MoeForCausalLM",),
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
    description="Qwen2-MoE: 60-64 gated SiLU experts + 1 shared expert behind a sigmoid gate, softmax top-k",
    examples=("Qwen/Qwen1.5-MoE-A2.7B", "Qwen/Qwen2-57B-A14B"),
)

"""OLMoE (OLMoE-1B-7B): 64 gated SiLU experts in every layer, softmax top-8, no shared expert."""

from .declaration import AllLayers, Experts, Family, Router

FAMILY = Family(
    name="olmoe",
    model_types=("olmoe",),
    architectures=("OlmoeForCausalLM",),
    num_experts=("num_experts", "num_local_experts"),
    moe_layers=AllLayers(),
    experts=Experts(prefix="model.layers.{L}.mlp.experts", gate="gate_proj", up="up_proj", down="down_proj"),
    router=Router(weight="model.layers.{L}.mlp.gate.weight", scoring="softmax", norm_topk_prob="norm_topk_prob"),
    moe_intermediate_size=("intermediate_size",),
    description="OLMoE: 64 gated SiLU experts per layer, softmax top-8",
    examples=("allenai/OLMoE-1B-7B-0924",),
)

"""Hunyuan-A13B (`hunyuan_v1_moe`): softmax top-k routing, always renormalised, through an fp32 linear `gate.wg`;
a shared MLP (`shared_mlp`, intermediate_size wide) in every layer. Experts are `intermediate_size` wide too."""

from .declaration import AllLayers, Experts, Family, Router, SharedExperts

FAMILY = Family(
    name="hunyuan_v1_moe",
    model_types=("hunyuan_v1_moe",),
    architectures=("HunYuanMoEV1ForCausalLM",),
    num_experts=("num_experts",),
    moe_layers=AllLayers(),
    experts=Experts(prefix="model.layers.{L}.mlp.experts", gate="gate_proj", up="up_proj", down="down_proj"),
    router=Router(
        weight="model.layers.{L}.mlp.gate.wg.weight", scoring="softmax", top_k="moe_topk", norm_topk_prob=True
    ),
    shared=SharedExperts(prefix="model.layers.{L}.mlp.shared_mlp", intermediate_size="intermediate_size", count=None),
    moe_intermediate_size=("intermediate_size",),
    description="Hunyuan-A13B: 64 gated SiLU experts + a shared MLP, softmax top-8 (fp32 router)",
    examples=("tencent/Hunyuan-A13B-Instruct",),
)

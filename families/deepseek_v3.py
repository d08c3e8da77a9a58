"""DeepSeek-V3 / R1 (and Kimi-K2's shape): sigmoid group-limited routing with a selection bias, a shared expert,
FP8 block-scaled weights in the published checkpoint, and a multi-token-prediction layer (`model.layers.61`) that
is not a decoder layer of the config and so passes through untouched."""

from .declaration import Experts, Family, FirstKDense, Router, SharedExperts

FAMILY = Family(
    name="deepseek_v3",
    model_types=("deepseek_v3", "kimi_k2"),
    architectures=("DeepseekV3ForCausalLM",),
    num_experts=("n_routed_experts",),
    moe_layers=FirstKDense(k="first_k_dense_replace", freq="moe_layer_freq"),
    experts=Experts(prefix="model.layers.{L}.mlp.experts", gate="gate_proj", up="up_proj", down="down_proj"),
    router=Router(
        logits_fp32=True,
        weight="model.layers.{L}.mlp.gate.weight",
        scoring="sigmoid",
        bias="model.layers.{L}.mlp.gate.e_score_correction_bias",
        norm_topk_prob="norm_topk_prob",
        n_group="n_group",
        topk_group="topk_group",
        routed_scaling_factor="routed_scaling_factor",
    ),
    shared=SharedExperts(prefix="model.layers.{L}.mlp.shared_experts", count="n_shared_experts"),
    description="DeepSeek-V3/R1: 256 gated SiLU experts + 1 shared, sigmoid group-limited top-8, FP8 weights",
    examples=("deepseek-ai/DeepSeek-V3", "deepseek-ai/DeepSeek-R1", "moonshotai/Kimi-K2-Instruct"),
)

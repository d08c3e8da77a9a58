"""GLM-4.5 / GLM-4.6 (`glm4_moe`): DeepSeek-V3-style sigmoid group-limited routing with a selection bias, a shared
expert, the first k layers dense; the multi-token-prediction layer after the last decoder layer passes through."""

from .declaration import Experts, Family, FirstKDense, Router, SharedExperts

FAMILY = Family(
    name="glm4_moe",
    model_types=("glm4_moe",),
    architectures=("Glm4MoeForCausalLM",),
    num_experts=("n_routed_experts",),
    moe_layers=FirstKDense(k="first_k_dense_replace", freq=None),
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
    description="GLM-4.5/4.6: 128-160 gated SiLU experts + 1 shared, sigmoid top-8 with selection bias",
    examples=("zai-org/GLM-4.5-Air", "zai-org/GLM-4.5", "zai-org/GLM-4.6"),
)

"""DeepSeek-V2 / V2-Lite: softmax routing (no selection bias, no renormalisation), `greedy` top-k or
`group_limited_greedy` (a group scores its best expert; experts outside the best `topk_group` groups are zeroed),
times `routed_scaling_factor`; shared experts; the first k layers dense."""

from .declaration import Experts, Family, FirstKDense, Router, SharedExperts

FAMILY = Family(
    name="deepseek_v2",
    model_types=("deepseek_v2",),
    architectures=("DeepseekV2ForCausalLM",),
    num_experts=("n_routed_experts",),
    moe_layers=FirstKDense(k="first_k_dense_replace", freq=None),
    experts=Experts(prefix="model.layers.{L}.mlp.experts", gate="gate_proj", up="up_proj", down="down_proj"),
    router=Router(
        logits_fp32=True,
        weight="model.layers.{L}.mlp.gate.weight",
        scoring="softmax",
        norm_topk_prob=False,  # v5 ignores norm_topk_prob for DeepSeek-V2
        n_group="n_group",
        topk_group="topk_group",
        routed_scaling_factor="routed_scaling_factor",
        topk_sorted=False,
        group_score="max",
        grouping=("topk_method", "group_limited_greedy"),
    ),
    shared=SharedExperts(prefix="model.layers.{L}.mlp.shared_experts", count="n_shared_experts"),
    description="DeepSeek-V2/V2-Lite: 64-160 gated SiLU experts + 2 shared, softmax top-6, optional group limit",
    examples=("deepseek-ai/DeepSeek-V2-Lite", "deepseek-ai/DeepSeek-V2-Lite-Chat", "deepseek-ai/DeepSeek-V2"),
)

"""dots.llm1 (rednote-hilab): DeepSeek-V3-style sigmoid routing with a selection bias and groups, a shared expert,
the first k layers dense."""

from .declaration import Experts, Family, FirstKDense, Router, SharedExperts

FAMILY = Family(
    name="dots1",
    model_types=("dots1",),
    architectures=("Dots1ForCausalLM",),
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
    description="dots.llm1: 128 gated SiLU experts + 2 shared, sigmoid top-6 with selection bias",
    examples=("rednote-hilab/dots.llm1.inst", "rednote-hilab/dots.llm1.base"),
)

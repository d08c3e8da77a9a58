"""Nemotron-H (NVIDIA-Nemotron-3-Nano-30B-A3B): hybrid Mamba/attention/MoE layers, non-gated squared-ReLU experts,
sigmoid routing with a selection bias, a shared expert, and a `backbone.` prefix that v5 renames to `model.`."""

from ..converters import Rename
from .declaration import Experts, Family, LayerTypes, Router, SharedExperts

FAMILY = Family(
    name="nemotron_h",
    model_types=("nemotron_h",),
    architectures=("NemotronHForCausalLM",),
    num_experts=("n_routed_experts",),
    moe_layers=LayerTypes(list_key="layers_block_type", value="moe", pattern_key="hybrid_override_pattern", char="E"),
    experts=Experts(prefix="backbone.layers.{L}.mixer.experts", up="up_proj", down="down_proj", activation="relu2"),
    router=Router(
        logits_fp32=True,
        weight="backbone.layers.{L}.mixer.gate.weight",
        scoring="sigmoid",
        bias="backbone.layers.{L}.mixer.gate.e_score_correction_bias",
        norm_topk_prob="norm_topk_prob",
        n_group="n_group",
        topk_group="topk_group",
        routed_scaling_factor="routed_scaling_factor",
    ),
    shared=SharedExperts(
        prefix="backbone.layers.{L}.mixer.shared_experts",
        gate=None,
        intermediate_size="moe_shared_expert_intermediate_size",  # the whole shared MLP's width (v5 does not
        count=None,  # multiply it by n_shared_experts, unlike DeepSeek)
    ),
    renames=(Rename("backbone.", "model.", anchored=True),),
    description="Nemotron-H: Mamba2/attention/MoE hybrid, 128 non-gated relu2 experts + 1 shared, sigmoid top-6",
    examples=("nvidia/NVIDIA-Nemotron-3-Nano-30B-A3B-BF16",),
)

"""ERNIE 4.5 MoE (ERNIE-4.5-21B-A3B): softmax routing whose choice adds a selection bias stored as
`mlp.moe_statics.e_score_correction_bias [1, E]` (v5 moves it under the router: `mlp.gate.moe_statics.*`), weights
renormalised by max(sum, moe_norm_min); optional shared experts; MoE layers by start/end index and interval."""

from ..converters import Rename
from .declaration import Experts, Family, IntervalRange, Router, SharedExperts

FAMILY = Family(
    name="ernie4_5_moe",
    model_types=("ernie4_5_moe",),
    architectures=("Ernie4_5_MoeForCausalLM",),
    num_experts=("moe_num_experts",),
    moe_layers=IntervalRange(start="moe_layer_start_index", end="moe_layer_end_index", interval="moe_layer_interval"),
    experts=Experts(prefix="model.layers.{L}.mlp.experts", gate="gate_proj", up="up_proj", down="down_proj"),
    router=Router(
        logits_fp32=True,
        weight="model.layers.{L}.mlp.gate.weight",
        scoring="softmax",
        bias="model.layers.{L}.mlp.moe_statics.e_score_correction_bias",
        top_k="moe_k",
        norm_topk_prob=True,
        norm_min="moe_norm_min",
    ),
    shared=SharedExperts(prefix="model.layers.{L}.mlp.shared_experts", count="moe_num_shared_experts"),
    renames=(Rename("mlp.moe_statics.e_score_correction_bias", "mlp.gate.moe_statics.e_score_correction_bias"),),
    description="ERNIE 4.5 MoE: 64 gated SiLU experts + 2 shared, softmax top-6 with a moe_statics selection bias",
    examples=("baidu/ERNIE-4.5-21B-A3B-PT", "baidu/ERNIE-4.5-300B-A47B-PT"),
)

"""GraniteMoE (granite-3.0-1b-a400m, granite-3.0-3b-a800m): experts already stacked in the checkpoint,
`block_sparse_moe.input_linear.weight [E, 2I, H]` (gate rows, then up rows) and `output_linear.weight [E, H, I]`,
which v5 only renames (`experts.gate_up_proj`, `experts.down_proj`); top-k on the logits, softmax over the chosen."""

from ..converters import Rename
from .declaration import AllLayers, Family, Router, StackedExperts

FAMILY = Family(
    name="granitemoe",
    model_types=("granitemoe",),
    architectures=("GraniteMoeForCausalLM",),
    num_experts=("num_local_experts",),
    moe_layers=AllLayers(),
    experts=StackedExperts(prefix="model.layers.{L}.block_sparse_moe.experts", transposed=False),
    router=Router(
        weight="model.layers.{L}.block_sparse_moe.router.layer.weight", scoring="softmax", norm_topk_prob=False,
        softmax_before_topk=False,
    ),
    renames=(
        Rename(".block_sparse_moe.input_linear.weight", ".block_sparse_moe.experts.gate_up_proj"),
        Rename(".block_sparse_moe.output_linear.weight", ".block_sparse_moe.experts.down_proj"),
        Rename(".block_sparse_moe.router.layer.weight", ".block_sparse_moe.router.weight"),
    ),
    moe_intermediate_size=("intermediate_size",),
    description="GraniteMoE: 32-40 stacked gated SiLU experts per layer, top-8 on logits then softmax",
    examples=("ibm-granite/granite-3.0-1b-a400m-base", "ibm-granite/granite-3.0-3b-a800m-instruct"),
)

"""Llama 4 text (Llama-4-Scout/Maverick language model, `llama4_text`): experts already stacked in the checkpoint
as v5 holds them, `feed_forward.experts.gate_up_proj [E, H, 2I]` (x @ W; gate columns, then up) and `down_proj [E, I,
H]`; a shared expert; top-1 on the logits with a sigmoid weight that scales the expert's *input*. MoE layers:
`moe_layers`, else every `interleave_moe_layer_step`-th."""

from .declaration import Family, LayerList, Router, SharedExperts, StackedExperts

FAMILY = Family(
    name="llama4_text",
    model_types=("llama4_text",),
    architectures=("Llama4ForCausalLM",),
    num_experts=("num_local_experts",),
    moe_layers=LayerList(list_key="moe_layers", step="interleave_moe_layer_step"),
    experts=StackedExperts(prefix="model.layers.{L}.feed_forward.experts", transposed=True),
    router=Router(
        weight="model.layers.{L}.feed_forward.router.weight",
        scoring="sigmoid",
        norm_topk_prob=False,
        softmax_before_topk=False,
        scale_input=True,
        returns=("scores", "logits"),
    ),
    shared=SharedExperts(
        prefix="model.layers.{L}.feed_forward.shared_expert", intermediate_size="intermediate_size", count=None
    ),
    moe_intermediate_size=("intermediate_size",),
    block_returns=("hidden", "logits"),
    description="Llama 4: 16-128 stacked gated SiLU experts [E, H, 2I] + 1 shared, sigmoid top-1 scaling the input",
    examples=("meta-llama/Llama-4-Scout-17B-16E-Instruct (language model)",),
)

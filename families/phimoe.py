"""Phi-3.5-MoE (`phimoe`): Mixtral's expert names (w1 gate, w3 up, w2 down under `block_sparse_moe`), routed by
SparseMixer (top-2; a masked softmax per pick, Gumbel sampling and a Heun-style gradient in training); v5 renames
`block_sparse_moe` to `mlp` and the router `gate` to `router`."""

from ..converters import Rename
from .declaration import AllLayers, Experts, Family, Router

FAMILY = Family(
    name="phimoe",
    model_types=("phimoe",),
    architectures=("PhimoeForCausalLM",),
    num_experts=("num_local_experts",),
    moe_layers=AllLayers(),
    experts=Experts(prefix="model.layers.{L}.block_sparse_moe.experts", gate="w1", up="w3", down="w2"),
    router=Router(
        weight="model.layers.{L}.block_sparse_moe.gate.weight",
        scoring="sparsemixer",
        norm_topk_prob=False,
        jitter_eps="router_jitter_noise",
        input_jitter=("input_jitter_noise", "input_jitter_noise"),  # v5 jitters in the block, then in the router
    ),
    renames=(Rename(".block_sparse_moe.", ".mlp."), Rename(".mlp.gate.weight", ".mlp.router.weight")),
    moe_intermediate_size=("intermediate_size",),
    description="Phi-3.5-MoE: 16 gated SiLU experts per layer, SparseMixer top-2 routing",
    examples=("microsoft/Phi-3.5-MoE-instruct",),
)

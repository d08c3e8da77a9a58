"""MiniMax-Text-01 (`minimax`): lightning/full attention hybrid with Mixtral's experts (w1, w3, w2 under
`block_sparse_moe`, renamed `mlp` by v5) and softmax top-2, always renormalised."""

from ..converters import Rename
from .declaration import AllLayers, Experts, Family, Router

FAMILY = Family(
    name="minimax",
    model_types=("minimax",),
    architectures=("MiniMaxForCausalLM",),
    num_experts=("num_local_experts",),
    moe_layers=AllLayers(),
    experts=Experts(prefix="model.layers.{L}.block_sparse_moe.experts", gate="w1", up="w3", down="w2"),
    router=Router(
        weight="model.layers.{L}.block_sparse_moe.gate.weight", scoring="softmax", norm_topk_prob=True,
        input_jitter=("router_jitter_noise",),
    ),
    renames=(Rename(".block_sparse_moe.", ".mlp."),),
    moe_intermediate_size=("intermediate_size",),
    description="MiniMax-Text-01: 32 gated SiLU experts per layer, softmax top-2, lightning-attention hybrid",
    examples=("MiniMaxAI/MiniMax-Text-01-hf",),
)

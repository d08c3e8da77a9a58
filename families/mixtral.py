"""Mixtral (Mixtral-8x7B): experts w1 (gate), w3 (up), w2 (down) under `block_sparse_moe`, which v5 calls `mlp`."""

from ..converters import Rename
from .declaration import AllLayers, Experts, Family, Router

FAMILY = Family(
    name="mixtral",
    model_types=("mixtral",),
    architectures=("MixtralForCausalLM",),
    num_experts=("num_local_experts",),
    moe_layers=AllLayers(),
    experts=Experts(prefix="model.layers.{L}.block_sparse_moe.experts", gate="w1", up="w3", down="w2"),
    router=Router(weight="model.layers.{L}.block_sparse_moe.gate.weight", scoring="softmax", norm_topk_prob=True),
    renames=(Rename(".block_sparse_moe.", ".mlp."),),
    moe_intermediate_size=("intermediate_size",),
    description="Mixtral: 8 gated SiLU experts per layer, softmax top-2 routing",
    examples=("mistralai/Mixtral-8x7B-v0.1", "mistralai/Mixtral-8x7B-Instruct-v0.1"),
)

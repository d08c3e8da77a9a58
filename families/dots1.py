"""dots.llm1 (rednote-hilab): DeepSeek-V3's block (sigmoid routing with a selection bias and groups, a shared expert,
the first k layers dense) under its own names; no `moe_layer_freq`."""

from dataclasses import replace

from .declaration import FirstKDense
from .deepseek_v3 import FAMILY as DEEPSEEK_V3

FAMILY = replace(
    DEEPSEEK_V3,
    name="dots1",
    model_types=("dots1",),
    architectures=("Dots1ForCausalLM",),
    moe_layers=FirstKDense(k="first_k_dense_replace", freq=None),
    description="dots.llm1: 128 gated SiLU experts + 2 shared, sigmoid top-6 with selection bias",
    examples=("rednote-hilab/dots.llm1.inst", "rednote-hilab/dots.llm1.base"),
)

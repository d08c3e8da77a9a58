"""GLM-4.5 / GLM-4.6 (`glm4_moe`): DeepSeek-V3's block (sigmoid group-limited routing with a selection bias, a shared
expert, the first k layers dense) under its own names; no `moe_layer_freq`. The multi-token-prediction layer after
the last decoder layer passes through."""

from dataclasses import replace

from .declaration import FirstKDense
from .deepseek_v3 import FAMILY as DEEPSEEK_V3

FAMILY = replace(
    DEEPSEEK_V3,
    name="glm4_moe",
    model_types=("glm4_moe",),
    architectures=("Glm4MoeForCausalLM",),
    moe_layers=FirstKDense(k="first_k_dense_replace", freq=None),
    description="GLM-4.5/4.6: 128-160 gated SiLU experts + 1 shared, sigmoid top-8 with selection bias",
    examples=("zai-org/GLM-4.5-Air", "zai-org/GLM-4.5", "zai-org/GLM-4.6"),
)

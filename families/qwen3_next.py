"""Qwen3-Next (Qwen3-Next-80B-A3B): hybrid linear/full attention; Qwen2-MoE's expert block (softmax top-k, one
shared expert behind a sigmoid gate) under its own names. The published multi-token-prediction weights (`mtp.*`)
pass through."""

from dataclasses import replace

from .qwen2_moe import FAMILY as QWEN2_MOE

FAMILY = replace(
    QWEN2_MOE,
    name="qwen3_next",
    model_types=("qwen3_next",),
    architectures=("Qwen3NextForCausalLM",),
    description="Qwen3-Next: 512 gated SiLU experts + 1 gated shared expert, softmax top-10, linear-attention hybrid",
    examples=("Qwen/Qwen3-Next-80B-A3B-Instruct",),
)

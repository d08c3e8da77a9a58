"""gpt-oss (gpt-oss-20b, gpt-oss-120b): experts already stacked and transposed, `mlp.experts.gate_up_proj [E, H,
2I]` with gate and up columns interleaved, `down_proj [E, I, H]`, both with biases; a clamped SwiGLU (alpha, limit);
top-k on the router logits (the router has a bias), softmax over the chosen. Published as MXFP4: each weight is
`*_blocks [E, out, in/32, 16]` + `*_scales [E, out, in/32]` (U8), passed through bitwise (`--dequantize bf16` turns
them into v5's bf16 `[E, in, out]` weights)."""

from .declaration import AllLayers, Family, Router, StackedExperts

FAMILY = Family(
    name="gpt_oss",
    model_types=("gpt_oss",),
    architectures=("GptOssForCausalLM",),
    num_experts=("num_local_experts",),
    moe_layers=AllLayers(),
    experts=StackedExperts(
        prefix="model.layers.{L}.mlp.experts",
        transposed=True,
        gate_up="interleave",
        bias=True,
        quantized=(("_blocks", "_scales"),),
        activation="clamped_swiglu",
        activation_args=(("alpha", "swiglu_alpha", 1.702), ("limit", "swiglu_limit", 7.0)),  # published configs omit alpha
    ),
    router=Router(
        weight="model.layers.{L}.mlp.router.weight",
        scoring="softmax",
        top_k=("num_experts_per_tok", "experts_per_token"),
        norm_topk_prob=False,
        softmax_before_topk=False,
        logit_bias="model.layers.{L}.mlp.router.bias",
    ),
    moe_intermediate_size=("intermediate_size",),
    block_returns=("hidden", "weights"),
    description="gpt-oss: 32-128 stacked experts [E, H, 2I] (interleaved, biased, clamped SwiGLU), MXFP4, top-4",
    examples=("openai/gpt-oss-20b", "openai/gpt-oss-120b"),
)

"""The vocabulary a family declaration is written in.

A declaration says, as data, what a family's checkpoint looks like: how to recognise its config, which layers are
MoE, where the per-expert tensors live and how they fuse, the router and shared experts, and the renames
transformers v5 applies when it loads the family. The engine reads only these fields; it knows no family by name.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Protocol, Sequence

from ..converters import Rename, rename_all

Config = Mapping[str, Any]


class ConfigError(ValueError):
    """config.json lacks or contradicts what a declaration needs."""


def config_value(cfg: Config, keys: str | Sequence[str], default: Any = ...) -> Any:
    """The first of `keys` present in `cfg` (families rename config fields across versions)."""
    for k in (keys,) if isinstance(keys, str) else keys:
        if k in cfg and cfg[k] is not None:
            return cfg[k]
    if default is ...:
        raise ConfigError(f"config.json has none of {keys if isinstance(keys, str) else list(keys)}")
    return default


# --- which layers are MoE ------------------------------------------------------------------------------------------


class MoELayers(Protocol):
    def layers(self, cfg: Config) -> list[int]: ...


def _num_layers(cfg: Config) -> int:
    n = int(config_value(cfg, ("num_hidden_layers", "n_layers", "num_layers")))
    if not 0 <= n <= 1 << 14:  # checked before range(n): a hostile config must not make us list 10**12 layers
        raise ConfigError(f"num_hidden_layers {n} is not a usable layer count")
    return n


@dataclass(frozen=True)
class AllLayers:
    """Every decoder layer is MoE (Mixtral)."""

    def layers(self, cfg: Config) -> list[int]:
        return list(range(_num_layers(cfg)))


@dataclass(frozen=True)
class SparseStep:
    """Layer L is MoE when (L + 1) % step == 0 and L is not listed in `skip` (Qwen2/3-MoE)."""

    step: str = "decoder_sparse_step"
    skip: str = "mlp_only_layers"

    def layers(self, cfg: Config) -> list[int]:
        step = int(config_value(cfg, self.step, 1)) or 1
        skip = set(config_value(cfg, self.skip, []) or [])
        return [L for L in range(_num_layers(cfg)) if L not in skip and (L + 1) % step == 0]


@dataclass(frozen=True)
class FirstKDense:
    """The first k layers are dense, then every `freq`-th layer is MoE (DeepSeek-V2/V3). `freq=None`: every layer
    from k on, whatever the config says (transformers v5 ignores `moe_layer_freq` for DeepSeek-V2, GLM-4-MoE, dots1)."""

    k: str = "first_k_dense_replace"
    freq: str | None = "moe_layer_freq"

    def layers(self, cfg: Config) -> list[int]:
        k = int(config_value(cfg, self.k, 0))
        freq = (int(config_value(cfg, self.freq, 1)) or 1) if self.freq else 1
        return [L for L in range(_num_layers(cfg)) if L >= k and L % freq == 0]


@dataclass(frozen=True)
class IntervalRange:
    """Layers start..end (inclusive; end -1 or absent: the last layer) where (L + 1) % interval == 0 (ERNIE 4.5)."""

    start: str = "moe_layer_start_index"
    end: str = "moe_layer_end_index"
    interval: str = "moe_layer_interval"

    def layers(self, cfg: Config) -> list[int]:
        n = _num_layers(cfg)
        start = int(config_value(cfg, self.start, 0))
        end = int(config_value(cfg, self.end, -1))
        end = n - 1 if end == -1 else end
        interval = int(config_value(cfg, self.interval, 1)) or 1
        return [L for L in range(n) if start <= L <= end and (L + 1) % interval == 0]


@dataclass(frozen=True)
class LayerList:
    """An explicit list of MoE layer numbers (`list_key`), else every `step`-th layer counting from step - 1
    (Llama 4: `moe_layers`, else `interleave_moe_layer_step`)."""

    list_key: str = "moe_layers"
    step: str = "interleave_moe_layer_step"

    def layers(self, cfg: Config) -> list[int]:
        n = _num_layers(cfg)
        listed = cfg.get(self.list_key)
        if listed is not None:
            if not isinstance(listed, list) or not all(type(L) is int and 0 <= L < n for L in listed):
                raise ConfigError(f"{self.list_key} is not a list of layer numbers below {n}")
            return sorted(set(listed))
        step = int(config_value(cfg, self.step, 1)) or 1
        return list(range(step - 1, n, step))


@dataclass(frozen=True)
class LayerTypes:
    """A per-layer type list (`list_key` entries equal to `value`) or a pattern string (`char` marks MoE).

    Nemotron-H publishes `hybrid_override_pattern` ("MEM*E..."); transformers v5 writes `layers_block_type`.
    """

    list_key: str = "layers_block_type"
    value: str = "moe"
    pattern_key: str = "hybrid_override_pattern"
    char: str = "E"

    def layers(self, cfg: Config) -> list[int]:
        types = cfg.get(self.list_key)
        if isinstance(types, list) and types:
            return [i for i, t in enumerate(types) if t == self.value]
        pattern = cfg.get(self.pattern_key)
        if isinstance(pattern, str) and pattern:
            return [i for i, c in enumerate(pattern) if c == self.char]
        raise ConfigError(f"config.json has neither {self.list_key} nor {self.pattern_key}")


# --- experts, router, shared experts -------------------------------------------------------------------------------

# Per-expert tensor suffix -> suffix of the fused v5 parameter (`gate_up_proj`, `gate_up_proj_scale_inv`, ...).
FUSED_SUFFIXES: dict[str, str] = {"weight": "", "weight_scale_inv": "_scale_inv", "bias": "_bias"}


@dataclass(frozen=True)
class Experts:
    """Per-expert tensors `{prefix}.{E}.{proj}.{tensor}` in the published checkpoint.

    Gated experts fuse as v5 does: `gate_up_proj [E, 2I, H]` (each expert's gate rows, then its up rows) and
    `down_proj [E, H, I]`. Non-gated experts: `up_proj [E, I, H]`, `down_proj [E, H, I]`. Each tensor kind in
    `tensors` (the weight and, for FP8 checkpoints, its block scales) fuses the same way.
    """

    prefix: str  # e.g. "model.layers.{L}.mlp.experts"
    down: str
    up: str
    gate: str | None = None  # None: non-gated (act(up x) -> down)
    tensors: tuple[str, ...] = ("weight", "weight_scale_inv")
    activation: str = "silu"  # "silu" (gated SwiGLU) or "relu2" (squared ReLU, non-gated)

    # How the fused parameters are laid out, for the runtime (fixed for per-expert checkpoints: fusing them is v5's
    # [E, out, in] with gate rows before up rows, never a transpose)
    stacked = False
    transposed = False
    gate_up = "concat"
    bias = False
    activation_args: tuple[tuple, ...] = ()  # (argument, config field[, default])

    @property
    def gated(self) -> bool:
        return self.gate is not None

    @property
    def in_proj(self) -> str:
        return "gate_up_proj" if self.gate is not None else "up_proj"

    def fused_params(self) -> list[tuple[str, tuple[str, ...]]]:
        """(fused parameter base name, per-expert projections concatenated into it, in order)."""
        if self.gate is not None:
            return [("gate_up_proj", (self.gate, self.up)), ("down_proj", (self.down,))]
        return [("up_proj", (self.up,)), ("down_proj", (self.down,))]


@dataclass(frozen=True)
class StackedExperts:
    """Experts already stacked in the published checkpoint: one `[E, ...]` tensor per projection and MoE layer
    (Llama 4, gpt-oss, GraniteMoE). The v5 parameters are `{prefix}.{in_proj}` and `{prefix}.{down}` (and, with
    `bias`, `..._bias [E, out]`); their published names are those v5 names with the family's renames undone (GraniteMoE
    publishes `block_sparse_moe.input_linear.weight`). Conversion renames and splits dim 0 by EP rank, nothing else:
    no transpose, no reordering, so a square matrix (H == I, H == 2I) keeps whatever orientation it is stored in.

    The orientation is declared, never guessed from shapes: `transposed=False` stores `in_proj [E, 2I, H]`, `down [E,
    H, I]` (v5's usual `F.linear` form); `transposed=True` stores `[E, H, 2I]` and `[E, I, H]` (`x @ W`, Llama 4 and
    gpt-oss). `gate_up="interleave"`: gate and up columns alternate (gpt-oss) instead of all gate then all up.

    `quantized`: suffix sets a checkpoint may store in place of a weight, e.g. `("_blocks", "_scales")` for gpt-oss's
    MXFP4 `gate_up_proj_blocks [E, 2I, H/32, 16]` + `gate_up_proj_scales [E, 2I, H/32]` (U8): passed through bitwise,
    split by EP rank on dim 0 like the weight they stand for.
    """

    prefix: str  # the experts module, e.g. "model.layers.{L}.mlp.experts" (its v5 name once renamed)
    in_proj: str = "gate_up_proj"
    down: str = "down_proj"
    gated: bool = True
    transposed: bool = False
    gate_up: str = "concat"  # "concat" | "interleave"
    bias: bool = False
    quantized: tuple[tuple[str, ...], ...] = ()
    activation: str = "silu"  # "silu", "relu2", ... or "clamped_swiglu" (gpt-oss: needs alpha and limit)
    # (argument, config field[, default when the config omits it]), e.g. (("alpha", "swiglu_alpha", 1.702),)
    activation_args: tuple[tuple, ...] = ()

    stacked = True
    tensors: tuple[str, ...] = ()  # per-expert tensor kinds: none

    def stacked_params(self) -> list[tuple[str, str, bool]]:
        """(v5 parameter name under the prefix, the weight it belongs to, required) for every tensor the checkpoint
        may hold: the weights, their biases, their quantized forms."""
        out: list[tuple[str, str, bool]] = []
        for w in (self.in_proj, self.down):
            out.append((w, w, False))  # a weight may be stored quantized instead: checked per layer
            if self.bias:
                out.append((w + "_bias", w, True))
            for group in self.quantized:
                out += [(w + suffix, w, False) for suffix in group]
        return out


@dataclass(frozen=True)
class Router:
    """The router and how it scores; config field names for its knobs. Read by the runtime, passed through by
    conversion.

    `weight`, `bias` and `logit_bias` are published tensor names; the router module is the first component below the
    MoE block (v5 names), and the tensor may sit deeper inside it (HunYuan `gate.wg.weight`, ERNIE
    `gate.moe_statics.e_score_correction_bias`).
    """

    weight: str  # e.g. "model.layers.{L}.mlp.gate.weight"
    scoring: str = "softmax"  # "softmax" | "sigmoid" | "sparsemixer" (PhiMoE's top-2 sampler, see runtime/router.py)
    bias: str | None = None  # selection-only correction bias (fp32), e.g. "...gate.e_score_correction_bias"
    top_k: str | Sequence[str] = "num_experts_per_tok"
    norm_topk_prob: str | bool = "norm_topk_prob"
    n_group: str | None = None
    topk_group: str | None = None
    routed_scaling_factor: str | None = None
    # True: score every expert (softmax or sigmoid), then top-k (Mixtral, Qwen, DeepSeek). False: top-k on the raw
    # logits, then score the chosen ones (softmax over them: GraniteMoE, gpt-oss; sigmoid of each: Llama 4)
    softmax_before_topk: bool = True
    logit_bias: str | None = None  # a learned bias of the router linear, added to the logits (gpt-oss `router.bias`)
    topk_sorted: bool | None = None  # torch.topk(sorted=...) as v5 calls it; None: v5's usual (sigmoid groups: False)
    group_score: str = "top2_sum"  # a group's score: sum of its two best (DeepSeek-V3) or "max" (DeepSeek-V2)
    grouping: tuple[str, str] | None = None  # group-limited only when config[field] == value (DeepSeek-V2 topk_method)
    norm_min: str | None = None  # renormalise by max(sum, config[norm_min]) (ERNIE `moe_norm_min`)
    norm_eps: float | None = None  # added to the renormalising sum; None: 1e-20 for sigmoid, 0 for softmax
    jitter_eps: str | None = None  # sparsemixer's threshold, a config field (PhiMoE `router_jitter_noise`)
    input_jitter: tuple[str, ...] = ()  # config fields of multiplicative input noise in training, applied in order
    scale_input: bool = False  # the routing weight scales the expert's input, not its output (Llama 4)
    # what v5's router module returns, in order (transformers records router_logits from it by position): "logits",
    # "weights" [T, k], "experts" [T, k], or "scores" [T, E] (the weights scattered into zeros: Llama 4)
    returns: tuple[str, ...] = ("logits", "weights", "experts")
    # the router linear in fp32 whatever the model dtype (v5 upcasts input and weight: DeepSeek-V2/V3, GLM-4-MoE, dots1,
    # ERNIE, Nemotron-H); False: in the router weight's dtype, as v5's Qwen/Mixtral routers
    logits_fp32: bool = False


@dataclass(frozen=True)
class SharedExperts:
    """Always-on dense expert(s) beside the routed ones: `{prefix}.{gate,up,down}_proj.weight`."""

    prefix: str  # e.g. "model.layers.{L}.mlp.shared_experts"
    gate: str | None = "gate_proj"
    up: str = "up_proj"
    down: str = "down_proj"
    intermediate_size: str | Sequence[str] = "moe_intermediate_size"
    count: str | None = "n_shared_experts"
    output_gate: str | None = None  # a sigmoid gate on the shared output (Qwen2-MoE), e.g. "...shared_expert_gate.weight"


@dataclass(frozen=True)
class Family:
    name: str
    model_types: tuple[str, ...]
    architectures: tuple[str, ...]
    num_experts: tuple[str, ...]  # config fields that hold the routed expert count, first present wins
    moe_layers: MoELayers
    experts: Experts | StackedExperts
    router: Router
    shared: SharedExperts | None = None
    renames: tuple[Rename, ...] = ()  # published key -> v5 in-memory key (applied to every key)
    # what the v5 block's forward returns: the hidden states, or (hidden, router logits) for Llama 4 and (hidden,
    # routing weights [T, k]) for gpt-oss, whose decoder layers unpack a pair
    block_returns: tuple[str, ...] = ("hidden",)
    moe_intermediate_size: tuple[str, ...] = ("moe_intermediate_size", "intermediate_size")
    description: str = ""
    examples: tuple[str, ...] = field(default=())  # Hub ids of checkpoints this declaration was checked against

    def matches(self, cfg: Config) -> bool:
        archs = cfg.get("architectures") or []
        return cfg.get("model_type") in self.model_types or any(a in self.architectures for a in archs)

    def expert_count(self, cfg: Config) -> int:
        return int(config_value(cfg, self.num_experts))

    def moe_layer_ids(self, cfg: Config) -> list[int]:
        return self.moe_layers.layers(cfg)

    def hf_expert_prefix(self, layer: int) -> str:
        return self.experts.prefix.format(L=layer)

    def fused_expert_prefix(self, layer: int) -> str:
        return rename_all(self.renames, self.hf_expert_prefix(layer))

    def to_fused_name(self, hf_name: str) -> str:
        return rename_all(self.renames, hf_name)

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
    return int(config_value(cfg, ("num_hidden_layers", "n_layers", "num_layers")))


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
    """The first k layers are dense, then every `freq`-th layer is MoE (DeepSeek-V2/V3)."""

    k: str = "first_k_dense_replace"
    freq: str = "moe_layer_freq"

    def layers(self, cfg: Config) -> list[int]:
        k = int(config_value(cfg, self.k, 0))
        freq = int(config_value(cfg, self.freq, 1)) or 1
        return [L for L in range(_num_layers(cfg)) if L >= k and L % freq == 0]


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

    @property
    def gated(self) -> bool:
        return self.gate is not None

    def fused_params(self) -> list[tuple[str, tuple[str, ...]]]:
        """(fused parameter base name, per-expert projections concatenated into it, in order)."""
        if self.gate is not None:
            return [("gate_up_proj", (self.gate, self.up)), ("down_proj", (self.down,))]
        return [("up_proj", (self.up,)), ("down_proj", (self.down,))]


@dataclass(frozen=True)
class Router:
    """The router and how it scores; config field names for its knobs. Read by the runtime, passed through by
    conversion."""

    weight: str  # e.g. "model.layers.{L}.mlp.gate.weight"
    scoring: str = "softmax"  # "softmax" | "sigmoid"
    bias: str | None = None  # selection-only correction bias (fp32), e.g. "...gate.e_score_correction_bias"
    top_k: str = "num_experts_per_tok"
    norm_topk_prob: str | bool = "norm_topk_prob"
    n_group: str | None = None
    topk_group: str | None = None
    routed_scaling_factor: str | None = None
    softmax_before_topk: bool = True  # Mixtral and Qwen: softmax over all experts, then top-k


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
    experts: Experts
    router: Router
    shared: SharedExperts | None = None
    renames: tuple[Rename, ...] = ()  # published key -> v5 in-memory key (applied to every key)
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

"""Top-k routers that reproduce transformers v5's routing on the same weights, configured from a family declaration.

The logits are ``F.linear(x, weight[, logit_bias])`` in the router weight's dtype, exactly as v5 computes them (v5
keeps some routers' weight in fp32 and computes their logits in fp32; others run in the model dtype). Then one of:

* score first (``softmax_before_topk``, the default): ``softmax`` (fp32, over all experts: Qwen, Mixtral, OLMoE,
  DeepSeek-V2, ERNIE, HunYuan, MiniMax) or ``sigmoid`` (fp32: DeepSeek-V3, GLM-4-MoE, dots1, Nemotron-H). A
  selection-only bias (``e_score_correction_bias``; ERNIE's ``[1, E]`` ``moe_statics``) is added for choosing;
  optionally experts are chosen inside the ``topk_group`` best of ``n_group`` groups (a group scores the sum of its two
  best biased scores, or its best score for DeepSeek-V2, whose masked experts score 0 instead of -inf); the weights are
  the *unbiased* scores of the chosen experts, optionally renormalised (sum + ``norm_eps``, or ``max(sum,
  norm_min)``), times ``routed_scaling_factor``.
* top-k first (``softmax_before_topk=False``): top-k on the logits, then softmax over the chosen (GraniteMoE,
  gpt-oss, whose router linear has a bias) or a sigmoid of each (Llama 4).
* ``sparsemixer`` (PhiMoE): top-2 by SparseMixer, v5's ``sparsemixer`` op for op: a masked softmax per pick; in
  training the picks are Gumbel-sampled and the weights carry a Heun-style straight-through gradient. It draws random
  numbers in the same order as v5, so with the same RNG state the same experts are sampled.

Routing weights are always returned in fp32 (v5 casts some back to the model dtype; for fp32 models that is the same
thing, for bf16 ones ours is the more precise of the two).

The op sequence is copied from v5 (same ``topk`` calls, ``sorted=False`` where v5 uses it) so that the chosen experts
*and their order* match, which keeps the expert sum in the same order as v5's.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import reduce
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from ..families.declaration import Router as RouterDecl
from ..families.declaration import config_value

SCORINGS = ("softmax", "sigmoid", "sparsemixer")


@dataclass(frozen=True)
class RouterSpec:
    """A declaration's router resolved against one config: plain numbers, no config field names left."""

    num_experts: int
    top_k: int
    scoring: str = "softmax"  # "softmax" | "sigmoid" | "sparsemixer"
    norm_topk_prob: bool = False
    has_bias: bool = False
    n_group: int = 1
    topk_group: int = 1
    routed_scaling_factor: float = 1.0
    softmax_before_topk: bool = True
    topk_sorted: bool | None = None  # None: True, except for the sigmoid score-first routers (v5 uses sorted=False)
    group_score: str = "top2_sum"  # "top2_sum" | "max"
    norm_eps: float | None = None  # None: 1e-20 for sigmoid, 0 for softmax
    norm_min: float | None = None
    has_logit_bias: bool = False
    jitter_eps: float = 0.0  # sparsemixer's threshold
    input_jitter: tuple[float, ...] = ()  # multiplicative input noise in training (applied by the block)
    scale_input: bool = False  # the weight scales the expert's input (applied by the experts)
    returns: tuple[str, ...] = ("logits", "weights", "experts")  # what forward returns, as v5's router does
    logits_fp32: bool = False  # the router linear in fp32 (input and weight upcast), as some v5 routers do

    def __post_init__(self) -> None:
        if self.scoring not in SCORINGS:
            raise ValueError(f"unknown router scoring {self.scoring!r} ({' | '.join(SCORINGS)})")
        if not 0 < self.top_k <= self.num_experts:
            raise ValueError(f"top_k={self.top_k} must be in 1..num_experts={self.num_experts}")
        if self.num_experts % self.n_group:
            raise ValueError(f"num_experts={self.num_experts} is not divisible by n_group={self.n_group}")
        if not 0 < self.topk_group <= self.n_group:
            raise ValueError(f"topk_group={self.topk_group} must be in 1..n_group={self.n_group}")
        if self.group_score not in ("top2_sum", "max"):
            raise ValueError(f"unknown group score {self.group_score!r} (top2_sum | max)")
        if self.scoring == "sparsemixer" and self.top_k != 2:
            raise ValueError(f"sparsemixer routes exactly 2 experts per token, not {self.top_k}")
        if not set(self.returns) <= {"logits", "weights", "experts", "scores"}:
            raise ValueError(f"a router returns logits, weights, experts or scores, not {self.returns}")

    @property
    def sorted(self) -> bool:
        if self.topk_sorted is not None:
            return self.topk_sorted
        return not (self.scoring == "sigmoid" and self.softmax_before_topk)

    @property
    def eps(self) -> float:
        if self.norm_eps is not None:
            return self.norm_eps
        return 1e-20 if self.scoring == "sigmoid" else 0.0

    @classmethod
    def from_declaration(cls, decl: RouterDecl, cfg: Mapping[str, Any], num_experts: int) -> "RouterSpec":
        norm = decl.norm_topk_prob
        if isinstance(norm, str):
            norm = bool(config_value(cfg, norm, False))
        n_group = int(config_value(cfg, decl.n_group, 1)) if decl.n_group else 1
        topk_group = int(config_value(cfg, decl.topk_group, 1)) if decl.topk_group else 1
        if decl.grouping is not None and config_value(cfg, decl.grouping[0], None) != decl.grouping[1]:
            n_group = topk_group = 1  # e.g. DeepSeek-V2 with topk_method "greedy": groups are ignored
        scale = float(config_value(cfg, decl.routed_scaling_factor, 1.0)) if decl.routed_scaling_factor else 1.0
        return cls(
            num_experts=num_experts,
            top_k=int(config_value(cfg, decl.top_k)),
            scoring=decl.scoring,
            norm_topk_prob=bool(norm),
            has_bias=decl.bias is not None,
            n_group=n_group,
            topk_group=topk_group,
            routed_scaling_factor=scale,
            softmax_before_topk=decl.softmax_before_topk,
            topk_sorted=decl.topk_sorted,
            group_score=decl.group_score,
            norm_eps=decl.norm_eps,
            norm_min=float(config_value(cfg, decl.norm_min)) if decl.norm_min else None,
            has_logit_bias=decl.logit_bias is not None,
            jitter_eps=float(config_value(cfg, decl.jitter_eps, 0.0)) if decl.jitter_eps else 0.0,
            input_jitter=tuple(float(config_value(cfg, k, 0.0)) for k in decl.input_jitter),
            scale_input=decl.scale_input,
            returns=tuple(decl.returns),
            logits_fp32=decl.logits_fp32,
        )


def route(
    spec: RouterSpec,
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    logit_bias: torch.Tensor | None = None,
    training: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Route tokens: ``(router_logits [T, E], topk_weights [T, k] fp32, topk_idx [T, k] int64)``.

    `hidden` is ``[T, H]``; `weight` is ``[E, H]``; `bias` the selection-only correction bias (``[E]`` or ``[1, E]``);
    `logit_bias` a bias of the router linear; `training` only matters to sparsemixer (sampling).
    """
    if spec.logits_fp32:
        lb = logit_bias.float() if logit_bias is not None else None
        logits = F.linear(hidden.float(), weight.float(), lb)
    else:
        logits = F.linear(hidden.to(weight.dtype), weight, logit_bias)
    if spec.scoring == "sparsemixer":
        top_w, top_i = sparsemixer(logits, spec.jitter_eps, training)
        return logits, top_w.float(), top_i

    if not spec.softmax_before_topk:  # top-k on the logits, then score the chosen ones
        top_l, top_i = torch.topk(logits.float(), spec.top_k, dim=-1, sorted=spec.sorted)
        top_w = torch.softmax(top_l, dim=-1) if spec.scoring == "softmax" else torch.sigmoid(top_l)
        return logits, top_w, top_i

    if spec.scoring == "softmax":
        scores = torch.softmax(logits, dim=-1, dtype=torch.float32)
    else:
        scores = logits.float().sigmoid()
    choice = scores + bias.float().reshape(-1) if bias is not None else scores
    if spec.n_group > 1 or spec.topk_group < spec.n_group:
        per_group = spec.num_experts // spec.n_group
        grouped = choice.view(-1, spec.n_group, per_group)
        if spec.group_score == "max":
            group_scores = grouped.max(dim=-1).values
        else:
            group_scores = grouped.topk(min(2, per_group), dim=-1)[0].sum(dim=-1)
        group_idx = torch.topk(group_scores, k=spec.topk_group, dim=-1, sorted=False)[1]
        group_mask = torch.zeros_like(group_scores)
        group_mask.scatter_(1, group_idx, 1)
        score_mask = group_mask.unsqueeze(-1).expand(-1, spec.n_group, per_group).reshape(-1, spec.num_experts)
        fill = 0.0 if spec.group_score == "max" else float("-inf")  # DeepSeek-V2 zeroes, V3 style uses -inf
        choice = choice.masked_fill(~score_mask.bool(), fill)
    top_i = torch.topk(choice, k=spec.top_k, dim=-1, sorted=spec.sorted)[1]
    # the weights are the unbiased scores; DeepSeek-V2 (no bias, groups zeroed) takes them from its masked scores
    top_w = (choice if spec.group_score == "max" and bias is None else scores).gather(1, top_i)
    if spec.norm_topk_prob:
        denom = top_w.sum(dim=-1, keepdim=True)
        if spec.eps:
            denom = denom + spec.eps
        if spec.norm_min is not None:
            denom = torch.clamp(denom, min=spec.norm_min)
        top_w = top_w / denom
    if spec.routed_scaling_factor != 1.0:  # x * 1.0 is x: one kernel less each way
        top_w = top_w * spec.routed_scaling_factor
    return logits, top_w, top_i


# --- sparsemixer (PhiMoE) ------------------------------------------------------------------------------------------


class _HeunMultiplier(torch.autograd.Function):
    """SparseMixer's straight-through multiplier: forward ``multiplier * mask_for_one``, backward a Heun's-method
    estimate of the routing gradient onto the scores (v5's ``PhimoeMultiplier``)."""

    @staticmethod
    def forward(ctx, scores, multiplier, selected_experts, masked_gates, mask_for_one):  # type: ignore[override]
        ctx.save_for_backward(multiplier, selected_experts, masked_gates)
        return multiplier * mask_for_one

    @staticmethod
    def backward(ctx, grad_at_output):  # type: ignore[override]
        multiplier, selected_experts, masked_gates = ctx.saved_tensors
        grad_at_output = grad_at_output * multiplier
        grad_at_scores_expanded = masked_gates * grad_at_output.mul(-1)
        grad_at_scores_expanded.scatter_add_(dim=-1, index=selected_experts, src=grad_at_output)
        return grad_at_scores_expanded, None, None, None, None


def _sparsemixer_pick(scores, masked_scores, jitter_eps, training, rand_uniform_twice):
    with torch.no_grad():
        mask_logits_threshold, max_ind = masked_scores.max(dim=-1, keepdim=True)
        factor = scores.abs().clamp(min=mask_logits_threshold)
        mask_logits_threshold = ((mask_logits_threshold - scores) / factor) > (2 * jitter_eps)
    masked_gates = masked_scores.masked_fill(mask_logits_threshold, float("-inf"))
    if training:
        gumbel = torch.empty_like(masked_gates, memory_format=torch.legacy_contiguous_format).exponential_().log()
        selected = (masked_gates - gumbel).max(dim=-1)[1].unsqueeze(-1)
    else:
        selected = max_ind
    masked_gates = torch.softmax(masked_gates, dim=-1)
    multiplier_o = masked_gates.gather(dim=-1, index=selected)
    if training:
        max_scores, max_ind = masked_gates.max(dim=-1, keepdim=True)
        r = torch.rand_like(max_scores).uniform_() if rand_uniform_twice else torch.rand_like(max_scores)
        mask_for_one = torch.logical_or(selected == max_ind, r > 0.75)
        mask_for_one = torch.add(0.3333, mask_for_one, alpha=0.6667).type_as(masked_gates)
        multiplier = _HeunMultiplier.apply(scores, multiplier_o, selected, masked_gates, mask_for_one)
    else:
        multiplier = multiplier_o
    return multiplier, selected


def sparsemixer(scores: torch.Tensor, jitter_eps: float, training: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-2 SparseMixer over router logits ``[T, E]``: ``(weights [T, 2], experts [T, 2])``; the second pick masks
    the first out. Random draws (training only) happen in v5's order."""
    m1, s1 = _sparsemixer_pick(scores, scores, jitter_eps, training, rand_uniform_twice=False)
    masked_scores = torch.scatter(scores, -1, s1, float("-inf"))
    m2, s2 = _sparsemixer_pick(scores, masked_scores, jitter_eps, training, rand_uniform_twice=True)
    return torch.concat((m1, m2), dim=-1), torch.concat((s1, s2), dim=-1)


# --- the module ----------------------------------------------------------------------------------------------------


def _register(root: nn.Module, path: str, tensor: torch.Tensor, kind: str) -> None:
    """Register `tensor` at dotted `path` below `root` (creating plain container modules on the way) as a
    "param", a "frozen" parameter (requires_grad False, as ERNIE's moe_statics bias) or a "buffer"."""
    *mods, leaf = path.split(".")
    m = root
    for name in mods:
        child = m._modules.get(name)
        if child is None:
            child = nn.Module()
            m.add_module(name, child)
        m = child
    if kind == "buffer":
        m.register_buffer(leaf, tensor)
    else:
        m.register_parameter(leaf, nn.Parameter(tensor, requires_grad=kind == "param"))


def _get(root: nn.Module, path: str) -> torch.Tensor:
    return reduce(getattr, path.split("."), root)


class TopKRouter(nn.Module):
    """The router module: its weight (``weight [E, H]``, or deeper, e.g. HunYuan's ``wg.weight``) and, when declared,
    the selection bias (``e_score_correction_bias [E]`` fp32, or ERNIE's ``moe_statics.e_score_correction_bias [1,
    E]``) and the logit bias (gpt-oss ``bias [E]``), under v5's names so state dicts line up.

    ``forward(hidden [..., H]) -> (router_logits [T, E], topk_weights [T, k] fp32, topk_idx [T, k])``, v5's contract
    (or what the declaration says v5's router returns, e.g. Llama 4's ``(scores [T, E], router_logits)``: transformers
    records ``router_logits`` from the router's output by position). The decision itself is always left in
    ``self.routing`` as ``(logits, weights, experts)`` for the block, which takes it (and clears it) after each call.
    """

    def __init__(
        self,
        spec: RouterSpec,
        hidden_size: int,
        weight_dtype: torch.dtype | None = None,
        bias_name: str = "e_score_correction_bias",
        device: torch.device | str | None = None,
        *,
        weight_name: str = "weight",
        bias_shape: tuple[int, ...] | None = None,
        bias_kind: str = "buffer",
        bias_dtype: torch.dtype = torch.float32,
        logit_bias_name: str = "bias",
    ) -> None:
        super().__init__()
        self.spec = spec
        self.hidden_dim = hidden_size
        self.top_k = spec.top_k
        self.num_experts = spec.num_experts
        self.routing: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        E = spec.num_experts
        self._weight_name = weight_name
        _register(self, weight_name, torch.zeros(E, hidden_size, dtype=weight_dtype, device=device), "param")
        self._logit_bias_name = logit_bias_name if spec.has_logit_bias else None
        if spec.has_logit_bias:
            _register(self, logit_bias_name, torch.zeros(E, dtype=weight_dtype, device=device), "param")
        self._bias_name = bias_name if spec.has_bias else None
        if spec.has_bias:
            _register(self, bias_name, torch.zeros(bias_shape or (E,), dtype=bias_dtype, device=device), bias_kind)

    @property
    def router_weight(self) -> torch.Tensor:
        return _get(self, self._weight_name)

    @property
    def correction_bias(self) -> torch.Tensor | None:
        return _get(self, self._bias_name) if self._bias_name else None

    @property
    def logit_bias(self) -> torch.Tensor | None:
        return _get(self, self._logit_bias_name) if self._logit_bias_name else None

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, ...]:
        logits, w, idx = route(
            self.spec,
            hidden_states.reshape(-1, self.hidden_dim),
            self.router_weight,
            self.correction_bias,
            self.logit_bias,
            training=self.training,
        )
        self.routing = (logits, w, idx)
        if self.spec.returns == ("logits", "weights", "experts"):
            return logits, w, idx
        out = {"logits": logits, "weights": w, "experts": idx}
        if "scores" in self.spec.returns:  # v5 Llama 4: sigmoid of the chosen logits scattered into a row of zeros
            out["scores"] = torch.zeros_like(logits, dtype=w.dtype).scatter(1, idx, w).to(logits.dtype)
        return tuple(out[k] for k in self.spec.returns)

    def extra_repr(self) -> str:
        s = self.spec
        return (
            f"experts={s.num_experts}, top_k={s.top_k}, scoring={s.scoring}, "
            f"score_before_topk={s.softmax_before_topk}, "
            f"norm_topk_prob={s.norm_topk_prob}, groups={s.topk_group}/{s.n_group}, scale={s.routed_scaling_factor}"
        )

"""The MoE block: router -> dispatcher -> this rank's experts -> combine (+ shared experts), a drop-in for the v5 block.

Every v5 MoE block of the declared families is called as ``block(hidden_states [B, S, H])`` and returns one tensor of
the same shape (Qwen3MoeSparseMoeBlock, MixtralSparseMoeBlock, DeepseekV3MoE, NemotronHMoE all do), so ours does too;
where the family declares that its block returns a pair (Llama 4: router logits; gpt-oss: routing weights), ours
returns the same pair. Multiplicative input jitter (Mixtral, MiniMax, PhiMoE) is drawn in training as v5 draws it.

Submodule names come from the family declaration (with v5's renames applied), relative to the block, e.g. ``gate``
(router), ``experts``, ``shared_experts``; parameter names inside them are v5's, so the block's state-dict keys are
exactly the v5 block's (the expert tensors holding this rank's ``E / ep`` experts instead of all ``E``).
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn

from ..families.declaration import Family, config_value
from .dispatch import LocalDispatcher
from .experts import GroupedExperts, SharedExpertsMLP
from .router import RouterSpec, TopKRouter


class MoEBlock(nn.Module):
    def __init__(
        self,
        router: TopKRouter,
        experts: GroupedExperts,
        dispatcher: Any = None,
        *,
        router_name: str = "gate",
        experts_name: str = "experts",
        shared: nn.Module | None = None,
        shared_name: str = "shared_experts",
        shared_gate: nn.Linear | None = None,
        shared_gate_name: str = "shared_expert_gate",
        returns: tuple[str, ...] = ("hidden",),
    ) -> None:
        super().__init__()
        if returns[:1] != ("hidden",) or not set(returns[1:]) <= {"logits", "weights"}:
            raise ValueError(f"a block returns ('hidden', ['logits' | 'weights']), not {returns}")
        self.returns = tuple(returns)
        self._router_name, self._experts_name = router_name, experts_name
        self._shared_name = shared_name if shared is not None else None
        self._shared_gate_name = shared_gate_name if shared_gate is not None else None
        for name, mod in ((router_name, router), (experts_name, experts)):
            if isinstance(getattr(type(self), name, None), property):
                # v5 names the router `router` (gpt-oss, Llama 4, PhiMoE): our property of that name returns it
                self._modules[name] = mod
            else:
                self.add_module(name, mod)
        if shared is not None:
            self.add_module(shared_name, shared)
        if shared_gate is not None:
            self.add_module(shared_gate_name, shared_gate)
        self.dispatcher = dispatcher if dispatcher is not None else LocalDispatcher(router.num_experts)
        if self.dispatcher.num_local_experts != experts.num_local_experts:
            raise ValueError(
                f"dispatcher gives this rank {self.dispatcher.num_local_experts} experts, the experts module holds "
                f"{experts.num_local_experts}"
            )

    @property
    def router(self) -> TopKRouter:
        return self._modules[self._router_name]  # type: ignore[return-value]

    @property
    def routed_experts(self) -> GroupedExperts:
        return self._modules[self._experts_name]  # type: ignore[return-value]

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        spec = getattr(self.router, "spec", None)
        for j in spec.input_jitter if self.training and spec is not None else ():
            if j > 0:  # in place, as v5 does: MiniMax's decoder layer reuses this very tensor as its residual
                hidden_states *= torch.empty_like(hidden_states).uniform_(1.0 - j, 1.0 + j)
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])
        routed = self.router(x)  # called as a module: transformers' output recorders hook it
        logits, topk_weights, topk_idx = getattr(self.router, "routing", None) or routed
        self.router.routing = None
        recv_x, recv_idx, recv_w, handle = self.dispatcher.dispatch(x, topk_idx, topk_weights)
        experts = self.routed_experts
        # the local dispatcher hands over the router's ids, all valid: the experts then run without a host sync
        experts.assume_local_ids = bool(getattr(self.dispatcher, "all_slots_local", False))
        try:
            y = experts(recv_x, recv_idx, recv_w)
        finally:
            experts.assume_local_ids = False
        out = self.dispatcher.combine(y, handle).view(shape)
        if self._shared_name is not None:
            shared = getattr(self, self._shared_name)(hidden_states)
            if self._shared_gate_name is not None:
                shared = torch.sigmoid(getattr(self, self._shared_gate_name)(hidden_states)) * shared
            out = out + shared
        if len(self.returns) == 1:
            return out
        extra = {"logits": logits, "weights": topk_weights.to(out.dtype)}
        return (out, *(extra[r] for r in self.returns[1:]))


# --- building from a declaration -----------------------------------------------------------------------------------


def _relative(name: str, block: str, what: str) -> list[str]:
    if not name.startswith(block + "."):
        raise ValueError(f"the declared {what} {name!r} is not inside the MoE block {block!r}")
    return name[len(block) + 1 :].split(".")


def block_prefix(family: Family, layer: int) -> str:
    """The v5 name of layer `layer`'s MoE block: the parent of its experts (``model.layers.3.mlp``)."""
    return family.fused_expert_prefix(layer).rsplit(".", 1)[0]


_RECORDABLE: dict[tuple[type, type], type] = {}


def recordable_as(module: nn.Module, template_cls: type) -> nn.Module:
    """Make `module` an instance of `template_cls` as well, without running its ``__init__``.

    transformers v5 records ``router_logits`` (for ``output_router_logits`` and the aux loss) with a forward hook
    on every module that ``isinstance``s the family's router class; our router returns the same ``(logits, weights,
    idx)`` tuple, so inheriting the class name is all the hook needs. Our ``forward`` comes first in the MRO.
    (The class is made at run time, so ``torch.save(model)`` of the whole module object cannot pickle it; state
    dicts and ``save_pretrained`` are unaffected.)
    """
    if template_cls is None or isinstance(module, template_cls):
        return module
    key = (type(module), template_cls)
    cls = _RECORDABLE.get(key)
    if cls is None:
        cls = type(f"{type(module).__name__}As{template_cls.__name__}", (type(module), template_cls), {})
        _RECORDABLE[key] = cls
    module.__class__ = cls
    if issubclass(template_cls, nn.Linear):  # PhiMoE's and Llama 4's routers are nn.Linear: code walking Linears
        w = module.weight  # (v5's _init_weights, PEFT) reads these attributes
        module.out_features, module.in_features = int(w.shape[0]), int(w.shape[1])
        if "bias" not in module._parameters and "bias" not in module._buffers:
            module.bias = None
    return module


def build_moe_block(
    family: Family,
    cfg: Mapping[str, Any],
    layer: int,
    *,
    dispatcher: Any = None,
    backend: str = "auto",
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    template: nn.Module | None = None,
) -> MoEBlock:
    """Our block for MoE layer `layer` of a `family` model with config `cfg` (a dict).

    `template`, the v5 block it replaces (may live on the meta device), supplies parameter dtypes (v5 keeps the
    sigmoid routers in fp32) and is checked against: the new block must hold exactly the template's parameter and
    buffer names with the same shapes (expert tensors: this rank's slice), else ``ValueError`` names the difference.
    """
    num_experts = family.expert_count(cfg)
    dispatcher = dispatcher if dispatcher is not None else LocalDispatcher(num_experts)
    if dispatcher.num_experts != num_experts:
        raise ValueError(f"dispatcher built for {dispatcher.num_experts} experts, the config has {num_experts}")
    hidden = int(config_value(cfg, "hidden_size"))
    block = block_prefix(family, layer)
    tmpl = dict(template.state_dict(keep_vars=True)) if template is not None else {}

    def dtype_of(rel: str) -> torch.dtype | None:
        t = tmpl.get(rel)
        return t.dtype if t is not None else dtype

    ex = family.experts
    experts_name = family.fused_expert_prefix(layer).rsplit(".", 1)[1]
    in_name = f"{experts_name}.{'gate_up_proj' if ex.gated else 'up_proj'}"
    first = dispatcher.ep_rank * dispatcher.num_local_experts
    rd = family.router
    experts = GroupedExperts(
        dispatcher.num_local_experts,
        hidden,
        int(config_value(cfg, family.moe_intermediate_size)),
        gated=ex.gated,
        act=ex.activation,
        backend=backend,
        first_expert=first,
        num_experts=num_experts,
        dtype=dtype_of(in_name),
        device=device,
        transposed=ex.transposed,
        gate_up=ex.gate_up,
        bias=ex.bias,
        act_args={a[0]: float(config_value(cfg, a[1], *a[2:])) for a in ex.activation_args},
        scale_input=rd.scale_input,
    )

    # the router module is the block's child named first in the declared router weight; its tensors may sit deeper
    r_parts = _relative(family.to_fused_name(rd.weight.format(L=layer)), block, "router weight")
    if len(r_parts) < 2 or r_parts[-1] != "weight":
        raise ValueError(f"router weight must be <module>[.<sub>].weight inside the block, got {'.'.join(r_parts)!r}")
    router_name, weight_path = r_parts[0], ".".join(r_parts[1:])

    def inside_router(published: str, what: str) -> str:
        parts = _relative(family.to_fused_name(published.format(L=layer)), block, what)
        if len(parts) < 2 or parts[0] != router_name:
            raise ValueError(f"the {what} must sit inside the router module {router_name!r}, got {'.'.join(parts)!r}")
        return ".".join(parts[1:])

    bias_name = inside_router(rd.bias, "router bias") if rd.bias is not None else "e_score_correction_bias"
    logit_bias_name = inside_router(rd.logit_bias, "router logit bias") if rd.logit_bias is not None else "bias"
    bias_t = tmpl.get(f"{router_name}.{bias_name}")  # v5: an fp32 buffer [E] (ERNIE: a frozen parameter [1, E])
    spec = RouterSpec.from_declaration(rd, cfg, num_experts)
    router = TopKRouter(
        spec,
        hidden,
        weight_dtype=dtype_of(f"{router_name}.{weight_path}"),
        bias_name=bias_name,
        device=device,
        weight_name=weight_path,
        bias_shape=tuple(bias_t.shape) if bias_t is not None else None,
        bias_kind="frozen" if isinstance(bias_t, nn.Parameter) else "buffer",
        bias_dtype=bias_t.dtype if bias_t is not None else torch.float32,
        logit_bias_name=logit_bias_name,
    )
    if template is not None:
        recordable_as(router, type(template.get_submodule(router_name)))

    shared = shared_gate = None
    shared_name, shared_gate_name = "shared_experts", "shared_expert_gate"
    if family.shared is not None:
        sd = family.shared
        s_parts = _relative(family.to_fused_name(sd.prefix.format(L=layer)), block, "shared experts")
        if len(s_parts) != 1:
            raise ValueError(f"shared experts must be a direct child of the block, got {'.'.join(s_parts)!r}")
        shared_name = s_parts[0]
        size = int(config_value(cfg, sd.intermediate_size))
        if sd.count is not None:
            size *= int(config_value(cfg, sd.count, 1))
        bias = f"{shared_name}.{sd.up}.bias" in tmpl
    if family.shared is not None and size > 0:  # a count of 0 (ERNIE moe_num_shared_experts: 0): no shared MLP
        shared = SharedExpertsMLP(
            hidden,
            size,
            gate=sd.gate,
            up=sd.up,
            down=sd.down,
            act=ex.activation,
            bias=bias,
            dtype=dtype_of(f"{shared_name}.{sd.up}.weight"),
            device=device,
        )
        if sd.output_gate is not None:
            g_parts = _relative(family.to_fused_name(sd.output_gate.format(L=layer)), block, "shared output gate")
            if len(g_parts) != 2 or g_parts[1] != "weight":
                raise ValueError(f"shared output gate must be <module>.weight, got {'.'.join(g_parts)!r}")
            shared_gate_name = g_parts[0]
            shared_gate = nn.Linear(hidden, 1, bias=False, dtype=dtype_of(f"{shared_gate_name}.weight"), device=device)

    out = MoEBlock(
        router,
        experts,
        dispatcher,
        router_name=router_name,
        experts_name=experts_name,
        shared=shared,
        shared_name=shared_name,
        shared_gate=shared_gate,
        shared_gate_name=shared_gate_name,
        returns=family.block_returns,
    )
    if template is not None:
        # v5 blocks register their children in different orders (Qwen3: experts, gate; Mixtral: gate, experts):
        # follow the template so state-dict key order is v5's too
        order = {name: i for i, (name, _) in enumerate(template.named_children())}
        out._modules = dict(sorted(out._modules.items(), key=lambda kv: order.get(kv[0], len(order))))
        check_matches_template(out, template, experts_name, dispatcher.ep_size)
    return out


def check_matches_template(block: nn.Module, template: nn.Module, experts_name: str, ep_size: int) -> None:
    """Same state-dict names as the v5 block, same shapes except the expert dim divided by `ep_size`."""
    ours = {k: tuple(v.shape) for k, v in block.state_dict(keep_vars=True).items()}
    theirs = {k: tuple(v.shape) for k, v in template.state_dict(keep_vars=True).items()}
    if set(ours) != set(theirs):
        missing = sorted(set(theirs) - set(ours))
        extra = sorted(set(ours) - set(theirs))
        raise ValueError(
            f"the family declaration does not describe this transformers block ({type(template).__name__}): "
            f"v5 has {missing or 'nothing more'}, ours has {extra or 'nothing more'} in addition"
        )
    for k, shape in theirs.items():
        want = shape
        if k.startswith(experts_name + "."):
            want = (shape[0] // ep_size,) + shape[1:]
        if ours[k] != want:
            raise ValueError(f"{k}: the declaration gives shape {ours[k]}, transformers v5 has {shape} (EP {ep_size})")


def copy_block_weights(ours: MoEBlock, theirs: nn.Module) -> None:
    """Load a v5 block's weights into ours (this rank's expert slice), for tests and in-memory conversion."""
    first = ours.routed_experts.first_expert
    n = ours.routed_experts.num_local_experts
    prefix = ours._experts_name + "."
    src = theirs.state_dict()
    sd = {k: (v[first : first + n] if k.startswith(prefix) else v) for k, v in src.items()}
    ours.load_state_dict(sd, strict=True)


__all__ = [
    "MoEBlock",
    "block_prefix",
    "build_moe_block",
    "check_matches_template",
    "copy_block_weights",
    "recordable_as",
]

"""The two layouts of a family's weights, and the exact map between them, computed on headers alone.

`canonical` is the published Hugging Face layout: per-expert tensors under the family's original names. `fused` is
transformers v5's in-memory layout: one `[E, ...]` parameter per projection and layer (`gate_up_proj` holds each
expert's gate rows then its up rows), v5's renames applied, and the expert dim split into EP blocks.

Both directions are compositions of converters ops (Stack/Unstack, Concat/Split, Rename), so every tensor of one
layout is an exact list of byte ranges of the other.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable

from .converters import ByteTensor, Concat, LayoutError, Split, Stack, Unstack, even_split
from .converters import rename_all, unrename_all
from .families import ConfigError, Family
from .families.declaration import FUSED_SUFFIXES
from .errors import CheckpointError, ModelError

if TYPE_CHECKING:
    from .checkpoint import Checkpoint


def natural_key(name: str) -> list[object]:
    """Sort key that orders layer/expert numbers numerically (layers.2 before layers.10)."""
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


@dataclass(frozen=True)
class FusedParam:
    """One fused v5 parameter of one MoE layer, e.g. `model.layers.3.mlp.experts.gate_up_proj_scale_inv`."""

    layer: int
    name: str  # fused (v5) name
    projs: tuple[str, ...]  # per-expert projections concatenated on dim 0 of each expert's tensor, in order
    tensor: str  # per-expert tensor kind: "weight", "weight_scale_inv", "bias"


class ExpertMap:
    """Everything the engine needs to know about a family's experts for one config."""

    def __init__(self, family: Family, config: dict, num_experts: int | None = None, moe_layers: list[int] | None = None):
        self.family = family
        self.config = config
        try:
            self.num_experts = int(num_experts if num_experts is not None else family.expert_count(config))
            self.moe_layers = list(moe_layers if moe_layers is not None else family.moe_layer_ids(config))
        except ConfigError as e:
            raise ModelError(f"{e} (family {family.name})", file="config.json") from None
        ex = family.experts
        self._expert_rx = {
            L: re.compile(re.escape(family.hf_expert_prefix(L)) + r"\.(\d+)\.([^.]+)\.(.+)$") for L in self.moe_layers
        }
        self.params: list[FusedParam] = []
        for L in self.moe_layers:
            prefix = family.fused_expert_prefix(L)
            for base, projs in ex.fused_params():
                for tensor in ex.tensors:
                    self.params.append(FusedParam(L, f"{prefix}.{base}{FUSED_SUFFIXES[tensor]}", projs, tensor))
        self.param_by_name = {p.name: p for p in self.params}

    def hf_name(self, layer: int, expert: int, proj: str, tensor: str) -> str:
        return f"{self.family.hf_expert_prefix(layer)}.{expert}.{proj}.{tensor}"

    def split_expert_key(self, name: str) -> tuple[int, int, str, str] | None:
        """(layer, expert, proj, tensor) when `name` is a per-expert key of a MoE layer."""
        for L, rx in self._expert_rx.items():
            m = rx.match(name)
            if m:
                return L, int(m.group(1)), m.group(2), m.group(3)
        return None

    # --- names of everything else ---------------------------------------------------------------------------------

    def dense_fused_name(self, hf_name: str) -> str:
        fused = rename_all(self.family.renames, hf_name)
        if unrename_all(self.family.renames, fused) != hf_name:
            raise ModelError(
                f"the family's renames are not reversible for this key (-> {fused!r}); it cannot round-trip",
                tensor=hf_name,
            )
        return fused

    def dense_hf_name(self, fused_name: str) -> str:
        return unrename_all(self.family.renames, fused_name)


def detect_layout(ckpt: "Checkpoint") -> str:
    """'packed' when the files already hold v5's fused expert parameters (save_original_format=False), else 'hf'."""
    try:
        emap = ExpertMap(ckpt.family, ckpt.config)
    except ModelError:
        return "hf"
    names = (e.name for h in ckpt.headers.values() for e in h.tensors)
    return "packed" if any(n in emap.param_by_name for n in names) else "hf"


# --- HF (canonical) -> fused ---------------------------------------------------------------------------------------


@dataclass
class FusedTensors:
    """A fused layout, planned: shared tensors (stored once) and each EP rank's expert tensors."""

    dense: list[tuple[str, ByteTensor]]
    ranks: list[list[tuple[str, ByteTensor]]]
    expert_ranges: list[tuple[int, int]]


def _where(t: ByteTensor) -> str | None:
    return t.segments[0].source if t.segments else None


def fuse(canonical: dict[str, ByteTensor], emap: ExpertMap, ep_size: int) -> FusedTensors:
    """Plan the fused layout at `ep_size` from canonical tensors (ordered), validating every expert."""
    E = emap.num_experts
    if ep_size < 1 or E % ep_size:
        raise ModelError(f"EP size {ep_size} does not divide the {E} experts per layer (choose a divisor of {E})")
    sizes = even_split(E, ep_size)
    ranges = [(r * sizes[0], (r + 1) * sizes[0]) for r in range(ep_size)]

    # Group the per-expert keys of MoE layers; everything else is dense.
    found: dict[tuple[int, str, str], dict[int, str]] = {}
    experts_seen: dict[int, set[int]] = {L: set() for L in emap.moe_layers}
    dense: list[tuple[str, ByteTensor]] = []
    declared = {(proj, p.tensor) for p in emap.params for proj in p.projs}
    for name, t in canonical.items():
        key = emap.split_expert_key(name)
        if key is None:
            dense.append((emap.dense_fused_name(name), t))
            continue
        L, e, proj, tensor = key
        if (proj, tensor) not in declared:
            raise ModelError(
                f"unexpected per-expert tensor for family {emap.family.name} (declared: "
                f"{', '.join(sorted(p + '.' + k for p, k in declared))})",
                file=_where(t),
                tensor=name,
            )
        if e >= E:
            raise ModelError(f"expert {e} is beyond the config's {E} experts", file=_where(t), tensor=name)
        found.setdefault((L, proj, tensor), {})[e] = name
        experts_seen[L].add(e)

    ranks: list[list[tuple[str, ByteTensor]]] = [[] for _ in range(ep_size)]
    for L in emap.moe_layers:
        if not experts_seen[L]:
            raise ModelError(
                f"config says layer {L} is MoE but the checkpoint has no expert tensors for it (looked for "
                f"{emap.hf_name(L, 0, emap.params[0].projs[0], 'weight')})"
            )
    for p in emap.params:
        present = [found.get((p.layer, proj, p.tensor), {}) for proj in p.projs]
        if not any(present):
            if p.tensor == "weight":
                raise ModelError(
                    f"layer {p.layer} has no {'/'.join(p.projs)} expert weights",
                    tensor=emap.hf_name(p.layer, 0, p.projs[0], "weight"),
                )
            continue  # e.g. no FP8 scales in a bf16 checkpoint
        per_expert = []
        for e in range(E):
            parts = []
            for proj, have in zip(p.projs, present):
                if e not in have:
                    raise ModelError("missing expert tensor", tensor=emap.hf_name(p.layer, e, proj, p.tensor))
                parts.append(canonical[have[e]])
            try:
                per_expert.append(Concat(0).apply(parts)[0] if len(parts) > 1 else parts[0])
            except LayoutError as err:
                raise ModelError(f"cannot fuse: {err}", tensor=emap.hf_name(p.layer, e, p.projs[0], p.tensor)) from None
        try:
            full = Stack().apply(per_expert)[0]
        except LayoutError as err:
            ref = per_expert[0]
            odd = next((e for e, t in enumerate(per_expert) if (t.shape, t.dtype) != (ref.shape, ref.dtype)), 0)
            raise ModelError(
                f"experts of different shapes or dtypes: {err}", tensor=emap.hf_name(p.layer, odd, p.projs[0], p.tensor)
            ) from None
        for r, part in enumerate(Split(0, sizes).apply([full])):
            ranks[r].append((p.name, part))
    return FusedTensors(dense, ranks, ranges)


# --- fused -> HF (canonical) ---------------------------------------------------------------------------------------


def unfuse_param(p: FusedParam, full: ByteTensor, emap: ExpertMap) -> list[tuple[str, ByteTensor]]:
    """Per-expert HF tensors of one full fused parameter (all E experts)."""
    if full.shape[0] != emap.num_experts:
        raise ModelError(f"holds {full.shape[0]} experts, the manifest/config says {emap.num_experts}", tensor=p.name)
    out: list[tuple[str, ByteTensor]] = []
    n = len(p.projs)
    for e, t in enumerate(Unstack().apply([full])):
        if t.shape[0] % n:
            raise ModelError(f"dim 1 ({t.shape[0]}) does not split into {n} equal parts", tensor=p.name)
        pieces = Split(0, (t.shape[0] // n,) * n).apply([t]) if n > 1 else [t]
        for proj, piece in zip(p.projs, pieces):
            out.append((emap.hf_name(p.layer, e, proj, p.tensor), piece))
    return out


def canonical_view(ckpt: "Checkpoint") -> tuple[dict[str, ByteTensor], ExpertMap]:
    """Every tensor of `ckpt` under its published HF name, as byte ranges of the stored files."""
    stored = ckpt.stored()
    if ckpt.layout == "hf":
        emap = ExpertMap(ckpt.family, ckpt.config)
        return {s.name: s.header.ref(s.entry) for s in stored}, emap
    m = ckpt.manifest or {}
    emap = ExpertMap(
        ckpt.family, ckpt.config, num_experts=m.get("num_experts"), moe_layers=m.get("moe_layers")
    )
    ep = ckpt.ep_size
    parts: dict[str, list[ByteTensor | None]] = {}
    dense: list[tuple[str, ByteTensor]] = []
    for s in stored:
        if s.name in emap.param_by_name:
            rank = s.rank if ckpt.layout == "fused" else 0
            if rank is None or not 0 <= rank < ep:
                raise CheckpointError("fused expert tensor in a file of no valid EP rank", file=s.header.path, tensor=s.name)
            slot = parts.setdefault(s.name, [None] * ep)
            if slot[rank] is not None:
                raise CheckpointError("expert tensor stored twice for one rank", file=s.header.path, tensor=s.name)
            slot[rank] = s.header.ref(s.entry)
        else:
            dense.append((s.name, s.header.ref(s.entry)))
    out: dict[str, ByteTensor] = {}
    for name, t in dense:
        out[emap.dense_hf_name(name)] = t
    for name, slot in parts.items():
        missing = [r for r, t in enumerate(slot) if t is None]
        if missing:
            raise CheckpointError(f"no part for EP rank(s) {missing}", file=ckpt.root, tensor=name)
        try:
            full = Concat(0).apply(slot)[0] if ep > 1 else slot[0]  # type: ignore[arg-type]
        except LayoutError as e:
            raise CheckpointError(f"EP parts do not fit together: {e}", file=ckpt.root, tensor=name) from None
        for hf, t in unfuse_param(emap.param_by_name[name], full, emap):
            if hf in out:
                raise CheckpointError("tensor appears both fused and unfused", file=ckpt.root, tensor=hf)
            out[hf] = t
    return dict(sorted(out.items(), key=lambda kv: natural_key(kv[0]))), emap


def full_fused_view(canonical: dict[str, ByteTensor], emap: ExpertMap) -> dict[str, ByteTensor]:
    """v5 names -> tensors at EP=1 (for rebuilding a packed source, and for the runtime loader)."""
    f = fuse(canonical, emap, 1)
    return dict(f.dense + f.ranks[0])


def names_in(items: Iterable[tuple[str, ByteTensor]]) -> list[str]:
    return [n for n, _ in items]

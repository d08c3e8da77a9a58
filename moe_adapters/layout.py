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
from .families import ConfigError, Family, config_value
from .families.declaration import FUSED_SUFFIXES
from .errors import CheckpointError, ModelError

if TYPE_CHECKING:
    from .checkpoint import Checkpoint

# Far above any real model (hundreds of layers, hundreds of experts), far below what would let a hostile config
# make us build millions of objects before the first check against the tensors.
MAX_LAYERS = 1 << 14
MAX_EXPERTS = 1 << 16


def natural_key(name: str) -> list[object]:
    """Sort key that orders layer/expert numbers numerically (layers.2 before layers.10)."""
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


@dataclass(frozen=True)
class FusedParam:
    """One fused v5 parameter of one MoE layer, e.g. `model.layers.3.mlp.experts.gate_up_proj_scale_inv`."""

    layer: int
    name: str  # fused (v5) name
    projs: tuple[str, ...]  # per-expert projections concatenated on dim 0 of each expert's tensor, in order
    tensor: str  # per-expert tensor kind: "weight", "weight_scale_inv", "bias"; stacked: the v5 parameter name
    stored: str | None = None  # experts already stacked in the checkpoint: the published name of this [E, ...] tensor


class ExpertMap:
    """Everything the engine needs to know about a family's experts for one config."""

    def __init__(self, family: Family, config: dict, num_experts: int | None = None, moe_layers: list[int] | None = None):
        self.family = family
        self.config = config
        try:
            self.num_experts = int(num_experts if num_experts is not None else family.expert_count(config))
            self.moe_layers = list(moe_layers if moe_layers is not None else family.moe_layer_ids(config))
        except (ConfigError, TypeError, ValueError, OverflowError) as e:  # a config.json value of the wrong type
            raise ModelError(f"{str(e)[:200]} (family {family.name})", file="config.json") from None
        if not 1 <= self.num_experts <= MAX_EXPERTS:
            raise ModelError(f"{self.num_experts} experts per layer is not a usable count", file="config.json")
        if len(self.moe_layers) > MAX_LAYERS or not all(type(L) is int and L >= 0 for L in self.moe_layers):
            raise ModelError("the MoE layer list is not a list of layer numbers", file="config.json")
        ex = family.experts
        # One regex for every layer: the template's {L} becomes a group, checked against the MoE layer set.
        head, _, tail = ex.prefix.partition("{L}")
        self._expert_rx = re.compile(re.escape(head) + r"(\d+)" + re.escape(tail) + r"\.(\d+)\.([^.]+)\.(.+)$")
        self._moe_set = set(self.moe_layers)
        self.params: list[FusedParam] = []
        for L in self.moe_layers:
            prefix = family.fused_expert_prefix(L)
            if ex.stacked:  # one [E, ...] tensor per parameter, published under the un-renamed v5 name
                for param, _, _ in ex.stacked_params():
                    name = f"{prefix}.{param}"
                    self.params.append(FusedParam(L, name, (), param, stored=unrename_all(family.renames, name)))
                continue
            for base, projs in ex.fused_params():
                for tensor in ex.tensors:
                    self.params.append(FusedParam(L, f"{prefix}.{base}{FUSED_SUFFIXES[tensor]}", projs, tensor))
        self.param_by_name = {p.name: p for p in self.params}
        self.param_by_stored = {p.stored: p for p in self.params if p.stored is not None}

    def hf_name(self, layer: int, expert: int, proj: str, tensor: str) -> str:
        return f"{self.family.hf_expert_prefix(layer)}.{expert}.{proj}.{tensor}"

    def split_expert_key(self, name: str) -> tuple[int, int, str, str] | None:
        """(layer, expert, proj, tensor) when `name` is a per-expert key of a MoE layer."""
        m = self._expert_rx.match(name)
        if m is None or int(m.group(1)) not in self._moe_set:
            return None
        return int(m.group(1)), int(m.group(2)), m.group(3), m.group(4)

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
    # stacked experts published under their v5 names (gpt-oss, Llama 4) are the hf layout, not a packed one
    return "packed" if any(n in emap.param_by_name and emap.param_by_name[n].stored != n for n in names) else "hf"


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
    if emap.family.experts.stacked:
        return _fuse_stacked(canonical, emap, sizes, ranges)

    # Group the per-expert keys of MoE layers; everything else is dense.
    found: dict[tuple[int, str, str], dict[int, str]] = {}
    experts_seen: dict[int, set[int]] = {L: set() for L in emap.moe_layers}
    dense: list[tuple[str, ByteTensor]] = []
    declared = {(proj, p.tensor) for p in emap.params for proj in p.projs}
    num_layers = _config_int(emap.config, ("num_hidden_layers", "n_layers", "num_layers"))
    mtp = _config_int(emap.config, ("num_nextn_predict_layers",)) or 0  # DeepSeek's MTP layers follow the others
    for name, t in canonical.items():
        key = emap.split_expert_key(name)
        if key is None:
            m = emap._expert_rx.match(name)
            if m and num_layers is not None and not num_layers <= int(m.group(1)) < num_layers + mtp:
                where = "makes a dense layer" if int(m.group(1)) < num_layers else f"does not have ({num_layers} layers)"
                raise ModelError(
                    f"an expert tensor in layer {m.group(1)}, which config.json {where}: the config does not match "
                    "the tensors",
                    file=_where(t),
                    tensor=name,
                )
            dense.append((emap.dense_fused_name(name), t))  # e.g. DeepSeek's MTP layer: passed through as stored
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
        slot = found.setdefault((L, proj, tensor), {})
        if e in slot:  # e.g. experts.5 and experts.05: one would silently be dropped
            raise ModelError(f"expert {e} stored twice (also as {slot[e]})", file=_where(t), tensor=name)
        slot[e] = name
        experts_seen[L].add(e)
        _check_expert_shape(emap, proj, tensor, t, name)

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
                    raise ModelError(
                        f"missing expert tensor (config.json says {E} experts per layer)",
                        tensor=emap.hf_name(p.layer, e, proj, p.tensor),
                    )
                parts.append(canonical[have[e]])
            try:
                per_expert.append(Concat(0).apply(parts)[0] if len(parts) > 1 else parts[0])
            except LayoutError as err:
                raise ModelError(
                    f"cannot fuse {'/'.join(p.projs)} of one expert: {err}",
                    file=_where(parts[-1]),
                    tensor=emap.hf_name(p.layer, e, p.projs[0], p.tensor),
                ) from None
        try:
            full = Stack().apply(per_expert)[0]
        except LayoutError as err:
            ref = per_expert[0]
            odd = next((e for e, t in enumerate(per_expert) if (t.shape, t.dtype) != (ref.shape, ref.dtype)), 0)
            raise ModelError(
                f"experts of different shapes or dtypes: {err}",
                file=_where(per_expert[odd]),
                tensor=emap.hf_name(p.layer, odd, p.projs[0], p.tensor),
            ) from None
        for r, part in enumerate(Split(0, sizes).apply([full])):
            ranks[r].append((p.name, part))
    planned = sum(t.nbytes for _, t in dense) + sum(t.nbytes for rank in ranks for _, t in rank)
    if planned != sum(t.nbytes for t in canonical.values()):  # every source byte lands in DST exactly once
        raise ModelError(f"internal: the plan holds {planned} bytes, the source {sum(t.nbytes for t in canonical.values())}")
    return FusedTensors(dense, ranks, ranges)


def _fuse_stacked(
    canonical: dict[str, ByteTensor], emap: ExpertMap, sizes: tuple[int, ...], ranges: list[tuple[int, int]]
) -> FusedTensors:
    """Experts already stacked in the checkpoint ([E, ...] per parameter): rename, split dim 0 by EP rank. Each
    weight must be present in exactly one form (plain, or all tensors of one quantized form), with its bias when
    the declaration has biases; plain weights must have the declared orientation for the config's sizes."""
    E = emap.num_experts
    ex = emap.family.experts
    dense: list[tuple[str, ByteTensor]] = []
    found: dict[str, ByteTensor] = {}
    for name, t in canonical.items():
        p = emap.param_by_stored.get(name)
        if p is None:
            dense.append((emap.dense_fused_name(name), t))
            continue
        if not t.shape or t.shape[0] != E:
            raise ModelError(
                f"stacked expert tensor {list(t.shape)} does not hold config.json's {E} experts on dim 0",
                file=_where(t),
                tensor=name,
            )
        found[p.name] = t
    for L in emap.moe_layers:
        prefix = emap.family.fused_expert_prefix(L)
        for w in (ex.in_proj, ex.down):
            forms = [(w,)] + [tuple(w + suffix for suffix in group) for group in ex.quantized]
            have = [f for f in forms if any(f"{prefix}.{x}" in found for x in f)]
            stored = unrename_all(emap.family.renames, f"{prefix}.{w}")
            if not have:
                raise ModelError(f"layer {L} has no {w} expert weights", tensor=stored)
            if len(have) > 1 or not all(f"{prefix}.{x}" in found for x in have[0]):
                raise ModelError(
                    f"expert weight stored in mixed or incomplete forms ({', '.join(x for f in have for x in f)})",
                    tensor=stored,
                )
            if ex.bias and f"{prefix}.{w}_bias" not in found:
                raise ModelError("missing expert bias", tensor=stored + "_bias")
            if have[0] == (w,):
                _check_stacked_shape(emap, w, found[f"{prefix}.{w}"], stored)
    ranks: list[list[tuple[str, ByteTensor]]] = [[] for _ in sizes]
    for p in emap.params:
        if p.name in found:
            for r, part in enumerate(Split(0, sizes).apply([found[p.name]])):
                ranks[r].append((p.name, part))
    planned = sum(t.nbytes for _, t in dense) + sum(t.nbytes for rank in ranks for _, t in rank)
    source = sum(t.nbytes for t in canonical.values())
    if planned != source:
        raise ModelError(f"internal: the plan holds {planned} bytes, the source {source}")
    return FusedTensors(dense, ranks, ranges)


def _check_stacked_shape(emap: ExpertMap, w: str, t: ByteTensor, name: str) -> None:
    """A stacked weight must have the declared orientation: in_proj [E, 2I, H] (transposed: [E, H, 2I]), down [E, H,
    I] (transposed: [E, I, H]). A square matrix passes either way and is used as declared, never transposed."""
    ex = emap.family.experts
    H = _config_int(emap.config, ("hidden_size",))
    I = _config_int(emap.config, tuple(emap.family.moe_intermediate_size))
    inner = None if I is None else (2 * I if ex.gated else I)
    out_in = (inner, H) if w == ex.in_proj else (H, I)
    want = (emap.num_experts,) + (out_in[::-1] if ex.transposed else out_in)
    if len(t.shape) != 3 or any(x is not None and x != d for x, d in zip(want, t.shape)):
        form = "[E, in, out]" if ex.transposed else "[E, out, in]"
        raise ModelError(
            f"stacked expert weight is {list(t.shape)} but the declaration ({form}) and config.json (hidden_size {H}, "
            f"intermediate size {I}) imply {['?' if x is None else x for x in want]}",
            file=_where(t),
            tensor=name,
        )


def _config_int(config: dict, keys: tuple[str, ...]) -> int | None:
    v = config_value(config, keys, None)
    return v if type(v) is int else None


def _check_expert_shape(emap: ExpertMap, proj: str, tensor: str, t: ByteTensor, name: str) -> None:
    """An expert weight must be [I, H] (gate/up) or [H, I] (down) for the config's sizes: a config.json from
    another model size would otherwise produce a fused folder that no loader can use."""
    if tensor != "weight" or len(t.shape) != 2:
        return
    H = _config_int(emap.config, ("hidden_size",))
    I = _config_int(emap.config, tuple(emap.family.moe_intermediate_size))
    want = (H, I) if proj == emap.family.experts.down else (I, H)
    if any(w is not None and w != d for w, d in zip(want, t.shape)):
        raise ModelError(
            f"expert weight is {list(t.shape)} but config.json implies {['?' if w is None else w for w in want]} "
            f"(hidden_size {H}, intermediate size {I}): the config does not match the tensors",
            file=_where(t),
            tensor=name,
        )


# --- fused -> HF (canonical) ---------------------------------------------------------------------------------------


def unfuse_param(p: FusedParam, full: ByteTensor, emap: ExpertMap) -> list[tuple[str, ByteTensor]]:
    """Per-expert HF tensors of one full fused parameter (all E experts)."""
    if full.shape[0] != emap.num_experts:
        raise ModelError(f"holds {full.shape[0]} experts, the manifest/config says {emap.num_experts}", tensor=p.name)
    if p.stored is not None:  # already stacked in the published form: only the name changes
        return [(p.stored, full)]
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
        hf = emap.dense_hf_name(name)
        if hf in out:  # two stored names for one tensor: one would silently be dropped
            raise CheckpointError(f"stored twice (as {hf} under two names or in two files)", file=ckpt.root, tensor=name)
        out[hf] = t
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

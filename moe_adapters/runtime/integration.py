"""``from moe_adapters import AutoModelForCausalLM``: transformers v5 models with expert-parallel MoE blocks.

``AutoModelForCausalLM.from_pretrained(path, ep_size=None, experts_backend="auto", dispatcher="auto", **kwargs)``

1. builds the transformers v5 model on the meta device (no rank ever allocates all experts),
2. replaces each MoE block named by the family declaration with a :class:`~.layer.MoEBlock` owning experts
   ``[rank * E / ep, (rank + 1) * E / ep)`` of its EP group,
3. reads every tensor from the checkpoint (HF, packed or fused at any EP size) through
   :mod:`moe_adapters.tensor_io`, which reads only the bytes asked for: each rank reads its own experts' rows;
   FP8 block-scaled weights are dequantized one tensor at a time,
4. recomputes the non-persistent buffers (rotary tables) the way v5's own loader does, ties weights, and returns the
   normal ``PreTrainedModel`` (in eval mode, like v5), with ``save_pretrained`` replaced by :func:`save_pretrained`.

Training: every rank feeds its own micro-batch; after ``loss.backward()`` call :func:`sync_gradients` (or wrap the
model in :class:`ExpertParallel`, which does it in ``finish_backward``), then step the optimizer. Dense parameters
are averaged over all ranks; expert parameters are not all-reduced inside their EP group (each rank owns its
experts, and the all-to-all backward has already summed every rank's contribution into them); they are scaled by
``1 / world_size`` (and summed over EP replicas when ``world_size > ep_size``), so that the step equals a single
process's step on the concatenated batch with the mean of the per-rank losses.
"""

from __future__ import annotations

import copy
import json
import os
import re
import types
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator

import torch
import torch.distributed as dist
from torch import nn

from .dispatch import deepep_available, make_dispatcher
from .experts import BACKENDS, te_available
from .layer import MoEBlock, block_prefix, build_moe_block
from .loss import use_fused_cross_entropy
from .norms import use_fused_rms_norms

_FP8 = tuple(getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2") if hasattr(torch, n))
_FP8_NAMES = ("F8_E4M3", "F8_E5M2")  # safetensors dtype names


@dataclass
class EPState:
    """What the runtime needs after loading: groups for gradients and saving, and where the weights came from."""

    ep_size: int
    ep_rank: int
    ep_group: Any  # None without torch.distributed
    expert_dp_group: Any  # ranks holding the same experts (EP replicas); None when there is one replica
    world_size: int
    source: str
    reader: Any  # moe_adapters.tensor_io.WeightReader of the source
    dispatcher: str
    experts_backend: str
    dequantized: bool = False
    moe_blocks: dict[str, MoEBlock] = field(default_factory=dict)

    def __deepcopy__(self, memo: dict) -> "EPState":
        """A copied model (a reference or EMA model) shares the process groups and the source reader; its block
        map points at the copied blocks."""
        new = copy.copy(self)
        memo[id(self)] = new
        new.moe_blocks = copy.deepcopy(self.moe_blocks, memo)
        return new


def _dist_on() -> bool:
    return dist.is_available() and dist.is_initialized()


def _groups(ep_size: int | None) -> tuple[int, int, Any, Any, int]:
    """(ep_size, ep_rank, ep_group, expert_dp_group, world): EP groups are consecutive ranks; every rank creates every
    group (``new_group`` is collective)."""
    if not _dist_on():
        if ep_size not in (None, 1):
            raise RuntimeError(f"ep_size={ep_size} needs torch.distributed initialised (torchrun + init_process_group)")
        return 1, 0, None, None, 1
    world, rank = dist.get_world_size(), dist.get_rank()
    ep = world if ep_size is None else int(ep_size)
    if ep < 1 or world % ep:
        raise ValueError(f"ep_size={ep} must divide the world size {world}")
    if ep == world:
        return ep, rank, dist.group.WORLD, None, world
    ep_group = edp_group = None
    for g in range(world // ep):
        ranks = list(range(g * ep, (g + 1) * ep))
        grp = dist.new_group(ranks)
        if rank in ranks:
            ep_group = grp
    for r in range(ep):
        ranks = list(range(r, world, ep))
        grp = dist.new_group(ranks)
        if rank in ranks:
            edp_group = grp
    return ep, rank % ep, ep_group, edp_group, world


def _resolve_path(path: str | os.PathLike, revision: str | None, token: Any) -> str:
    path = str(path)
    if os.path.isdir(path):
        return path
    from huggingface_hub import snapshot_download  # noqa: PLC0415
    from huggingface_hub.utils import HFValidationError, validate_repo_id  # noqa: PLC0415

    try:
        validate_repo_id(path)
    except HFValidationError:
        raise FileNotFoundError(f"{path}: no such checkpoint folder (and not a Hub repo id ORG/NAME)") from None

    kw = {"revision": revision, "token": token, "allow_patterns": ["*.json", "*.safetensors", "*.txt", "*.model"]}
    if _dist_on() and dist.get_rank() != 0:
        dist.barrier()  # rank 0 downloads first; the others then find the files in the cache
        return snapshot_download(path, **kw)
    out = snapshot_download(path, **kw)
    if _dist_on():
        dist.barrier()
    return out


def _dtype_from(value: Any, config: Any, fp8_source: bool) -> torch.dtype:
    if isinstance(value, torch.dtype):
        return value
    if value in (None, "auto"):
        if fp8_source:
            return torch.bfloat16
        value = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or torch.float32
        if isinstance(value, torch.dtype):
            return value
    if isinstance(value, str) and hasattr(torch, value) and isinstance(getattr(torch, value), torch.dtype):
        return getattr(torch, value)
    raise ValueError(f"cannot use dtype {value!r}")


def _fp32_patterns(model: nn.Module, dtype: torch.dtype) -> re.Pattern | None:
    """v5's ``_keep_in_fp32_modules(_strict)`` as a regex over parameter names (v5 applies it when loading)."""
    plan = getattr(model, "_get_dtype_plan", lambda d: {})(dtype) or {}
    if not plan:
        return None
    return re.compile("|".join(f"(?:{p.replace('*', '.*')})" for p in plan))


def _set_tensor(model: nn.Module, name: str, value: torch.Tensor, requires_grad: bool) -> None:
    mod_name, _, attr = name.rpartition(".")
    mod = model.get_submodule(mod_name) if mod_name else model
    if attr in mod._parameters:
        mod._parameters[attr] = nn.Parameter(value, requires_grad=requires_grad and value.is_floating_point())
    elif attr in mod._buffers:
        mod._buffers[attr] = value
    else:
        raise KeyError(name)


def _fix_nonpersistent_buffers(model: nn.Module, device: torch.device) -> None:
    """Non-persistent buffers (rotary ``inv_freq``) were computed on meta: rebuild them as v5's loader does, by
    running the model's ``_init_weights`` on their module, and check every value was written."""
    owners: dict[str, nn.Module] = {}
    for mod_name, mod in model.named_modules():
        for b_name, buf in list(mod._buffers.items()):
            if buf is not None and buf.is_meta:
                fill = torch.full_like(buf, float("nan"), device=device) if buf.is_floating_point() else None
                mod._buffers[b_name] = fill if fill is not None else torch.zeros_like(buf, device=device)
                owners[mod_name] = mod
    init = getattr(model, "_init_weights", None)
    for mod_name, mod in owners.items():
        if init is not None:
            with torch.no_grad():
                init(mod)
        for b_name, buf in mod._buffers.items():
            if buf is not None and buf.is_floating_point() and torch.isnan(buf).any():
                raise RuntimeError(
                    f"cannot rebuild buffer {mod_name}.{b_name}: transformers' _init_weights left it unset"
                )


class AutoModelForCausalLM:
    """Drop-in for ``transformers.AutoModelForCausalLM`` whose MoE blocks are expert-parallel."""

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        ep_size: int | None = None,
        experts_backend: str = "auto",
        dispatcher: str = "auto",
        fused_rms_norm: bool = True,
        fused_cross_entropy: bool = False,
        **kwargs: Any,
    ):
        """Load a causal LM with this rank's experts only. ``ep_size`` defaults to the torch.distributed world size
        (1 without a process group); it must divide the world size (ranks ``[g*ep, (g+1)*ep)`` form EP group g).

        Keyword arguments understood as in transformers: ``dtype`` / ``torch_dtype`` (default ``"auto"``: the
        config's dtype; bf16 for FP8 checkpoints, which are dequantized), ``attn_implementation``, ``revision``,
        ``token``, ``trust_remote_code``; ``device`` (default: the current CUDA device, else CPU); ``family`` (a
        family name, when the config does not identify it). Other keywords override config attributes, as in
        transformers. ``device_map`` and quantization are not supported (every rank holds its whole shard).

        ``fused_rms_norm``: RMSNorms whose forward is v5's standard formula (checked bitwise on probe inputs) keep only
        their input for backward (:mod:`.norms`; the same outputs, a third less activation memory per Qwen3 layer).
        ``fused_cross_entropy``: ``model(..., labels=...)`` under autograd computes the loss from the hidden states
        in chunks, without ``[tokens, vocab]`` logits (:mod:`.loss`); such outputs carry no ``logits``.
        """
        import transformers  # noqa: PLC0415

        from ..tensor_io import open_reader  # noqa: PLC0415

        if experts_backend not in BACKENDS:
            raise ValueError(f"experts_backend must be one of {BACKENDS}, got {experts_backend!r}")
        if experts_backend == "te" and not te_available():
            raise ValueError("experts_backend='te' needs transformer_engine, which does not import here")
        if dispatcher == "deepep" and not deepep_available():
            raise ValueError("dispatcher='deepep' needs deep_ep, which does not import here")
        loading_info = kwargs.pop("output_loading_info", False)
        for bad in ("device_map", "quantization_config", "tp_plan", "load_in_8bit", "load_in_4bit"):
            if kwargs.get(bad) is not None:
                raise ValueError(f"{bad} is not supported by moe_adapters' from_pretrained")
            kwargs.pop(bad, None)
        dtype_arg = kwargs.pop("dtype", kwargs.pop("torch_dtype", "auto"))
        attn = kwargs.pop("attn_implementation", None)
        family = kwargs.pop("family", None)
        device = torch.device(kwargs.pop("device", None) or ("cuda" if torch.cuda.is_available() else "cpu"))
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        hub = {k: kwargs.pop(k) for k in ("revision", "token", "trust_remote_code") if k in kwargs}
        kwargs.pop("low_cpu_mem_usage", None)

        path = _resolve_path(pretrained_model_name_or_path, hub.get("revision"), hub.get("token"))
        reader = open_reader(path, family)
        fam, cfg_dict = reader.family, reader.config

        user_config = kwargs.pop("config", None)
        if user_config is not None and not isinstance(user_config, (str, os.PathLike)):
            config = copy.deepcopy(user_config)  # as transformers: the config given wins over the file's
            for k, v in kwargs.items():
                setattr(config, k, v)
        else:
            config = transformers.AutoConfig.from_pretrained(
                user_config or path, trust_remote_code=hub.get("trust_remote_code", False), **kwargs
            )
        qc = getattr(config, "quantization_config", None)
        fp8_source = qc is not None
        if fp8_source:
            method = qc.get("quant_method") if isinstance(qc, dict) else getattr(qc, "quant_method", None)
            if method not in ("fp8", "mxfp4"):
                raise ValueError(
                    f"quantization {method!r} is not supported; only FP8 block-scaled and MXFP4 checkpoints"
                )
            del config.quantization_config  # we dequantize on load: the model in memory is not quantized
        dtype = _dtype_from(dtype_arg, config, fp8_source)
        cfg_dict = dict(cfg_dict, **_overrides(config, cfg_dict, kwargs, whole=user_config is not None))

        ep, ep_rank, ep_group, edp_group, world = _groups(ep_size)
        disp = make_dispatcher(dispatcher, fam.expert_count(cfg_dict), group=ep_group, device=device)

        with torch.device("meta"):
            model = transformers.AutoModelForCausalLM.from_config(
                config, dtype=dtype, attn_implementation=attn, trust_remote_code=hub.get("trust_remote_code", False)
            )
        blocks: dict[str, MoEBlock] = {}
        for L in fam.moe_layer_ids(cfg_dict):
            name = block_prefix(fam, L)
            template = model.get_submodule(name)
            block = build_moe_block(
                fam, cfg_dict, L, dispatcher=disp, backend=experts_backend, dtype=dtype, device="meta",
                template=template,
            )
            model.set_submodule(name, block)
            blocks[name] = block

        _load(model, reader, dtype, device, ep, ep_rank)
        _fix_nonpersistent_buffers(model, device)
        model.tie_weights()
        if fused_rms_norm:
            use_fused_rms_norms(model)
        if fused_cross_entropy:
            use_fused_cross_entropy(model)
        left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
        if left:
            raise RuntimeError(f"not loaded from {path}: {left[:8]}{' ...' if len(left) > 8 else ''}")
        model.eval()
        try:
            gen = transformers.GenerationConfig.from_pretrained(path)
            if model.can_generate():
                model.generation_config = gen
        except OSError:
            pass
        model.moe_ep = EPState(
            ep_size=ep,
            ep_rank=ep_rank,
            ep_group=ep_group,
            expert_dp_group=edp_group,
            world_size=world,
            source=path,
            reader=reader,
            dispatcher=disp.name,
            experts_backend=experts_backend,
            dequantized=fp8_source,
            moe_blocks=blocks,
        )
        model.save_pretrained = types.MethodType(save_pretrained, model)
        if loading_info:  # every tensor was loaded (a leftover raised above): nothing missing or unexpected
            return model, {"missing_keys": [], "unexpected_keys": [], "mismatched_keys": [], "error_msgs": []}
        return model


def _overrides(config: Any, file_cfg: dict[str, Any], kwargs: dict[str, Any], whole: bool) -> dict[str, Any]:
    """The config values that differ from config.json because the caller asked: keyword overrides under their
    canonical names (``num_experts_per_tok`` is ERNIE's ``moe_k``: v5's ``attribute_map``), or, for a ``config=``
    object, every value of a config.json key that it changes. The MoE blocks are built from these, so they route
    exactly as v5's model built from the same config does."""
    final = config.to_dict()
    aliases = getattr(type(config), "attribute_map", {}) or {}
    wanted = {aliases.get(k, k) for k in kwargs} | set(kwargs)
    out = {k: v for k, v in final.items() if k in wanted}
    if whole:
        out.update({k: v for k, v in final.items() if k in file_cfg and file_cfg[k] != v})
    return out


def _load(model: nn.Module, reader: Any, dtype: torch.dtype, device: torch.device, ep: int, ep_rank: int) -> None:
    """Every parameter and persistent buffer from `reader`; expert tensors: this rank's rows only."""
    have = set(reader.fused_names())
    tied = set(getattr(model, "all_tied_weights_keys", {}) or {})
    fp32 = _fp32_patterns(model, dtype)
    missing = []
    expert_ids = _expert_ids(model)
    for name, t in model.state_dict(keep_vars=True).items():
        mxfp4 = name not in have and f"{name}_blocks" in have and f"{name}_scales" in have  # gpt-oss's published form
        if name not in have and not mxfp4:
            if name in tied:
                continue
            missing.append(name)
            continue
        expert = id(t) in expert_ids
        rng = None
        if expert:
            n = t.shape[0]
            rng = (ep_rank * n, (ep_rank + 1) * n)
        target = torch.float32 if fp32 is not None and fp32.search(name) and t.is_floating_point() else t.dtype
        stored = None if mxfp4 else reader.ref(name, rng).dtype  # header only: no bytes read yet
        if mxfp4:
            value = reader.read_mxfp4(name, rng, target)  # dequantized as transformers does, this rank's experts
        elif stored in _FP8_NAMES and target not in _FP8:
            value = reader.read_dequantized(name, rng, target)  # one tensor at a time, straight to `target`
        else:
            value = reader.read(name, rng)
        if tuple(value.shape) != tuple(t.shape):
            raise ValueError(f"{name}: checkpoint shape {tuple(value.shape)}, model expects {tuple(t.shape)}")
        value = value.to(device=device, dtype=target)
        _set_tensor(model, name, value, requires_grad=isinstance(t, nn.Parameter) and t.requires_grad)
    if missing:
        raise KeyError(f"the checkpoint lacks {len(missing)} tensors the model needs: {missing[:8]}")


# --- parameters and gradients --------------------------------------------------------------------------------------


def _expert_ids(model: nn.Module) -> set[int]:
    """ids of the parameters that live in a routed-experts module. Asked of the modules, not marked on the tensors:
    ``load_state_dict(assign=True)``, ``deepcopy`` or a swapped ``.to()`` make new parameter objects."""
    from .experts import GroupedExperts

    return {id(p) for m in model.modules() if isinstance(m, GroupedExperts) for p in m.parameters()}


def expert_parameters(model: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    """This rank's routed-expert parameters (not data-parallel inside the EP group)."""
    ids = _expert_ids(model)
    return ((n, p) for n, p in model.named_parameters() if id(p) in ids)


def dense_parameters(model: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    """Every other parameter (replicated on every rank, averaged over all ranks)."""
    ids = _expert_ids(model)
    return ((n, p) for n, p in model.named_parameters() if id(p) not in ids)


def _all_reduce_sum(tensors: list[torch.Tensor], group: Any, bucket_numel: int = 1 << 25) -> None:
    """Sum `tensors` in place over `group`, flattened into buckets per dtype and device (fewer collectives)."""
    by_kind: dict[tuple, list[torch.Tensor]] = {}
    for t in tensors:
        by_kind.setdefault((t.dtype, t.device), []).append(t)
    for ts in by_kind.values():
        i = 0
        while i < len(ts):
            bucket, n = [], 0
            while i < len(ts) and (not bucket or n + ts[i].numel() <= bucket_numel):
                bucket.append(ts[i])
                n += ts[i].numel()
                i += 1
            flat = torch.cat([t.reshape(-1) for t in bucket])
            dist.all_reduce(flat, group=group)
            off = 0
            for t in bucket:
                t.copy_(flat[off : off + t.numel()].view_as(t))
                off += t.numel()


@torch.no_grad()
def sync_gradients(model: nn.Module) -> None:
    """Make this rank's ``.grad`` the gradient of the mean of all ranks' losses.

    Dense (replicated) parameters: all-reduce over every rank, divided by the world size. Expert parameters: no
    reduction inside the EP group (each rank owns its experts; the all-to-all backward already delivered every
    rank's contribution), summed over EP replicas when ``world > ep_size``, divided by the world size. A parameter
    without a gradient counts as zero (every rank must join every collective). No-op without torch.distributed.
    """
    state: EPState | None = getattr(model, "moe_ep", None)
    if not _dist_on():
        return
    world = dist.get_world_size()
    expert_ids = _expert_ids(model)
    dense, experts = [], []
    for _, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        (experts if id(p) in expert_ids else dense).append(p.grad)
    if world > 1:
        _all_reduce_sum(dense, None)
    edp = state.expert_dp_group if state is not None else None
    if edp is not None:
        _all_reduce_sum(experts, edp)
    for g in dense + experts:
        g.div_(world)


@torch.no_grad()
def clip_grad_norm_(model: nn.Module, max_norm: float, norm_type: float = 2.0) -> torch.Tensor:
    """``torch.nn.utils.clip_grad_norm_`` for an expert-parallel model; call it after :func:`sync_gradients`.

    Each rank holds different experts, so the plain function would see a different norm on every rank and scale the
    replicated dense gradients differently (the dense weights would then drift apart). Here dense gradients (equal on
    every rank after the sync) count once and expert gradients are summed over the EP group: every rank gets the
    norm of the whole model's gradient and the same scale. ``norm_type`` 2 or inf. Returns the total norm (fp32).
    """
    if norm_type not in (2, 2.0, float("inf")):
        raise ValueError(f"norm_type must be 2 or inf, got {norm_type}")
    expert_ids = _expert_ids(model)
    grads = [(id(p) in expert_ids, p.grad) for p in model.parameters() if p.grad is not None]
    dense = [g for is_expert, g in grads if not is_expert]
    experts = [g for is_expert, g in grads if is_expert]
    device = next((g.device for g in dense + experts), torch.device("cpu"))
    inf = norm_type == float("inf")

    def part(grads: list[torch.Tensor]) -> torch.Tensor:
        if not grads:
            return torch.zeros((), dtype=torch.float32, device=device)
        if inf:
            return torch.stack([g.detach().abs().max().float() for g in grads]).max()
        return torch.stack([g.detach().float().square().sum() for g in grads]).sum()

    d, e = part(dense), part(experts)
    state: EPState | None = getattr(model, "moe_ep", None)
    if _dist_on() and state is not None and state.ep_size > 1:
        dist.all_reduce(e, op=dist.ReduceOp.MAX if inf else dist.ReduceOp.SUM, group=state.ep_group)
    total = torch.maximum(d, e) if inf else (d + e).sqrt()
    scale = (max_norm / (total + 1e-6)).clamp(max=1.0)
    for g in dense + experts:
        g.mul_(scale.to(g.dtype))
    return total


class ExpertParallel(nn.Module):
    """A thin DDP-like wrapper: ``forward`` is the model's; call ``finish_backward()`` after ``loss.backward()`` (it
    runs :func:`sync_gradients`). Unlike DDP it never all-reduces expert gradients."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.module(*args, **kwargs)

    def finish_backward(self) -> None:
        sync_gradients(self.module)


def resident_expert_bytes(model: nn.Module) -> int:
    """Bytes of routed-expert parameters held by this rank."""
    return sum(p.numel() * p.element_size() for _, p in expert_parameters(model))


# --- saving --------------------------------------------------------------------------------------------------------


@dataclass
class _Item:
    published: str  # name in the saved checkpoint
    fused: str  # v5 name in the model
    expert: int | None = None  # per-expert slice of a fused expert parameter
    rows: tuple[int, int] | None = None  # rows of that expert's [2I, H] (gate or up), None: all
    stacked: bool = False  # a whole [E, ...] expert parameter (experts stacked in the published form), gathered


def _published_items(model: nn.Module, state: EPState) -> list[_Item]:
    """Every tensor of the model under its published (HF) name, experts one by one, in natural order."""
    from ..layout import natural_key  # noqa: PLC0415

    emap = state.reader.expert_map
    tied = set(getattr(model, "all_tied_weights_keys", {}) or {})
    items: list[_Item] = []
    for name, t in model.state_dict(keep_vars=True).items():
        if name in tied:
            continue
        p = emap.param_by_name.get(name)
        if p is None:
            items.append(_Item(emap.dense_hf_name(name), name))
            continue
        if p.stored is not None:  # published stacked (Llama 4, gpt-oss, GraniteMoE): one tensor, renamed back
            items.append(_Item(p.stored, name, stacked=True))
            continue
        E = t.shape[0] * state.ep_size
        n = len(p.projs)
        rows = t.shape[1] // n
        for e in range(E):
            for j, proj in enumerate(p.projs):
                items.append(_Item(emap.hf_name(p.layer, e, proj, p.tensor), name, e, (j * rows, (j + 1) * rows)))
    return sorted(items, key=lambda it: natural_key(it.published))


def _parse_size(size: int | str) -> int:
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B|B)?\s*", str(size), re.I)
    if not m:
        raise ValueError(f"cannot read size {size!r}")
    unit = (m.group(2) or "B").upper()
    mult = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}[unit]
    return int(float(m.group(1)) * mult)


def _plan_files(
    model: nn.Module, state: EPState, items: list[_Item], max_shard_size: int | str
) -> tuple[list[tuple[str, list[_Item], dict[str, str] | None]], dict[str, Any] | None]:
    """Files to write: the source's own files (names, grouping, metadata) when the source was an HF checkpoint with
    exactly these tensor names; otherwise transformers-style ``model-0000i-of-0000N.safetensors`` shards."""
    ckpt = state.reader.ckpt
    by_name = {it.published: it for it in items}
    if ckpt.layout == "hf":
        stored = {e.name: f for f, h in ckpt.headers.items() for e in h.tensors}
        if set(stored) == set(by_name):
            files = [
                (f, [by_name[e.name] for e in h.tensors], h.metadata) for f, h in ckpt.headers.items()
            ]
            index_meta = None
            if ckpt.index_text is not None:
                index_meta = json.loads(ckpt.index_text).get("metadata") or {}
            return files, index_meta if ckpt.index_name else None
    limit = _parse_size(max_shard_size)
    shapes = _item_shapes(model, state, items)
    groups: list[list[_Item]] = [[]]
    size = 0
    for it in items:
        nbytes = shapes[it.published][1]
        if groups[-1] and size + nbytes > limit:
            groups.append([])
            size = 0
        groups[-1].append(it)
        size += nbytes
    if len(groups) == 1:
        return [("model.safetensors", groups[0], {"format": "pt"})], None
    n = len(groups)
    return [(f"model-{i + 1:05d}-of-{n:05d}.safetensors", g, {"format": "pt"}) for i, g in enumerate(groups)], {}


def _item_shapes(model: nn.Module, state: EPState, items: list[_Item]) -> dict[str, tuple[tuple[int, ...], int]]:
    sd = model.state_dict(keep_vars=True)
    out = {}
    for it in items:
        t = sd[it.fused]
        shape = tuple(t.shape)
        if it.stacked:
            shape = (shape[0] * state.ep_size,) + shape[1:]
        if it.expert is not None:
            shape = shape[1:]
            if it.rows is not None:
                shape = (it.rows[1] - it.rows[0],) + shape[1:]
        numel = 1
        for d in shape:
            numel *= d
        out[it.published] = (shape, numel * t.element_size())
    return out


def _gather_experts(t: torch.Tensor, state: EPState) -> torch.Tensor:
    """The full ``[E, ...]`` parameter from this rank's ``[E/ep, ...]`` slice (collective over the EP group)."""
    if state.ep_size == 1:
        return t.detach()
    parts = [torch.empty_like(t) for _ in range(state.ep_size)]
    dist.all_gather(parts, t.detach().contiguous(), group=state.ep_group)
    return torch.cat(parts, dim=0)


def save_pretrained(
    model: nn.Module,
    save_directory: str | os.PathLike,
    is_main_process: bool | None = None,
    state_dict: dict[str, torch.Tensor] | None = None,
    max_shard_size: int | str = "50GB",
    safe_serialization: bool = True,
    variant: str | None = None,
    push_to_hub: bool = False,
    save_original_format: bool = True,
    **kwargs: Any,
) -> None:
    """Write a standard HF checkpoint: per-expert keys under the published names, experts gathered from every rank
    of the EP group. Where the source was an HF checkpoint with the same tensor names, its file names, grouping and
    safetensors metadata are kept (so an untrained round trip reproduces the source files byte for byte).

    Arguments as transformers v5's (same order): ``state_dict`` (this rank's, keyed as ``model.state_dict()``, e.g.
    EMA weights) replaces the live weights. What this writer cannot do is refused, not ignored: ``variant``,
    ``push_to_hub`` (use ``moe-adapters push``), ``save_original_format=False``, ``safe_serialization=False``.

    Collective: every rank must call it. Global rank 0 (or ``is_main_process``) writes.
    """
    from safetensors.torch import save_file  # noqa: PLC0415

    refused = {
        "variant": variant is not None,
        "push_to_hub": bool(push_to_hub),
        "save_original_format=False": not save_original_format,
        "safe_serialization=False": not safe_serialization,
    }
    refused.update({k: True for k in kwargs if k not in ("token", "save_peft_format", "save_function")})
    bad = [k for k, v in refused.items() if v]
    if bad:
        raise ValueError(
            f"moe_adapters' save_pretrained does not support {', '.join(bad)}: it writes the published per-expert "
            "layout as safetensors (publish with `moe-adapters push`)"
        )
    state: EPState = model.moe_ep
    main = is_main_process if is_main_process is not None else (not _dist_on() or dist.get_rank() == 0)
    save_directory = str(save_directory)
    if main:
        os.makedirs(save_directory, exist_ok=True)
    items = _published_items(model, state)
    files, index_meta = _plan_files(model, state, items, max_shard_size)
    sd = model.state_dict()
    if state_dict is not None:
        if set(state_dict) != set(sd):
            diff = sorted(set(state_dict) ^ set(sd))
            raise ValueError(f"state_dict keys differ from the model's (this rank's shard): {diff[:5]}")
        sd = state_dict
    uses: dict[str, int] = {}
    for _, its, _ in files:
        for it in its:
            if it.expert is not None:
                uses[it.fused] = uses.get(it.fused, 0) + 1
    full: dict[str, torch.Tensor] = {}
    weight_map: dict[str, str] = {}
    total_size = 0
    for fname, its, meta in files:
        tensors: dict[str, torch.Tensor] = {}
        for it in its:
            if it.stacked:
                value = _gather_experts(sd[it.fused], state)  # collective, same order on every rank
            elif it.expert is None:
                value = sd[it.fused]
            else:
                if it.fused not in full:
                    full[it.fused] = _gather_experts(sd[it.fused], state)  # same order on every rank
                value = full[it.fused][it.expert]
                if it.rows is not None:
                    value = value[it.rows[0] : it.rows[1]]
                uses[it.fused] -= 1
                if uses[it.fused] == 0:
                    full.pop(it.fused)
            if main:
                tensors[it.published] = value.detach().to("cpu").contiguous().clone()
            weight_map[it.published] = fname
            total_size += value.numel() * value.element_size()
        if main:
            save_file(tensors, os.path.join(save_directory, fname), metadata=meta)
    if not main:
        return
    if index_meta is not None:
        meta = dict(index_meta)
        meta["total_size"] = total_size
        if "total_parameters" in meta or not index_meta:
            meta["total_parameters"] = _num_parameters(model, state)
        index = {"metadata": meta, "weight_map": weight_map}
        with open(os.path.join(save_directory, "model.safetensors.index.json"), "w", encoding="utf-8") as f:
            f.write(json.dumps(index, indent=2, sort_keys=True) + "\n")
    model.config.dtype = str(next(p.dtype for p in model.parameters() if p.is_floating_point())).split(".")[1]
    model.config.architectures = [type(model).__name__]
    model.config.save_pretrained(save_directory)
    gen = getattr(model, "generation_config", None)
    if gen is not None and model.can_generate():
        gen.save_pretrained(save_directory)


def _num_parameters(model: nn.Module, state: EPState) -> int:
    """Parameters of the whole (unsharded) model, counted as v5's ``num_parameters()`` does (unique, no buffers)."""
    seen: set[int] = set()
    expert_ids = _expert_ids(model)
    n = 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        n += p.numel() * (state.ep_size if id(p) in expert_ids else 1)
    return n


__all__: Iterable[str] = [
    "AutoModelForCausalLM",
    "clip_grad_norm_",
    "EPState",
    "ExpertParallel",
    "dense_parameters",
    "expert_parameters",
    "resident_expert_bytes",
    "save_pretrained",
    "sync_gradients",
]

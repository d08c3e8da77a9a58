"""HF <-> fused conversion and EP resharding: plan from headers, copy byte ranges, commit atomically."""

from __future__ import annotations

import json
import os
import re
import resource
import shutil
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

from .converters import ByteTensor
from .atomic import AtomicFolder
from .checkpoint import Checkpoint, open_checkpoint
from .errors import ModelError, OptionError
from .distributed import Share, timeout_seconds
from .execute import SourceTensorHashes, Written, default_workers, write_files
from .layout import ExpertMap, FusedTensors, canonical_view, full_fused_view, fuse
from .manifest import build_manifest, check_files, copy_checked, source_pinned, source_record, write_manifest
from .provenance import build_provenance, origin_of, write_provenance
from .computed import release
from .transforms import cast, dequantize as dequantize_weights
from .plan import DEFAULT_SHARD_BYTES, OutFile, layout_file, rebuild_file, shard


class Reporter(Protocol):
    """Progress sink: `begin` announces a phase and its byte total, `advance` is called from worker threads."""

    def begin(self, label: str, total: int) -> None: ...
    def advance(self, n: int) -> None: ...
    def end(self) -> None: ...


class _Silent:
    def begin(self, label: str, total: int) -> None:
        pass

    def advance(self, n: int) -> None:
        pass

    def end(self) -> None:
        pass


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


@dataclass
class Summary:
    src: str
    dst: str
    direction: str
    family: str
    ep_size: int
    tensors: int
    files: int
    bytes_written: int
    bytes_read: int
    seconds: float
    peak_rss: int
    checks: list[str] = field(default_factory=list)
    left_out: list[str] = field(default_factory=list)  # source files not carried (weights outside the index)

    @property
    def gbps(self) -> float:
        return self.bytes_written / self.seconds / 1e9 if self.seconds > 0 else 0.0

    def as_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["gb_per_s"] = round(self.gbps, 3)
        return d


def _index_json(files: list[OutFile]) -> str:
    weight_map = {name: f.name for f in files for name, _ in f.parts}
    total = sum(t.nbytes for f in files for _, t in f.parts)
    body = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    return json.dumps(body, indent=2, sort_keys=True) + "\n"


def _numbered(stem: str, groups: list[list[tuple[str, ByteTensor]]], rank: int | None) -> list[OutFile]:
    n = len(groups)
    return [layout_file(f"{stem}-{i + 1:05d}-of-{n:05d}.safetensors", rank, g) for i, g in enumerate(groups)]


def plan_fused(ft: FusedTensors, max_shard_bytes: int) -> list[OutFile]:
    """Dense tensors in `model-dense-*` files; each rank's experts in `model-epRRR-of-NNN-*` files of its own."""
    ep = len(ft.ranks)
    files = _numbered("model-dense", shard(ft.dense, max_shard_bytes), None) if ft.dense else []
    for r, tensors in enumerate(ft.ranks):
        files += _numbered(f"model-ep{r:03d}-of-{ep:03d}", shard(tensors, max_shard_bytes), r)
    return files


def plan_hf(canonical: dict[str, ByteTensor], max_shard_bytes: int) -> list[OutFile]:
    groups = shard(list(canonical.items()), max_shard_bytes)
    if len(groups) == 1:
        return [layout_file("model.safetensors", None, groups[0])]
    return _numbered("model", groups, None)


def _router_biases(pattern: str | None, canonical: dict) -> set[str]:
    """Names of the router's selection bias in every layer (`{L}` any layer number, MoE or extra like an MTP layer)."""
    if not pattern:
        return set()
    rx = re.compile(re.escape(pattern).replace(re.escape("{L}"), r"\d+") + r"\Z")
    return {n for n in canonical if rx.match(n)}


def _is_quantized(canonical: dict, config: dict) -> bool:
    """FP8 block-scaled (``*_scale_inv``) or MXFP4 (``*_blocks``) weights, or a quantization_config saying so."""
    return bool(config.get("quantization_config")) or any(
        n.endswith(("_scale_inv", "_blocks")) for n in canonical
    )


def _lossy_note(dequantize: str | None, dtype: str | None, config: dict | None = None) -> str:
    qc = (config or {}).get("quantization_config")
    method = "MXFP4" if isinstance(qc, dict) and qc.get("quant_method") == "mxfp4" else "FP8"
    parts = [f"{method} dequantized to {dequantize}" if dequantize else "", f"cast to {dtype}" if dtype else ""]
    return "; ".join(x for x in parts if x) + ": not byte-identical to the source"


def _copy_other_files(ckpt: Checkpoint, out: str, config: dict | None = None) -> None:
    """Carry config, tokenizer and everything else over unchanged (config.json rewritten only by a lossy transform)."""
    if config is not None:
        with open(os.path.join(out, "config.json"), "x") as f:
            json.dump(config, f, indent=2)
            f.write("\n")
    for rel in ckpt.other_files:
        if config is not None and rel == "config.json":
            continue
        dst = os.path.join(out, rel)
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        shutil.copyfile(os.path.join(ckpt.root, rel), dst)


def _resolver(canonical: dict[str, ByteTensor], emap: ExpertMap) -> Callable[[str], ByteTensor]:
    fused: dict[str, ByteTensor] = {}

    def resolve(name: str) -> ByteTensor:
        if name in canonical:
            return canonical[name]
        if not fused:
            fused.update(full_fused_view(canonical, emap))
        if name in fused:
            return fused[name]
        raise ModelError("recorded in the source but absent from this checkpoint", tensor=name)

    return resolve


def convert(
    src: str,
    dst: str,
    *,
    to: str | None = None,
    ep: int | None = None,
    family: str | None = None,
    overwrite: bool = False,
    workers: int | None = None,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    reporter: Reporter | None = None,
    dequantize: str | None = None,
    dtype: str | None = None,
) -> Summary:
    """Convert checkpoint folder `src` into `dst` (default: to the other layout). Never writes into `src`.

    Lossless unless asked: `dequantize="bf16"` turns FP8 block-scaled (or MXFP4 `_blocks`/`_scales`) weights into
    bf16 (dropping the scales and `quantization_config`), `dtype` casts floating-point weights. Either makes the
    result a new checkpoint with no way back to the source bytes, which the manifest then says.
    """
    t0 = time.perf_counter()
    dst_abs = os.path.abspath(dst) if str(dst).strip() else str(dst)  # now: DST may replace the working directory
    rep = reporter or _Silent()
    workers = workers or default_workers()
    ckpt = open_checkpoint(src, family)
    if ckpt.layout == "fused":
        check_files(ckpt)
    # default: the other layout; a fused source with --ep is resharded (fused -> fused)
    target = to or ("hf" if ckpt.layout == "fused" and ep is None else "fused")
    if target not in ("hf", "fused"):
        raise ModelError(f"unknown target layout {target!r} (use fused or hf)")
    if ep is not None and ep < 1:
        raise OptionError(f"--ep must be a positive number of ranks, not {ep}")
    if target == "hf" and ep not in (None, 1):
        raise ModelError("--ep applies to the fused layout only (to reshard a fused folder, add --to fused)")
    canonical, emap = canonical_view(ckpt)
    config = ckpt.config
    if dequantize:
        if not _is_quantized(canonical, config):
            raise OptionError(
                "--dequantize: nothing here is quantized (no quantization_config, FP8 scales or MXFP4 blocks)",
                file=ckpt.root,
            )
        canonical, config = dequantize_weights(
            canonical, config, dequantize, transposed=getattr(ckpt.family.experts, "transposed", True)
        )
    if dtype:
        keep = _router_biases(ckpt.family.router.bias, canonical)  # selection biases stay fp32, MTP layers' too
        cast_view, cast_config = cast(canonical, config, dtype, keep)
        if any(cast_view[n] is not canonical[n] for n in canonical):
            canonical, config = cast_view, cast_config
        else:
            dtype = None  # every weight already has that dtype: nothing changes, the way back stays exact
    lossy = bool(dequantize or dtype)
    if target == "hf" and ckpt.layout == "hf" and not lossy:
        raise ModelError("already in the hf layout; convert with --to fused", file=ckpt.root)

    share = Share.from_env()
    if target == "fused":
        ep_size = ep or (ckpt.ep_size if ckpt.layout == "fused" else 1)  # --to fused alone keeps a fused EP
        ft = fuse(canonical, emap, ep_size)
        files = plan_fused(ft, max_shard_bytes)
        rebuild_from: dict[str, Any] = {}
        verb = "HF" if ckpt.layout != "fused" else "fused"
        label = f"{verb} -> fused EP={ep_size}"
    else:
        ep_size = 1
        rebuild_from = {} if lossy else (ckpt.manifest or {}).get("source") or {}
        if to == "hf" and rebuild_from.get("layout", "hf") != "hf":
            rebuild_from = {}  # asked for the per-expert HF layout, not the source's own (v5 packed) files
        if ckpt.layout == "fused" and rebuild_from.get("files"):
            resolve = _resolver(canonical, emap)
            files = [rebuild_file(f["name"], f, resolve) for f in rebuild_from["files"]]
        else:
            rebuild_from = {}
            files = plan_hf(canonical, max_shard_bytes)
        target = rebuild_from.get("layout", "hf") if rebuild_from else "hf"  # the source's exact files come back
        label = f"{ckpt.layout} -> {target}"
    # hash every source tensor as it streams past: the proof of the way back, at no extra read
    watch = None
    if target == "fused" and ckpt.manifest is None and not lossy:
        watch = SourceTensorHashes(
            {h.path: [(h.data_start + e.begin, h.data_start + e.end, e.name) for e in h.tensors] for h in ckpt.headers.values()}
        )
    mine = share.mine(files) if share.active else files

    def write_mine(tmp: str) -> dict[str, Written]:
        rep.begin(label + (f" (rank {share.rank}/{share.world})" if share.active else ""), sum(f.size for f in mine))
        try:
            return write_files(tmp, mine, workers, rep.advance, watch=watch, per_tensor=bool(rebuild_from))
        finally:
            rep.end()

    checks: list[str] = []
    try:
        if share.active and share.rank != 0:
            tmp = share.tmp_name(dst)
            share.wait_for_folder(tmp, timeout_seconds())
            try:
                written = write_mine(tmp)
                share.publish(tmp, written, watch.result() if watch else {})
            except BaseException as exc:
                share.fail(tmp, str(exc))
                raise
            direction = f"{ckpt.layout}->{target} (rank {share.rank} of {share.world}: its share of the files)"
        else:
            with AtomicFolder(
                dst, overwrite=overwrite, sources=(ckpt.root,), tmp=share.tmp_name(dst) if share.active else None
            ) as out:
                # a fused source not checked tensor by tensor below: its files are hashed against its manifest
                proven = source_pinned(rebuild_from)
                written = write_mine(out.tmp) if proven else copy_checked(ckpt, lambda: write_mine(out.tmp))
                source_hashes = watch.result() if watch else {}
                if share.active:
                    theirs, their_hashes = share.gather(out.tmp, timeout_seconds())
                    written.update(theirs)
                    for path, d in their_hashes.items():
                        source_hashes.setdefault(path, {}).update(d)
                    if watch is not None:  # stacked tensors whose EP slices several processes wrote: hash them here
                        for path, d in watch.missing_from(source_hashes).items():
                            source_hashes.setdefault(path, {}).update(d)
                if target == "fused":
                    if lossy:  # nothing to rebuild: say so, and where it came from
                        source = {"lossy": _lossy_note(dequantize, dtype, ckpt.config), "origin": origin_of(ckpt.root)}
                    else:
                        source = source_record(ckpt, source_hashes)
                    _finish_fused(out.tmp, ckpt, emap, ft, files, written, ep_size, config if lossy else None, source)
                else:
                    checks += _finish_hf(out.tmp, ckpt, files, written, rebuild_from, config if lossy else None)
                out.commit()
            direction = f"{ckpt.layout}->{target}"
    finally:
        release(list(canonical.values()))  # computed (dequantized/cast) tensors are not kept
    return Summary(
        src=ckpt.root,
        dst=dst_abs,
        direction=direction,
        family=ckpt.family.name,
        ep_size=ep_size,
        tensors=sum(len(f.parts) for f in files),
        files=len(written),
        bytes_written=sum(w.size for w in written.values()),
        bytes_read=sum(t.nbytes for f in mine for _, t in f.parts),
        seconds=time.perf_counter() - t0,
        peak_rss=peak_rss_bytes(),
        checks=checks,
        left_out=list(ckpt.left_out),
    )


def _finish_fused(
    tmp: str,
    ckpt: Checkpoint,
    emap: ExpertMap,
    ft: FusedTensors,
    files: list[OutFile],
    written: dict[str, Written],
    ep_size: int,
    config: dict | None,
    source: dict[str, Any],
) -> None:
    """Index (EP=1), other files, and the manifest, written last."""
    if ep_size == 1:
        with open(os.path.join(tmp, "model.safetensors.index.json"), "x") as fh:
            fh.write(_index_json(files))
    manifest = build_manifest(
        family=ckpt.family.name,
        ep_size=ep_size,
        num_experts=emap.num_experts,
        moe_layers=emap.moe_layers,
        expert_ranges=ft.expert_ranges,
        files=[(f.name, f.rank, [n for n, _ in f.parts]) for f in files],
        written=written,
        source=source,
        index="model.safetensors.index.json" if ep_size == 1 else None,
    )
    _copy_other_files(ckpt, tmp, config)
    write_manifest(tmp, manifest)


def _finish_hf(
    tmp: str,
    ckpt: Checkpoint,
    files: list[OutFile],
    written: dict[str, Written],
    rebuild_from: dict[str, Any],
    config: dict | None,
) -> list[str]:
    """Index, other files, provenance; when rebuilding a recorded source, prove every tensor against it."""
    checks: list[str] = []
    index = rebuild_from.get("index") if rebuild_from else None
    if not rebuild_from and len(files) > 1:
        index = {"name": "model.safetensors.index.json", "text": _index_json(files)}
    if index:
        with open(os.path.join(tmp, index["name"]), "x", encoding="utf-8", newline="") as fh:
            fh.write(index["text"])
    if rebuild_from:
        checked = 0
        for f in rebuild_from["files"]:
            want = f.get("tensor_sha256") or {}
            got = written[f["name"]].tensor_sha256
            for name, digest in want.items():
                if got.get(name) != digest:
                    raise ModelError("rebuilt tensor differs from the source's recorded sha256", file=f["name"], tensor=name)
            checked += len(want)
        if checked:
            checks.append(
                f"{len(files)} files rebuilt with the source's own headers; {checked:,} tensors match the source's "
                "recorded sha256"
            )
    _copy_other_files(ckpt, tmp, config)
    write_provenance(
        tmp,
        build_provenance(  # what `push` verifies against (see provenance.py)
            family=ckpt.family.name,
            source=rebuild_from,
            written=written,
            checks=checks,
            converted_from={"path": ckpt.root, "layout": ckpt.layout, "ep_size": ckpt.ep_size},
        ),
    )
    return checks

"""HF <-> fused conversion and EP resharding: plan from headers, copy byte ranges, commit atomically."""

from __future__ import annotations

import json
import os
import resource
import shutil
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

from .converters import ByteTensor
from .atomic import AtomicFolder
from .checkpoint import Checkpoint, open_checkpoint
from .errors import ModelError
from .execute import default_workers, hash_file, run_parallel, write_files
from .layout import ExpertMap, FusedTensors, canonical_view, full_fused_view, fuse
from .manifest import build_manifest, check_files, source_record, write_manifest
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


def _copy_other_files(ckpt: Checkpoint, out: str) -> None:
    for rel in ckpt.other_files:
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
) -> Summary:
    """Convert checkpoint folder `src` into `dst` (default: to the other layout). Never writes into `src`."""
    t0 = time.perf_counter()
    rep = reporter or _Silent()
    workers = workers or default_workers()
    ckpt = open_checkpoint(src, family)
    if ckpt.layout == "fused":
        check_files(ckpt, checksums=False)
    target = to or ("hf" if ckpt.layout == "fused" else "fused")
    if target not in ("hf", "fused"):
        raise ModelError(f"unknown target layout {target!r} (use fused or hf)")
    if target == "hf" and ckpt.layout == "hf":
        raise ModelError("already in the hf layout; convert with --to fused", file=ckpt.root)
    if target == "hf" and ep not in (None, 1):
        raise ModelError("--ep applies to the fused layout only")
    canonical, emap = canonical_view(ckpt)

    checks: list[str] = []
    source_hashes: dict[str, str] = {}
    with AtomicFolder(dst, overwrite=overwrite, sources=(ckpt.root,)) as out:
        if target == "fused":
            ep_size = ep or 1
            ft = fuse(canonical, emap, ep_size)
            files = plan_fused(ft, max_shard_bytes)
            hash_jobs = []
            if ckpt.manifest is None:  # record the source's sha256, read in parallel with the copy
                hash_jobs = [
                    (lambda rel=rel, h=h: source_hashes.__setitem__(rel, hash_file(h.path, rep.advance)))
                    for rel, h in ckpt.headers.items()
                ]
            total = sum(f.size for f in files) + (ckpt.total_bytes if hash_jobs else 0)
            rep.begin(f"HF -> fused EP={ep_size}" if ckpt.layout != "fused" else f"fused -> fused EP={ep_size}", total)
            written: dict = {}
            run_parallel(
                [lambda: written.update(write_files(out.tmp, files, workers, rep.advance))] + hash_jobs,
                2 if hash_jobs else 1,
            )
            if ep_size == 1:
                with open(os.path.join(out.tmp, "model.safetensors.index.json"), "x") as fh:
                    fh.write(_index_json(files))
            manifest = build_manifest(
                family=ckpt.family.name,
                ep_size=ep_size,
                num_experts=emap.num_experts,
                moe_layers=emap.moe_layers,
                expert_ranges=ft.expert_ranges,
                files=[(f.name, f.rank, [n for n, _ in f.parts]) for f in files],
                written=written,
                source=source_record(ckpt, source_hashes),
                index="model.safetensors.index.json" if ep_size == 1 else None,
            )
            _copy_other_files(ckpt, out.tmp)
            write_manifest(out.tmp, manifest)
            direction = f"{ckpt.layout}->fused"
        else:
            ep_size = 1
            src_rec = (ckpt.manifest or {}).get("source") or {}
            if ckpt.layout == "fused" and src_rec.get("files"):
                resolve = _resolver(canonical, emap)
                files = [rebuild_file(f["name"], f, resolve) for f in src_rec["files"]]
                index = src_rec.get("index")
            else:
                files = plan_hf(canonical, max_shard_bytes)
                index = None
                if len(files) > 1:
                    index = {"name": "model.safetensors.index.json", "text": _index_json(files)}
            rep.begin(f"{ckpt.layout} -> HF", sum(f.size for f in files))
            written = write_files(out.tmp, files, workers, rep.advance)
            if index:
                with open(os.path.join(out.tmp, index["name"]), "x", encoding="utf-8", newline="") as fh:
                    fh.write(index["text"])
            if ckpt.layout == "fused" and src_rec.get("files"):
                for f in src_rec["files"]:
                    if f.get("sha256") and written[f["name"]].sha256 != f["sha256"]:
                        raise ModelError("rebuilt file differs from the recorded source sha256", file=f["name"])
                checks.append(f"{len(files)} files match the source's recorded sha256")
            _copy_other_files(ckpt, out.tmp)
            direction = f"{ckpt.layout}->hf"
        rep.end()
        out.commit()
    return Summary(
        src=ckpt.root,
        dst=os.path.abspath(dst),
        direction=direction,
        family=ckpt.family.name,
        ep_size=ep_size,
        tensors=sum(len(f.parts) for f in files),
        files=len(files),
        bytes_written=sum(w.size for w in written.values()),
        bytes_read=sum(t.nbytes for f in files for _, t in f.parts) + (ckpt.total_bytes if source_hashes else 0),
        seconds=time.perf_counter() - t0,
        peak_rss=peak_rss_bytes(),
        checks=checks,
    )

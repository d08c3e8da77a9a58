"""The manifest of a fused folder (`moe_adapters.json`).

It records what the fused folder is (family, EP size, expert ranges, its files with sizes and sha256) and the
source it came from, written down exactly: each source file's name, size, sha256 and raw header (which fixes the
tensor order and padding), and the raw index JSON. With it, the way back rebuilds the source byte for byte.

A manifest is read from a folder that may come from anywhere, and its names become paths we read and, on the way
back, paths we *write*: `validate_manifest` checks its whole shape before anything uses it, so a hostile manifest
can neither name a file outside DST nor crash the engine with a value of the wrong type.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any, Callable, TypeVar

from .checkpoint import MANIFEST_NAME, Checkpoint, is_safe_relname, read_json
from .errors import ManifestError, MoeAdaptersError
from .execute import Written, hash_file, run_parallel
from .provenance import origin_of

FORMAT_VERSION = 1
MAX_EP = 1 << 16
MAX_EXPERTS = 1 << 20
MAX_LAYERS = 1 << 16
_SHA256 = re.compile(r"[0-9a-f]{64}")
T = TypeVar("T")


def _is_int(x: object, lo: int = 0, hi: int | None = None) -> bool:
    return type(x) is int and x >= lo and (hi is None or x <= hi)


def _is_sha(x: object) -> bool:
    return isinstance(x, str) and _SHA256.fullmatch(x) is not None


def _is_utf8(x: object) -> bool:
    """A string we can write back as UTF-8 (JSON admits lone surrogates such as "\\ud800"; files cannot)."""
    if not isinstance(x, str):
        return False
    try:
        x.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _name(entry: object) -> str:
    name = entry.get("name") if isinstance(entry, dict) else entry
    r = repr(name)
    return r if len(r) <= 80 else r[:77] + "..."


def validate_manifest(m: Any, path: str) -> dict[str, Any]:
    """`m` (parsed from `path`) if it is a well-formed manifest; else a ManifestError saying what is wrong."""

    def bad(what: str) -> ManifestError:
        return ManifestError(f"invalid manifest: {what}"[:300], file=path)

    if not isinstance(m, dict) or m.get("layout") != "fused":
        raise bad("not a moe-adapters fused manifest")
    if m.get("moe_adapters_manifest") != FORMAT_VERSION:
        raise bad(f"format version {m.get('moe_adapters_manifest')!r} (this moe-adapters reads {FORMAT_VERSION})")
    if not isinstance(m.get("family"), str):
        raise bad("family is not a string")
    ep, E = m.get("ep_size"), m.get("num_experts")
    if not _is_int(ep, 1, MAX_EP):
        raise bad(f"ep_size {ep!r}")
    if not _is_int(E, 1, MAX_EXPERTS) or E % ep:
        raise bad(f"num_experts {E!r} (must be a positive multiple of ep_size {ep})")
    layers = m.get("moe_layers")
    if not isinstance(layers, list) or len(layers) > MAX_LAYERS or not all(_is_int(L) for L in layers):
        raise bad("moe_layers is not a list of layer numbers")
    if len(set(layers)) != len(layers):
        raise bad("moe_layers lists a layer twice")
    if m.get("expert_ranges") != [[r * (E // ep), (r + 1) * (E // ep)] for r in range(ep)]:
        raise bad(f"expert_ranges do not split {E} experts evenly over {ep} ranks")
    files = m.get("files")
    if not isinstance(files, list) or not files:
        raise bad("no file list")
    seen: set[str] = set()
    for f in files:
        if not isinstance(f, dict) or not is_safe_relname(f.get("name")) or not f["name"].endswith(".safetensors"):
            raise bad(f"file name {_name(f)} is not a safe relative *.safetensors name")
        if f["name"] in seen:
            raise bad(f"{f['name']!r} listed twice")
        seen.add(f["name"])
        if "rank" not in f or not (f["rank"] is None or _is_int(f["rank"], 0, ep - 1)):
            raise bad(f"{f['name']}: rank {f.get('rank')!r} is not an EP rank of {ep}")
        if not _is_int(f.get("size"), 8) or not _is_sha(f.get("sha256")):
            raise bad(f"{f['name']}: size or sha256 missing or malformed")
        if "tensors" in f and not _is_int(f["tensors"]):
            raise bad(f"{f['name']}: tensors is not a count")
    missing = sorted(set(range(ep)) - {f["rank"] for f in files})
    if missing:
        raise bad(f"no file for EP rank(s) {missing[:8]}")
    index = m.get("index")
    if index is not None and not (is_safe_relname(index) and index.endswith(".safetensors.index.json")):
        raise bad(f"index {index!r} is not a safe relative *.safetensors.index.json name")
    _validate_source(m.get("source"), bad)
    return m


def _validate_source(src: Any, bad: Callable[[str], ManifestError]) -> None:
    """The source record's names are the names fused -> hf *writes*: each must stay inside DST."""
    if src is None:
        return
    if not isinstance(src, dict):
        raise bad("source is not an object")
    files = src.get("files")
    if files is not None:
        if not isinstance(files, list):
            raise bad("source files is not a list")
        seen: set[str] = set()
        for f in files:
            if not isinstance(f, dict) or not is_safe_relname(f.get("name")) or not f["name"].endswith(".safetensors"):
                raise bad(f"source file name {_name(f)} is not a safe relative *.safetensors name")
            if f["name"] in seen:
                raise bad(f"source file {f['name']!r} listed twice")
            seen.add(f["name"])
            if not _is_int(f.get("size"), 8) or not _is_utf8(f.get("header")):
                raise bad(f"source file {f['name']}: size or header missing")
            if f.get("sha256") is not None and not _is_sha(f["sha256"]):
                raise bad(f"source file {f['name']}: malformed sha256")
            th = f.get("tensor_sha256")
            if th is not None and not (isinstance(th, dict) and all(_is_sha(v) for v in th.values())):
                raise bad(f"source file {f['name']}: malformed tensor_sha256")
    index = src.get("index")
    if index is not None:
        if not isinstance(index, dict) or not _is_utf8(index.get("text")):
            raise bad("source index is not {name, text}")
        name = index.get("name")
        if not (is_safe_relname(name) and name.endswith(".safetensors.index.json")):
            raise bad(f"source index name {name!r} is not a safe relative *.safetensors.index.json name")


def source_record(ckpt: Checkpoint, tensor_hashes: dict[str, dict[str, str]]) -> dict[str, Any]:
    """What rebuilding `ckpt` exactly needs (or, for a fused input, the source its own manifest recorded)."""
    if ckpt.manifest is not None:
        return ckpt.manifest.get("source") or {}
    return {
        "layout": ckpt.layout,
        "origin": origin_of(ckpt.root),  # Hub repo id + commit for a Hugging Face cache snapshot, else the path
        "files": [
            {
                "name": rel,
                "size": h.size,
                "header": h.header_text.decode("utf-8"),
                # sha256 of every tensor, hashed while the conversion streamed it (one pass over the source)
                "tensor_sha256": {
                    e.name: tensor_hashes[h.path][e.name] for e in h.tensors if e.name in tensor_hashes.get(h.path, {})
                },
            }
            for rel, h in ckpt.headers.items()
        ],
        "index": (
            {"name": ckpt.index_name, "text": ckpt.index_text.decode("utf-8")}
            if ckpt.index_name and ckpt.index_text is not None
            else None
        ),
    }


def build_manifest(
    *,
    family: str,
    ep_size: int,
    num_experts: int,
    moe_layers: list[int],
    expert_ranges: list[tuple[int, int]],
    files: list[tuple[str, int | None, list[str]]],
    written: dict[str, Written],
    source: dict[str, Any],
    index: str | None,
) -> dict[str, Any]:
    return {
        "moe_adapters_manifest": FORMAT_VERSION,
        "layout": "fused",
        "family": family,
        "ep_size": ep_size,
        "num_experts": num_experts,
        "moe_layers": moe_layers,
        "expert_ranges": [list(r) for r in expert_ranges],
        "files": [
            {"name": name, "rank": rank, "size": written[name].size, "sha256": written[name].sha256, "tensors": len(t)}
            for name, rank, t in files
        ],
        "index": index,  # the fused folder's own index (EP=1 only: then plain transformers loads the folder)
        "source": source,
    }


def write_manifest(folder: str, manifest: dict[str, Any]) -> None:
    with open(os.path.join(folder, MANIFEST_NAME), "x") as f:
        json.dump(manifest, f, indent=1)
        f.write("\n")


def check_files(ckpt: Checkpoint) -> None:
    """A fused folder's files must match its manifest: sizes, tensor counts and the EP=1 index (cheap: headers
    only). The sha256 of every file is `checksum_jobs`' work (it reads every byte)."""
    if ckpt.manifest is None:
        return
    mpath = os.path.join(ckpt.root, MANIFEST_NAME)
    for f in ckpt.manifest["files"]:
        h = ckpt.headers.get(f["name"])
        if h is None:
            raise ManifestError("manifest lists a file that is missing", file=os.path.join(ckpt.root, f["name"]))
        if h.size != f["size"]:
            raise ManifestError(f"size {h.size} differs from the manifest's {f['size']} ({mpath})", file=h.path)
        if "tensors" in f and len(h.tensors) != f["tensors"]:
            raise ManifestError(f"holds {len(h.tensors)} tensors, the manifest says {f['tensors']}", file=h.path)
    if ckpt.manifest.get("index"):
        ipath = os.path.join(ckpt.root, ckpt.manifest["index"])
        index, _ = read_json(ipath, unique_keys=True)
        want = {e.name: rel for rel, h in ckpt.headers.items() for e in h.tensors}
        if not isinstance(index, dict) or index.get("weight_map") != want:
            raise ManifestError("the index does not match the files the manifest lists", file=ipath)


def checksum_jobs(ckpt: Checkpoint, progress=None) -> list[tuple[str, Callable[[], bool]]]:
    """(path, job) for every file a fused folder's manifest lists; a job hashes the file and says whether its sha256
    matches. Jobs, not results, so a caller can run them in the pool it already has (verify does)."""
    return [
        (ckpt.headers[f["name"]].path, lambda f=f: hash_file(ckpt.headers[f["name"]].path, progress) == f["sha256"])
        for f in (ckpt.manifest or {}).get("files", [])
    ]


def checksum_failures(ckpt: Checkpoint, workers: int, progress=None) -> list[str]:
    """Paths of the fused folder's files whose sha256 differs from the manifest (hashed in parallel)."""
    jobs = checksum_jobs(ckpt, progress)
    ok = run_parallel([job for _, job in jobs], workers)
    return [path for (path, _), good in zip(jobs, ok) if not good]


def source_pinned(src: dict[str, Any] | None) -> bool:
    """True when the source record holds a sha256 for every tensor of every source file: then fused -> hf proves
    each rebuilt tensor against it, and hashing the fused files too would add nothing. Otherwise (no record, a
    record from an older version, or one edited to drop hashes) the fused files are checked with `copy_checked`."""
    from .safetensors_file import parse_header

    files = (src or {}).get("files")
    if not files:
        return False
    for f in files:
        th = f.get("tensor_sha256")
        try:
            names = {e.name for e in parse_header(f["name"], f["header"].encode(), f["size"]).tensors}
        except MoeAdaptersError:
            return False
        if not isinstance(th, dict) or set(th) != names:
            return False
    return True


def copy_checked(ckpt: Checkpoint, copy: Callable[[], T]) -> T:
    """Run `copy` (which reads `ckpt`); for a fused source, hash its files alongside and fail on any mismatch.

    Without this, resharding a damaged fused folder would copy the damage and re-checksum it into a new manifest
    that looks perfectly valid. The hashes read the same bytes as the copy, at the same time (mostly from the page
    cache); DST is committed only after they match.
    """
    if ckpt.manifest is None:
        return copy()
    out: list[T] = []
    failures: list[str] = []
    run_parallel([lambda: out.append(copy()), lambda: failures.extend(checksum_failures(ckpt, 1))], 2)
    if failures:
        raise ManifestError(f"sha256 differs from the manifest ({MANIFEST_NAME}): the file was changed", file=failures[0])
    return out[0]

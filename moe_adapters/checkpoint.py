"""Open a checkpoint folder: config, index, safetensors headers and (in fused folders) the manifest.

Only headers are read. Paths are checked before anything is opened: an index may not name a file outside the
folder (no absolute paths, no `..`, no symlink that leads out), and pickle checkpoints are refused, never loaded.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

from .families import Family, UnknownFamily, detect, get
from .errors import CheckpointError, ManifestError
from .safetensors_file import SafetensorsHeader, TensorEntry, read_header

MANIFEST_NAME = "moe_adapters.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
MAX_JSON_BYTES = 256 * 1024 * 1024


@dataclass(frozen=True)
class StoredTensor:
    """One tensor as stored: its file (relative name), the EP rank that file belongs to (None: shared), its entry."""

    file: str
    rank: int | None
    entry: TensorEntry
    header: SafetensorsHeader

    @property
    def name(self) -> str:
        return self.entry.name


@dataclass
class Checkpoint:
    root: str
    config: dict[str, Any]
    family: Family
    layout: str  # "hf" (published, per-expert), "packed" (v5 names, EP=1, no manifest) or "fused" (with manifest)
    headers: dict[str, SafetensorsHeader]  # relative file name -> header, in file order
    file_ranks: dict[str, int | None]
    index_name: str | None = None
    index_text: bytes | None = None
    manifest: dict[str, Any] | None = None
    other_files: list[str] = field(default_factory=list)  # everything else to carry over (config, tokenizer, ...)

    @property
    def ep_size(self) -> int:
        return int(self.manifest["ep_size"]) if self.manifest else 1

    def stored(self) -> list[StoredTensor]:
        return [
            StoredTensor(f, self.file_ranks.get(f), e, h) for f, h in self.headers.items() for e in h.tensors
        ]

    @property
    def total_bytes(self) -> int:
        return sum(h.size for h in self.headers.values())

    @property
    def num_tensors(self) -> int:
        return sum(len(h.tensors) for h in self.headers.values())


def _read_json(path: str) -> tuple[Any, bytes]:
    try:
        if os.path.getsize(path) > MAX_JSON_BYTES:
            raise CheckpointError("JSON file too large", file=path)
        with open(path, "rb") as f:
            raw = f.read()
        return json.loads(raw), raw
    except (UnicodeDecodeError, ValueError) as e:
        raise CheckpointError(f"not valid JSON ({type(e).__name__}: {e})", file=path) from None
    except OSError as e:
        raise CheckpointError(f"cannot read: {e.strerror or e}", file=path) from None


def _inside(root: str, path: str) -> bool:
    root_r = os.path.realpath(root)
    real = os.path.realpath(path)
    if os.path.commonpath([root_r, real]) == root_r:
        return True
    # A Hugging Face cache snapshot links each file to ../../blobs/<hash>: accept exactly that layout.
    parts = root_r.split(os.sep)
    if "snapshots" in parts:
        repo = os.sep.join(parts[: parts.index("snapshots")])
        blobs = os.path.join(repo, "blobs")
        return os.path.commonpath([blobs, real]) == blobs
    return False


def safe_member(root: str, rel: str, *, what: str) -> str:
    """The path of `rel` inside `root`, refusing absolute paths, `..` and links that lead outside."""
    if not isinstance(rel, str) or not rel or os.path.isabs(rel) or rel.startswith(("/", "\\")):
        raise CheckpointError(f"{what} names an absolute or empty path {rel!r}", file=root)
    norm = os.path.normpath(rel)
    if norm.startswith("..") or ".." in norm.split(os.sep) or "\x00" in rel:
        raise CheckpointError(f"{what} names a path outside the checkpoint: {rel!r}", file=root)
    path = os.path.join(root, norm)
    if not _inside(root, path):
        raise CheckpointError(f"{what} {rel!r} is a link leading outside the checkpoint", file=root)
    return path


def _find_index(root: str, names: list[str]) -> str | None:
    idx = sorted(n for n in names if n.endswith(".safetensors.index.json"))
    if "model.safetensors.index.json" in idx:
        return "model.safetensors.index.json"
    if len(idx) > 1:
        raise CheckpointError(f"several index files: {', '.join(idx)}", file=root)
    return idx[0] if idx else None


def _other_files(root: str, skip: set[str]) -> list[str]:
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") or d == ".")
        for fn in sorted(filenames):
            rel = os.path.relpath(os.path.join(dirpath, fn), root)
            if rel in skip or fn.endswith(".safetensors") or fn.endswith(PICKLE_SUFFIXES):
                continue
            if fn.startswith(".") or ".tmp-moe_adapters" in rel:
                continue
            out.append(rel)
    return out


def _pick_family(cfg: dict[str, Any], family: str | None, path: str) -> Family:
    try:
        return get(family) if family else detect(cfg)
    except UnknownFamily as e:
        raise CheckpointError(str(e), file=path) from None


def open_checkpoint(path: str, family: str | None = None) -> Checkpoint:
    """Read everything but the tensor data of the checkpoint in folder `path`."""
    root = os.path.abspath(path)
    if not os.path.isdir(root):
        raise CheckpointError("not a folder" if os.path.exists(root) else "no such folder", file=path)
    names = sorted(os.listdir(root))
    cfg_path = os.path.join(root, "config.json")
    if not os.path.isfile(cfg_path):
        raise CheckpointError("no config.json: cannot tell the model family", file=path)
    config, _ = _read_json(cfg_path)
    if not isinstance(config, dict):
        raise CheckpointError("config.json is not a JSON object", file=cfg_path)

    manifest = None
    if MANIFEST_NAME in names:
        manifest, _ = _read_json(os.path.join(root, MANIFEST_NAME))
        if not isinstance(manifest, dict) or manifest.get("layout") != "fused":
            raise ManifestError("not a moe-adapters fused manifest", file=os.path.join(root, MANIFEST_NAME))
        family = family or manifest.get("family")
    fam = _pick_family(config, family, path)

    index_name = index_text = None
    file_ranks: dict[str, int | None] = {}
    if manifest is not None:
        try:
            for f in manifest["files"]:
                file_ranks[f["name"]] = f.get("rank")
        except (KeyError, TypeError):
            raise ManifestError("manifest has no valid file list", file=os.path.join(root, MANIFEST_NAME)) from None
        weight_map = None
    else:
        index_name = _find_index(root, names)
        weight_map = None
        if index_name is not None:
            index_path = safe_member(root, index_name, what="index")
            index, index_text = _read_json(index_path)
            weight_map = index.get("weight_map") if isinstance(index, dict) else None
            if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                raise CheckpointError("index has no valid weight_map", file=index_path)
            for rel in dict.fromkeys(weight_map.values()):
                file_ranks[rel] = None
        else:
            for n in names:
                if n.endswith(".safetensors"):
                    file_ranks[n] = None
    if not file_ranks:
        pickles = [n for n in names if n.endswith(PICKLE_SUFFIXES)]
        if pickles:
            raise CheckpointError(
                f"only pickle weights ({', '.join(pickles[:3])}): moe-adapters never unpickles; re-save the model with "
                "safetensors first (transformers: model.save_pretrained(dir, safe_serialization=True))",
                file=os.path.join(root, pickles[0]),
            )
        raise CheckpointError("no *.safetensors files", file=path)

    headers: dict[str, SafetensorsHeader] = {}
    for rel in file_ranks:
        fpath = safe_member(root, rel, what="index" if index_name else "manifest" if manifest else "file list")
        if not os.path.isfile(fpath):
            raise CheckpointError("listed in the index but missing", file=fpath)
        headers[rel] = read_header(fpath)

    if weight_map is not None:
        seen: dict[str, str] = {}
        for rel, h in headers.items():
            for e in h.tensors:
                if e.name in seen:
                    raise CheckpointError(f"tensor also stored in {seen[e.name]}", file=h.path, tensor=e.name)
                seen[e.name] = rel
                if weight_map.get(e.name) != rel:
                    where = weight_map.get(e.name)
                    msg = f"index says {where}" if where else "not listed in the index"
                    raise CheckpointError(f"index and files disagree: {msg}", file=h.path, tensor=e.name)
        for name, rel in weight_map.items():
            if name not in seen:
                raise CheckpointError("index lists a tensor its file does not hold", file=headers[rel].path, tensor=name)
    elif manifest is None:
        seen = {}
        for rel, h in headers.items():
            for e in h.tensors:
                if e.name in seen:
                    raise CheckpointError(f"tensor also stored in {seen[e.name]}", file=h.path, tensor=e.name)
                seen[e.name] = rel

    skip = set(file_ranks) | {x for x in (index_name, MANIFEST_NAME, (manifest or {}).get("index")) if x}
    from .layout import detect_layout  # layout knows the family's names; checkpoint only reads files

    ckpt = Checkpoint(
        root=root,
        config=config,
        family=fam,
        layout="fused" if manifest is not None else "hf",
        headers=headers,
        file_ranks=file_ranks,
        index_name=index_name,
        index_text=index_text,
        manifest=manifest,
        other_files=_other_files(root, skip),
    )
    if manifest is None:
        ckpt.layout = detect_layout(ckpt)
    return ckpt

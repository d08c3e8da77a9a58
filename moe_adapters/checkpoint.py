"""Open a checkpoint folder: config, index, safetensors headers and (in fused folders) the manifest.

Only headers are read. Paths are checked before anything is opened: an index may not name a file outside the
folder (no absolute paths, no `..`, no symlink that leads out), and pickle checkpoints are refused, never loaded.
Every file we open must be a regular file (a FIFO would hang us, a device would feed us endless bytes), every JSON
file is size-capped and parsed as strict UTF-8, and the index and manifest may not repeat a key (JSON would let
the last one silently win, hiding a tensor listed twice).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

from .families import Family, UnknownFamily, detect, get
from .errors import CheckpointError, ManifestError
from .safetensors_file import (
    SafetensorsHeader,
    TensorEntry,
    DuplicateKey,
    pread_exact,
    load_json_strict,
    open_regular,
    read_header,
)

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
    left_out: list[str] = field(default_factory=list)  # weight files not in the checkpoint's index: not carried

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


def read_json(path: str, *, unique_keys: bool = False) -> tuple[Any, bytes]:
    """Parse a JSON file of the checkpoint: a regular file, at most MAX_JSON_BYTES, UTF-8; typed errors only."""
    try:
        fd, size = open_regular(path)
        try:
            if size > MAX_JSON_BYTES:
                raise CheckpointError(f"JSON file of {size} bytes exceeds the {MAX_JSON_BYTES}-byte limit", file=path)
            raw = pread_exact(fd, size, 0)
        finally:
            os.close(fd)
    except OSError as e:
        raise CheckpointError(f"cannot read: {e.strerror or e}", file=path) from None
    try:
        return (load_json_strict(raw) if unique_keys else json.loads(raw.decode("utf-8"))), raw
    except DuplicateKey as e:
        raise CheckpointError(f"{e.key!r} is listed twice (JSON keys must be unique)"[:300], file=path) from None
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise CheckpointError(f"not valid JSON ({type(e).__name__}: {str(e)[:120]})", file=path) from None


def _inside(root: str, path: str) -> bool:
    root_r = os.path.realpath(root)
    real = os.path.realpath(path)
    if os.path.commonpath([root_r, real]) == root_r:
        return True
    # A Hugging Face cache snapshot (<cache>/models--org--name/snapshots/<rev>/) links each file to
    # ../../blobs/<hash>: accept exactly that layout, nothing else outside the folder.
    parts = root_r.split(os.sep)
    if "snapshots" in parts:
        i = len(parts) - 1 - parts[::-1].index("snapshots")
        if i >= 1 and parts[i - 1].startswith(("models--", "datasets--", "spaces--")):
            blobs = os.path.join(os.sep.join(parts[:i]), "blobs")
            return os.path.commonpath([blobs, real]) == blobs
    return False


def is_safe_relname(rel: object) -> bool:
    """A relative name that stays inside its folder whatever joins it: no absolute path, no `..`, `.` or empty
    component, no NUL. Used for names read from an index or manifest, which become paths we read or write."""
    if not isinstance(rel, str) or not rel or len(rel) > 4096 or "\x00" in rel or "\\" in rel:
        return False
    return not os.path.isabs(rel) and all(p not in ("", ".", "..") for p in rel.split("/"))


def safe_member(root: str, rel: str, *, what: str) -> str:
    """The path of `rel` inside `root`, refusing absolute paths, `..` and links that lead outside."""
    if not isinstance(rel, str) or not rel or os.path.isabs(rel) or rel.startswith(("/", "\\")):
        raise CheckpointError(f"{what} names an absolute or empty path {rel!r}"[:300], file=root)
    norm = os.path.normpath(rel)
    if norm == ".." or norm.startswith("../") or "\x00" in rel or len(rel) > 4096:
        raise CheckpointError(f"{what} names a path outside the checkpoint: {rel!r}"[:300], file=root)
    path = os.path.join(root, norm)
    if not _inside(root, path):
        raise CheckpointError(f"{what} {rel!r} is a link leading outside the checkpoint"[:300], file=root)
    return path


def _find_index(root: str, names: list[str]) -> str | None:
    idx = sorted(n for n in names if n.endswith(".safetensors.index.json"))
    if "model.safetensors.index.json" in idx:
        return "model.safetensors.index.json"
    if len(idx) > 1:
        raise CheckpointError(f"several index files: {', '.join(idx)}", file=root)
    return idx[0] if idx else None


def _raise(e: OSError) -> None:
    raise CheckpointError(f"cannot list: {e.strerror or e}", file=e.filename)


def _other_files(root: str, skip: set[str], left_out: list[str] | None = None) -> list[str]:
    """Files to carry over verbatim (config, tokenizer, ...). Each must be a regular file inside the folder: a link
    leading out would copy a file from elsewhere on the machine (a key, a password file) into DST, maybe onto the
    Hub; an unreadable subfolder or a dangling link would silently leave DST incomplete.

    Weights that are not part of the checkpoint (``*.safetensors`` outside its index, e.g. Mistral's
    ``consolidated.safetensors``) and any other ``*.safetensors.index.json`` (it would point at files that are not
    carried) are not copied; their names go to `left_out`, so the caller can say so."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root, onerror=_raise):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") or d == ".")
        for fn in sorted(filenames):
            path = os.path.join(dirpath, fn)
            rel = os.path.relpath(path, root)
            if rel in skip or fn.endswith(PICKLE_SUFFIXES):
                continue
            if fn.endswith((".safetensors", ".safetensors.index.json")):
                if left_out is not None and not fn.startswith("."):
                    left_out.append(rel)
                continue
            if fn.startswith(".") or ".tmp-moe_adapters" in rel:
                continue
            if not _inside(root, path):
                raise CheckpointError("a link leading outside the checkpoint", file=path)
            if not os.path.isfile(path):
                raise CheckpointError("not a regular file (dangling link, FIFO or device?)", file=path)
            out.append(rel)
    return out


def _pick_family(cfg: dict[str, Any], family: str | None, path: str) -> Family:
    try:
        return get(family) if family else detect(cfg)
    except UnknownFamily as e:
        raise CheckpointError(str(e), file=path) from None
    except (TypeError, ValueError, AttributeError):  # e.g. "architectures": 5 or [1, 2]
        raise CheckpointError(
            "model_type or architectures in config.json is malformed; pass --family NAME", file=path
        ) from None


def open_checkpoint(path: str, family: str | None = None) -> Checkpoint:
    """Read everything but the tensor data of the checkpoint in folder `path`."""
    root = os.path.abspath(path)
    if not os.path.isdir(root):
        raise CheckpointError("not a folder" if os.path.exists(root) else "no such folder", file=path)
    names = sorted(os.listdir(root))
    cfg_path = os.path.join(root, "config.json")
    if not os.path.lexists(cfg_path):
        raise CheckpointError("no config.json: cannot tell the model family", file=path)
    safe_member(root, "config.json", what="config")
    config, _ = read_json(cfg_path)
    if not isinstance(config, dict):
        raise CheckpointError("config.json is not a JSON object", file=cfg_path)

    manifest = None
    if MANIFEST_NAME in names:
        from .manifest import validate_manifest  # manifest imports this module

        mpath = safe_member(root, MANIFEST_NAME, what="manifest")
        manifest = validate_manifest(read_json(mpath, unique_keys=True)[0], mpath)
        family = family or manifest["family"]
    fam = _pick_family(config, family, path)

    index_name = index_text = None
    file_ranks: dict[str, int | None] = {}
    if manifest is not None:
        for f in manifest["files"]:
            file_ranks[f["name"]] = f["rank"]
        stray = [n for n in names if n.endswith(".safetensors") and n not in file_ranks]
        if stray:
            raise ManifestError(
                "a safetensors file the manifest does not list: the folder was changed after conversion",
                file=os.path.join(root, stray[0]),
            )
        weight_map = None
    else:
        index_name = _find_index(root, names)
        weight_map = None
        if index_name is not None:
            index_path = safe_member(root, index_name, what="index")
            index, index_text = read_json(index_path, unique_keys=True)
            weight_map = index.get("weight_map") if isinstance(index, dict) else None
            if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                raise CheckpointError("index has no valid weight_map", file=index_path)
            if not weight_map:
                raise CheckpointError("index lists no tensors", file=index_path)
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
        if not os.path.lexists(fpath):
            where = "index" if index_name else "manifest" if manifest else "folder"
            raise CheckpointError(f"listed in the {where} but missing", file=fpath)
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
    )
    ckpt.other_files = _other_files(root, skip, ckpt.left_out)
    if manifest is None:
        ckpt.layout = detect_layout(ckpt)
    return ckpt

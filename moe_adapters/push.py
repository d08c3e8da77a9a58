"""Hugging Face Hub out: publish a standard HF checkpoint, after proving it identical to its source.

`push` refuses a folder unless

* it is in the standard Hugging Face layout (`hf`: one tensor per expert, what the family publishes; not `fused`,
  not transformers v5's `packed`), and
* `verify` proves it identical, tensor by tensor and bit for bit, to its source: the one given with
  `verify_against` (a folder or a Hub id), or else the one recorded in the folder's provenance record
  (`.moe_adapters_provenance.json`, written by `convert` whenever it writes an HF folder; see provenance.py). With
  the recorded source, every weight file's sha256 must also equal the source file's recorded sha256 (the same
  bytes, headers included) and the sha256 `convert` recorded when it wrote the folder (nothing changed since).

`no_verify=True` skips all of that (the model card then says "not verified"): for weights that are meant to differ,
such as a fine-tuned checkpoint.

The upload is one commit made with huggingface_hub's commit API (`HfApi.create_commit` with one
`CommitOperationAdd` per file plus the generated model card, and a `CommitOperationDelete` per file the branch held
that the folder does not), after `create_repo(exist_ok=True)` and, for a branch
other than main, `create_branch(exist_ok=True)`. One commit keeps the repo consistent: a reader never sees half a
checkpoint (an index naming shards that are not there yet), which `upload_folder`'s multi-commit pipeline can
show while a large upload is in flight. It is still resumable: the large files are uploaded before the commit is
created, and re-running the same push after an interruption uploads only what is missing (LFS objects the Hub
already holds are skipped by the LFS batch API; with hf_xet, already-uploaded chunks are deduplicated), and files
whose content is already on the branch are dropped from the commit. The Hub's limits for one commit (25k LFS files)
are far beyond any checkpoint (hundreds of files).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from .checkpoint import Checkpoint, open_checkpoint
from .errors import HubError, HubOfflineError, PushRefused, VerificationFailed
from .execute import default_workers, hash_file, run_parallel
from .hub import Resolved, hub_errors, parse_hub_ref, resolve
from .provenance import PROVENANCE_NAME, origin_of, read_provenance

CARD_NAME = "README.md"
CARRIED_CARD_KEYS = ("license", "license_name", "license_link", "language", "pipeline_tag", "datasets")


@dataclass
class PushResult:
    path: str
    repo_id: str
    revision: str
    dry_run: bool
    family: str
    files: list[dict[str, Any]]  # {"path", "size", "sha256"}, the model card last
    skipped: list[str]  # files in the folder that are not uploaded (pickles, dot-files, the provenance record)
    bytes: int
    verification: dict[str, Any]
    model_card: str
    repo_url: str | None = None
    created_repo: bool | None = None
    commit_url: str | None = None
    removed: list[str] = field(default_factory=list)  # files the branch held that this folder does not: deleted
    commit_oid: str | None = None
    changed: bool | None = None  # False: the branch already held exactly these files, no commit was made
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


# ---- what is uploaded -----------------------------------------------------------------------------------------------


def upload_plan(ckpt: Checkpoint) -> tuple[list[str], list[str]]:
    """(files to upload, files left out), relative paths. The weights, their index and every other file conversion
    carries (config, tokenizer, code, licence), except the folder's README.md, which the generated card replaces."""
    keep = list(ckpt.headers)
    if ckpt.index_name:
        keep.append(ckpt.index_name)
    keep += [f for f in ckpt.other_files if f != CARD_NAME]
    keep = sorted(dict.fromkeys(keep))
    kept = set(keep) | {CARD_NAME}
    left_out = []
    for dirpath, dirnames, filenames in os.walk(ckpt.root):
        dirnames[:] = sorted(dirnames)
        for fn in sorted(filenames):
            rel = os.path.relpath(os.path.join(dirpath, fn), ckpt.root)
            if rel not in kept:
                left_out.append(rel)
    return keep, left_out


# ---- verification ---------------------------------------------------------------------------------------------------


def _public(target: Resolved) -> str:
    """How the card and commit message name a source: the Hub id and commit, or a local folder's name (a local path
    says nothing to readers and may say too much about the machine)."""
    if target.repo_id:
        return f"{target.repo_id}@{target.commit}" if target.commit else target.repo_id
    return f"local folder {os.path.basename(os.path.abspath(target.path))}"


def _verify(path: str, target: Resolved, *, workers: int | None, reporter, family: str | None) -> dict[str, Any]:
    from .verify import verify

    if os.path.realpath(target.path) == os.path.realpath(path):
        raise PushRefused("cannot verify a folder against itself; name its source with --verify-against", file=path)
    r = verify(path, target.path, workers=workers, reporter=reporter, family=family)
    if not r.identical:
        first = (
            [f"only in {path}: {n}" for n in r.only_in_a[:3]]
            + [f"only in the source: {n}" for n in r.only_in_b[:3]]
            + r.mismatched[:3]
        )
        raise VerificationFailed(
            f"not identical to {target.describe()}: {len(r.only_in_a)} tensors only here, {len(r.only_in_b)} only in "
            f"the source, {len(r.mismatched)} differ (first: {'; '.join(first)}); nothing was pushed",
            file=path,
        )
    return {
        "status": "identical",
        "method": "moe-adapters verify (canonical tensors, bit for bit)",
        "against": _public(target),
        "against_path": target.path,
        "repo_id": target.repo_id,
        "commit": target.commit,
        "tensors": r.tensors,
        "bytes_compared": r.bytes_compared,
        "seconds": round(r.seconds, 3),
    }


def _recorded_source(path: str, prov: dict[str, Any], *, progress) -> tuple[Resolved, str]:
    """The source named by the provenance record, preferring what needs no network: the original folder (or cache
    snapshot) if it is still there, then the fused folder it went through, then the Hub repo at the recorded commit."""
    origin = (prov.get("source") or {}).get("origin") or {}
    conv = prov.get("converted_from") or {}
    if origin.get("path") and os.path.isdir(origin["path"]):
        return Resolved(origin["path"], origin["path"], origin.get("repo_id"), origin.get("revision"),
                        origin.get("revision")), "the recorded source"
    if conv.get("path") and os.path.isdir(conv["path"]):
        return Resolved(conv["path"], conv["path"]), f"the {conv.get('layout', 'fused')} folder it was converted from"
    if origin.get("repo_id"):
        rev = origin.get("revision")
        ref = f"{origin['repo_id']}@{rev}" if rev else origin["repo_id"]
        return resolve(ref, progress=progress), "the recorded source"
    gone = origin.get("path") or conv.get("path") or "?"
    raise PushRefused(
        f"its recorded source ({gone}) is gone; name the source with --verify-against SRC (a folder or Hub id), or "
        "pass --no-verify to push unverified",
        file=path,
    )


def _local_origin(folder: str) -> dict[str, Any]:
    """Where a local source folder came from: a Hugging Face cache snapshot names its repo and commit; a fused
    folder's manifest records its own source's origin."""
    from .checkpoint import MANIFEST_NAME

    origin = origin_of(folder)
    if "repo_id" in origin:
        return origin
    try:
        with open(os.path.join(folder, MANIFEST_NAME), encoding="utf-8") as fh:
            recorded = ((json.load(fh).get("source") or {}).get("origin")) or {}
    except (OSError, ValueError, AttributeError):
        return origin
    return recorded if isinstance(recorded, dict) and recorded.get("repo_id") else origin


def _lossy_note(fused_folder: str) -> str | None:
    """The lossy-conversion note a fused folder's manifest records instead of an exact source, if any."""
    from .checkpoint import MANIFEST_NAME

    try:
        with open(os.path.join(fused_folder, MANIFEST_NAME), encoding="utf-8") as fh:
            note = (json.load(fh).get("source") or {}).get("lossy")
    except (OSError, ValueError, AttributeError):
        return None
    return str(note) if note else None


def _check_recorded_hashes(path: str, prov: dict[str, Any], hashes: dict[str, str]) -> str | None:
    """The folder's files must be what `convert` wrote (sha256 in the provenance record): then the checks convert
    passed while writing them (each rebuilt tensor equal to the source's recorded sha256, the source's own headers)
    still hold. Returns how many weight files that proves byte-identical to the source's, or None."""
    written = {f["name"]: f for f in prov.get("files") or [] if f.get("sha256")}
    for name, f in written.items():
        if name in hashes and hashes[name] != f["sha256"]:
            raise VerificationFailed(
                f"{name} changed since moe-adapters wrote it (sha256 differs from {PROVENANCE_NAME}); nothing was "
                "pushed",
                file=path,
            )
    src_files = (prov.get("source") or {}).get("files") or []
    same = 0
    for f in src_files:
        if f["name"] not in hashes:
            continue
        if f.get("sha256"):
            if hashes[f["name"]] != f["sha256"]:
                raise VerificationFailed(
                    f"{f['name']} is not byte-identical to the source's {f['name']} (sha256); nothing was pushed",
                    file=path,
                )
            same += 1
        elif f.get("tensors_hashed") and f["name"] in written and prov.get("checks"):
            same += 1  # rebuilt with the source's header, every tensor checked by convert, unchanged since
    return f"{same}/{len(src_files)}" if src_files and same else None


# ---- model card -----------------------------------------------------------------------------------------------------


def split_front_matter(text: str) -> tuple[dict[str, Any], str]:
    """(YAML front matter as a dict, body) of a model card; ({}, text) when it has none or it is not valid YAML."""
    import yaml

    if text.startswith("---"):
        lines = text.split("\n")
        if lines[0].strip() == "---":
            for i in range(1, len(lines)):
                if lines[i].strip() == "---":
                    try:
                        meta = yaml.safe_load("\n".join(lines[1:i])) or {}
                    except yaml.YAMLError:
                        return {}, text
                    return (meta if isinstance(meta, dict) else {}), "\n".join(lines[i + 1 :]).lstrip("\n")
    return {}, text


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.2f} MB"


def model_card(
    *,
    repo_id: str,
    family: str,
    family_description: str,
    base_model: str | None,
    source_repo: str | None,
    source_path: str | None,
    source_commit: str | None,
    converted: str,
    verification: dict[str, Any],
    files: int,
    total_bytes: int,
    original_card: str | None,
    endpoint: str = "https://huggingface.co",
) -> str:
    """README.md for the pushed repo: YAML front matter (base_model, library_name, tags, and the licence/language
    of the original card), then what the checkpoint is, where it came from and how it was verified."""
    import yaml

    from . import __version__

    orig_meta, orig_body = split_front_matter(original_card) if original_card else ({}, "")
    meta: dict[str, Any] = {}
    if base_model:
        meta["base_model"] = base_model
    meta["library_name"] = "transformers"
    for k in CARRIED_CARD_KEYS:
        if k in orig_meta:
            meta[k] = orig_meta[k]
    meta.setdefault("pipeline_tag", "text-generation")
    tags = ["moe-adapters", "mixture-of-experts", family, "safetensors"]
    for t in orig_meta.get("tags") or []:
        if isinstance(t, str) and t not in tags:
            tags.append(t)
    meta["tags"] = tags
    front = yaml.safe_dump(meta, sort_keys=False, allow_unicode=True, default_flow_style=False)

    if source_repo:
        src_link = f"[`{source_repo}`]({endpoint.rstrip('/')}/{source_repo})"
    elif source_path:  # a local folder: its name only, never the local path
        src_link = f"from a local folder (`{os.path.basename(source_path.rstrip(os.sep)) or source_path}`)"
    else:
        src_link = "(source not recorded)"
    at = f" at commit `{source_commit}`" if source_commit else ""
    if verification.get("status") == "identical":
        verdict = (
            f"identical: {verification['tensors']:,} tensors ({_gb(verification['bytes_compared'])}) compared bit for "
            f"bit by `moe-adapters verify` against `{verification['against']}`"
        )
        if verification.get("files_identical_to_source"):
            same = verification["files_identical_to_source"]
            verdict += f"; {same} weight files byte-identical to the source's (sha256)"
        summary = (
            "These weights are the source's, unchanged: `push` refuses to upload a folder that `verify` does not "
            "prove identical to its source."
        )
        if verification.get("note"):
            verdict += f" (note: {verification['note']})"
            summary = (
                f"Note: {verification['note']}; the weights are identical to the folder they were converted from, "
                "not to the published source."
            )
    else:
        verdict = f"**not verified** ({verification.get('reason', 'skipped')})"
        summary = "These weights were **not verified** against a source before upload."
    rows = [
        ("Source", f"{src_link}{at}"),
        ("Family", f"`{family}`: {family_description}"),
        ("Converted", converted),
        ("Verification", verdict),
        ("Files", f"{files} files, {_gb(total_bytes)}"),
        ("Tool", f"moe-adapters {__version__}"),
    ]
    table = "| | |\n|---|---|\n" + "".join(f"| {k} | {v.replace('|', '/')} |\n" for k, v in rows)
    name = repo_id.split("/")[-1]
    body = (
        f"# {name}\n\n"
        f"The `{family}` checkpoint {src_link}{at}, in the standard Hugging Face layout (one tensor per expert, the "
        f"names and files the model's authors publish). {summary}\n\n"
        f"{table}\n"
        "## Use\n\n"
        "```python\n"
        "from transformers import AutoModelForCausalLM\n\n"
        f'model = AutoModelForCausalLM.from_pretrained("{repo_id}")\n'
        "```\n\n"
        "The layout is the published one, so it loads wherever the source loads (transformers, vLLM, SGLang). To "
        "train with experts sharded across GPUs, convert it to the fused expert-parallel layout:\n\n"
        f"```bash\nmoe-adapters convert {repo_id} ./{name}-ep8 --ep 8\n```\n"
    )
    if orig_body.strip():
        body += "\n## Original model card\n\n" + orig_body.rstrip() + "\n"
    return f"---\n{front}---\n\n{body}"


# ---- push -----------------------------------------------------------------------------------------------------------


def push(
    path: str,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    commit_message: str | None = None,
    dry_run: bool = False,
    verify_against: str | None = None,
    no_verify: bool = False,
    base_model: str | None = None,
    workers: int | None = None,
    reporter=None,
    say: Callable[[str], None] = lambda m: None,
    family: str | None = None,
) -> PushResult:
    """Verify, then upload `path` to `repo_id` (one commit on `revision`, default main) with a generated model card.

    `dry_run` does everything but the Hub writes (no repo created, nothing uploaded) and returns what would be
    uploaded, with the model card. Raises PushRefused / VerificationFailed before any Hub write."""
    t0 = time.perf_counter()
    ref = parse_hub_ref(repo_id)
    if ref is None or ref[1] is not None:
        raise HubError(f"--repo-id must read ORG/NAME, got {repo_id!r}")
    if base_model is not None and parse_hub_ref(base_model) != (base_model, None):
        raise HubError(f"--base-model must be a Hub repo id ORG/NAME, got {base_model!r}")
    if no_verify and verify_against:
        raise PushRefused("--no-verify and --verify-against contradict each other; pass one")
    branch = revision or "main"
    if not dry_run:
        from .hub import offline

        if offline():
            raise HubOfflineError("HF_HUB_OFFLINE=1 forbids pushing: unset it to push, or pass --dry-run")

    ckpt = open_checkpoint(path, family)
    if ckpt.layout != "hf":
        raise PushRefused(
            f"a {ckpt.layout} checkpoint: push publishes the standard Hugging Face layout only (one tensor per "
            f"expert), which everyone can load; convert it first: moe-adapters convert {path} {path.rstrip('/')}-hf "
            "--to hf",
            file=ckpt.root,
        )
    prov = read_provenance(ckpt.root)
    workers = workers or default_workers()

    # 1. prove it
    if no_verify:
        verification: dict[str, Any] = {"status": "skipped", "reason": "--no-verify"}
        target = None
    elif verify_against:
        say(f"verifying {path} against {verify_against} ...")
        target = resolve(verify_against, progress=reporter)
        verification = _verify(ckpt.root, target, workers=workers, reporter=reporter, family=family)
    else:
        if prov is None:
            raise PushRefused(
                "no record of its source (it was not written by `moe-adapters convert`); name the source with "
                "--verify-against SRC (a folder or Hub id), or pass --no-verify to push unverified",
                file=ckpt.root,
            )
        target, what = _recorded_source(ckpt.root, prov, progress=reporter)
        say(f"verifying {path} against {what}, {target.describe()} ...")
        verification = _verify(ckpt.root, target, workers=workers, reporter=reporter, family=family)

    # 2. hash what is uploaded (LFS needs the sha256; huggingface_hub then does not hash again)
    files, left_out = upload_plan(ckpt)
    sizes = {rel: os.path.getsize(os.path.join(ckpt.root, rel)) for rel in files}
    if reporter:
        reporter.begin("sha256", sum(sizes.values()))
    digests = run_parallel(
        [lambda rel=rel: (rel, hash_file(os.path.join(ckpt.root, rel), reporter.advance if reporter else None))
         for rel in files],
        workers,
    )
    if reporter:
        reporter.end()
    hashes: dict[str, str] = dict(digests)  # type: ignore[arg-type]
    if prov is not None and not no_verify and not verify_against:
        same = _check_recorded_hashes(ckpt.root, prov, hashes)
        if same:
            verification["files_identical_to_source"] = same

    # 3. the model card
    origin = ((prov or {}).get("source") or {}).get("origin") or {}
    if verify_against and target is not None:  # the source named on the command line, and where it came from
        origin = {"path": target.path, "repo_id": target.repo_id, "revision": target.commit}
        if not target.repo_id:
            origin.update({k: v for k, v in _local_origin(target.path).items() if k in ("repo_id", "revision")})
    src_repo, src_commit, source = origin.get("repo_id"), origin.get("revision"), origin.get("path")
    conv = (prov or {}).get("converted_from") or {}
    if conv.get("layout") == "fused":
        converted = f"HF -> fused expert-parallel layout (EP={conv.get('ep_size', '?')}) -> HF, with moe-adapters"
    elif conv.get("layout"):
        converted = f"{conv['layout']} -> HF, with moe-adapters"
    else:
        converted = "not recorded"
    lossy = _lossy_note(conv.get("path")) if conv.get("path") else None
    if lossy:  # a dequantized / cast conversion: identical to the folder it came from, not to the published source
        converted += f" (lossy: {lossy})"
        verification["note"] = f"the conversion was lossy ({lossy})"
    original = None
    if os.path.isfile(os.path.join(ckpt.root, CARD_NAME)):
        with open(os.path.join(ckpt.root, CARD_NAME), encoding="utf-8", errors="replace") as fh:
            original = fh.read()
    try:
        from huggingface_hub import constants

        endpoint = constants.ENDPOINT
    except Exception:  # pragma: no cover
        endpoint = "https://huggingface.co"
    card = model_card(
        repo_id=repo_id,
        family=ckpt.family.name,
        family_description=ckpt.family.description,
        base_model=base_model or src_repo,
        source_repo=src_repo,
        source_path=source,
        source_commit=src_commit,
        converted=converted,
        verification=verification,
        files=len(files) + 1,
        total_bytes=sum(sizes.values()),
        original_card=original,
        endpoint=endpoint,
    )
    card_bytes = card.encode("utf-8")
    listing = [{"path": rel, "size": sizes[rel], "sha256": hashes[rel]} for rel in files]
    listing.append({"path": CARD_NAME, "size": len(card_bytes), "sha256": hashlib.sha256(card_bytes).hexdigest()})
    result = PushResult(
        path=ckpt.root,
        repo_id=repo_id,
        revision=branch,
        dry_run=dry_run,
        family=ckpt.family.name,
        files=listing,
        skipped=left_out,
        bytes=sum(f["size"] for f in listing),
        verification={k: v for k, v in verification.items() if k != "against_path"},
        model_card=card,
    )
    if dry_run:
        result.seconds = time.perf_counter() - t0
        return result

    # 4. upload: one commit
    message = commit_message or (
        f"Upload {ckpt.family.name} checkpoint, verified identical to {verification['against']} (moe-adapters)"
        if verification["status"] == "identical"
        else f"Upload {ckpt.family.name} checkpoint (moe-adapters, not verified)"
    )
    description = f"Pushed with moe-adapters. Verification: {verification['status']}" + (
        f" against {verification['against']} ({verification['tensors']:,} tensors, bit for bit)"
        if verification["status"] == "identical"
        else ""
    )
    result.repo_url, result.created_repo, result.commit_url, result.commit_oid, result.changed, result.removed = _upload(
        ckpt.root, repo_id, branch, files, hashes, card_bytes, private=private, message=message,
        description=description, reporter=reporter, say=say,
    )
    result.seconds = time.perf_counter() - t0
    return result


def _upload(root: str, repo_id: str, branch: str, files: list[str], hashes: dict[str, str], card: bytes, *,
            private: bool, message: str, description: str, reporter,
            say: Callable[[str], None]) -> tuple[str, bool, str, str, bool, list[str]]:
    """create_repo / create_branch / create_commit. huggingface_hub's own tqdm bars are switched off for the call
    (they do not compose with ours: one line per file, left behind); the reporter shows the phase instead, with the
    bytes to send and the time elapsed (the commit API reports no per-byte progress to its caller).

    The same commit deletes the files the branch held that the folder does not (an earlier push's shards, notes):
    what the card says was verified is then exactly what the branch holds. `.gitattributes` stays."""
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    from . import __version__

    api = HfApi(library_name="moe-adapters", library_version=__version__)
    was_disabled = are_progress_bars_disabled()
    disable_progress_bars()
    try:
        with hub_errors(repo_id, branch, writing=True):
            existed = api.repo_exists(repo_id)
            url = api.create_repo(repo_id, private=True if private else None, exist_ok=True)
            if branch != "main":
                api.create_branch(repo_id, branch=branch, exist_ok=True)
            before = api.repo_info(repo_id, revision=branch).sha
            ops = []
            for rel in files:
                op = CommitOperationAdd(path_in_repo=rel.replace(os.sep, "/"), path_or_fileobj=os.path.join(root, rel))
                op.upload_info.sha256 = bytes.fromhex(hashes[rel])  # hashed above: not read twice
                ops.append(op)
            ops.append(CommitOperationAdd(path_in_repo=CARD_NAME, path_or_fileobj=card))
            keep = {op.path_in_repo for op in ops} | {".gitattributes"}
            stale = sorted(p for p in api.list_repo_files(repo_id, revision=branch) if p not in keep)
            ops += [CommitOperationDelete(path_in_repo=p) for p in stale]
            say(f"uploading {len(ops)} files to {repo_id} ({branch}) ...")
            if reporter:
                size = sum(os.path.getsize(os.path.join(root, rel)) for rel in files) + len(card)
                reporter.begin(f"upload {len(ops)} files ({_gb(size)}) to {repo_id}", None)
            info = api.create_commit(repo_id, ops, commit_message=message, commit_description=description,
                                     revision=branch)
    finally:
        if reporter:
            reporter.end()
        if not was_disabled:
            enable_progress_bars()
    return str(url), not existed, info.commit_url, info.oid, info.oid != before, stale

"""Hugging Face Hub in: resolve a source that is a Hub repo id to a folder in the local cache.

Everything goes through `huggingface_hub` (no HTTP client of our own), so its settings apply unchanged: `HF_HOME` /
`HF_HUB_CACHE` (where files go), `HF_ENDPOINT` (which Hub), `HF_HUB_OFFLINE=1` (cache only), `HF_TOKEN` or the
token saved by `hf auth login` (private and gated repos). Tokens are never read, printed or logged here; only
huggingface_hub sends them, and error messages are scrubbed of the token in case a server echoes it.

A source is a Hub repo id when it is not an existing path and reads `ORG/NAME` or `ORG/NAME@REVISION`
(`--revision` on the command line does the same). Only what conversion needs is downloaded: safetensors weights and
their index, JSON configs, tokenizer files, the model card, licence and code files. Pickle weights (`*.bin`, `*.pt`,
`*.pth`, ...) are never downloaded.
"""

from __future__ import annotations

import contextlib
import os
import re
import threading
from dataclasses import dataclass
from typing import Any, Iterator

from .errors import CheckpointError, HubAuthError, HubError, HubNotFoundError, HubOfflineError
from .provenance import origin_of

ALLOW_PATTERNS = [
    "*.safetensors",
    "*.safetensors.index.json",
    "*.json",  # config.json, generation_config.json, tokenizer_config.json, special_tokens_map.json, ...
    "*.txt",  # merges.txt, vocab.txt, LICENSE.txt
    "*.model",  # sentencepiece tokenizers
    "*.tiktoken",
    "*.jinja",  # chat_template.jinja
    "*.md",  # README.md (model card), LICENSE.md
    "*.py",  # remote code (configuration_*.py / modeling_*.py): copied along, never imported by moe-adapters
    "LICENSE*",
    "NOTICE*",
    "USE_POLICY*",
]
# Never fetched even when an allow pattern matches: pickles and other weight formats we do not convert.
IGNORE_PATTERNS = ["*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl", "*.pickle", "*.h5", "*.msgpack", "*.onnx", "*.gguf",
                   "original/*", ".git*"]

_NAME = r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9_-])?"
_REPO_ID = re.compile(rf"^{_NAME}/{_NAME}$")


def parse_hub_ref(text: str) -> tuple[str, str | None] | None:
    """`ORG/NAME` -> (repo id, None); `ORG/NAME@REV` -> (repo id, REV); None when `text` cannot be a Hub repo id."""
    repo_id, sep, rev = text.partition("@")
    if not _REPO_ID.match(repo_id) or "--" in repo_id or ".." in repo_id or repo_id.endswith(".git"):
        return None
    if sep and not rev:
        return None
    return repo_id, (rev or None)


def split_ref(src: str, revision: str | None) -> tuple[str, str | None]:
    """(repo id, revision) of `ORG/NAME[@REV]` and an optional --revision (which must agree with @REV)."""
    ref = parse_hub_ref(src)
    if ref is None:
        raise HubError(f"not a Hub repo id: {src!r} (expected ORG/NAME or ORG/NAME@REVISION)")
    repo_id, rev = ref
    if rev and revision and rev != revision:
        raise HubError(f"two revisions given for {repo_id}: {rev!r} (after @) and {revision!r} (--revision)")
    return repo_id, rev or revision


def looks_like_hub_id(text: str) -> bool:
    return not os.path.exists(text) and parse_hub_ref(text) is not None


@dataclass
class Resolved:
    """A source as given (`given`) and the local folder it names (`path`); for a Hub id, the repo and commit."""

    given: str
    path: str
    repo_id: str | None = None
    revision: str | None = None  # as asked for (branch, tag or commit); None means the default branch
    commit: str | None = None  # the exact commit the files come from

    @property
    def from_hub(self) -> bool:
        return self.repo_id is not None

    def describe(self) -> str:
        if not self.repo_id:
            return self.path
        return f"{self.repo_id}@{self.commit[:12] if self.commit else self.revision or 'main'}"

    def as_dict(self) -> dict[str, Any]:
        return {"repo_id": self.repo_id, "revision": self.revision, "commit": self.commit, "path": self.path}


def resolve(src: str, revision: str | None = None, *, progress=None) -> Resolved:
    """A local folder as it is; a Hub repo id downloaded (or found in the cache) with huggingface_hub.

    `progress` is a reporter (`begin`/`advance`/`end`) for the download's bytes. Anything that is neither an existing
    path nor a Hub repo id is returned unchanged, so the caller's own error ("no such folder") names it.
    """
    if os.path.exists(src):
        if revision:
            raise HubError(f"--revision applies to Hub repo ids, and {src} is a local folder")
        return Resolved(src, src)
    if parse_hub_ref(src) is None:
        return Resolved(src, src)
    repo_id, rev = split_ref(src, revision)
    try:
        path = download(repo_id, rev, progress=progress, local_hint=src)
    finally:
        if progress is not None:
            progress.end()
    return Resolved(src, path, repo_id, rev, origin_of(path).get("revision"))


def download(repo_id: str, revision: str | None = None, *, progress=None, local_hint: str | None = None) -> str:
    """`snapshot_download` of what conversion needs; returns the snapshot folder inside the Hugging Face cache."""
    from huggingface_hub import snapshot_download

    from . import __version__

    if progress is not None:
        progress.begin(f"download {repo_id}", 0)
    with hub_errors(repo_id, revision, local_hint=local_hint):
        path = snapshot_download(
            repo_id,
            revision=revision,
            allow_patterns=ALLOW_PATTERNS,
            ignore_patterns=IGNORE_PATTERNS,
            library_name="moe-adapters",
            library_version=__version__,
            tqdm_class=progress_bar_class(progress) if progress is not None else None,
        )
    if not any(n.endswith(".safetensors") for n in os.listdir(path)):
        raise CheckpointError(
            f"Hub repo {repo_id} has no *.safetensors weights; moe-adapters never downloads or unpickles pickle "
            "weights (*.bin, *.pt)",
            file=path,
        )
    return path


def describe_remote(src: str, revision: str | None = None, family: str | None = None) -> dict[str, Any]:
    """`inspect` of a Hub repo without downloading its weights.

    The small files (config, index, manifest, tokenizer) come through `snapshot_download` into the cache as usual;
    each safetensors header is read with `HfApi.parse_safetensors_file_metadata` (an HTTP range request for the
    header only). A temporary folder then holds the small files and, for every weight file, a sparse stand-in with
    that header and the file's real size (no data blocks on disk), and `inspect.describe` reads it like any folder.
    """
    import shutil
    import tempfile

    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.hf_api import RepoFile

    from . import __version__
    from .inspect import describe
    from .safetensors_file import encode_header

    repo_id, revision = split_ref(src, revision)
    api = HfApi(library_name="moe-adapters", library_version=__version__)
    with hub_errors(repo_id, revision, local_hint=src):
        small = snapshot_download(
            repo_id,
            revision=revision,
            allow_patterns=[p for p in ALLOW_PATTERNS if p != "*.safetensors"],
            ignore_patterns=IGNORE_PATTERNS,
            library_name="moe-adapters",
            library_version=__version__,
            tqdm_class=progress_bar_class(_Silent()),  # a few small files: no bars
        )
        commit = origin_of(small).get("revision") or revision
        weights = [
            f for f in api.list_repo_tree(repo_id, revision=commit, recursive=True)
            if isinstance(f, RepoFile) and f.path.endswith(".safetensors")
        ]
        if not weights:
            raise CheckpointError(f"Hub repo {repo_id} has no *.safetensors weights", file=small)
        headers = {f.path: api.parse_safetensors_file_metadata(repo_id, f.path, revision=commit) for f in weights}
    tmp = tempfile.mkdtemp(prefix="moe-adapters-inspect-")
    try:
        for dirpath, _, names in os.walk(small):
            for n in names:
                src = os.path.join(dirpath, n)
                dst = os.path.join(tmp, os.path.relpath(src, small))
                os.makedirs(os.path.dirname(dst), exist_ok=True)
                shutil.copyfile(src, dst)
        for f in weights:
            meta = headers[f.path]
            entries = sorted(
                ((name, t.dtype, tuple(t.shape), *t.data_offsets) for name, t in meta.tensors.items()),
                key=lambda e: e[3],
            )
            data = max((e[4] for e in entries), default=0)
            text = encode_header(entries, meta.metadata or None)
            real = (f.lfs.size if f.lfs is not None else f.size) - 8 - data  # the original header's length
            if len(text) < real:
                text += b" " * (real - len(text))  # same size as the real file
            path = os.path.join(tmp, f.path)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "wb") as out:
                out.write(len(text).to_bytes(8, "little") + text)
                out.truncate(8 + len(text) + data)  # sparse: no data is stored
        info = describe(tmp, family)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    info["path"] = f"{repo_id}@{commit}"
    info["hub_source"] = {"repo_id": repo_id, "revision": revision, "commit": commit, "path": None,
                          "weights_downloaded": False}
    return info


# ---- errors ---------------------------------------------------------------------------------------------------------


def _token_scrubbed(text: str) -> str:
    try:
        from huggingface_hub import get_token

        token = get_token()
    except Exception:
        token = None
    return text.replace(token, "***") if token and len(token) >= 8 else text


def offline() -> bool:
    from huggingface_hub import constants

    f = getattr(constants, "is_offline_mode", None)
    return bool(f() if callable(f) else getattr(constants, "HF_HUB_OFFLINE", False))


def _endpoint() -> str:
    from huggingface_hub import constants

    return constants.ENDPOINT


def _cache() -> str:
    from huggingface_hub import constants

    return constants.HF_HUB_CACHE


def _is_network_error(e: BaseException) -> bool:
    if isinstance(e, (ConnectionError, TimeoutError)):
        return True
    mod = type(e).__module__.split(".")[0]
    return mod in ("httpx", "httpx2", "httpcore", "requests", "urllib3") and any(
        w in type(e).__name__ for w in ("Connect", "Timeout", "Network", "Protocol", "Proxy")
    )


@contextlib.contextmanager
def hub_errors(repo_id: str, revision: str | None = None, *, local_hint: str | None = None,
               writing: bool = False) -> Iterator[None]:
    """Turn huggingface_hub's exceptions into moe-adapters' typed errors with a message that says what to do."""
    from huggingface_hub import errors as hf

    where = f"{repo_id}@{revision}" if revision else repo_id
    also = f"; and there is no local folder {local_hint!r}" if local_hint else ""  # a mistyped path looks like an id
    try:
        yield
    except hf.GatedRepoError:
        raise HubAuthError(
            f"{repo_id} is gated: accept its terms on the Hub, then use a token with access (HF_TOKEN or "
            "`hf auth login`)"
        ) from None
    except hf.RepositoryNotFoundError:
        raise HubNotFoundError(
            f"no Hub repo {repo_id} at {_endpoint()} (or it is private and the token does not grant access){also}"
        ) from None
    except hf.RevisionNotFoundError:
        raise HubNotFoundError(f"{repo_id} has no revision {revision or 'main'!r} at {_endpoint()}") from None
    except (hf.OfflineModeIsEnabled, hf.LocalEntryNotFoundError) as e:
        cause = e.__cause__ or e.__context__
        if offline():
            raise HubOfflineError(
                f"{where} is not in the local cache ({_cache()}) and HF_HUB_OFFLINE=1 forbids downloading it: unset "
                f"HF_HUB_OFFLINE, or download it once while online{also}"
            ) from None
        status = getattr(getattr(cause, "response", None), "status_code", None)
        if isinstance(cause, hf.HfHubHTTPError) and status in (401, 403):
            raise HubAuthError(f"{where}: the Hub refused the token ({cause.response.status_code}); set HF_TOKEN or "
                               "run `hf auth login`") from None
        raise HubOfflineError(
            f"cannot reach the Hub at {_endpoint()} for {where}, and it is not in the local cache ({_cache()}): check "
            f"the network and HF_ENDPOINT, or set HF_HUB_OFFLINE=1 to use cached files only{also}"
        ) from None
    except hf.HFValidationError as e:
        raise HubError(f"not a valid Hub repo id {repo_id!r}: {e}") from None
    except hf.HfHubHTTPError as e:
        status = e.response.status_code if e.response is not None else None
        msg = _token_scrubbed(str(e).splitlines()[0] if str(e) else type(e).__name__)
        if status in (401, 403):
            need = "write access" if writing else "access"
            raise HubAuthError(
                f"{where}: the Hub refused the token ({status}): use a token with {need} (HF_TOKEN or `hf auth login`)"
            ) from None
        raise HubError(f"{where}: Hub request failed: {msg}") from None
    except Exception as e:
        if _is_network_error(e):
            raise HubOfflineError(
                f"cannot reach the Hub at {_endpoint()} for {where} ({type(e).__name__}): check the network and "
                "HF_ENDPOINT"
            ) from None
        raise


# ---- progress -------------------------------------------------------------------------------------------------------


class _Silent:
    def begin(self, label: str, total: int | None) -> None:
        pass

    def advance(self, n: int) -> None:
        pass

    def set_total(self, total: int) -> None:
        pass

    def end(self) -> None:
        pass


def progress_bar_class(reporter) -> type:
    """A tqdm stand-in for `snapshot_download(tqdm_class=...)` that feeds the download's byte count to `reporter`.

    huggingface_hub aggregates every file's bytes into one bar (unit "B", "Reconstructing..."), whose total grows as
    files are announced; we forward that bar (`set_total`, `advance`) and ignore the others (the file count and the
    network-bytes bars). The caller has begun the reporter's phase and ends it.
    """
    state: dict[str, Any] = {"tracked": None}
    lock = threading.Lock()

    class _Bar:
        def __init__(self, iterable=None, *args: Any, **kw: Any) -> None:
            self.iterable = iterable
            self.desc = str(kw.get("desc") or "")
            self.n = kw.get("initial") or 0
            self._total = kw.get("total") or 0
            self.format_dict: dict[str, Any] = {"rate": None}
            with lock:
                if (kw.get("unit") == "B" and state["tracked"] is None
                        and not self.desc.lower().startswith("downloading bytes")):
                    state["tracked"] = self
            self._mine = state["tracked"] is self

        # the parts of tqdm's interface that huggingface_hub uses
        @property
        def total(self) -> int:
            return self._total

        @total.setter
        def total(self, value: int | None) -> None:
            self._total = value or 0
            if getattr(self, "_mine", False) and hasattr(reporter, "set_total"):
                reporter.set_total(self._total)

        def update(self, n: int | float | None = 1) -> None:
            n = int(n or 0)
            self.n += n
            if self._mine and n > 0:
                reporter.advance(n)

        def __iter__(self):
            return iter(self.iterable or [])

        def __enter__(self) -> "_Bar":
            return self

        def __exit__(self, *exc: Any) -> None:
            pass

        def _noop(self, *a: Any, **k: Any) -> None:
            pass

        _lock = threading.RLock()  # tqdm's locking API (older huggingface_hub runs tqdm's thread_map with it)

        @classmethod
        def get_lock(cls):
            return cls._lock

        @classmethod
        def set_lock(cls, lk) -> None:
            cls._lock = lk

        close = refresh = set_description = set_description_str = set_postfix_str = set_postfix = clear = _noop

    return _Bar

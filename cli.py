"""The `moe-adapters` command: parse, call the library, print. Errors become one `error:` line and exit 2."""

from __future__ import annotations

import functools
import json
import math
import sys
import threading
from typing import Any, Callable, Optional

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(
    name="moe-adapters",
    help=(
        "Move Mixture-of-Experts checkpoints between the Hugging Face layout (one tensor per expert) and fused, "
        "expert-parallel layouts, and prove the round trip exact.\n\n"
        "Examples:\n\n"
        "  moe-adapters inspect Qwen/Qwen3-30B-A3B\n\n"
        "  moe-adapters convert Qwen/Qwen3-30B-A3B ./qwen-ep8 --ep 8     # a Hub id or a local folder\n\n"
        "  moe-adapters convert ./qwen-ep8 ./qwen-hf          # back to the original files, byte for byte\n\n"
        "  moe-adapters verify Qwen/Qwen3-30B-A3B ./qwen-ep8\n\n"
        "  moe-adapters push ./qwen-hf --repo-id my-org/Qwen3-30B-A3B --dry-run\n\n"
        "Global options go before the command (moe-adapters --quiet convert ...). Each command's --help has "
        "examples; docs/cli/ has a page per command."
    ),
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_enable=False,
)

_state: dict[str, Any] = {"debug": False, "quiet": False}
out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)


def _show_version(value: bool) -> None:
    if value:
        from moe_adapters import __version__

        print(f"moe-adapters {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks on errors."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars or summaries; errors only."),
    version: bool = typer.Option(
        False, "--version", help="Print the version and exit.", callback=_show_version, is_eager=True
    ),
) -> None:
    _state["debug"] = debug
    _state["quiet"] = quiet


def fail(message: str, code: int = 2) -> None:
    sys.stderr.write(f"error: {message}\n")
    raise typer.Exit(code)


def reports_errors(fn: Callable) -> Callable:
    """Turn library errors into one `error:` line and exit 2 (tracebacks only with --debug)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from moe_adapters.errors import MoeAdaptersError

        try:
            return fn(*args, **kwargs)
        except (typer.Exit, typer.Abort, KeyboardInterrupt):
            raise
        except MoeAdaptersError as e:
            if _state["debug"]:
                raise
            fail(str(e))
        except OSError as e:
            if _state["debug"]:
                raise
            fail(f"{e.filename}: {e.strerror}" if e.filename else str(e))
        except Exception as e:  # an internal error still gets one line; --debug shows where
            if _state["debug"]:
                raise
            fail(f"internal error: {type(e).__name__}: {e} (rerun with --debug for the traceback)")

    return wrapper


class RichReporter:
    """Progress bar with bytes, speed and ETA on stderr; thread-safe `advance`."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self._progress = None
        self._task = None
        self._lock = threading.Lock()

    def begin(self, label: str, total: Optional[int]) -> None:
        """A new phase; `total=None` when its size is unknown (a pulsing bar with the time elapsed)."""
        if not self.enabled:
            return
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
            TransferSpeedColumn,
        )

        self.end()
        if total is None:
            columns: list = [TimeElapsedColumn()]
        else:
            columns = [DownloadColumn(), TransferSpeedColumn(), TimeRemainingColumn()]
        self._progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            *columns,
            console=err,
            transient=True,
        )
        self._progress.start()
        self._task = self._progress.add_task(label, total=total)

    def advance(self, n: int) -> None:
        if self._progress is not None:
            with self._lock:
                self._progress.update(self._task, advance=n)

    def set_total(self, total: int) -> None:
        """For phases whose size is learnt as they go (a Hub download announces files one by one)."""
        if self._progress is not None:
            with self._lock:
                self._progress.update(self._task, total=total)

    def end(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None


def _reporter(as_json: bool) -> RichReporter:
    return RichReporter(enabled=not (_state["quiet"] or as_json) and err.is_terminal)


def _source(src: str, revision: Optional[str], as_json: bool) -> tuple[str, Optional[dict]]:
    """SRC as a local folder: itself; as a Hub repo id (ORG/NAME or ORG/NAME@REV, when no such path exists): the
    snapshot huggingface_hub downloads (or finds) in its cache. Returns (folder, Hub details or None)."""
    from moe_adapters.hub import looks_like_hub_id, resolve

    if not looks_like_hub_id(src):
        if revision:
            resolve(src, revision)  # raises: --revision needs a Hub id
        return src, None
    talk = not (as_json or _state["quiet"]) and err.is_terminal  # like the progress bars: a terminal only
    _hub_logging()
    if talk:
        err.print(f"resolving {src} on the Hub ...")
    r = resolve(src, revision, progress=_reporter(as_json))
    if talk:
        err.print(f"using {r.describe()} ({r.path})")
    return r.path, r.as_dict()


def _hub_logging() -> None:
    """--quiet means errors only, huggingface_hub's warnings included. Its "no files have been modified" warning is
    dropped always: the summary says "already up to date" itself."""
    from huggingface_hub.utils import logging as hf_logging

    if _state["quiet"]:
        hf_logging.set_verbosity_error()
    root = hf_logging.get_logger()  # the library's logger; its children's records reach its handlers
    for target in [root, *root.handlers]:
        target.addFilter(_not_modified_filter)


def _not_modified_filter(record: Any) -> bool:
    return "No files have been modified" not in record.getMessage()


def _complete_family(incomplete: str) -> list[str]:
    from moe_adapters.families import REGISTRY

    return [n for n in REGISTRY if n.startswith(incomplete)]


def _complete_layout(incomplete: str) -> list[str]:
    return [n for n in ("fused", "hf") if n.startswith(incomplete)]


REVISION_HELP = "Branch, tag or commit, when SRC is a Hub repo id (same as SRC@REVISION)."


def _print_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, default=str) + "\n")


def _gb(n: int) -> str:
    return f"{n / 1e9:.3f} GB" if n >= 1e8 else f"{n / 1e6:.2f} MB"


def _table(title: str, rows: list[tuple[str, Any]]) -> None:
    if _state["quiet"]:
        return
    t = Table(title=title, show_header=False, title_justify="left")
    t.add_column(style="bold")
    t.add_column()
    for k, v in rows:
        t.add_row(k, str(v))
    out.print(t)


def parse_size(text: str, option: str = "--max-shard-size") -> int:
    """``5GB``, ``500MB``, ``64KiB``, ``1000``: a positive whole number of bytes (one `error:` line otherwise)."""
    from moe_adapters.errors import OptionError

    units = {"": 1, "B": 1, "KB": 1000, "MB": 1000**2, "GB": 1000**3, "KIB": 1024, "MIB": 1024**2, "GIB": 1024**3}
    s = text.strip().upper()
    num = s.rstrip("KMGIB")
    try:
        value = float(num) * units[s[len(num) :]]
    except (ValueError, KeyError):
        raise OptionError(f"{option}: not a size: {text!r} (e.g. 5GB, 500MB)") from None
    if not math.isfinite(value) or value < 1:
        raise OptionError(f"{option}: must be a positive size, not {text!r} (e.g. 5GB, 500MB)")
    return int(value)


@app.command(
    epilog=(
        "Examples:\n\n"
        "  moe-adapters families\n\n"
        "  moe-adapters families --json"
    )
)
@reports_errors
def families(as_json: bool = typer.Option(False, "--json", help="Machine-readable output.")) -> None:
    """List the registered model families and what they match."""
    from moe_adapters.families import REGISTRY

    rows = [
        {
            "name": f.name,
            "model_types": list(f.model_types),
            "architectures": list(f.architectures),
            "gated": f.experts.gated,
            "activation": f.experts.activation,
            "router": f.router.scoring,
            "shared_experts": f.shared is not None,
            "stacked": f.experts.stacked,  # experts already [E, ...] in the published checkpoint
            "description": f.description,
        }
        for f in REGISTRY.values()
    ]
    if as_json:
        return _print_json(rows)
    t = Table("family", "model_type", "architectures", "experts", "router")
    for col in t.columns[:3]:
        col.overflow = "fold"  # names are what a config is matched on: never cut them short
    for r in rows:
        kind = ("gated " if r["gated"] else "") + r["activation"] + (" + shared" if r["shared_experts"] else "")
        kind += " (stacked)" if r["stacked"] else ""
        t.add_row(r["name"], ", ".join(r["model_types"]), ", ".join(r["architectures"]), kind, r["router"])
    out.print(t)


@app.command(
    epilog=(
        "PATH may be a Hub repo id (ORG/NAME, ORG/NAME@REVISION or --revision): only its small files (config, index) "
        "and each safetensors header (an HTTP range request) are fetched, never the weights; with HF_HUB_OFFLINE=1 a "
        "cached copy is read.\n\n"
        "Examples:\n\n"
        "  moe-adapters inspect ./qwen-ep8\n\n"
        "  moe-adapters inspect Qwen/Qwen3-30B-A3B --json"
    )
)
@reports_errors
def inspect(
    path: str = typer.Argument(..., help="Checkpoint folder (HF or fused), or a Hub repo id ORG/NAME\\[@REVISION]."),
    family: Optional[str] = typer.Option(
        None, "--family", help="Family name, when config.json is not enough.", autocompletion=_complete_family
    ),
    revision: Optional[str] = typer.Option(None, "--revision", help=REVISION_HELP),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
) -> None:
    """Show a checkpoint's family, layout, EP size, experts, MoE layers, tensors and bytes."""
    from moe_adapters.hub import describe_remote, looks_like_hub_id, offline
    from moe_adapters.inspect import describe

    if looks_like_hub_id(path) and not offline():  # headers only: no weights downloaded
        _hub_logging()
        info = describe_remote(path, revision, family)
    else:  # a folder, or a Hub id read from the cache (HF_HUB_OFFLINE=1)
        local, hub = _source(path, revision, as_json)
        info = describe(local, family)
        if hub:
            info["hub_source"] = hub
    if as_json:
        return _print_json(info)
    layers = info["moe_layers"]
    shown = ", ".join(map(str, layers[:12])) + (f", ... ({len(layers)} layers)" if len(layers) > 12 else "")
    _table(
        f"{path} @ {info['hub_source']['commit']}" if info.get("hub_source") else path,
        [
            ("family", info["family"]),
            ("layout", info["layout"]),
            ("ep_size", info["ep_size"]),
            ("num_experts", info["num_experts"]),
            ("moe_layers", shown),
            ("tensors", f"{info['tensors']:,}"),
            ("files", info["files"]),
            ("bytes", f"{info['bytes']:,} ({_gb(info['bytes'])})"),
            ("dtypes", ", ".join(f"{k} {v:,}" for k, v in info["dtypes"].items())),
        ],
    )


@app.command(
    epilog=(
        "SRC may be a Hub repo id (ORG/NAME, ORG/NAME@REVISION or --revision): huggingface_hub downloads what "
        "conversion needs (safetensors, configs, tokenizer, model card; never pickles) into its cache (HF_HOME), "
        "or reads the cache alone with HF_HUB_OFFLINE=1.\n\n"
        "Examples:\n\n"
        "  moe-adapters convert Qwen/Qwen3-30B-A3B ./qwen-ep8 --ep 8\n\n"
        "  moe-adapters convert ./qwen-ep8 ./qwen-ep4 --to fused --ep 4\n\n"
        "  moe-adapters convert ./qwen-ep8 ./qwen-hf          # back to the source files, byte for byte"
    )
)
@reports_errors
def convert(
    src: str = typer.Argument(..., help="Source checkpoint folder, or a Hub repo id ORG/NAME\\[@REVISION]."),
    dst: str = typer.Argument(..., help="Destination folder (must not exist unless --overwrite)."),
    to: Optional[str] = typer.Option(
        None, "--to", help="Target layout: fused or hf (default: the other one).", autocompletion=_complete_layout
    ),
    ep: Optional[int] = typer.Option(None, "--ep", help="Expert-parallel size of the fused layout."),
    family: Optional[str] = typer.Option(
        None, "--family", help="Family name, when config.json is not enough.", autocompletion=_complete_family
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace DST if it exists (atomically)."),
    workers: Optional[int] = typer.Option(None, "--workers", min=1, help="Parallel I/O threads."),
    max_shard_size: str = typer.Option(
        "5GB", "--max-shard-size", help="Most tensor bytes per output file, e.g. 5GB or 500MB (headers add a little)."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
    revision: Optional[str] = typer.Option(None, "--revision", help=REVISION_HELP),
    dequantize: Optional[str] = typer.Option(
        None, "--dequantize", help="Dequantize FP8 block-scaled (DeepSeek) or MXFP4 (gpt-oss) weights to this dtype (bf16), dropping the scales. Lossy."
    ),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="Cast floating-point weights (bf16, fp16, fp32). Lossy."),
) -> None:
    """Convert HF <-> fused (and fused EP=N -> EP=M) by copying byte ranges; writes DST atomically.

    Lossless by default. Under torchrun (or with RANK/WORLD_SIZE set) every rank writes its share of the files
    into one shared temporary folder and rank 0 writes the manifest and renames it into place.
    """
    from moe_adapters.convert import convert as run

    local_src, hub = _source(src, revision, as_json)
    s = run(
        local_src,
        dst,
        to=to.lower() if to else None,
        ep=ep,
        family=family,
        overwrite=overwrite,
        workers=workers,
        max_shard_bytes=parse_size(max_shard_size),
        reporter=_reporter(as_json),
        dequantize=dequantize,
        dtype=dtype,
    )
    if as_json:
        return _print_json(s.as_dict() | ({"hub_source": hub} if hub else {}))
    _table(
        f"converted ({s.direction}, {s.family}, EP={s.ep_size})",
        ([("source", f"{src} @ {hub['commit']}")] if hub else [])
        + [
            ("destination", s.dst),
            ("tensors", f"{s.tensors:,}"),
            ("files", s.files),
            ("bytes written", f"{s.bytes_written:,} ({_gb(s.bytes_written)})"),
            ("seconds", f"{s.seconds:.2f}"),
            ("throughput", f"{s.gbps:.2f} GB/s"),
            ("peak RSS", f"{s.peak_rss / 2**20:.0f} MiB"),
        ]
        + [("check", c) for c in s.checks]
        + ([("left out", "not in the index, not copied: " + _first(s.left_out, 8))] if s.left_out else []),
    )


def _first(names: list[str], n: int) -> str:
    return ", ".join(names[:n]) + (" ..." if len(names) > n else "")


@app.command(
    epilog=(
        "Either side may be a Hub repo id (ORG/NAME or ORG/NAME@REVISION), fetched into the Hugging Face cache.\n\n"
        "Examples:\n\n"
        "  moe-adapters verify ./Qwen3-30B-A3B ./qwen-ep8\n\n"
        "  moe-adapters verify Qwen/Qwen3-30B-A3B ./qwen-hf --json"
    )
)
@reports_errors
def verify(
    a: str = typer.Argument(..., help="First checkpoint (any layout; folder or Hub id ORG/NAME\\[@REVISION])."),
    b: str = typer.Argument(..., help="Second checkpoint (any layout; folder or Hub id ORG/NAME\\[@REVISION])."),
    workers: Optional[int] = typer.Option(None, "--workers", min=1, help="Parallel I/O threads."),
    family: Optional[str] = typer.Option(
        None, "--family", help="Family name, when config.json is not enough (as for convert).",
        autocompletion=_complete_family,
    ),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
) -> None:
    """Compare two checkpoints bitwise in canonical form. Exit 0 identical, 1 different, 2 bad input."""
    from moe_adapters.verify import verify as run

    local_a, hub_a = _source(a, None, as_json)
    local_b, hub_b = _source(b, None, as_json)
    r = run(local_a, local_b, workers=workers, reporter=_reporter(as_json), family=family)
    if as_json:
        _print_json(r.as_dict() | {k: v for k, v in (("hub_a", hub_a), ("hub_b", hub_b)) if v})
    else:
        _table(
            "identical" if r.identical else "DIFFERENT",
            [
                ("tensors compared", f"{r.tensors:,}"),
                ("bytes compared", f"{r.bytes_compared:,} ({_gb(r.bytes_compared)})"),
                ("seconds", f"{r.seconds:.2f}"),
            ],
        )
    if not r.identical:
        from moe_adapters.errors import printable  # names come from the files: escape control characters

        lines = [printable(x) for x in r.problems()[:30]]
        sys.stderr.write(
            f"different: {len(r.only_in_a)} only in A, {len(r.only_in_b)} only in B, {len(r.mismatched)} differ, "
            f"{len(r.checksum_failures)} files fail their manifest sha256; first: {lines[0]}\n"
        )
        for line in lines[1:]:
            sys.stderr.write(f"  {line}\n")
        raise typer.Exit(1)


@app.command(
    epilog=(
        "Refused unless PATH is in the standard HF layout and verify proves it identical, bit for bit, to "
        "--verify-against SRC or to the source recorded when convert wrote PATH (.moe_adapters_provenance.json); "
        "--no-verify skips the proof. Uploads one commit with huggingface_hub's commit API (re-running resumes) and a "
        "generated model card: README.md with base_model, library_name and tags, stating source, revision, family, "
        "conversion and verification. The token comes from HF_TOKEN or `hf auth login` and is never printed. "
        "Exit 0 pushed (or dry run), 1 not identical, 2 refused or failed.\n\n"
        "Examples:\n\n"
        "  moe-adapters push ./qwen-hf --repo-id my-org/Qwen3-30B-A3B --dry-run\n\n"
        "  moe-adapters push ./qwen-hf --repo-id my-org/Qwen3-30B-A3B --private\n\n"
        "  moe-adapters push ./copy --repo-id my-org/copy --verify-against Qwen/Qwen3-30B-A3B --revision v1\n\n"
        "  moe-adapters push ./finetuned --repo-id my-org/qwen-ft --no-verify --base-model Qwen/Qwen3-30B-A3B"
    )
)
@reports_errors
def push(
    path: str = typer.Argument(..., help="Standard HF checkpoint folder to publish (layout hf)."),
    repo_id: str = typer.Option(..., "--repo-id", help="Hub repo to push to, ORG/NAME (created if needed)."),
    private: bool = typer.Option(
        False, "--private", help="Create the repo private (an existing repo keeps its visibility)."
    ),
    revision: Optional[str] = typer.Option(
        None, "--revision", help="Branch to commit to (created from main if needed)."
    ),
    commit_message: Optional[str] = typer.Option(
        None, "--commit-message", help="Commit title (the default says what it is and what it was verified against)."
    ),
    dry_run: bool = typer.Option(
        False, "--dry-run", help="Verify and list what would be uploaded, with the model card; upload nothing."
    ),
    verify_against: Optional[str] = typer.Option(
        None,
        "--verify-against",
        help="The source to prove PATH identical to: a folder (any layout) or a Hub id ORG/NAME\\[@REV].",
    ),
    no_verify: bool = typer.Option(False, "--no-verify", help="Push without verification (the model card says so)."),
    base_model: Optional[str] = typer.Option(
        None, "--base-model", help="base_model for the model card (default: the source's Hub id, when it has one)."
    ),
    workers: Optional[int] = typer.Option(
        None, "--workers", min=1, help="Parallel I/O threads for verify and hashing."
    ),
    family: Optional[str] = typer.Option(
        None, "--family", help="Family name, when config.json is not enough (as for convert).",
        autocompletion=_complete_family,
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON (with the model card)."),
) -> None:
    """Publish a standard HF checkpoint to the Hub, after proving it identical to its source."""
    from moe_adapters.errors import VerificationFailed
    from moe_adapters.push import push as run

    talk = not (as_json or _state["quiet"]) and err.is_terminal  # status lines with the bars, on a terminal only
    _hub_logging()
    try:
        r = run(
            path,
            repo_id,
            private=private,
            revision=revision,
            commit_message=commit_message,
            dry_run=dry_run,
            verify_against=verify_against,
            no_verify=no_verify,
            base_model=base_model,
            workers=workers,
            family=family,
            reporter=_reporter(as_json),
            say=err.print if talk else (lambda m: None),
        )
    except VerificationFailed as e:
        if _state["debug"]:
            raise
        fail(str(e), code=1)
    if as_json:
        return _print_json(r.as_dict())
    if dry_run and not _state["quiet"]:
        t = Table("path", "bytes", "sha256", title=f"dry run: would upload to {r.repo_id} ({r.revision})",
                  title_justify="left")
        for f in r.files:
            t.add_row(f["path"], f"{f['size']:,}", f["sha256"][:16])
        out.print(t)
        front = r.model_card.split("\n---\n", 1)[0]
        out.print(f"model card front matter:\n{front}\n---", markup=False)
    v = r.verification
    verdict = (
        f"identical to {v['against']} ({v['tensors']:,} tensors, {_gb(v['bytes_compared'])})"
        + (
            f"; {v['files_identical_to_source']} files byte-identical to the source's"
            if v.get("files_identical_to_source")
            else ""
        )
        if v["status"] == "identical"
        else f"NOT VERIFIED ({v.get('reason')})"
    )
    _table(
        f"dry run: nothing uploaded to {r.repo_id}" if dry_run else f"pushed to {r.repo_id}",
        [
            ("repo", r.repo_id + (" (created)" if r.created_repo else "")),
            ("branch", r.revision),
            ("files", f"{len(r.files)} ({r.bytes:,} bytes, {_gb(r.bytes)})"),
            ("verification", verdict),
        ]
        + ([("commit", r.commit_url + ("" if r.changed else " (already up to date: nothing new to commit)"))]
           if r.commit_url else [])
        + ([("left out", _first(r.skipped, 8))] if r.skipped else [])
        + ([("removed from the branch", _first(r.removed, 8))] if r.removed else [])
        + [("seconds", f"{r.seconds:.2f}")],
    )


@app.command(
    epilog=(
        "Examples:\n\n"
        "  moe-adapters demo\n\n"
        "  moe-adapters demo --workdir ./demo --json"
    )
)
@reports_errors
def demo(
    workdir: Optional[str] = typer.Option(None, "--workdir", help="Keep the files here instead of a temp folder."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
) -> None:
    """Build a small Qwen3-MoE checkpoint with transformers, convert HF -> fused EP=4 -> HF, verify, summarise."""
    from moe_adapters.demo import run_demo

    res = run_demo(workdir, reporter=_reporter(as_json), say=(lambda m: None) if (as_json or _state["quiet"]) else out.print)
    if as_json:
        return _print_json(res)
    _table(
        "moe-adapters demo: HF -> fused EP=4 -> HF, verified",
        [
            ("model", res["model"]),
            ("tensors", f"{res['tensors']:,}"),
            ("bytes", f"{res['bytes']:,} ({_gb(res['bytes'])})"),
            ("HF -> fused EP=4", f"{res['to_fused_s']:.2f} s, {res['to_fused_gbps']:.2f} GB/s"),
            ("fused -> HF", f"{res['to_hf_s']:.2f} s, {res['to_hf_gbps']:.2f} GB/s"),
            ("verify", f"{res['verify']} ({res['verify_s']:.2f} s)"),
            ("files byte-identical", res["files_identical"]),
            ("peak RSS", f"{res['peak_rss'] / 2**20:.0f} MiB"),
            ("total seconds", f"{res['seconds']:.1f}"),
        ],
    )
    if not (res["verify"] == "identical" and res["files_identical"]):
        raise typer.Exit(1)


def main() -> None:
    app(prog_name="moe-adapters")


if __name__ == "__main__":
    main()

"""The `moe-adapters` command: parse, call the library, print. Errors become one `error:` line and exit 2."""

from __future__ import annotations

import functools
import json
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
        "  moe-adapters inspect ./Qwen3-30B-A3B\n\n"
        "  moe-adapters convert ./Qwen3-30B-A3B ./qwen-ep8 --ep 8\n\n"
        "  moe-adapters convert ./qwen-ep8 ./qwen-hf          # back to the original files, byte for byte\n\n"
        "  moe-adapters verify ./Qwen3-30B-A3B ./qwen-ep8"
    ),
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_enable=False,
)

_state: dict[str, Any] = {"debug": False, "quiet": False}
out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)


@app.callback()
def _main(
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks on errors."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars or summaries; errors only."),
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

    def begin(self, label: str, total: int) -> None:
        if not self.enabled:
            return
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
            TransferSpeedColumn,
        )

        self.end()
        self._progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
            console=err,
            transient=True,
        )
        self._progress.start()
        self._task = self._progress.add_task(label, total=total)

    def advance(self, n: int) -> None:
        if self._progress is not None:
            with self._lock:
                self._progress.update(self._task, advance=n)

    def end(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None


def _reporter(as_json: bool) -> RichReporter:
    return RichReporter(enabled=not (_state["quiet"] or as_json) and err.is_terminal)


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


def parse_size(text: str) -> int:
    units = {"": 1, "B": 1, "KB": 1000, "MB": 1000**2, "GB": 1000**3, "KIB": 1024, "MIB": 1024**2, "GIB": 1024**3}
    s = text.strip().upper()
    num = s.rstrip("KMGIB")
    try:
        return int(float(num) * units[s[len(num) :]])
    except (ValueError, KeyError):
        raise typer.BadParameter(f"not a size: {text!r} (e.g. 5GB, 500MB)") from None


@app.command()
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
            "description": f.description,
        }
        for f in REGISTRY.values()
    ]
    if as_json:
        return _print_json(rows)
    t = Table("family", "model_type", "architectures", "experts", "router")
    for r in rows:
        kind = ("gated " if r["gated"] else "") + r["activation"] + (" + shared" if r["shared_experts"] else "")
        t.add_row(r["name"], ", ".join(r["model_types"]), ", ".join(r["architectures"]), kind, r["router"])
    out.print(t)


@app.command()
@reports_errors
def inspect(
    path: str = typer.Argument(..., help="Checkpoint folder (HF or fused)."),
    family: Optional[str] = typer.Option(None, "--family", help="Family name, when config.json is not enough."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
) -> None:
    """Show a checkpoint's family, layout, EP size, experts, MoE layers, tensors and bytes."""
    from moe_adapters.inspect import describe

    info = describe(path, family)
    if as_json:
        return _print_json(info)
    layers = info["moe_layers"]
    shown = ", ".join(map(str, layers[:12])) + (f", ... ({len(layers)} layers)" if len(layers) > 12 else "")
    _table(
        path,
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


@app.command()
@reports_errors
def convert(
    src: str = typer.Argument(..., help="Source checkpoint folder."),
    dst: str = typer.Argument(..., help="Destination folder (must not exist unless --overwrite)."),
    to: Optional[str] = typer.Option(None, "--to", help="Target layout: fused or hf (default: the other one)."),
    ep: Optional[int] = typer.Option(None, "--ep", min=1, help="Expert-parallel size of the fused layout."),
    family: Optional[str] = typer.Option(None, "--family", help="Family name, when config.json is not enough."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace DST if it exists (atomically)."),
    workers: Optional[int] = typer.Option(None, "--workers", min=1, help="Parallel I/O threads."),
    max_shard_size: str = typer.Option("5GB", "--max-shard-size", help="Largest output file, e.g. 5GB or 500MB."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
) -> None:
    """Convert HF <-> fused (and fused EP=N -> EP=M) by copying byte ranges; writes DST atomically."""
    from moe_adapters.convert import convert as run

    s = run(
        src,
        dst,
        to=to,
        ep=ep,
        family=family,
        overwrite=overwrite,
        workers=workers,
        max_shard_bytes=parse_size(max_shard_size),
        reporter=_reporter(as_json),
    )
    if as_json:
        return _print_json(s.as_dict())
    _table(
        f"converted ({s.direction}, {s.family}, EP={s.ep_size})",
        [
            ("destination", s.dst),
            ("tensors", f"{s.tensors:,}"),
            ("files", s.files),
            ("bytes written", f"{s.bytes_written:,} ({_gb(s.bytes_written)})"),
            ("seconds", f"{s.seconds:.2f}"),
            ("throughput", f"{s.gbps:.2f} GB/s"),
            ("peak RSS", f"{s.peak_rss / 2**20:.0f} MiB"),
        ]
        + [("check", c) for c in s.checks],
    )


@app.command()
@reports_errors
def verify(
    a: str = typer.Argument(..., help="First checkpoint (any layout)."),
    b: str = typer.Argument(..., help="Second checkpoint (any layout)."),
    workers: Optional[int] = typer.Option(None, "--workers", min=1, help="Parallel I/O threads."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
) -> None:
    """Compare two checkpoints bitwise in canonical form. Exit 0 identical, 1 different, 2 bad input."""
    from moe_adapters.verify import verify as run

    r = run(a, b, workers=workers, reporter=_reporter(as_json))
    if as_json:
        _print_json(r.as_dict())
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
        lines = [f"only in {r.a}: {n}" for n in r.only_in_a[:10]] + [f"only in {r.b}: {n}" for n in r.only_in_b[:10]]
        lines += r.mismatched[:10]
        sys.stderr.write(
            f"different: {len(r.only_in_a)} only in A, {len(r.only_in_b)} only in B, {len(r.mismatched)} differ; "
            f"first: {lines[0]}\n"
        )
        for line in lines[1:]:
            sys.stderr.write(f"  {line}\n")
        raise typer.Exit(1)


@app.command()
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
    app()


if __name__ == "__main__":
    main()

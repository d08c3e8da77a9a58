"""Bad and hostile input never costs data: a corpus of broken checkpoints, each run through the CLI.

For every case the checkpoint is copied, damaged one way, and `moe-adapters convert SRC DST` must: exit 2 with exactly
one `error:` line on stderr that names the file (and tensor, where there is one) and says what is wrong; leave SRC
byte-identical (every file hashed before and after); leave no DST, no temporary folder and no lock file. `verify`
and `inspect` of the same folder must not crash either (their exit codes are recorded in docs/reliability.md).

Set MOE_RELIABILITY_TABLE=path to write the observed error lines as the Markdown rows of that table.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import tracemalloc
from dataclasses import dataclass
from typing import Callable

import pytest
from typer.testing import CliRunner

from moe_adapters.cli import app
from moe_adapters.convert import convert
from moe_adapters.errors import CheckpointError
from moe_adapters.safetensors_file import read_header

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MIX = "model.layers.0.block_sparse_moe.experts"  # Mixtral's per-expert keys (fixture: 2 layers x 8 experts)
QWEN = "model.layers.0.mlp.experts"


# --- helpers (also used by the other reliability tests) -------------------------------------------------------------


def tree_state(folder: str) -> dict[str, str]:
    """Everything under `folder`, hidden files included: sha256 of each file, the target of each link."""
    out: dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(folder):
        for n in dirnames + filenames:
            p = os.path.join(dirpath, n)
            rel = os.path.relpath(p, folder)
            st = os.lstat(p)
            if stat.S_ISLNK(st.st_mode):
                out[rel] = "link:" + os.readlink(p)
            elif stat.S_ISREG(st.st_mode):
                with open(p, "rb") as f:
                    out[rel] = hashlib.sha256(f.read()).hexdigest()
            elif not stat.S_ISDIR(st.st_mode):
                out[rel] = f"special:{stat.S_IFMT(st.st_mode)}"
    return out


def leftovers(parent: str) -> list[str]:
    """Temporary folders, backups or lock files of ours beside DST."""
    return sorted(n for n in os.listdir(parent) if "moe_adapters" in n)


def read_raw(path: str) -> tuple[dict, bytes]:
    data = open(path, "rb").read()
    n = int.from_bytes(data[:8], "little")
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def write_raw(path: str, header: bytes, blob: bytes) -> None:
    with open(path, "wb") as f:
        f.write(len(header).to_bytes(8, "little") + header + blob)


def edit_header(path: str, fn: Callable[[dict], object]) -> None:
    hdr, blob = read_raw(path)
    fn(hdr)
    text = json.dumps(hdr).encode()
    write_raw(path, text + b" " * (-len(text) % 8), blob)


def weight_map(folder: str) -> dict[str, str]:
    return json.load(open(os.path.join(folder, "model.safetensors.index.json")))["weight_map"]


def file_of(folder: str, tensor: str) -> str:
    return os.path.join(folder, weight_map(folder)[tensor])


def edit_index(folder: str, fn: Callable[[dict], object]) -> None:
    p = os.path.join(folder, "model.safetensors.index.json")
    idx = json.load(open(p))
    fn(idx["weight_map"])
    json.dump(idx, open(p, "w"), indent=2)


def edit_tensors(folder: str, rel: str, fn: Callable[[dict], object]) -> None:
    """Rewrite one safetensors file with `fn` applied to its tensors, and the index to match."""
    from safetensors.torch import load_file, save_file

    path = os.path.join(folder, rel)
    tensors = load_file(path)
    fn(tensors)
    save_file(tensors, path, metadata={"format": "pt"})
    idx_path = os.path.join(folder, "model.safetensors.index.json")
    if os.path.exists(idx_path):
        edit_index(folder, lambda wm: [wm.pop(k) for k in [k for k, v in wm.items() if v == rel]] + [
            wm.__setitem__(k, rel) for k in tensors
        ])


def edit_json(path: str, fn: Callable[[dict], object]) -> None:
    obj = json.load(open(path))
    fn(obj)
    json.dump(obj, open(path, "w"), indent=1)


def flip_byte(path: str, pos: int) -> None:
    with open(path, "r+b") as f:
        f.seek(pos)
        b = f.read(1)
        f.seek(pos)
        f.write(bytes([b[0] ^ 0xFF]))


def run_cli(*args: str) -> tuple[int, str]:
    """The CLI in-process (fast); returns (exit code, stderr)."""
    r = CliRunner().invoke(app, list(args))
    assert r.exception is None or isinstance(r.exception, SystemExit), repr(r.exception)
    return r.exit_code, r.stderr


def one_error_line(stderr: str) -> str:
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    assert "internal error" not in lines[0] and "Traceback" not in stderr, stderr
    assert lines[0].isprintable(), lines[0]
    return lines[0]


# --- the corpus -------------------------------------------------------------------------------------------------------


@dataclass
class Case:
    id: str
    base: str  # "hf" (Mixtral), "qwen" (Qwen3-MoE), "fused" (Mixtral fused EP=2), "fused1" (EP=1), "empty"
    mutate: Callable[[str], object]
    expect: str  # regex the error line must match
    names: str  # must appear in the error line: the file's basename or the tensor
    args: tuple[str, ...] = ()  # extra convert arguments


def _first_shard(d: str) -> str:
    return sorted(n for n in os.listdir(d) if n.endswith(".safetensors"))[1]


def _truncate(d: str, n: int) -> None:
    p = os.path.join(d, _first_shard(d))
    os.truncate(p, n if n >= 0 else os.path.getsize(p) + n)


def _length_field(d: str, value: int) -> None:
    with open(os.path.join(d, _first_shard(d)), "r+b") as f:
        f.write(value.to_bytes(8, "little"))


def _replace_header_text(d: str, make: Callable[[int], bytes]) -> None:
    p = os.path.join(d, _first_shard(d))
    data = open(p, "rb").read()
    n = int.from_bytes(data[:8], "little")
    open(p, "wb").write(data[:8] + make(n) + data[8 + n :])


def _sorted_entries(hdr: dict) -> list[str]:
    return sorted((k for k in hdr if k != "__metadata__"), key=lambda k: hdr[k]["data_offsets"][0])


def _overlap(hdr: dict) -> None:
    second = _sorted_entries(hdr)[1]
    hdr[second]["data_offsets"] = [o - 2 for o in hdr[second]["data_offsets"]]


def _past_end(hdr: dict) -> None:
    last = _sorted_entries(hdr)[-1]
    hdr[last]["data_offsets"] = [o + 16 for o in hdr[last]["data_offsets"]]


def _dup_header_key(d: str) -> None:
    p = file_of(d, f"{MIX}.3.w1.weight")
    hdr, blob = read_raw(p)
    name = f"{MIX}.3.w1.weight"
    text = json.dumps(hdr)[:-1] + f', "{name}": ' + json.dumps(hdr[name]) + "}"
    text_b = text.encode()
    write_raw(p, text_b + b" " * (-len(text_b) % 8), blob)


def _hostile_name(d: str) -> None:
    edit_header(file_of(d, f"{MIX}.3.w1.weight"), lambda h: h.__setitem__("evil\n\x1b[2Jname", h.pop(f"{MIX}.3.w1.weight")))


def _dup_index_key(d: str) -> None:
    p = os.path.join(d, "model.safetensors.index.json")
    idx = json.load(open(p))
    wm = idx["weight_map"]
    k = f"{MIX}.3.w1.weight"
    body = ", ".join(f"{json.dumps(a)}: {json.dumps(b)}" for a, b in wm.items())
    body += f", {json.dumps(k)}: {json.dumps(wm[k])}"
    open(p, "w").write('{"metadata": {}, "weight_map": {' + body + "}}")


def _other_shard(d: str, tensor: str) -> str:
    return next(n for n in sorted(set(weight_map(d).values())) if n != weight_map(d)[tensor])


def _link_out(d: str, rel: str, content: bytes | None = None) -> None:
    outside = os.path.join(os.path.dirname(d), "outside")
    os.makedirs(outside, exist_ok=True)
    target = os.path.join(outside, os.path.basename(rel))
    p = os.path.join(d, rel)
    if content is None:
        shutil.move(p, target)
    else:
        open(target, "wb").write(content)
    os.symlink(target, p)


def _stored_twice(d: str) -> None:
    from safetensors.torch import load_file, save_file

    t = load_file(file_of(d, f"{MIX}.3.w1.weight"))
    save_file({f"{MIX}.3.w1.weight": t[f"{MIX}.3.w1.weight"]}, os.path.join(d, "extra.safetensors"))
    os.unlink(os.path.join(d, "model.safetensors.index.json"))


def _config(d: str, **kv: object) -> None:
    edit_json(os.path.join(d, "config.json"), lambda c: c.update(kv))


def _drop(name: str) -> Callable[[str], None]:
    return lambda d: edit_tensors(d, weight_map(d)[name], lambda t: t.pop(name))


def _dup_expert(d: str) -> None:
    rel = weight_map(d)[f"{MIX}.5.w1.weight"]
    edit_tensors(d, rel, lambda t: t.__setitem__(f"{MIX}.05.w1.weight", t[f"{MIX}.5.w1.weight"].clone()))


def _reshape_expert(shape: tuple[int, int] | None, dtype=None) -> Callable[[str], None]:
    import torch

    def go(d: str) -> None:
        name = f"{MIX}.2.w1.weight"

        def f(t: dict) -> None:
            t[name] = torch.zeros(shape, dtype=torch.bfloat16) if shape else t[name].to(getattr(torch, dtype))

        edit_tensors(d, weight_map(d)[name], f)

    return go


def _fused_file(d: str, rank: int | None) -> str:
    m = json.load(open(os.path.join(d, "moe_adapters.json")))
    return os.path.join(d, next(f["name"] for f in m["files"] if f["rank"] == rank))


def _flip_fused(d: str) -> None:
    p = _fused_file(d, 1)
    h = read_header(p)
    e = h.tensors[-1]
    flip_byte(p, h.data_start + (e.begin + e.end) // 2)


def _flip_unpinned(d: str) -> None:
    """A manifest whose source record has no per-tensor sha256 (older versions wrote none): the way back cannot
    prove the rebuilt tensors, so the fused files themselves are checked."""
    edit_json(os.path.join(d, "moe_adapters.json"), lambda m: [f.pop("tensor_sha256", None) for f in m["source"]["files"]])
    _flip_fused(d)


def _manifest(fn: Callable[[dict], object]) -> Callable[[str], None]:
    return lambda d: edit_json(os.path.join(d, "moe_adapters.json"), fn)


def _mfile(i: int, **kv: object) -> Callable[[dict], None]:
    return lambda m: m["files"][i].update(kv)


def _msource(i: int, **kv: object) -> Callable[[dict], None]:
    return lambda m: m["source"]["files"][i].update(kv)


def _stray(d: str) -> None:
    shutil.copy(_fused_file(d, 0), os.path.join(d, "model-ep000-of-002-99999-of-99999.safetensors"))


def _dup_manifest_key(d: str) -> None:
    p = os.path.join(d, "moe_adapters.json")
    text = open(p).read().rstrip()
    open(p, "w").write(text[:-1] + ', "ep_size": 2}')


def _pickle_only(name: str) -> Callable[[str], None]:
    def go(d: str) -> None:
        for n in os.listdir(d):
            if n.endswith((".safetensors", ".index.json")):
                os.unlink(os.path.join(d, n))
        open(os.path.join(d, name), "wb").write(b"\x80\x04\x95\x05\x00\x00\x00\x00\x00\x00\x00K\x01.")

    return go


def _pickle_as_safetensors(d: str) -> None:
    p = os.path.join(d, _first_shard(d))
    open(p, "wb").write(b"\x80\x04\x95" + b"\x00" * 64)


W1 = f"{MIX}.3.w1.weight"
CASES = [
    # safetensors files
    Case("truncated file", "hf", lambda d: _truncate(d, -10), r"tensors cover|run past the end", "model-00002"),
    Case("shorter than the length field", "hf", lambda d: _truncate(d, 4), r"truncated: 4 bytes", "model-00002"),
    Case("header length larger than file", "hf", lambda d: _length_field(d, 10**6), r"larger than the file", "model-00002"),
    Case("header length claims 300 MB", "hf", lambda d: _length_field(d, 300 << 20), r"exceeds the 104857600-byte limit", "model-00002"),
    Case("header length 2**64-1", "hf", lambda d: _length_field(d, 2**64 - 1), r"exceeds the", "model-00002"),
    Case("header not JSON", "hf", lambda d: _replace_header_text(d, lambda n: b"{" + b"x" * (n - 1)), r"not valid JSON", "model-00002"),
    Case("header not UTF-8", "hf", lambda d: _replace_header_text(d, lambda n: b"{" + b"\xff" * (n - 1)), r"not valid JSON \(UnicodeDecodeError", "model-00002"),
    Case("header a JSON array", "hf", lambda d: _replace_header_text(d, lambda n: b"[]" + b" " * (n - 2)), r"does not start with", "model-00002"),
    Case("overlapping offsets", "hf", lambda d: edit_header(os.path.join(d, _first_shard(d)), _overlap), r"overlap the previous tensor", "tensor "),
    Case("offsets past the end", "hf", lambda d: edit_header(os.path.join(d, _first_shard(d)), _past_end), r"run past the end", "tensor "),
    Case("dtype does not match byte count", "hf", lambda d: edit_header(file_of(d, W1), lambda h: h[W1].update(dtype="F32")), r"F32\[16, 32\] needs 2048 bytes but data_offsets .* hold 1024", W1),
    Case("shape does not match byte count", "hf", lambda d: edit_header(file_of(d, W1), lambda h: h[W1].update(shape=[16, 33])), r"needs 1056 bytes", W1),
    Case("huge shape", "hf", lambda d: edit_header(file_of(d, W1), lambda h: h[W1].update(shape=[2**40] * 4000)), r"needs more than the file holds", W1),
    Case("unsupported dtype", "hf", lambda d: edit_header(file_of(d, W1), lambda h: h[W1].update(dtype="F4")), r"unsupported dtype 'F4'", W1),
    Case("tensor twice in one header", "hf", _dup_header_key, r"appears twice in the safetensors header", W1),
    Case("hostile tensor name (newline, escape)", "hf", _hostile_name, r"evil\\n\\x1b\[2Jname", "model-"),
    Case("safetensors that is a pickle", "hf", _pickle_as_safetensors, r"exceeds the|larger than the file", "model-00002"),
    # index
    Case("index names a missing file", "hf", lambda d: edit_index(d, lambda wm: wm.__setitem__(W1, "model-gone.safetensors")), r"listed in the index but missing", "model-gone.safetensors"),
    Case("index path with ..", "hf", lambda d: edit_index(d, lambda wm: wm.__setitem__(W1, "../outside.safetensors")), r"path outside the checkpoint", "../outside.safetensors"),
    Case("index absolute path", "hf", lambda d: edit_index(d, lambda wm: wm.__setitem__(W1, "/etc/passwd")), r"absolute or empty path", "/etc/passwd"),
    Case("shard is a symlink leading out", "hf", lambda d: _link_out(d, weight_map(d)[W1]), r"link leading outside the checkpoint", "model-0"),
    Case("tensor listed twice in the index", "hf", _dup_index_key, r"listed twice", W1),
    Case("tensor in the wrong file", "hf", lambda d: edit_index(d, lambda wm: wm.__setitem__(W1, _other_shard(d, W1))), r"index and files disagree", W1),
    Case("index lists a tensor no file holds", "hf", lambda d: edit_index(d, lambda wm: wm.__setitem__("model.ghost.weight", wm[W1])), r"index lists a tensor its file does not hold", "model.ghost.weight"),
    Case("file holds a tensor the index omits", "hf", lambda d: edit_index(d, lambda wm: wm.pop(W1)), r"not listed in the index", W1),
    Case("tensor stored in two files", "hf", _stored_twice, r"tensor also stored in", W1),
    Case("index not JSON", "hf", lambda d: open(os.path.join(d, "model.safetensors.index.json"), "w").write("{"), r"not valid JSON", "model.safetensors.index.json"),
    Case("index without weight_map", "hf", lambda d: open(os.path.join(d, "model.safetensors.index.json"), "w").write("{}"), r"no valid weight_map", "model.safetensors.index.json"),
    Case("extra file links out (tokenizer.json -> secret)", "hf", lambda d: _link_out(d, "tokenizer.json", b"SECRET"), r"link leading outside the checkpoint", "tokenizer.json"),
    Case("config.json links out", "hf", lambda d: _link_out(d, "config.json"), r"link leading outside", "config"),
    Case("dangling link", "hf", lambda d: os.symlink("missing-blob", os.path.join(d, "tokenizer.json")), r"not a regular file", "tokenizer.json"),
    # model
    Case("unknown family", "hf", lambda d: _config(d, model_type="mystery_moe", architectures=["MysteryForCausalLM"]), r"no family matches model_type 'mystery_moe'.*pass --family", "mystery"),
    Case("--family that does not exist", "hf", lambda d: None, r"unknown family 'nope'", "nope", ("--family", "nope")),
    Case("config: more experts than stored", "hf", lambda d: _config(d, num_local_experts=16), r"missing expert tensor \(config.json says 16 experts", f"{MIX}.8.w1.weight"),
    Case("config: fewer experts than stored", "hf", lambda d: _config(d, num_local_experts=4), r"expert 4 is beyond the config's 4 experts", f"{MIX}.4."),
    Case("config: expert count not a number", "hf", lambda d: _config(d, num_local_experts="eight"), r"invalid literal", "config.json"),
    Case("config: wrong hidden_size", "hf", lambda d: _config(d, hidden_size=48), r"config does not match the tensors", "experts.0.w"),
    Case("config: 10**12 layers", "hf", lambda d: _config(d, num_hidden_layers=10**12), r"num_hidden_layers 1000000000000 is not a usable layer count", "config.json"),
    Case("config: fewer layers than stored", "hf", lambda d: _config(d, num_hidden_layers=1), r"layer 1, which config.json does not have", "model.layers.1."),
    Case("config: a MoE layer declared dense", "qwen", lambda d: _config(d, mlp_only_layers=[0, 1]), r"layer 0, which config.json makes a dense layer", f"{QWEN}.0."),
    Case("missing expert", "hf", _drop(f"{MIX}.3.w1.weight"), r"missing expert tensor", f"{MIX}.3.w1.weight"),
    Case("duplicate expert (experts.5 and experts.05)", "hf", _dup_expert, r"expert 5 stored twice", f"{MIX}.5"),
    Case("expert of another shape", "hf", _reshape_expert((17, 32)), r"expert weight is \[17, 32\]", f"{MIX}.2.w1.weight"),
    Case("expert of another dtype", "hf", _reshape_expert(None, "float32"), r"cannot fuse w1/w3 of one expert: cannot combine dtypes", f"{MIX}.2.w1"),
    Case("EP does not divide the experts", "hf", lambda d: None, r"EP size 3 does not divide the 8 experts", "EP size 3", ("--ep", "3")),
    # fused folders and their manifest
    Case("fused: a flipped byte (-> hf)", "fused", _flip_fused, r"differs from the source's recorded sha256", "model.layers."),
    Case("fused: a flipped byte (reshard)", "fused", _flip_fused, r"sha256 differs from the manifest", "model-ep001", ("--to", "fused", "--ep", "4")),
    Case("fused: a flipped byte, source record without tensor hashes (-> hf)", "fused", _flip_unpinned, r"sha256 differs from the manifest", "model-ep001"),
    Case("fused: manifest sha256 edited (reshard)", "fused", _manifest(_mfile(0, sha256="0" * 64)), r"sha256 differs from the manifest", "model-", ("--to", "fused", "--ep", "4")),
    Case("fused: file truncated", "fused", lambda d: os.truncate(_fused_file(d, 1), os.path.getsize(_fused_file(d, 1)) - 1), r"tensors cover|run past the end", "model-ep001"),
    Case("fused: file missing", "fused", lambda d: os.unlink(_fused_file(d, 1)), r"listed in the manifest but missing", "model-ep001"),
    Case("fused: a file the manifest does not list", "fused", _stray, r"does not list", "99999-of-99999"),
    Case("fused: size differs from manifest", "fused", _manifest(_mfile(0, size=12345)), r"differs from the manifest's 12345", "model-"),
    Case("fused: tensor count differs from manifest", "fused", _manifest(_mfile(0, tensors=999)), r"the manifest says 999", "model-"),
    Case("fused: manifest ep_size edited", "fused", _manifest(lambda m: m.update(ep_size=4)), r"invalid manifest: expert_ranges", "moe_adapters.json"),
    Case("fused: manifest rank out of range", "fused", _manifest(_mfile(-1, rank=7)), r"rank 7 is not an EP rank", "moe_adapters.json"),
    Case("fused: manifest file name with ..", "fused", _manifest(_mfile(0, name="../x.safetensors")), r"is not a safe relative", "moe_adapters.json"),
    Case("fused: source file name with .. (would write outside DST)", "fused", _manifest(_msource(0, name="../../evil.safetensors")), r"is not a safe relative", "moe_adapters.json"),
    Case("fused: source file name absolute", "fused", lambda d: _manifest(_msource(0, name=os.path.join(os.path.dirname(d), "abs-evil.safetensors")))(d), r"is not a safe relative", "moe_adapters.json"),
    Case("fused: source index name outside DST", "fused", _manifest(lambda m: m["source"]["index"].update(name="../evil.safetensors.index.json")), r"source index name", "moe_adapters.json"),
    Case("fused: manifest not JSON", "fused", lambda d: open(os.path.join(d, "moe_adapters.json"), "w").write("{"), r"not valid JSON", "moe_adapters.json"),
    Case("fused: manifest key twice", "fused", _dup_manifest_key, r"'ep_size' is listed twice", "moe_adapters.json"),
    Case("fused: manifest of a future version", "fused", _manifest(lambda m: m.update(moe_adapters_manifest=99)), r"format version 99", "moe_adapters.json"),
    Case("fused EP=1: index disagrees with files", "fused1", lambda d: edit_index(d, lambda wm: wm.pop(next(iter(wm)))), r"index does not match", "model.safetensors.index.json"),
    # pickles
    Case("pickle only: pytorch_model.bin", "hf", _pickle_only("pytorch_model.bin"), r"never unpickles; re-save the model with safetensors", "pytorch_model.bin"),
    Case("pickle only: consolidated.00.pth", "hf", _pickle_only("consolidated.00.pth"), r"never unpickles", "consolidated.00.pth"),
    Case("pickle only: model.pt", "hf", _pickle_only("model.pt"), r"never unpickles", "model.pt"),
]


@pytest.fixture(scope="module")
def bases(hf_checkpoint, tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("bases")
    hf = hf_checkpoint("mixtral")
    fused, fused1 = str(root / "fused"), str(root / "fused1")
    convert(hf, fused, ep=2, max_shard_bytes=8000)
    convert(hf, fused1, ep=1)
    return {"hf": hf, "qwen": hf_checkpoint("qwen3_moe"), "fused": fused, "fused1": fused1}


_rows: list[str] = []


@pytest.fixture(scope="module", autouse=True)
def _table():
    yield
    out = os.environ.get("MOE_RELIABILITY_TABLE")
    if out and _rows:
        with open(out, "w") as f:
            f.write("\n".join(_rows) + "\n")


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_one_clear_error_and_costs_nothing(case: Case, bases, tmp_path):
    src, dst = str(tmp_path / "src"), str(tmp_path / "dst")
    shutil.copytree(bases[case.base], src, symlinks=True)
    case.mutate(src)
    before = tree_state(str(tmp_path))
    code, err = run_cli("convert", src, dst, *case.args)
    line = one_error_line(err)
    assert code == 2, (code, line)
    assert re.search(case.expect, line), line
    assert case.names in line, line
    assert tree_state(str(tmp_path)) == before  # SRC (and everything beside it) untouched; nothing new
    assert not os.path.lexists(dst) and not leftovers(str(tmp_path))
    # verify and inspect of the same folder: a clear answer too, never a crash (verify compares weights only, so a
    # config that does not fit, or an option verify does not take, may rightly pass it)
    vcode, verr = run_cli("verify", src, bases[case.base])
    assert vcode in (0, 1, 2), verr
    if vcode == 2:
        one_error_line(verr)
    icode, ierr = run_cli("inspect", src, *case.args[:2] if case.args[:1] == ("--family",) else ())
    if icode:
        one_error_line(ierr)
    assert tree_state(str(tmp_path)) == before
    _rows.append(
        f"| {case.id} | `convert` exit 2, one line naming `{case.names}` | {code}: `{line}` | {vcode} | {icode} |"
    )


def test_a_fifo_in_the_folder_does_not_hang(hf_checkpoint, tmp_path):
    """A FIFO named like a shard (or a config) would block open() forever; it is refused, in a subprocess with a
    timeout so a regression fails instead of hanging the suite."""
    for victim in ("shard", "tokenizer.json"):
        src = tmp_path / f"src-{victim}"
        shutil.copytree(hf_checkpoint("mixtral"), src)
        name = _first_shard(str(src)) if victim == "shard" else victim
        if (src / name).exists():
            os.unlink(src / name)
        os.mkfifo(src / name)
        p = subprocess.run([sys.executable, "-m", "moe_adapters", "convert", str(src), str(tmp_path / "dst")],
                           capture_output=True, text=True, cwd=ROOT, timeout=60, stdin=subprocess.DEVNULL)
        line = one_error_line(p.stderr)
        assert p.returncode == 2 and "not a regular file" in line and name in line
        assert not os.path.lexists(tmp_path / "dst")


def test_300_mb_header_claim_allocates_nothing(tmp_path):
    """A (sparse) file of 310 MB whose length field claims a 300 MB header: refused before any allocation."""
    p = str(tmp_path / "big.safetensors")
    with open(p, "wb") as f:
        f.write((300 << 20).to_bytes(8, "little") + b"{")
        f.truncate(310 << 20)
    tracemalloc.start()
    try:
        with pytest.raises(CheckpointError, match="exceeds the 104857600-byte limit"):
            read_header(p)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20, peak


# --- nothing in the code unpickles ------------------------------------------------------------------------------------

# The grep-able rule (docs/reliability.md): this pattern matches nothing in the shipped code.
#   grep -rnE "$UNPICKLE" moe_adapters families converters cli.py benchmarks
UNPICKLE = (
    r"\bimport (c?pickle|_pickle|dill|cloudpickle|joblib|shelve|marshal)\b|\bfrom (c?pickle|_pickle|dill|cloudpickle|"
    r"joblib|shelve|marshal) import|\bpickle\.|\btorch\.load\b|weights_only|\b(np|numpy)\.load\b|allow_pickle|"
    r"\bUnpickler\b|\byaml\.(unsafe_)?load\(|(^|[^.a-zA-Z_])(eval|exec)\(|__reduce__"
)


def test_nothing_in_the_code_unpickles():
    rx = re.compile(UNPICKLE)
    hits = []
    for top in ("moe_adapters", "families", "converters", "cli.py", "benchmarks"):
        path = os.path.join(ROOT, top)
        files = [path] if os.path.isfile(path) else [
            os.path.join(dp, f) for dp, _, fs in os.walk(path) for f in fs if f.endswith(".py")
        ]
        for fp in files:
            for i, line in enumerate(open(fp, encoding="utf-8"), 1):
                if rx.search(line):
                    hits.append(f"{os.path.relpath(fp, ROOT)}:{i}: {line.strip()}")
    assert not hits, "code that can unpickle:\n" + "\n".join(hits)
    assert rx.search("torch.load(f)") and rx.search("import pickle") and rx.search("np.load(p, allow_pickle=True)")
    assert rx.search("eval(x)") and not rx.search("model.eval()")

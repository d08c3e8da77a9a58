"""The `moe-adapters` command end to end, in subprocesses: outputs, exit codes and one-line errors."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cli(*args: str, check: int | None = 0) -> subprocess.CompletedProcess:
    p = subprocess.run([sys.executable, "-m", "moe_adapters", *args], capture_output=True, text=True, cwd=ROOT,
                       stdin=subprocess.DEVNULL, timeout=300)
    if check is not None:
        assert p.returncode == check, (p.returncode, p.stdout, p.stderr)
    return p


def one_error_line(p: subprocess.CompletedProcess) -> str:
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), p.stderr
    assert "Traceback" not in p.stderr
    return lines[0]


def test_families_json():
    rows = json.loads(cli("families", "--json").stdout)
    names = {r["name"] for r in rows}
    assert {"qwen3_moe", "mixtral", "deepseek_v3", "nemotron_h"} <= names
    nem = next(r for r in rows if r["name"] == "nemotron_h")
    assert nem["gated"] is False and nem["activation"] == "relu2" and "NemotronHForCausalLM" in nem["architectures"]


def test_convert_inspect_verify(hf_checkpoint, tmp_path):
    src = hf_checkpoint("deepseek_v3")
    dst = str(tmp_path / "fused")
    s = json.loads(cli("convert", src, dst, "--ep", "2", "--json").stdout)
    assert s["ep_size"] == 2 and s["direction"] == "hf->fused" and s["bytes_written"] > 0 and s["peak_rss"] > 0
    info = json.loads(cli("inspect", dst, "--json").stdout)
    assert (info["family"], info["layout"], info["ep_size"], info["num_experts"]) == ("deepseek_v3", "fused", 2, 8)
    assert info["moe_layers"] == [1, 2] and info["expert_ranges"] == [[0, 4], [4, 8]]
    src_info = json.loads(cli("inspect", src, "--json").stdout)
    assert src_info["layout"] == "hf" and src_info["tensors"] > info["tensors"]
    v = json.loads(cli("verify", src, dst, "--json").stdout)
    assert v["identical"] and v["tensors"] == src_info["tensors"]
    # human output also works
    assert "identical" in cli("verify", src, dst).stdout
    # again into the same DST: refused, one line naming it, nothing changed
    p = cli("convert", src, dst, check=2)
    assert dst in one_error_line(p) and "--overwrite" in p.stderr


def test_verify_exit_1_names_the_tensor(hf_checkpoint, tmp_path):
    src = hf_checkpoint("qwen3_moe")
    copy = str(tmp_path / "copy")
    shutil.copytree(src, copy)
    from moe_adapters.checkpoint import open_checkpoint

    h = next(iter(open_checkpoint(copy).headers.values()))
    e = h.tensors[0]
    with open(h.path, "r+b") as f:
        f.seek(h.data_start + e.begin)
        b = f.read(1)
        f.seek(h.data_start + e.begin)
        f.write(bytes([b[0] ^ 0x80]))
    p = cli("verify", src, copy, check=1)
    assert e.name in p.stderr


def test_bad_input_is_one_error_line(tmp_path, hf_checkpoint):
    p = cli("inspect", str(tmp_path / "nope"), check=2)
    assert "no such folder" in one_error_line(p)
    # truncated safetensors file: named, exit 2, no DST
    src = str(tmp_path / "src")
    shutil.copytree(hf_checkpoint("mixtral"), src)
    victim = sorted(n for n in os.listdir(src) if n.endswith(".safetensors"))[1]
    with open(os.path.join(src, victim), "r+b") as f:
        f.truncate(os.path.getsize(os.path.join(src, victim)) - 10)
    dst = str(tmp_path / "dst")
    line = one_error_line(cli("convert", src, dst, check=2))
    assert victim in line
    assert not os.path.exists(dst)
    assert cli("verify", src, hf_checkpoint("mixtral"), check=2).returncode == 2


def test_unknown_family_suggests_flag(tmp_path, hf_checkpoint):
    src = str(tmp_path / "src")
    shutil.copytree(hf_checkpoint("qwen3_moe"), src)
    cfg = json.load(open(os.path.join(src, "config.json")))
    cfg["model_type"], cfg["architectures"] = "mystery_moe", ["MysteryForCausalLM"]
    json.dump(cfg, open(os.path.join(src, "config.json"), "w"))
    line = one_error_line(cli("inspect", src, check=2))
    assert "--family" in line and "mystery_moe" in line
    info = json.loads(cli("inspect", src, "--family", "qwen3_moe", "--json").stdout)
    assert info["family"] == "qwen3_moe"


def test_pickle_checkpoints_are_refused(tmp_path):
    d = tmp_path / "pkl"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "mixtral", "num_hidden_layers": 1}))
    (d / "pytorch_model.bin").write_bytes(b"\x80\x04K\x01.")  # a pickle; must never be loaded
    line = one_error_line(cli("convert", str(d), str(tmp_path / "out"), check=2))
    assert "pytorch_model.bin" in line and "unpickles" in line


def test_demo_json():
    res = json.loads(cli("demo", "--json").stdout)
    assert res["verify"] == "identical" and res["files_identical"] is True
    assert res["tensors"] > 500 and res["bytes"] > 100_000_000 and res["peak_rss"] > 0


def test_help_has_examples():
    out = cli("--help").stdout
    assert "convert" in out and "verify" in out and "moe-adapters convert" in out

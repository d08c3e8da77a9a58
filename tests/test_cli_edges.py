"""Edge cases a user hits with `convert` / `verify` / `inspect` (found by an audit): destinations that hold the
working directory, `--overwrite` onto files and links, packed sources and `--to hf`, families named by hand,
no-op transforms, bad sizes, weight files outside the index."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
from test_cli import ROOT, cli, one_error_line


def run_in(cwd: str, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", "moe_adapters", *args], capture_output=True, text=True, cwd=cwd,
                          stdin=subprocess.DEVNULL, timeout=300, env=env)


@pytest.mark.parametrize("dst", [".", "", ".."])
def test_destination_holding_the_working_directory_is_refused(hf_checkpoint, tmp_path, dst):
    src = hf_checkpoint("qwen3_moe")
    work = tmp_path / "sandbox" / "inner"
    work.mkdir(parents=True)
    (work / "notes.txt").write_text("important")
    p = run_in(str(work), "convert", src, dst, "--ep", "2", "--overwrite")
    assert p.returncode == 2
    assert "current directory" in one_error_line(p) or "empty destination" in one_error_line(p)
    assert (work / "notes.txt").read_text() == "important" and sorted(os.listdir(work)) == ["notes.txt"]


def test_overwrite_of_a_file_or_link_leaves_nothing_that_comes_back(hf_checkpoint, tmp_path):
    src = hf_checkpoint("qwen3_moe")
    (tmp_path / "afile").write_text("data")
    (tmp_path / "realdir").mkdir()
    os.symlink(tmp_path / "realdir", tmp_path / "link")
    for name in ("afile", "link"):
        cli("-q", "convert", src, str(tmp_path / name), "--ep", "2", "--overwrite")
    assert os.path.isdir(tmp_path / "realdir")  # the link was replaced, not what it pointed to
    assert [n for n in os.listdir(tmp_path) if n.startswith(".")] == []  # no backups, no locks
    shutil.rmtree(tmp_path / "afile")
    cli("-q", "convert", src, str(tmp_path / "afile"), "--ep", "2")  # the old file does not reappear
    assert os.path.isdir(tmp_path / "afile")


def test_packed_source_comes_back_packed_or_as_hf_when_asked(hf_checkpoint, tmp_path):
    src = hf_checkpoint("qwen3_moe", "packed")
    fused = str(tmp_path / "fused")
    cli("-q", "convert", src, fused, "--ep", "2")
    back = json.loads(cli("convert", fused, str(tmp_path / "back"), "--json").stdout)
    assert back["direction"] == "fused->packed"
    assert json.loads(cli("inspect", str(tmp_path / "back"), "--json").stdout)["layout"] == "packed"
    hf = json.loads(cli("convert", fused, str(tmp_path / "hf"), "--to", "hf", "--json").stdout)
    assert hf["direction"] == "fused->hf"
    assert json.loads(cli("inspect", str(tmp_path / "hf"), "--json").stdout)["layout"] == "hf"
    assert json.loads(cli("verify", src, str(tmp_path / "hf"), "--json").stdout)["identical"]


def test_verify_takes_family_for_an_unregistered_model_type(hf_checkpoint, tmp_path):
    src = str(tmp_path / "custom")
    shutil.copytree(hf_checkpoint("qwen3_moe"), src)
    cfg_path = os.path.join(src, "config.json")
    cfg = json.load(open(cfg_path))
    cfg.update(model_type="my_moe", architectures=["MyMoeForCausalLM"])
    json.dump(cfg, open(cfg_path, "w"))
    fused, back = str(tmp_path / "fused"), str(tmp_path / "back")
    cli("-q", "convert", src, fused, "--family", "qwen3_moe", "--ep", "2")
    cli("-q", "convert", fused, back)
    assert "--family" in one_error_line(cli("verify", src, back, check=2))
    assert json.loads(cli("verify", src, back, "--family", "qwen3_moe", "--json").stdout)["identical"]


def test_noop_dtype_stays_exact_and_dequantize_needs_quantized_weights(hf_checkpoint, tmp_path):
    src = hf_checkpoint("qwen3_moe")  # bf16
    fused = str(tmp_path / "fused")
    cli("-q", "convert", src, fused, "--ep", "2", "--dtype", "bf16")
    manifest = json.load(open(os.path.join(fused, "moe_adapters.json")))
    assert "lossy" not in manifest["source"] and manifest["source"]["files"]
    cli("-q", "convert", fused, str(tmp_path / "back"))
    for name in os.listdir(src):
        if name.endswith((".safetensors", ".json")):
            assert open(os.path.join(src, name), "rb").read() == open(tmp_path / "back" / name, "rb").read(), name
    p = cli("convert", src, str(tmp_path / "dq"), "--dequantize", "bf16", check=2)
    assert "nothing here is quantized" in one_error_line(p) and not os.path.exists(tmp_path / "dq")


@pytest.mark.parametrize("size", ["abc", "", "B", "0", "-5", "inf", "nan"])
def test_bad_max_shard_size_is_one_error_line(hf_checkpoint, tmp_path, size):
    p = cli("convert", hf_checkpoint("qwen3_moe"), str(tmp_path / "out"), "--max-shard-size", size, check=2)
    line = one_error_line(p)
    assert "--max-shard-size" in line and "internal error" not in line
    assert not os.path.exists(tmp_path / "out")


def test_weights_outside_the_index_are_named_not_silently_dropped(hf_checkpoint, tmp_path):
    src = str(tmp_path / "src")
    shutil.copytree(hf_checkpoint("qwen3_moe"), src)
    index = os.path.join(src, "model.safetensors.index.json")
    if not os.path.exists(index):
        pytest.skip("the fixture is a single-file checkpoint")
    shutil.copyfile(index, os.path.join(src, "consolidated.safetensors.index.json"))
    first = sorted(f for f in os.listdir(src) if f.endswith(".safetensors"))[0]
    shutil.copyfile(os.path.join(src, first), os.path.join(src, "consolidated.safetensors"))
    s = json.loads(cli("convert", src, str(tmp_path / "out"), "--ep", "2", "--json").stdout)
    assert sorted(s["left_out"]) == ["consolidated.safetensors", "consolidated.safetensors.index.json"]
    assert not {"consolidated.safetensors", "consolidated.safetensors.index.json"} & set(os.listdir(tmp_path / "out"))
    assert "left out" in cli("convert", src, str(tmp_path / "out2"), "--ep", "2").stdout


def test_inspect_with_a_family_that_does_not_fit_fails(hf_checkpoint):
    p = cli("inspect", hf_checkpoint("qwen3_moe"), "--family", "mixtral", check=2)
    assert one_error_line(p).startswith("error: ")


def test_version_and_case_insensitive_layout(hf_checkpoint, tmp_path):
    assert cli("--version").stdout.startswith("moe-adapters ")
    s = json.loads(cli("convert", hf_checkpoint("qwen3_moe"), str(tmp_path / "o"), "--to", "FUSED", "--json").stdout)
    assert s["direction"] == "hf->fused"


def test_ep_on_a_fused_source_reshards_and_to_fused_keeps_its_ep(hf_checkpoint, tmp_path):
    src = hf_checkpoint("qwen3_moe")
    ep4 = str(tmp_path / "ep4")
    cli("-q", "convert", src, ep4, "--ep", "4")
    s = json.loads(cli("convert", ep4, str(tmp_path / "ep2"), "--ep", "2", "--json").stdout)
    assert (s["direction"], s["ep_size"]) == ("fused->fused", 2)
    s = json.loads(cli("convert", ep4, str(tmp_path / "same"), "--to", "fused", "--json").stdout)
    assert s["ep_size"] == 4
    p = cli("convert", ep4, str(tmp_path / "bad"), "--to", "hf", "--ep", "2", check=2)
    assert "--to fused" in one_error_line(p)
    assert json.loads(cli("verify", src, str(tmp_path / "ep2"), "--json").stdout)["identical"]


def test_ep_zero_or_negative_is_one_error_line(hf_checkpoint, tmp_path):
    for ep in ("0", "-2"):
        p = cli("convert", hf_checkpoint("qwen3_moe"), str(tmp_path / "o"), "--ep", ep, check=2)
        assert "--ep" in one_error_line(p) and not os.path.exists(tmp_path / "o")


def test_fp8_scale_grid_too_small_names_the_tensor(hf_checkpoint, tmp_path):
    from safetensors.torch import load_file, save_file

    src = str(tmp_path / "fp8")
    shutil.copytree(hf_checkpoint("deepseek_v3", "fp8"), src)
    for fn in sorted(os.listdir(src)):
        if not fn.endswith(".safetensors"):
            continue
        t = load_file(os.path.join(src, fn))
        name = next((n for n in t if n.endswith("_scale_inv") and "experts" in n), None)
        if name:
            t[name] = t[name][:0].contiguous()  # no block rows at all for its weight (the tiny dims need one)
            save_file(t, os.path.join(src, fn), metadata={"format": "pt"})
            break
    p = cli("convert", src, str(tmp_path / "out"), "--dequantize", "bf16", check=2)
    line = one_error_line(p)
    assert name in line and "scale grid" in line and not os.path.exists(tmp_path / "out")


def test_dtype_keeps_every_layers_router_bias_in_fp32(hf_checkpoint, tmp_path):
    from safetensors import safe_open

    out = str(tmp_path / "f32")
    cli("-q", "convert", hf_checkpoint("deepseek_v3", "fp8"), out, "--dequantize", "bf16", "--dtype", "fp32")
    biases = {}
    for fn in os.listdir(out):
        if fn.endswith(".safetensors"):
            with safe_open(os.path.join(out, fn), "pt") as f:
                biases.update({n: f.get_slice(n).get_dtype() for n in f.keys() if n.endswith("e_score_correction_bias")})
    assert biases and set(biases.values()) == {"F32"}
    out = str(tmp_path / "bf16")
    cli("-q", "convert", hf_checkpoint("deepseek_v3", "fp8"), out, "--dtype", "bf16")
    for fn in os.listdir(out):
        if fn.endswith(".safetensors"):
            with safe_open(os.path.join(out, fn), "pt") as f:
                assert all(f.get_slice(n).get_dtype() == "F32" for n in f.keys() if n.endswith("e_score_correction_bias"))

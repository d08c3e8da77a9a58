"""Conversion features beyond the lossless default: FP8 dequantization, dtype casts, a conversion split across
processes (torchrun-style RANK/WORLD_SIZE), and the --workers option."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open

from checkpoints import tensors_of

from moe_adapters.checkpoint import open_checkpoint
from moe_adapters.convert import convert
from moe_adapters.tensor_io import WeightReader
from moe_adapters.verify import verify

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def reference_dequant(w: torch.Tensor, s: torch.Tensor, block: int = 128) -> torch.Tensor:
    """The straightforward definition, tile by tile."""
    out = torch.empty(w.shape, dtype=torch.float32)
    for i in range(s.shape[0]):
        for j in range(s.shape[1]):
            tile = (slice(i * block, (i + 1) * block), slice(j * block, (j + 1) * block))
            out[tile] = w[tile].float() * s[i, j]
    return out.to(torch.bfloat16)


@pytest.mark.parametrize("to,ep", [("fused", 2), ("hf", 1)])
def test_dequantize_bf16_matches_reference(hf_checkpoint, tmp_path, to, ep):
    src = hf_checkpoint("deepseek_v3", "fp8")
    dst = str(tmp_path / "deq")
    convert(src, dst, to=to, ep=ep, dequantize="bf16")
    cfg = json.load(open(os.path.join(dst, "config.json")))
    assert "quantization_config" not in cfg
    orig = tensors_of(src)
    got = tensors_of(dst)
    assert not [k for k in got if k.endswith("_scale_inv")]
    assert all(t.dtype != torch.float8_e4m3fn for t in got.values())
    canonical = WeightReader(dst)  # any layout -> per-expert view through the engine
    if to == "hf":
        for name, w in orig.items():
            if w.dtype == torch.float8_e4m3fn and not name.startswith("model.layers.3."):
                want = reference_dequant(w, orig[name + "_scale_inv"])
                assert torch.equal(got[name], want), name
    else:
        # fused gate_up of layer 1, rank 0 = experts 0..3: gate rows then up rows, each dequantized with its own scales
        w = got["model.layers.1.mlp.experts.gate_up_proj"] if "model.layers.1.mlp.experts.gate_up_proj" in got else None
        full = canonical.read("model.layers.1.mlp.experts.gate_up_proj")
        for e in range(8):
            g = orig[f"model.layers.1.mlp.experts.{e}.gate_proj.weight"]
            u = orig[f"model.layers.1.mlp.experts.{e}.up_proj.weight"]
            want = torch.cat([
                reference_dequant(g, orig[f"model.layers.1.mlp.experts.{e}.gate_proj.weight_scale_inv"]),
                reference_dequant(u, orig[f"model.layers.1.mlp.experts.{e}.up_proj.weight_scale_inv"]),
            ])
            assert torch.equal(full[e], want), e
        assert w is None or w.shape[0] == 4
        assert json.load(open(os.path.join(dst, "moe_adapters.json")))["source"]["lossy"].startswith("FP8 dequantized")
    # the MTP layer and bf16 tensors pass through unchanged
    assert torch.equal(got["model.layers.3.eh_proj.weight"], orig["model.layers.3.eh_proj.weight"])


def test_dtype_cast_only_when_asked(hf_checkpoint, tmp_path):
    src = hf_checkpoint("qwen3_moe")
    dst = str(tmp_path / "f32")
    convert(src, dst, ep=2, dtype="fp32")
    back = str(tmp_path / "back")
    convert(dst, back)
    a, b = tensors_of(src), tensors_of(back)
    assert a.keys() == b.keys()
    for k in a:
        assert b[k].dtype == torch.float32 and torch.equal(b[k], a[k].float()), k
    assert not verify(src, dst).identical  # a cast is not the source any more, and verify says so


@pytest.mark.parametrize("family,variant", [("mixtral", ""), ("gpt_oss", "mxfp4")])
def test_split_across_processes(hf_checkpoint, tmp_path, family, variant):
    """Three ranks (RANK/WORLD_SIZE as torchrun sets them) each write their share; rank 0 writes the manifest last.
    The result equals a single-process conversion byte for byte, also where experts are stacked [E, ...] tensors
    (gpt-oss) that no one process reads whole: rank 0 hashes those for the manifest."""
    src = hf_checkpoint(family, variant)
    single, multi = str(tmp_path / "single"), str(tmp_path / "multi")
    convert(src, single, ep=4, max_shard_bytes=6000)
    procs = []
    for rank in range(3):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE="3", MOE_ADAPTERS_RUN_ID="test-run", PYTHONPATH=ROOT)
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "moe_adapters", "convert", src, multi, "--ep", "4", "--max-shard-size", "6000", "--json"],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT))
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], outs
    summaries = [json.loads(o[0]) for o in outs]
    assert sum(s["bytes_read"] for s in summaries) > 0
    assert all(s["files"] >= 1 for s in summaries[1:])  # every rank wrote something

    def digest(folder):
        return {n: hashlib.sha256(open(os.path.join(folder, n), "rb").read()).hexdigest() for n in sorted(os.listdir(folder))}

    assert digest(multi) == digest(single)
    assert not [n for n in os.listdir(tmp_path) if "tmp-moe_adapters" in n]
    assert verify(src, multi).identical


@pytest.mark.parametrize("workers", [1, 3])
def test_workers_option(hf_checkpoint, tmp_path, workers):
    src = hf_checkpoint("nemotron_h")
    dst, back = str(tmp_path / "fused"), str(tmp_path / "back")
    convert(src, dst, ep=2, workers=workers)
    convert(dst, back, workers=workers)
    assert verify(src, back).identical
    assert open_checkpoint(back).layout == "hf"

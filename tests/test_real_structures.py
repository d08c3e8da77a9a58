"""Every real checkpoint structure in ../shared/realmodels (complete key sets, dtypes, shard names; tiny dims):
family detection, MoE layers, HF -> fused EP=4 -> HF byte-identical, and verify."""

from __future__ import annotations

import hashlib
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

from realstructure import SHARED, build  # noqa: E402

from moe_adapters.checkpoint import open_checkpoint  # noqa: E402
from moe_adapters.convert import convert  # noqa: E402
from moe_adapters.inspect import describe  # noqa: E402
from moe_adapters.verify import verify  # noqa: E402

# model folder -> (family, experts per layer, MoE layers)
EXPECTED = {
    "DeepSeek-V2-Lite": ("deepseek_v2", 64, 26),
    "DeepSeek-V3": ("deepseek_v3", 256, 58),
    "Mixtral-8x7B-v0.1": ("mixtral", 8, 32),
    "NVIDIA-Nemotron-3-Nano-30B-A3B-BF16": ("nemotron_h", 128, 23),
    "Qwen3-235B-A22B": ("qwen3_moe", 128, 94),
    "Qwen3-30B-A3B": ("qwen3_moe", 128, 48),
    "gpt-oss-20b": ("gpt_oss", 32, 24),
}
MODELS = sorted(m for m in EXPECTED if os.path.isdir(os.path.join(SHARED, m)))


def digests(folder: str) -> dict[str, str]:
    return {
        n: hashlib.sha256(open(os.path.join(folder, n), "rb").read()).hexdigest()
        for n in sorted(os.listdir(folder))
        if not n.startswith(".")
    }


@pytest.mark.skipif(not MODELS, reason="../shared/realmodels is not here")
@pytest.mark.parametrize("model", MODELS)
def test_real_structure_round_trip(model, tmp_path):
    src, fused, back = (str(tmp_path / n) for n in ("src", "fused", "back"))
    info = build(model, src)
    d = describe(src)
    family, experts, layers = EXPECTED[model]
    assert (d["family"], d["layout"], d["num_experts"], len(d["moe_layers"])) == (family, "hf", experts, layers)
    assert d["tensors"] == info["tensors"] and d["files"] == info["files"]
    convert(src, fused, ep=4)
    ck = open_checkpoint(fused)
    assert ck.ep_size == 4 and {r for r in ck.file_ranks.values() if r is not None} == {0, 1, 2, 3}
    convert(fused, back)
    assert digests(back) == digests(src)
    assert verify(src, fused).identical
    if model == "DeepSeek-V3":  # the MTP layer (61) is not a decoder layer: its experts pass through unfused
        names = {s.name for s in ck.stored()}
        assert "model.layers.61.mlp.experts.255.down_proj.weight_scale_inv" in names
        assert "model.layers.60.mlp.experts.gate_up_proj_scale_inv" in names

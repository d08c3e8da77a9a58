"""HF -> fused (EP 1/2/4) -> HF is byte-identical for every family; resharding works directly; the results load in
transformers with identical logits; verify catches a single flipped byte."""

from __future__ import annotations

import hashlib
import json
import os

import pytest
import torch
from safetensors import safe_open

from checkpoints import FAMILIES
from moe_adapters.checkpoint import open_checkpoint
from moe_adapters.converters import unrename_all
from moe_adapters.convert import convert
from moe_adapters.errors import DestinationError, ModelError
from moe_adapters.verify import verify


def file_hashes(folder: str) -> dict[str, str]:
    out = {}
    for name in sorted(os.listdir(folder)):
        p = os.path.join(folder, name)
        if os.path.isfile(p) and not name.startswith("."):  # .moe_adapters_provenance.json: see provenance.py
            out[name] = hashlib.sha256(open(p, "rb").read()).hexdigest()
    return out


def weights_of(folder: str) -> dict[str, str]:
    return {k: v for k, v in file_hashes(folder).items() if k != "moe_adapters.json"}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("ep", [1, 2, 4])
def test_hf_fused_hf_is_byte_identical(family, ep, hf_checkpoint, tmp_path):
    src = hf_checkpoint(family)
    before = file_hashes(src)
    fused, back = str(tmp_path / "fused"), str(tmp_path / "back")
    s = convert(src, fused, ep=ep, max_shard_bytes=8000)
    assert s.ep_size == ep and s.family == family
    ck = open_checkpoint(fused)
    assert ck.layout == "fused" and ck.ep_size == ep
    # each rank's experts sit in files of that rank only, and there are several per rank at this shard size
    ranks = {r for r in ck.file_ranks.values() if r is not None}
    assert ranks == set(range(ep))
    convert(fused, back)
    assert file_hashes(back) == before  # every file, the index JSON and config: same sha256
    assert file_hashes(src) == before  # the source is untouched


@pytest.mark.parametrize("family", FAMILIES)
def test_reshard_direct_ep4_to_ep2(family, hf_checkpoint, tmp_path):
    src = hf_checkpoint(family)
    ep4, ep2, back = (str(tmp_path / n) for n in ("ep4", "ep2", "back"))
    convert(src, ep4, ep=4)
    s = convert(ep4, ep2, to="fused", ep=2)
    assert s.direction == "fused->fused"
    ck = open_checkpoint(ep2)
    assert ck.ep_size == 2
    assert json.load(open(os.path.join(ep2, "moe_adapters.json")))["expert_ranges"] == [[0, 4], [4, 8]]
    # rank r's file holds exactly experts [4r, 4r+4): compare against the HF per-expert tensors
    hf = open_checkpoint(src)
    fam = hf.family
    layer = fam.moe_layer_ids(hf.config)[0]
    pname = f"{fam.fused_expert_prefix(layer)}.down_proj"
    hf_down = {}
    stacked_down = unrename_all(fam.renames, pname)  # experts already stacked in the checkpoint: one [E, ...] tensor
    for h in hf.headers.values():
        with safe_open(h.path, "pt") as f:
            for k in f.keys():
                if fam.experts.stacked and k == stacked_down:
                    hf_down.update(enumerate(f.get_tensor(k)))
                elif k.startswith(fam.hf_expert_prefix(layer) + ".") and k.endswith(f".{fam.experts.down}.weight"):
                    hf_down[int(k.split(".")[-3])] = f.get_tensor(k)
    assert sorted(hf_down) == list(range(8))
    for rel, rank in ck.file_ranks.items():
        with safe_open(os.path.join(ep2, rel), "pt") as f:
            if pname in f.keys():
                part = f.get_tensor(pname)
                want = torch.stack([hf_down[e] for e in range(4 * rank, 4 * rank + 4)])
                assert part.dtype == want.dtype and torch.equal(part.view(torch.uint8), want.view(torch.uint8))
    convert(ep2, back)
    assert file_hashes(back) == file_hashes(src)


@pytest.mark.parametrize("family", FAMILIES)
def test_ep1_fused_loads_strict_into_v5_model(family, hf_checkpoint, tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    src = hf_checkpoint(family)
    fused = str(tmp_path / "fused")
    convert(src, fused, ep=1)
    state = {}
    for name in os.listdir(fused):
        if name.endswith(".safetensors"):
            with safe_open(os.path.join(fused, name), "pt") as f:
                state.update({k: f.get_tensor(k) for k in f.keys()})
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(src), dtype=torch.bfloat16)
    for tied, source in (getattr(model, "all_tied_weights_keys", None) or {}).items():  # ERNIE ties lm_head
        assert tied not in state
        state[tied] = state[source]
    model.load_state_dict(state, strict=True)
    ref = AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16)
    for k, v in ref.state_dict().items():
        assert torch.equal(model.state_dict()[k].view(torch.uint8), v.view(torch.uint8)), k


@pytest.mark.parametrize("family", FAMILIES)
def test_roundtrip_loads_in_transformers_with_identical_logits(family, hf_checkpoint, tmp_path):
    from transformers import AutoModelForCausalLM

    src = hf_checkpoint(family)
    fused, back = str(tmp_path / "fused"), str(tmp_path / "back")
    convert(src, fused, ep=2)
    convert(fused, back)
    ids = torch.randint(0, 96, (2, 7), generator=torch.Generator().manual_seed(0))
    logits = []
    for path in (src, back):
        m = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        with torch.no_grad():
            logits.append(m(ids).logits)
    assert torch.equal(logits[0], logits[1])


def test_fused_ep1_folder_loads_with_plain_from_pretrained(hf_checkpoint, tmp_path):
    from transformers import AutoModelForCausalLM

    src = hf_checkpoint("qwen3_moe")
    fused = str(tmp_path / "fused")
    convert(src, fused, ep=1)
    ids = torch.arange(10).reshape(1, 10)
    a = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    b = AutoModelForCausalLM.from_pretrained(fused, dtype=torch.float32).eval()
    with torch.no_grad():
        assert torch.equal(a(ids).logits, b(ids).logits)


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
def test_tied_embeddings(family, hf_checkpoint, tmp_path):
    src = hf_checkpoint(family, "tied")
    names = set()
    for h in open_checkpoint(src).headers.values():
        names |= {e.name for e in h.tensors}
    assert "lm_head.weight" not in names  # transformers wrote the tied checkpoint without it
    fused, back = str(tmp_path / "fused"), str(tmp_path / "back")
    convert(src, fused, ep=2)
    convert(fused, back)
    assert file_hashes(back) == file_hashes(src)
    assert verify(src, fused).identical


def test_deepseek_fp8_with_mtp_layer(hf_checkpoint, tmp_path):
    src = hf_checkpoint("deepseek_v3", "fp8")
    fused, back = str(tmp_path / "fused"), str(tmp_path / "back")
    convert(src, fused, ep=4)
    ck = open_checkpoint(fused)
    n = ck.config["num_hidden_layers"]
    stored = {s.name: s.entry for s in ck.stored()}
    # FP8 experts fuse with their block scales under v5's names
    w = stored["model.layers.1.mlp.experts.gate_up_proj"]
    s = stored["model.layers.1.mlp.experts.gate_up_proj_scale_inv"]
    assert w.dtype == "F8_E4M3" and w.shape == (2, 32, 32)
    assert s.dtype == "F32" and s.shape == (2, 2, 1)
    assert stored["model.layers.1.mlp.experts.down_proj_scale_inv"].shape == (2, 1, 1)
    # the MTP layer (beyond num_hidden_layers) passes through with its per-expert keys, dtypes untouched
    assert stored[f"model.layers.{n}.mlp.experts.0.gate_proj.weight"].dtype == "F8_E4M3"
    assert stored[f"model.layers.{n}.eh_proj.weight"].dtype == "BF16"
    assert stored["model.layers.1.mlp.gate.e_score_correction_bias"].dtype == "F32"
    assert stored["model.layers.0.mlp.down_proj.weight_scale_inv"].dtype == "F32"
    convert(fused, back)
    assert file_hashes(back) == file_hashes(src)
    assert verify(src, fused).identical


@pytest.mark.parametrize("family", ["mixtral", "nemotron_h", "phimoe"])  # families whose v5 names are renamed
def test_packed_v5_input(family, hf_checkpoint, tmp_path):
    """save_pretrained(save_original_format=False) writes v5's fused names; accept it as input."""
    src, packed = hf_checkpoint(family), hf_checkpoint(family, "packed")
    assert open_checkpoint(packed).layout == "packed"
    assert verify(src, packed).identical  # same seed: the same weights in the other form
    fused, hf, back = (str(tmp_path / n) for n in ("fused", "hf", "back"))
    convert(packed, fused, ep=2)
    assert verify(src, fused).identical
    convert(packed, hf, to="hf")
    assert open_checkpoint(hf).layout == "hf"
    assert verify(src, hf).identical
    convert(fused, back)  # fused from packed goes back to the packed files exactly
    assert weights_of(back) == weights_of(packed)


@pytest.mark.parametrize("family", FAMILIES)
def test_verify_catches_a_flipped_byte(family, hf_checkpoint, tmp_path):
    src = hf_checkpoint(family)
    fused = str(tmp_path / "fused")
    convert(src, fused, ep=2)
    assert verify(src, fused).identical
    ck = open_checkpoint(fused)
    # flip one byte inside an expert tensor of rank 1
    rel = next(r for r, rank in ck.file_ranks.items() if rank == 1)
    h = ck.headers[rel]
    e = h.tensors[-1]
    pos = h.data_start + e.begin + (e.end - e.begin) // 2
    with open(h.path, "r+b") as f:
        f.seek(pos)
        b = f.read(1)
        f.seek(pos)
        f.write(bytes([b[0] ^ 0x01]))
    r = verify(src, fused)
    assert not r.identical and len(r.mismatched) == 1 and r.mismatched[0].endswith("bytes differ")


def test_ep_that_does_not_divide_experts_is_a_clear_error(hf_checkpoint, tmp_path):
    with pytest.raises(ModelError, match="EP size 3 does not divide the 8 experts"):
        convert(hf_checkpoint("qwen3_moe"), str(tmp_path / "x"), ep=3)
    assert not os.path.exists(tmp_path / "x")
    assert not [p for p in os.listdir(tmp_path) if "tmp-moe_adapters" in p]


def test_refuses_existing_destination_and_source_overlap(hf_checkpoint, tmp_path):
    src = hf_checkpoint("qwen3_moe")
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "keep.txt").write_text("mine")
    with pytest.raises(DestinationError, match="already exists"):
        convert(src, str(dst))
    assert (dst / "keep.txt").read_text() == "mine"
    with pytest.raises(DestinationError, match="overlaps the source"):
        convert(src, os.path.join(src, "inside"))
    convert(src, str(dst), overwrite=True)
    assert not (dst / "keep.txt").exists() and open_checkpoint(str(dst)).layout == "fused"

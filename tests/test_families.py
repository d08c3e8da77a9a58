"""What is specific to the families beyond the four first ones (issue 8): experts already stacked in the checkpoint
(GraniteMoE, Llama 4, gpt-oss), gpt-oss's MXFP4 form (bitwise pass-through, `--dequantize bf16` as transformers
computes it), square expert matrices whose orientation only the declaration knows, router variants (SparseMixer in
training), and the real gpt-oss-20b / DeepSeek-V2-Lite configs and weight-name lists planned against the v5 models
they describe (headers only: no weights exist here).

The generic checks (bit-exact HF -> fused (EP 1/2/4) -> HF, EP 4 -> 2 resharding, verify, strict load into the v5
model, block / router / whole-model equivalence with v5, EP over gloo) run for every family in
test_convert_roundtrip.py and test_runtime_*.py.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
from math import prod

import pytest
import torch
from safetensors import safe_open

from checkpoints import tensors_of

from moe_adapters.checkpoint import open_checkpoint
from moe_adapters.converters import ByteTensor, DequantizeMXFP4
from moe_adapters.convert import convert
from moe_adapters.errors import ModelError
from moe_adapters.families import REGISTRY, detect
from moe_adapters.layout import ExpertMap, fuse
from moe_adapters.verify import verify

REAL = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..", "shared", "realmodels")
NEW = [
    "qwen2_moe", "qwen3_next", "olmoe", "glm4_moe", "deepseek_v2", "dots1", "ernie4_5_moe", "hunyuan_v1_moe",
    "granitemoe", "phimoe", "minimax", "llama4_text", "gpt_oss",
]


def _hashes(folder: str) -> dict[str, str]:
    return {
        n: hashlib.sha256(open(os.path.join(folder, n), "rb").read()).hexdigest()
        for n in sorted(os.listdir(folder))
        if os.path.isfile(os.path.join(folder, n)) and not n.startswith(".")
    }


# --- the registry --------------------------------------------------------------------------------------------------


def test_families_command_lists_every_family_with_its_architectures():
    import subprocess

    p = subprocess.run(
        [sys.executable, "-m", "moe_adapters", "families", "--json"], capture_output=True, text=True, timeout=120,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    )
    assert p.returncode == 0, p.stderr
    rows = {r["name"]: r for r in json.loads(p.stdout)}
    assert set(NEW) <= set(rows)
    for name in NEW:
        fam = REGISTRY[name]
        assert rows[name]["architectures"] == list(fam.architectures) and rows[name]["architectures"]
        assert rows[name]["model_types"] == list(fam.model_types)
    assert {n for n, r in rows.items() if r["stacked"]} == {"granitemoe", "llama4_text", "gpt_oss"}
    assert rows["phimoe"]["router"] == "sparsemixer" and rows["gpt_oss"]["activation"] == "clamped_swiglu"


@pytest.mark.parametrize("family", NEW)
def test_transformers_config_is_detected(family, hf_checkpoint):
    """The config.json transformers writes for the family is matched by model_type and by architecture alone."""
    cfg = json.load(open(os.path.join(hf_checkpoint(family), "config.json")))
    assert detect(cfg).name == family
    assert detect({"architectures": cfg["architectures"]}).name == family


# --- experts already stacked in the checkpoint ---------------------------------------------------------------------


def test_packed_granitemoe_input_and_stacked_hf_layout(hf_checkpoint, tmp_path):
    """GraniteMoE publishes `input_linear.weight`; v5's packed save writes `experts.gate_up_proj`: both are read,
    and the packed form converts back to the published names. gpt-oss publishes its v5 names: that is `hf`."""
    src, packed = hf_checkpoint("granitemoe"), hf_checkpoint("granitemoe", "packed")
    assert open_checkpoint(src).layout == "hf" and open_checkpoint(packed).layout == "packed"
    assert open_checkpoint(hf_checkpoint("gpt_oss")).layout == "hf"
    assert verify(src, packed).identical
    hf = str(tmp_path / "hf")
    convert(packed, hf, to="hf")
    assert set(tensors_of(hf)) == set(tensors_of(src))
    assert "model.layers.0.block_sparse_moe.input_linear.weight" in tensors_of(hf)


def test_stacked_slices_are_rows_of_the_stored_tensor(hf_checkpoint, tmp_path):
    """Each EP rank's fused tensor is rows [r E/ep, (r+1) E/ep) of the published stacked tensor, bitwise (biases
    included), under v5's name."""
    src = hf_checkpoint("gpt_oss")
    fused = str(tmp_path / "ep4")
    convert(src, fused, ep=4)
    want = tensors_of(src)
    ck = open_checkpoint(fused)
    seen = 0
    for rel, rank in ck.file_ranks.items():
        if rank is None:
            continue
        for name, t in _file_tensors(os.path.join(fused, rel)).items():
            ref = want[name][2 * rank : 2 * rank + 2]
            assert t.dtype == ref.dtype and torch.equal(t.view(torch.uint8), ref.contiguous().view(torch.uint8))
            seen += 1
    assert seen == 4 * 2 * 4  # 4 ranks x 2 layers x (gate_up, its bias, down, its bias)


def _file_tensors(path: str) -> dict[str, torch.Tensor]:
    with safe_open(path, "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


# --- square expert matrices: orientation from the declaration, never from shapes -----------------------------------


@pytest.mark.parametrize("family,square", [("gpt_oss", "down_proj"), ("llama4_text", "gate_up_proj")])
def test_square_experts_keep_the_declared_orientation(family, square):
    """gpt-oss has H == I (as gpt-oss-20b: 2880), so `down_proj [E, I, H]` is square; the Llama 4 fixture has
    H == 2I, so `gate_up_proj [E, H, 2I]` is. Shapes cannot tell [E, in, out] from [E, out, in] there: the tensor
    passes the conversion's shape check under either declared orientation and is copied as stored; a transpose
    "guessed" from shapes would load without complaint (same shape) and silently compute something else, while the
    declared orientation matches v5. (Flipping the whole declaration is refused: the other matrix is not square.)"""
    from runtime_helpers import randomize_, rel_err, tiny_config
    from transformers import AutoModelForCausalLM

    from moe_adapters.layout import _check_stacked_shape
    from moe_adapters.runtime.layer import block_prefix, build_moe_block, copy_block_weights

    cfg = tiny_config(family)
    d = cfg.to_dict()
    fam = detect(d)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32, experts_implementation="eager").eval()
    randomize_(model, seed=3)
    layer = fam.moe_layer_ids(d)[0]
    v5 = model.get_submodule(block_prefix(fam, layer))
    p = v5.experts.get_parameter(square)
    assert p.shape[1] == p.shape[2]  # the fixture really is square there
    flipped = dataclasses.replace(fam, experts=dataclasses.replace(fam.experts, transposed=not fam.experts.transposed))

    t = ByteTensor.contiguous("F32", tuple(p.shape), "mem", 0)
    for decl in (fam, flipped):
        _check_stacked_shape(ExpertMap(decl, d), square, t, square)  # no shape check can tell the two apart

    x = torch.randn(2, 5, d["hidden_size"], generator=torch.Generator().manual_seed(0))
    want = v5(x)[0]
    ours = build_moe_block(fam, d, layer, template=v5).eval()
    copy_block_weights(ours, v5)
    assert rel_err(ours(x)[0].reshape(want.shape), want) <= 1e-6
    guessed = {k: v.transpose(1, 2).contiguous() if k == f"experts.{square}" else v for k, v in v5.state_dict().items()}
    ours.load_state_dict(guessed, strict=True)  # a transposed square matrix loads without a word
    assert rel_err(ours(x)[0].reshape(want.shape), want) > 1e-2
    with pytest.raises(ValueError, match="transformers v5 has"):
        build_moe_block(flipped, d, layer, template=v5)


def test_flipped_orientation_of_a_non_square_stacked_weight_is_refused(tmp_path, hf_checkpoint):
    """gpt-oss's gate_up_proj [E, H, 2I] = [8, 32, 64] is not square: declared the other way round, the engine
    refuses the checkpoint instead of guessing a transpose."""
    fam = REGISTRY["gpt_oss"]
    src = hf_checkpoint("gpt_oss")
    ck = open_checkpoint(src)
    from moe_adapters.layout import canonical_view

    canonical, emap = canonical_view(ck)
    fuse(canonical, emap, 2)  # as declared: fine
    flipped = dataclasses.replace(fam, experts=dataclasses.replace(fam.experts, transposed=False))
    with pytest.raises(ModelError, match="declaration"):
        fuse(canonical, ExpertMap(flipped, ck.config), 2)


# --- gpt-oss's MXFP4 form ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("ep", [1, 2, 4])
def test_mxfp4_round_trip_is_bitwise(hf_checkpoint, tmp_path, ep):
    src = hf_checkpoint("gpt_oss", "mxfp4")
    before = _hashes(src)
    fused, back = str(tmp_path / "fused"), str(tmp_path / "back")
    convert(src, fused, ep=ep, max_shard_bytes=8000)
    stored = {s.name: s.entry for s in open_checkpoint(fused).stored()}
    blocks = stored["model.layers.0.mlp.experts.gate_up_proj_blocks"]
    assert blocks.dtype == "U8" and blocks.shape == (8 // ep, 128, 2, 16)  # [E/ep, 2I, H/32, 16]
    assert stored["model.layers.0.mlp.experts.down_proj_scales"].shape == (8 // ep, 64, 2)
    assert stored["model.layers.0.mlp.experts.down_proj_bias"].dtype == "BF16"
    assert verify(src, fused).identical
    convert(fused, back)
    assert _hashes(back) == before and _hashes(src) == before


def test_mxfp4_reshard_ep4_to_ep2(hf_checkpoint, tmp_path):
    src = hf_checkpoint("gpt_oss", "mxfp4")
    ep4, ep2, back = (str(tmp_path / n) for n in ("ep4", "ep2", "back"))
    convert(src, ep4, ep=4)
    assert convert(ep4, ep2, to="fused", ep=2).direction == "fused->fused"
    assert verify(src, ep2).identical
    convert(ep2, back)
    assert _hashes(back) == _hashes(src)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float16])
def test_mxfp4_dequantize_op_is_transformers_bitwise(dtype):
    """Our MXFP4 op against transformers' integrations/mxfp4.py on random codes and every exponent class (tiny,
    normal, huge), across chunk boundaries."""
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    g = torch.Generator().manual_seed(0)
    blocks = torch.randint(0, 256, (3, 40, 5, 16), generator=g, dtype=torch.uint8)
    scales = torch.randint(100, 150, (3, 40, 5), generator=g, dtype=torch.uint8)
    want = convert_moe_packed_tensors(blocks, scales, dtype=dtype)
    got = DequantizeMXFP4(dtype=str(dtype).removeprefix("torch."), rows_per_chunk=7).apply_tensors([blocks, scales])[0]
    assert got.shape == want.shape == (3, 160, 40) and got.dtype == dtype
    assert torch.equal(got.view(torch.uint8) if dtype != torch.float32 else got.view(torch.int32),
                       want.view(torch.uint8) if dtype != torch.float32 else want.view(torch.int32))


def test_mxfp4_dequantize_bf16_conversion(hf_checkpoint, tmp_path):
    """`convert --dequantize bf16`: each `*_blocks`/`*_scales` pair becomes v5's bf16 weight, bitwise what
    transformers' own dequantization gives; quantization_config is dropped; the EP=1 result loads strict into the v5
    model and plain transformers loads the HF form; both to fused (EP 2) and to hf."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    src = hf_checkpoint("gpt_oss", "mxfp4")
    q = tensors_of(src)
    fused1, fused2, hf = (str(tmp_path / n) for n in ("f1", "f2", "hf"))
    convert(src, fused1, ep=1, dequantize="bf16")
    convert(src, fused2, ep=2, dequantize="bf16")
    convert(src, hf, to="hf", dequantize="bf16")
    deq = tensors_of(fused1)
    for L in (0, 1):
        for w in ("gate_up_proj", "down_proj"):
            name = f"model.layers.{L}.mlp.experts.{w}"
            want = convert_moe_packed_tensors(q[name + "_blocks"], q[name + "_scales"], dtype=torch.bfloat16)
            assert deq[name].dtype == torch.bfloat16
            assert torch.equal(deq[name].view(torch.int16), want.view(torch.int16))
            assert name + "_blocks" not in deq and name + "_scales" not in deq
    assert set(tensors_of(hf)) == set(deq)
    assert verify(fused1, fused2).identical and verify(fused1, hf).identical
    for folder in (fused1, hf):
        assert "quantization_config" not in json.load(open(os.path.join(folder, "config.json")))
    assert json.load(open(os.path.join(fused1, "moe_adapters.json")))["source"]["lossy"].startswith("MXFP4 dequantized")
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(fused1), dtype=torch.bfloat16)
    model.load_state_dict(deq, strict=True)
    plain = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.bfloat16)
    assert torch.equal(plain.model.layers[1].mlp.experts.gate_up_proj, deq["model.layers.1.mlp.experts.gate_up_proj"])
    # close to the bf16 weights the fixture was quantized from (FP4: a few bits of mantissa)
    orig = tensors_of(src + ".bf16")["model.layers.0.mlp.experts.down_proj"].float()
    err = (deq["model.layers.0.mlp.experts.down_proj"].float() - orig).abs().max() / orig.abs().max()
    assert 0 < err < 0.25


def test_mxfp4_dequantize_at_ep_n_computes_each_expert_once(hf_checkpoint, tmp_path, monkeypatch):
    """An EP rank's file dequantizes only its experts' rows: the work (experts dequantized) does not grow with EP
    (it grew N-fold before: every rank's file dequantized the whole stacked weight)."""
    from moe_adapters.converters import ops

    done = {"experts": 0}
    original = ops.DequantizeMXFP4.apply_tensors

    def counting(self, tensors):
        done["experts"] += tensors[0].shape[0]
        return original(self, tensors)

    monkeypatch.setattr(ops.DequantizeMXFP4, "apply_tensors", counting)
    src = hf_checkpoint("gpt_oss", "mxfp4")
    work = {}
    for ep in (1, 4):
        done["experts"] = 0
        convert(src, str(tmp_path / f"ep{ep}"), ep=ep, dequantize="bf16")
        work[ep] = done["experts"]
    assert work[1] > 0 and work[4] == work[1]
    assert verify(str(tmp_path / "ep1"), str(tmp_path / "ep4")).identical


def test_mxfp4_checkpoint_loads_dequantized_in_the_runtime(hf_checkpoint, tmp_path):
    """moe_adapters.AutoModelForCausalLM reads the MXFP4 experts (this rank's rows of blocks and scales) and
    dequantizes them on load: the same model as plain transformers on the `--dequantize bf16` conversion."""
    from transformers import AutoModelForCausalLM as HFAuto

    import moe_adapters

    src = hf_checkpoint("gpt_oss", "mxfp4")
    hf = str(tmp_path / "hf")
    convert(src, hf, to="hf", dequantize="bf16")
    ours = moe_adapters.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    assert ours.moe_ep.dequantized and getattr(ours.config, "quantization_config", None) is None
    ref = HFAuto.from_pretrained(hf, dtype=torch.bfloat16, experts_implementation="eager").float()
    for (n, a), (n2, b) in zip(ours.state_dict().items(), ref.state_dict().items()):
        assert n == n2 and torch.equal(a, b), n
    ids = torch.randint(0, 96, (2, 6), generator=torch.Generator().manual_seed(0))
    assert torch.equal(ours(input_ids=ids).logits, ref(input_ids=ids).logits)


# --- router variants beyond what the block tests cover -------------------------------------------------------------


def test_sparsemixer_samples_in_training_as_v5_does():
    """PhiMoE in training: Gumbel-sampled picks and the Heun multiplier's gradient, draw for draw v5's (same seed);
    the sampling is real (another seed picks differently; eval picks the argmax)."""
    from runtime_helpers import tiny_config
    from transformers import AutoModelForCausalLM

    from moe_adapters.runtime.layer import block_prefix, build_moe_block

    cfg = tiny_config("phimoe", input_jitter_noise=0.0, router_jitter_noise=0.5)  # a wide mask: many candidates
    d = cfg.to_dict()
    fam = detect(d)
    block = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).get_submodule(block_prefix(fam, 0))
    v5, ours = block.router, build_moe_block(fam, d, 0, template=block).router
    with torch.no_grad():
        v5.weight.copy_(torch.randn(v5.weight.shape, generator=torch.Generator().manual_seed(1)))
    ours.load_state_dict(v5.state_dict())
    x = torch.randn(64, d["hidden_size"], generator=torch.Generator().manual_seed(2))
    v5.train(), ours.train()
    picks = []
    for seed in (3, 3, 4):
        torch.manual_seed(seed)
        l_ref, w_ref, i_ref = v5(x.clone())
        torch.manual_seed(seed)
        l, w, i = ours(x.clone())
        assert torch.equal(i, i_ref) and torch.equal(w, w_ref)
        g = torch.randn(w.shape, generator=torch.Generator().manual_seed(seed))
        (gw_ref,) = torch.autograd.grad((w_ref * g).sum(), v5.weight)
        (gw,) = torch.autograd.grad((w * g).sum(), ours.router_weight)
        assert torch.equal(gw, gw_ref)  # the straight-through (Heun) gradient, bitwise
        picks.append(i)
    assert not torch.equal(picks[0], picks[2])  # another seed: other samples
    v5.eval(), ours.eval()
    assert torch.equal(ours(x)[2], v5(x)[2])


def test_ernie_without_shared_experts():
    """ERNIE with moe_num_shared_experts 0 has no shared MLP in v5; ours neither, same state dict, same output."""
    from runtime_helpers import randomize_, rel_err, tiny_config
    from transformers import AutoModelForCausalLM

    from moe_adapters.runtime.layer import block_prefix, build_moe_block, copy_block_weights

    cfg = tiny_config("ernie4_5_moe", moe_num_shared_experts=0)
    d = cfg.to_dict()
    fam = detect(d)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    randomize_(model, seed=1)
    v5 = model.get_submodule(block_prefix(fam, 1)).eval()
    ours = build_moe_block(fam, d, 1, template=v5).eval()
    copy_block_weights(ours, v5)
    assert list(ours.state_dict()) == list(v5.state_dict()) and not any("shared" in k for k in v5.state_dict())
    x = torch.randn(2, 5, d["hidden_size"], generator=torch.Generator().manual_seed(0))
    assert rel_err(ours(x), v5(x)) == 0.0


@pytest.mark.parametrize(
    "family,cfg,want",
    [
        ("ernie4_5_moe", {"num_hidden_layers": 6, "moe_layer_start_index": 1, "moe_layer_end_index": -1,
                          "moe_layer_interval": 2}, [1, 3, 5]),
        ("ernie4_5_moe", {"num_hidden_layers": 6, "moe_layer_start_index": 0, "moe_layer_end_index": 3}, [0, 1, 2, 3]),
        ("llama4_text", {"num_hidden_layers": 6, "moe_layers": None, "interleave_moe_layer_step": 2}, [1, 3, 5]),
        ("llama4_text", {"num_hidden_layers": 6, "moe_layers": [4, 0]}, [0, 4]),
        ("deepseek_v2", {"num_hidden_layers": 4, "first_k_dense_replace": 1, "moe_layer_freq": 2}, [1, 2, 3]),
    ],
)
def test_moe_layer_rules_agree_with_v5(family, cfg, want):
    """The declared MoE layers are those v5 builds an MoE block for (v5 ignores DeepSeek-V2's moe_layer_freq)."""
    from runtime_helpers import TINY
    from transformers import AutoConfig, AutoModelForCausalLM

    fam = REGISTRY[family]
    conf = AutoConfig.for_model(family, **{**TINY[family], **cfg})
    assert fam.moe_layer_ids(conf.to_dict()) == want
    assert fam.moe_layer_ids(cfg) == want  # from the raw published config as well
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(conf)
    moe = [i for i in range(cfg["num_hidden_layers"]) if any(".experts." in n for n, _ in
           model.named_parameters() if n.startswith(f"model.layers.{i}."))]
    assert moe == want


# --- the real checkpoints' names, planned against the v5 models they describe --------------------------------------


def _real(name: str) -> tuple[dict, dict[str, ByteTensor]]:
    folder = os.path.join(REAL, name)
    cfg = json.load(open(os.path.join(folder, "config.json")))
    canonical, pos = {}, 0
    for line in open(os.path.join(folder, "weight_names.txt")):
        tname, shape, dtype = line.rstrip("\n").split("\t")
        t = ByteTensor.contiguous(dtype, json.loads(shape), "headers-only", pos)
        canonical[tname] = t
        pos += t.nbytes
    return cfg, canonical


def _v5_shapes(cfg: dict) -> dict[str, tuple[int, ...]]:
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = {k: v for k, v in cfg.items() if k not in ("quantization_config", "auto_map")}
    conf = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(conf)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


@pytest.mark.skipif(not os.path.isdir(os.path.join(REAL, "DeepSeek-V2-Lite")), reason="no real model lists")
def test_real_deepseek_v2_lite_plans_onto_the_v5_model():
    cfg, canonical = _real("DeepSeek-V2-Lite")
    fam = detect(cfg)
    emap = ExpertMap(fam, cfg)
    assert fam.name == "deepseek_v2" and emap.num_experts == 64 and emap.moe_layers == list(range(1, 27))
    full = fuse(canonical, emap, 1)
    got = {n: t.shape for n, t in full.dense + full.ranks[0]}
    assert got == _v5_shapes(cfg)  # every v5 parameter, under v5's name and shape, nothing else
    ep8 = fuse(canonical, emap, 8)
    assert all(dict(r)["model.layers.5.mlp.experts.gate_up_proj"].shape == (8, 2816, 2048) for r in ep8.ranks)


@pytest.mark.skipif(not os.path.isdir(os.path.join(REAL, "gpt-oss-20b")), reason="no real model lists")
def test_real_gpt_oss_20b_mxfp4_plans_and_dequantizes_onto_the_v5_model():
    """gpt-oss-20b as published (MXFP4 blocks/scales, H == I == 2880): every expert tensor splits by EP rank and
    comes back under its own name; dequantized, the plan is exactly the bf16 v5 model's parameters."""
    from moe_adapters.computed import release
    from moe_adapters.layout import unfuse_param
    from moe_adapters.transforms import dequantize

    cfg, canonical = _real("gpt-oss-20b")
    fam = detect(cfg)
    emap = ExpertMap(fam, cfg)
    assert fam.name == "gpt_oss" and emap.num_experts == 32 and emap.moe_layers == list(range(24))
    for ep in (4, 8):
        ft = fuse(canonical, emap, ep)
        rank0 = dict(ft.ranks[0])
        assert rank0["model.layers.7.mlp.experts.gate_up_proj_blocks"].shape == (32 // ep, 5760, 90, 16)
        assert rank0["model.layers.7.mlp.experts.down_proj_scales"].shape == (32 // ep, 2880, 90)
        assert len(rank0) == 24 * 6 and sum(t.nbytes for r in ft.ranks for _, t in r) + sum(
            t.nbytes for _, t in ft.dense) == sum(t.nbytes for t in canonical.values()) == 13761264768
    from moe_adapters.converters import Concat

    back = {}
    for p in emap.params:
        parts = [dict(r).get(p.name) for r in ft.ranks]
        if parts[0] is not None:
            back.update(unfuse_param(p, Concat(0).apply(parts)[0], emap))
    assert set(back) == {n for n in canonical if ".experts." in n}
    deq, new_cfg = dequantize(canonical, cfg, "bf16", transposed=fam.experts.transposed)
    try:
        assert "quantization_config" not in new_cfg
        full = fuse(deq, ExpertMap(fam, new_cfg), 1)
        got = {n: t.shape for n, t in full.dense + full.ranks[0]}
        assert got == _v5_shapes(new_cfg)
        assert got["model.layers.0.mlp.experts.gate_up_proj"] == (32, 2880, 5760)  # [E, H, 2I]
        assert prod(got["model.layers.0.mlp.experts.down_proj"]) == 32 * 2880 * 2880
    finally:
        release(list(deq.values()))


@pytest.fixture(scope="module")
def runtime_ckpts(tmp_path_factory):
    from runtime_helpers import build_checkpoint

    root = tmp_path_factory.mktemp("families_runtime")
    return lambda family: build_checkpoint(family, str(root / family), seed=5)


@pytest.mark.parametrize("family", NEW)
def test_router_logits_and_aux_loss_are_recorded(runtime_ckpts, family):
    """`output_router_logits=True`: transformers records the router's output by position (Llama 4: its second
    item); ours returns what v5's router returns, so the recorded logits and the aux loss are v5's, bitwise."""
    from transformers import AutoModelForCausalLM as HFAuto

    import moe_adapters

    path = runtime_ckpts(family)
    ref = HFAuto.from_pretrained(path, experts_implementation="eager", output_router_logits=True)
    ours = moe_adapters.AutoModelForCausalLM.from_pretrained(path, output_router_logits=True)
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(1))
    r, o = ref(input_ids=ids, labels=ids), ours(input_ids=ids, labels=ids)
    assert r.router_logits and len(o.router_logits) == len(r.router_logits)
    for a, b in zip(o.router_logits, r.router_logits):
        assert torch.equal(a, b)
    assert (o.aux_loss is None) == (r.aux_loss is None)
    if r.aux_loss is not None:
        assert torch.equal(o.aux_loss, r.aux_loss)
    assert torch.equal(o.loss, r.loss)

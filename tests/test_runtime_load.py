"""``moe_adapters.AutoModelForCausalLM.from_pretrained`` in one process (no torch.distributed: EP = 1).

The loaded model is a normal transformers ``PreTrainedModel`` whose MoE blocks are ours; against plain transformers
v5 on the same checkpoint (fp32): same class, same state-dict names and shapes, bitwise-equal logits and
non-persistent buffers, gradients within 1e-6 relative, same aux loss; ``save_pretrained`` reproduces the source
bytes; packed (v5 in-memory names) and fused (moe-adapters, EP = 2) checkpoints load to the same logits; FP8
block-scaled checkpoints load dequantized.
"""

from __future__ import annotations

import filecmp
import json
import os

import pytest
import torch
from runtime_helpers import FAMILIES, build_checkpoint, reference_model, rel_err, tiny_config

import moe_adapters
from moe_adapters.runtime.layer import MoEBlock

TOL = 1e-6
# Qwen3-Next: the gated-delta-rule backward (transformers' reference torch implementation) of the linear-attention
# layer before the MoE block amplifies the ~1e-7 differences in the block's input gradient (a different but equally
# exact expert summation order) to 1.1e-6 on `linear_attn.A_log` (5.9e-7 with the `loop` backend); every MoE block
# weight stays below 1e-6 (test_runtime_layer.py checks the block alone at 1e-6).
MODEL_TOL = {"qwen3_next": 2e-6}
# Gradients of the whole model (the forward stays bitwise): in fp32, v5's RMSNorm's `.to(float32)` returns its input
# itself, so autograd sums three gradients into it (square, product, residual) in its own order; our RMSNorm hands
# back one (its two terms already summed). Measured: 1.6e-6 at worst (Qwen2-MoE's k_proj bias, 8.6e-7 with
# fused_rms_norm=False); in bf16 the norm's gradients are bitwise v5's (test_runtime_memory.py).
GRAD_TOL = 2e-6


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("load_ckpts")
    return {f: build_checkpoint(f, str(root / f), seed=5) for f in FAMILIES}


def _ids(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", FAMILIES)
def test_ep1_model_is_v5_model_with_our_blocks(ckpts, family, tmp_path):
    ref = reference_model(ckpts[family])
    ours = moe_adapters.AutoModelForCausalLM.from_pretrained(ckpts[family], dtype=torch.float32)
    assert type(ours) is type(ref) and not ours.training
    blocks = [m for m in ours.modules() if isinstance(m, MoEBlock)]
    assert blocks and len(blocks) == len(ours.moe_ep.moe_blocks)
    ref_sd, our_sd = ref.state_dict(), ours.state_dict()
    assert list(our_sd) == list(ref_sd)
    for k in ref_sd:
        assert our_sd[k].shape == ref_sd[k].shape and our_sd[k].dtype == ref_sd[k].dtype, k
        assert torch.equal(our_sd[k], ref_sd[k]), k
    assert len(list(ref.named_buffers())) == len(list(ours.named_buffers()))
    for (n, b), (n2, b2) in zip(ref.named_buffers(), ours.named_buffers()):  # incl. rebuilt rotary tables
        assert n == n2 and torch.equal(b, b2), n

    ids = _ids()
    ref.train(), ours.train()
    torch.manual_seed(0)  # the same draws for sampling routers (PhiMoE) and input jitter (PhiMoE, MiniMax)
    r = ref(input_ids=ids, labels=ids)
    torch.manual_seed(0)
    o = ours(input_ids=ids, labels=ids)
    assert torch.equal(o.logits, r.logits)
    r.loss.backward()
    o.loss.backward()
    grads = dict(ours.named_parameters())
    # (ERNIE's moe_statics bias only selects: no gradient on either side; v5's loader marks it trainable, ours not)
    worst = max(
        rel_err(grads[n].grad, p.grad) for n, p in ref.named_parameters() if p.grad is not None or grads[n].grad is not None
    )
    assert worst <= MODEL_TOL.get(family, GRAD_TOL)

    ours.save_pretrained(tmp_path / "saved")
    for f in sorted(os.listdir(ckpts[family])):
        assert filecmp.cmp(os.path.join(ckpts[family], f), tmp_path / "saved" / f, shallow=False), f


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
def test_router_logits_and_aux_loss_are_recorded(ckpts, family):
    """v5 records router logits with a hook on its router class; ours inherits that class name, so
    ``output_router_logits`` and the load-balancing aux loss work unchanged."""
    from transformers import AutoModelForCausalLM as HFAuto

    ref = HFAuto.from_pretrained(ckpts[family], experts_implementation="eager", output_router_logits=True)
    ours = moe_adapters.AutoModelForCausalLM.from_pretrained(ckpts[family], output_router_logits=True)
    ids = _ids(1)
    r, o = ref(input_ids=ids, labels=ids), ours(input_ids=ids, labels=ids)
    assert len(o.router_logits) == len(r.router_logits) > 0
    for a, b in zip(o.router_logits, r.router_logits):
        assert torch.equal(a, b)
    assert torch.equal(o.aux_loss, r.aux_loss) and torch.equal(o.loss, r.loss)


def test_packed_and_fused_sources_load_to_the_same_logits(ckpts, tmp_path):
    """A v5-packed checkpoint (fused names, EP = 1) and a moe-adapters fused checkpoint at EP = 2 load into the
    same model; saving the packed one writes a standard per-expert HF checkpoint that plain transformers loads."""
    from transformers import AutoModelForCausalLM as HFAuto

    from moe_adapters.convert import convert

    family = "deepseek_v3"
    src = ckpts[family]
    packed = str(tmp_path / "packed")
    HFAuto.from_pretrained(src).save_pretrained(packed, max_shard_size="20KB", save_original_format=False)
    fused = str(tmp_path / "fused")
    convert(src, fused, to="fused", ep=2)
    ids = _ids(2)
    want = reference_model(src)(input_ids=ids).logits
    for path in (packed, fused):
        m = moe_adapters.AutoModelForCausalLM.from_pretrained(path)
        assert torch.equal(m(input_ids=ids).logits, want), path
    m = moe_adapters.AutoModelForCausalLM.from_pretrained(packed)
    m.save_pretrained(tmp_path / "resaved", max_shard_size="30KB")
    files = os.listdir(tmp_path / "resaved")
    assert sum(f.endswith(".safetensors") for f in files) > 1 and "model.safetensors.index.json" in files
    keys = json.load(open(tmp_path / "resaved" / "model.safetensors.index.json"))["weight_map"]
    assert "model.layers.1.mlp.experts.7.gate_proj.weight" in keys and not any(k.endswith("gate_up_proj") for k in keys)
    assert torch.equal(reference_model(str(tmp_path / "resaved"))(input_ids=ids).logits, want)


def test_fp8_checkpoint_loads_dequantized(tmp_path):
    """DeepSeek-V3's published form (FP8 e4m3 weights, 128x128 block scales, an MTP layer): weights arrive in the
    training dtype, equal to weight * scale per block; the MTP layer is ignored, as v5 ignores it."""
    from checkpoints import build_deepseek_fp8
    from safetensors import safe_open

    path = build_deepseek_fp8(str(tmp_path / "fp8"))
    index = json.load(open(os.path.join(path, "model.safetensors.index.json")))["weight_map"]

    def stored(name):
        with safe_open(os.path.join(path, index[name]), "pt") as f:
            return f.get_tensor(name)

    m = moe_adapters.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    assert getattr(m.config, "quantization_config", None) is None and m.moe_ep.dequantized
    L = 1
    up = f"model.layers.{L}.mlp.experts.5.up_proj"
    w, s = stored(f"{up}.weight"), stored(f"{up}.weight_scale_inv")
    assert w.dtype == torch.float8_e4m3fn and s.numel() == 1  # tiny dims: one 128x128 block
    gate_up = m.get_parameter(f"model.layers.{L}.mlp.experts.gate_up_proj")
    I = gate_up.shape[1] // 2
    assert gate_up.dtype == torch.float32
    assert torch.equal(gate_up[5, I:], w.float() * s.float())
    q = m.get_parameter(f"model.layers.{L}.self_attn.q_a_proj.weight")
    qa = f"model.layers.{L}.self_attn.q_a_proj"
    qw, qs = stored(f"{qa}.weight"), stored(f"{qa}.weight_scale_inv")
    assert torch.equal(q, qw.float() * qs.float())
    assert torch.isfinite(m(input_ids=_ids()).logits).all()
    assert moe_adapters.AutoModelForCausalLM.from_pretrained(path).dtype == torch.bfloat16  # "auto": bf16


def test_ep_size_needs_a_process_group(ckpts):
    with pytest.raises(RuntimeError, match="torch.distributed"):
        moe_adapters.AutoModelForCausalLM.from_pretrained(ckpts["mixtral"], ep_size=2)


def test_unsupported_kwargs_are_refused(ckpts):
    with pytest.raises(ValueError, match="device_map"):
        moe_adapters.AutoModelForCausalLM.from_pretrained(ckpts["mixtral"], device_map="auto")
    with pytest.raises(ValueError, match="experts_backend"):
        moe_adapters.AutoModelForCausalLM.from_pretrained(ckpts["mixtral"], experts_backend="cutlass")


def test_tiny_config_has_every_declared_knob():
    """Guard for the fixtures: the tiny configs exercise the group-limited and scaled sigmoid paths."""
    d = tiny_config("deepseek_v3").to_dict()
    assert d["n_group"] > 1 and d["topk_group"] < d["n_group"] and d["routed_scaling_factor"] != 1.0

"""Our routers against transformers v5's router modules of each family, on the same weights.

Exactness claimed and checked bitwise: the same experts in the same order, the same routing weights, the same logits.
"""

from __future__ import annotations

import pytest
import torch
from runtime_helpers import FAMILIES, tiny_config

from moe_adapters.families import detect
from moe_adapters.runtime.layer import block_prefix, build_moe_block
from moe_adapters.runtime.router import RouterSpec, route


def _v5_router(family: str, **overrides):
    """(family, config dict, v5's router module, ours built from the declaration for the same block)."""
    from transformers import AutoModelForCausalLM

    cfg = tiny_config(family, **overrides)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()  # eval: PhiMoE samples in training
    d = cfg.to_dict()
    fam = detect(d)
    layer = fam.moe_layer_ids(d)[0]
    block = model.get_submodule(block_prefix(fam, layer))
    ours = build_moe_block(fam, d, layer, template=block)
    return fam, d, block.get_submodule(ours._router_name), ours.router.eval()


CASES = [(f, {}) for f in FAMILIES] + [
    ("qwen3_moe", {"norm_topk_prob": True}),
    ("deepseek_v3", {"n_group": 1, "topk_group": 1, "norm_topk_prob": False}),
    ("nemotron_h", {"n_group": 4, "topk_group": 3, "num_experts_per_tok": 4}),
    ("deepseek_v2", {"topk_method": "greedy"}),  # groups ignored (DeepSeek-V2-Lite)
    ("qwen2_moe", {"norm_topk_prob": True}),
    ("glm4_moe", {"n_group": 1, "topk_group": 1, "norm_topk_prob": False}),
    ("gpt_oss", {"num_experts_per_tok": 2}),
]
IDS = [f"{f}-{'-'.join(map(str, o.values())) or 'default'}" for f, o in CASES]


@pytest.mark.parametrize("family,overrides", CASES, ids=IDS)
def test_router_matches_v5_bitwise(family, overrides):
    fam, cfg, v5, ours = _v5_router(family, **overrides)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, t in list(v5.named_parameters()) + list(v5.named_buffers()):
            scale = 0.5 if name.endswith("e_score_correction_bias") else 1.0  # selection bias: a real but small nudge
            t.copy_(torch.randn(t.shape, generator=g) * scale)
    spec = ours.spec
    assert spec == RouterSpec.from_declaration(fam.router, cfg, fam.expert_count(cfg))
    ours.load_state_dict(v5.state_dict(), strict=True)
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in v5.named_parameters()]

    x = torch.randn(512, cfg["hidden_size"], generator=g)
    ref = v5(x)
    got = ours(x)  # what v5's router returns, in v5's order (Llama 4: scores [T, E], then logits)
    assert len(got) == len(ref)
    for a, b in zip(got, ref):
        assert a.shape == b.shape and torch.equal(a, b.to(a.dtype))  # same experts in the same order, same weights
    l, w, i = ours.routing
    assert w.dtype == torch.float32
    # the routing is not degenerate: many distinct experts chosen, weights differ across tokens
    assert len(torch.unique(i)) == spec.num_experts
    assert w.std() > 0


def test_selection_bias_changes_choice_but_not_weights():
    """The correction bias only picks experts: the weights are the unbiased sigmoid scores of the picked ones."""
    spec = RouterSpec(num_experts=4, top_k=1, scoring="sigmoid", has_bias=True)
    weight = torch.eye(4, 4)
    x = torch.tensor([[2.0, 1.0, 0.0, 0.0]])
    _, w0, i0 = route(spec, x, weight, torch.zeros(4))
    _, w1, i1 = route(spec, x, weight, torch.tensor([0.0, 5.0, 0.0, 0.0]))
    assert i0.item() == 0 and i1.item() == 1
    assert w0.item() == torch.sigmoid(torch.tensor(2.0)).item()
    assert w1.item() == torch.sigmoid(torch.tensor(1.0)).item()


def test_group_limited_topk_stays_in_best_groups():
    spec = RouterSpec(num_experts=8, top_k=2, scoring="sigmoid", n_group=4, topk_group=1)
    logits = torch.tensor([[0.0, 0.0, 5.0, 4.0, 9.0, -9.0, 0.0, 0.0]])  # group 1 (2, 3) sums highest: 5 + 4
    _, _, idx = route(spec, logits, torch.eye(8))
    assert sorted(idx[0].tolist()) == [2, 3]  # expert 4 scores highest alone but its group (4, 5) loses


def test_spec_rejects_bad_configs():
    with pytest.raises(ValueError):
        RouterSpec(num_experts=6, top_k=2, n_group=4)
    with pytest.raises(ValueError):
        RouterSpec(num_experts=4, top_k=5)
    with pytest.raises(ValueError):
        RouterSpec(num_experts=4, top_k=1, scoring="relu")


@pytest.mark.parametrize("family", FAMILIES)
def test_bf16_router_math_matches_v5(family):
    """In a bf16 model the router's logits, choices and weights still equal v5's: some v5 routers upcast input and
    weight to fp32 (DeepSeek, GLM, dots1, ERNIE, Nemotron-H), others run in the model dtype; the declaration says which.
    A router in the wrong precision flips near-tied choices (seen on an H200 with ERNIE before `logits_fp32`)."""
    from runtime_helpers import randomize_

    from transformers import AutoModelForCausalLM

    cfg = tiny_config(family)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    randomize_(model, seed=3)
    model = model.to(torch.bfloat16)
    d = cfg.to_dict()
    fam = detect(d)
    layer = fam.moe_layer_ids(d)[0]
    block = model.get_submodule(block_prefix(fam, layer))
    ours = build_moe_block(fam, d, layer, template=block).to(torch.bfloat16).eval()
    v5_router = block.get_submodule(ours._router_name)
    ours.router.load_state_dict(v5_router.state_dict())
    x = torch.randn(512, d["hidden_size"], generator=torch.Generator().manual_seed(7)).to(torch.bfloat16)
    ref = v5_router(x)
    got = ours.router(x)
    names = fam.router.returns
    ref_d, got_d = dict(zip(names, ref)), dict(zip(names, got))
    assert torch.equal(ref_d["logits"].float(), got_d["logits"].float())
    if "experts" in ref_d:
        assert torch.equal(ref_d["experts"], got_d["experts"])

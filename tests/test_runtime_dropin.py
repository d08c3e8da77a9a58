"""What users do with a transformers model, done to ours (found by an audit): rebuilt parameter objects, copies,
a ``config=`` object, overrides by a v5 alias, odd expert widths, code that walks ``nn.Linear`` modules, and the
arguments of v5's ``save_pretrained``."""

from __future__ import annotations

import copy
import os

import pytest
import torch
from runtime_helpers import build_checkpoint, reference_model, rel_err

import moe_adapters
from moe_adapters.runtime.dispatch import _Base
from moe_adapters.runtime.integration import expert_parameters, resident_expert_bytes


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    made: dict[str, str] = {}

    def get(family: str, **overrides) -> str:
        key = family + repr(sorted(overrides.items()))
        if key not in made:
            made[key] = build_checkpoint(family, str(tmp_path_factory.mktemp(family) / "ckpt"), seed=3, **overrides)
        return made[key]

    return get


def _ids() -> torch.Tensor:
    return torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))


def test_experts_are_known_by_their_module_after_new_parameter_objects(ckpt):
    m = moe_adapters.AutoModelForCausalLM.from_pretrained(ckpt("qwen3_moe"), dtype=torch.float32)
    names = [n for n, _ in expert_parameters(m)]
    size = resident_expert_bytes(m)
    assert names and size > 0
    m.load_state_dict({k: v.clone() for k, v in m.state_dict().items()}, assign=True)  # new Parameter objects
    assert [n for n, _ in expert_parameters(m)] == names and resident_expert_bytes(m) == size
    twin = copy.deepcopy(m)
    assert [n for n, _ in expert_parameters(twin)] == names
    assert twin.moe_ep.moe_blocks and all(b in list(twin.modules()) for b in twin.moe_ep.moe_blocks.values())
    assert torch.equal(twin(input_ids=_ids()).logits, m(input_ids=_ids()).logits)


def test_a_copied_dispatcher_shares_what_cannot_be_copied():
    d = _Base(8)
    d.group = object.__new__(type("Unpicklable", (), {"__reduce__": lambda self: (_ for _ in ()).throw(TypeError())}))
    c = copy.deepcopy(d)
    assert c is not d and c.group is d.group


def test_config_object_and_alias_overrides_reach_the_routers(ckpt):
    from transformers import AutoConfig

    path = ckpt("qwen3_moe")
    cfg = AutoConfig.from_pretrained(path)
    cfg.output_router_logits, cfg.num_experts_per_tok = True, 3
    ours = moe_adapters.AutoModelForCausalLM.from_pretrained(path, config=cfg, dtype=torch.float32)
    ref = reference_model(path).__class__.from_pretrained(path, config=cfg, dtype=torch.float32,
                                                           experts_implementation="eager")
    assert {b.router.top_k for b in ours.moe_ep.moe_blocks.values()} == {3}
    o, r = ours(input_ids=_ids(), labels=_ids()), ref(input_ids=_ids(), labels=_ids())
    assert o.aux_loss is not None and rel_err(o.aux_loss, r.aux_loss) <= 1e-6 and rel_err(o.logits, r.logits) <= 1e-6

    ernie = ckpt("ernie4_5_moe")  # num_experts_per_tok is an alias of ERNIE's moe_k
    ours = moe_adapters.AutoModelForCausalLM.from_pretrained(ernie, dtype=torch.float32, num_experts_per_tok=3)
    ref = reference_model(ernie).__class__.from_pretrained(ernie, dtype=torch.float32, num_experts_per_tok=3,
                                                            experts_implementation="eager")
    assert ours.config.moe_k == 3 and {b.router.top_k for b in ours.moe_ep.moe_blocks.values()} == {3}
    assert rel_err(ours(input_ids=_ids()).logits, ref(input_ids=_ids()).logits) <= 1e-6


def test_auto_backend_falls_back_when_the_expert_width_is_not_16_byte_aligned(ckpt):
    path = ckpt("mixtral", intermediate_size=12)  # bf16 rows of 24 bytes
    ours = moe_adapters.AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
    ref = moe_adapters.AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, experts_backend="loop")
    assert torch.equal(ours(input_ids=_ids()).logits, ref(input_ids=_ids()).logits)


@pytest.mark.parametrize("family", ["phimoe", "llama4_text"])
def test_routers_that_are_linear_in_v5_look_like_linear(ckpt, family):
    m = moe_adapters.AutoModelForCausalLM.from_pretrained(ckpt(family), dtype=torch.float32)
    linears = [mod for mod in m.modules() if isinstance(mod, torch.nn.Linear)]
    assert all(isinstance(mod.in_features, int) and hasattr(mod, "bias") for mod in linears)
    m.apply(m._init_weights)  # v5's initializer walks every nn.Linear


def test_save_pretrained_takes_v5_arguments_or_refuses_them(ckpt, tmp_path):
    from transformers import AutoModelForCausalLM

    m = moe_adapters.AutoModelForCausalLM.from_pretrained(ckpt("mixtral"), dtype=torch.float32)
    ema = {k: v + 1 for k, v in m.state_dict().items()}
    m.save_pretrained(tmp_path / "ema", state_dict=ema)
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "ema", dtype=torch.float32)
    assert torch.equal(back.model.embed_tokens.weight, ema["model.embed_tokens.weight"])
    m.save_pretrained(tmp_path / "not_main", False)  # v5's second argument: is_main_process
    assert not os.path.exists(tmp_path / "not_main")
    for bad in ({"variant": "ema"}, {"push_to_hub": True}, {"save_original_format": False}):
        with pytest.raises(ValueError, match="does not support"):
            m.save_pretrained(tmp_path / "bad", **bad)


@pytest.mark.parametrize("norm_type", [2.0, float("inf")])
def test_clip_grad_norm_matches_torch_in_one_process(ckpt, norm_type):
    from moe_adapters.runtime.integration import clip_grad_norm_

    path = ckpt("qwen3_moe")
    ours = moe_adapters.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    ref = moe_adapters.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    for m in (ours, ref):
        m.train()
        m(input_ids=_ids(), labels=_ids()).loss.backward()
    total = clip_grad_norm_(ours, 0.01, norm_type)
    want = torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.01, norm_type)
    assert rel_err(total, want) <= 1e-6 and total > 0.01  # it did clip
    for (n, p), (_, q) in zip(ours.named_parameters(), ref.named_parameters()):
        assert rel_err(p.grad, q.grad) <= 1e-6, n


def test_unusable_options_and_paths_fail_at_load_not_at_forward(ckpt, tmp_path):
    from moe_adapters.runtime.dispatch import deepep_available
    from moe_adapters.runtime.experts import te_available

    path = ckpt("qwen3_moe")
    with pytest.raises(FileNotFoundError, match="no such checkpoint folder"):
        moe_adapters.AutoModelForCausalLM.from_pretrained(str(tmp_path / "no" / "such" / "dir"))
    if not deepep_available():
        with pytest.raises(ValueError, match="deep_ep"):
            moe_adapters.AutoModelForCausalLM.from_pretrained(path, dispatcher="deepep")
    if not te_available():
        with pytest.raises(ValueError, match="transformer_engine"):
            moe_adapters.AutoModelForCausalLM.from_pretrained(path, experts_backend="te")
    model, info = moe_adapters.AutoModelForCausalLM.from_pretrained(path, output_loading_info=True)
    assert info["missing_keys"] == [] and info["unexpected_keys"] == [] and model.moe_ep.moe_blocks

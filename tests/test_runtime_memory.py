"""The memory-lean pieces of the drop-in: RMSNorm that saves only its input, and the causal-LM loss computed from the
hidden states in chunks. Each is checked against v5's own modules: forward bitwise where the math is the same ops,
gradients to fp32 rounding, and the bytes kept for backward measured with saved-tensor hooks."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from runtime_helpers import FAMILIES, build_checkpoint, rel_err
from torch import nn

import moe_adapters
from moe_adapters.runtime.loss import linear_cross_entropy, use_fused_cross_entropy
from moe_adapters.runtime.norms import matches_rms_norm, rms_norm, use_fused_rms_norms


def _saved_bytes(fn) -> int:
    """Bytes of distinct non-parameter storages autograd keeps while ``fn()`` runs."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if not isinstance(t, nn.Parameter):
            seen.setdefault(t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def _v5_norm(dim: int, dtype: torch.dtype):
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeRMSNorm

    norm = Qwen3MoeRMSNorm(dim, eps=1e-6).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(dim, generator=torch.Generator().manual_seed(1)).to(dtype))
    return norm


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_is_v5_bitwise_forward_and_backward(dtype):
    norm = _v5_norm(64, dtype)
    x = (torch.randn(3, 5, 64, generator=torch.Generator().manual_seed(2)) * 4).to(dtype)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    want, got = norm(xa), rms_norm(xb, norm.weight, norm.variance_epsilon)
    assert got.dtype == want.dtype and torch.equal(got, want)
    d_out = torch.randn(want.shape, generator=torch.Generator().manual_seed(3)).to(dtype)
    want_dx, want_dw = torch.autograd.grad(want, (xa, norm.weight), d_out)
    got_dx, got_dw = torch.autograd.grad(got, (xb, norm.weight), d_out)
    assert got_dx.dtype == dtype and torch.equal(got_dx, want_dx)  # the backward takes autograd's steps
    assert got_dw.dtype == dtype and torch.equal(got_dw, want_dw)


def test_rms_norm_keeps_only_its_input_and_one_value_per_row():
    norm = _v5_norm(256, torch.bfloat16)
    x = torch.randn(64, 256, dtype=torch.bfloat16, requires_grad=True)
    v5 = _saved_bytes(lambda: norm(x))
    ours = _saved_bytes(lambda: rms_norm(x, norm.weight, norm.variance_epsilon))
    assert ours == x.numel() * 2 + 64 * 4  # x in bf16, rstd in fp32
    assert v5 >= 2.9 * ours  # v5 keeps the fp32 input (for the square and the product) and the bf16 cast


def test_only_norms_with_the_standard_formula_are_swapped():
    from transformers.models.gemma3.modeling_gemma3 import Gemma3RMSNorm  # (1 + w), cast after the multiply

    class Scaled(nn.Module):  # one parameter, an eps, a different formula
        def __init__(self) -> None:
            super().__init__()
            self.weight, self.eps = nn.Parameter(torch.ones(16)), 1e-6

        def forward(self, x):
            return x * 2 * self.weight

    model = nn.ModuleDict({"a": _v5_norm(16, torch.float32), "b": Gemma3RMSNorm(16), "c": Scaled()})
    assert matches_rms_norm(model["a"]) and not matches_rms_norm(model["b"]) and not matches_rms_norm(model["c"])
    original = type(model["a"])
    assert use_fused_rms_norms(model) == ["a"]
    assert isinstance(model["a"], original) and type(model["a"]).__name__ == original.__name__
    assert type(model["b"]) is Gemma3RMSNorm and type(model["c"]) is Scaled
    assert use_fused_rms_norms(model) == []  # already swapped
    twin = copy.deepcopy(model)
    x = torch.randn(2, 16)
    assert torch.equal(twin["a"](x), model["a"](x)) and list(twin.state_dict()) == ["a.weight", "b.weight", "c.weight"]


@pytest.mark.parametrize("family", FAMILIES)
def test_drop_in_with_fused_norms_gives_the_same_logits(family, tmp_path):
    path = build_checkpoint(family, str(tmp_path / "ckpt"), seed=5)
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    outs, grads = [], []
    for fused in (False, True):
        model = moe_adapters.AutoModelForCausalLM.from_pretrained(path, fused_rms_norm=fused).train()
        torch.manual_seed(0)  # PhiMoE / MiniMax draw in training
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        outs.append(out.logits)
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
        swapped = {type(m).__name__ for m in model.modules() if getattr(m, "moe_adapters_fused_rms_norm", False)}
        # left alone by the probe: Qwen3-Next's (1 + w) and gated norms, PhiMoE's LayerNorm, gpt-oss's and
        # Nemotron-H's (w * x).to(dtype) and Nemotron-H's gated norm (and Llama 4's weightless L2 norm)
        assert bool(swapped) == (fused and family not in ("qwen3_next", "phimoe", "gpt_oss", "nemotron_h"))
        assert all(n.endswith("RMSNorm") for n in swapped)
    assert torch.equal(outs[0], outs[1])
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        assert rel_err(grads[1][name], grads[0][name]) < 1e-4, name


def _v5_causal_loss(logits, labels, **kw):
    from transformers.loss.loss_utils import ForCausalLMLoss

    return ForCausalLMLoss(logits, labels, logits.shape[-1], **kw)


@pytest.mark.parametrize("chunk", [1, 5, None])
@pytest.mark.parametrize("reduction", ["mean", "num_items", "shift_labels"])
def test_linear_cross_entropy_matches_v5_loss_and_gradients(chunk, reduction):
    g = torch.Generator().manual_seed(4)
    h = torch.randn(2, 7, 32, generator=g, dtype=torch.float64).float()
    w = torch.randn(50, 32, generator=g).mul(0.3)
    labels = torch.randint(0, 50, (2, 7), generator=g)
    labels[0, :3] = -100
    kw: dict = {}
    if reduction == "num_items":
        kw["num_items_in_batch"] = torch.tensor(9)
    if reduction == "shift_labels":
        kw["shift_labels"] = torch.randint(0, 50, (2, 7), generator=g)
    ha, wa = h.clone().requires_grad_(), w.clone().requires_grad_()
    want = _v5_causal_loss(F.linear(ha, wa), labels, **kw)
    hb, wb = h.clone().requires_grad_(), w.clone().requires_grad_()
    target = kw.get("shift_labels", F.pad(labels, (0, 1), value=-100)[..., 1:])
    got = linear_cross_entropy(hb, wb, target, num_items_in_batch=kw.get("num_items_in_batch"), chunk=chunk)
    assert rel_err(got, want) < 1e-6
    (want * 3).backward()
    (got * 3).backward()
    assert rel_err(hb.grad, ha.grad) < 1e-5 and rel_err(wb.grad, wa.grad) < 1e-5
    if reduction != "shift_labels":
        assert hb.grad[0, :2].abs().sum() == 0  # positions whose next token is ignored get no gradient


def test_linear_cross_entropy_never_holds_all_logits():
    h = torch.randn(64, 16, dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(1000, 16, dtype=torch.bfloat16, requires_grad=True)
    t = torch.randint(0, 1000, (64,))
    full = _saved_bytes(lambda: F.cross_entropy(F.linear(h, w).float(), t))
    fused = _saved_bytes(lambda: linear_cross_entropy(h, w, t, chunk=8))
    assert full >= 64 * 1000 * 4  # the fp32 log-softmax of every token
    assert fused <= (h.numel() + w.numel()) * 2 + 64 * 8  # the gradients it already computed, and the targets


def test_fused_cross_entropy_on_a_v5_model(tmp_path):
    path = build_checkpoint("qwen3_moe", str(tmp_path / "ckpt"), seed=6)
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[1, :4] = -100
    plain = moe_adapters.AutoModelForCausalLM.from_pretrained(path).train()
    fused = moe_adapters.AutoModelForCausalLM.from_pretrained(path, fused_cross_entropy=True).train()
    want = plain(input_ids=ids, labels=labels)
    got = fused(input_ids=ids, labels=labels)
    assert got.logits is None and "logits" not in got.keys() and rel_err(got.loss, want.loss) < 1e-6
    want.loss.backward()
    got.loss.backward()
    for (name, p), (_, q) in zip(plain.named_parameters(), fused.named_parameters()):
        assert rel_err(q.grad, p.grad) < 1e-5, name
    # logits as usual without labels, or without autograd
    assert torch.equal(fused(input_ids=ids).logits, plain(input_ids=ids).logits)
    with torch.no_grad():
        assert fused(input_ids=ids, labels=labels).logits is not None
    # a copy (a reference model) uses its own head
    twin = copy.deepcopy(fused)
    with torch.no_grad():
        twin.lm_head.weight.mul_(2)
    assert twin(input_ids=ids, labels=labels).loss.item() != fused(input_ids=ids, labels=labels).loss.item()


def test_fused_cross_entropy_refuses_models_that_change_their_logits():
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(  # Gemma 2 soft-caps its logits between the head and the loss
        "gemma2", hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, vocab_size=64, final_logit_softcapping=30.0,
    )
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).train()
    use_fused_cross_entropy(model)
    ids = torch.randint(0, 64, (1, 6))
    with pytest.raises(RuntimeError, match="changes its logits"):
        model(input_ids=ids, labels=ids)
    assert model(input_ids=ids).logits.shape == (1, 6, 64)  # the failed call left the head as it was
    with pytest.raises(ValueError, match="bias-free"):
        use_fused_cross_entropy(nn.Module())


def test_the_functions_compiled_on_cuda_trace_as_one_graph():
    """What CUDA compiles (inductor, one kernel per direction) traces without graph breaks and computes the same
    (checked here through aot_eager: tracing and autograd decomposition, no C++ compiler needed)."""
    from moe_adapters.runtime.loss import cross_entropy_chunk_math
    from moe_adapters.runtime.norms import rms_norm_backward_math, rms_norm_forward_math

    def traced(fn):
        return torch.compile(fn, backend="aot_eager", fullgraph=True, dynamic=True)

    logits = torch.randn(5, 50).bfloat16()
    target = torch.randint(0, 50, (5,))
    target[0] = -100
    for with_grad in (True, False):
        want = cross_entropy_chunk_math(logits, target, -100, torch.tensor(0.25), with_grad)
        got = traced(cross_entropy_chunk_math)(logits, target, -100, torch.tensor(0.25), with_grad)
        assert torch.equal(got[0], want[0]) and (got[1] is None) == (want[1] is None)
        assert want[1] is None or torch.equal(got[1], want[1])
    x, w, d = torch.randn(3, 4, 64).bfloat16(), torch.randn(64).bfloat16(), torch.randn(3, 4, 64).bfloat16()
    out, rstd = rms_norm_forward_math(x, w, 1e-6)
    got_out, got_rstd = traced(rms_norm_forward_math)(x, w, 1e-6)
    assert torch.equal(got_out, out) and torch.equal(got_rstd, rstd)
    for a, b in zip(traced(rms_norm_backward_math)(x, w, rstd, d), rms_norm_backward_math(x, w, rstd, d)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v3"])
def test_activation_checkpointing_under_ep_gives_the_same_gradients(family, tmp_path):
    """v5's activation checkpointing on our model at EP=2 (gloo): the recomputed forward exchanges tokens again on
    every rank, and the gradients equal those of the plain backward bitwise."""
    from runtime_helpers import ep_checkpointing_worker, spawn

    path = build_checkpoint(family, str(tmp_path / "ckpt"), seed=7)
    spawn(ep_checkpointing_worker, 2, path, str(tmp_path))
    for rank in range(2):
        plain, recomputed = torch.load(tmp_path / f"rank{rank}.pt")
        assert plain.keys() == recomputed.keys() and len(plain) > 10
        for name in plain:
            assert torch.equal(plain[name], recomputed[name]), (rank, name)


def test_a_scaled_loss_scales_the_gradients_without_rounding_the_factor():
    """``(loss / 3).backward()`` (gradient accumulation): the gradients are those of ``loss`` times 1/3, computed in
    fp32 and rounded once (a bf16 factor would be 0.3340, 0.2% off)."""
    g = torch.Generator().manual_seed(8)
    h = torch.randn(16, 32, generator=g).bfloat16().requires_grad_()
    w = torch.randn(40, 32, generator=g).bfloat16().requires_grad_()
    t = torch.randint(0, 40, (16,), generator=g)
    (d_h1, d_w1) = torch.autograd.grad(linear_cross_entropy(h, w, t), (h, w))
    (d_h3, d_w3) = torch.autograd.grad(linear_cross_entropy(h, w, t) / 3, (h, w))
    third = torch.tensor(1.0) / 3  # what autograd hands the loss: fp32
    assert torch.equal(d_h3, (d_h1.float() * third).bfloat16()) and torch.equal(d_w3, (d_w1.float() * third).bfloat16())


def test_a_compiled_model_with_fused_norms_and_loss_trains_like_the_eager_one(tmp_path):
    """``torch.compile(model)`` (traced through aot_eager: dynamo and autograd, no C++ compiler) over the deferred
    head, the chunked loss and the swapped norms: the same loss and gradients as the eager model."""
    path = build_checkpoint("qwen3_moe", str(tmp_path / "ckpt"), seed=9)
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    results = []
    for compile_it in (False, True):
        model = moe_adapters.AutoModelForCausalLM.from_pretrained(path, fused_cross_entropy=True).train()
        run = torch.compile(model, backend="aot_eager") if compile_it else model
        out = run(input_ids=ids, labels=ids)
        out.loss.backward()
        results.append((out.loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
    (eager_loss, eager), (compiled_loss, grads) = results
    assert rel_err(compiled_loss, eager_loss) < 1e-6 and eager.keys() == grads.keys()
    for name in eager:
        assert rel_err(grads[name], eager[name]) < 1e-5, name


def _fused_and_plain(tmp_path, family: str, **load):
    path = build_checkpoint(family, str(tmp_path / family), seed=11)
    fused = moe_adapters.AutoModelForCausalLM.from_pretrained(path, fused_cross_entropy=True, **load).train()
    plain = moe_adapters.AutoModelForCausalLM.from_pretrained(path, **load).train()
    return fused, plain


def test_fused_loss_under_autocast_runs_the_head_in_the_autocast_dtype(tmp_path):
    """HF Trainer's ``bf16=True`` on fp32 weights: the loss and gradients under ``torch.autocast`` match v5's."""
    fused, plain = _fused_and_plain(tmp_path, "qwen3_moe")
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    outs = []
    for model in (plain, fused):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        outs.append(out.loss.detach())
        assert model.lm_head.weight.grad.dtype == torch.float32
    assert rel_err(outs[1], outs[0]) < 1e-3
    assert rel_err(fused.lm_head.weight.grad, plain.lm_head.weight.grad) < 2e-2


def test_every_target_ignored_gives_zero_gradients_not_nan(tmp_path):
    """A batch whose labels are all -100 (a truncated SFT answer): the loss is NaN as torch's mean is, but the
    gradients are zero, as v5's, so an optimizer step leaves the weights finite."""
    fused, plain = _fused_and_plain(tmp_path, "qwen3_moe")
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    labels = torch.full_like(ids, -100)
    for kwargs in ({}, {"num_items_in_batch": torch.tensor(0)}):
        for model in (plain, fused):
            model.zero_grad(set_to_none=True)
            loss = model(input_ids=ids, labels=labels, **kwargs).loss
            assert torch.isnan(loss)
            loss.backward()
            grads = [p.grad for p in model.parameters() if p.grad is not None]
            assert grads and all(torch.equal(g, torch.zeros_like(g)) for g in grads)


def test_return_dict_false_leaves_the_logits_out(tmp_path):
    fused, plain = _fused_and_plain(tmp_path, "qwen3_moe")
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    got = fused(input_ids=ids, labels=ids, return_dict=False)
    want = plain(input_ids=ids, labels=ids, return_dict=False)
    assert len(got) == len(want) - 1 and rel_err(got[0], want[0]) < 1e-6
    assert not any(isinstance(x, torch.Tensor) and x.dim() == 3 for x in got[1:])  # no [B, T, *] tensor left


def test_a_model_that_upcasts_its_logits_is_served_in_bf16(tmp_path):
    """Nemotron-H's forward does ``lm_head(h).float()``: a dtype change keeps the deferred head's mark."""
    fused, plain = _fused_and_plain(tmp_path, "nemotron_h", dtype=torch.bfloat16)
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    got, want = fused(input_ids=ids, labels=ids), plain(input_ids=ids, labels=ids)
    assert got.logits is None and rel_err(got.loss, want.loss) < 1e-3


def test_norms_are_probed_in_fp32_and_bf16(tmp_path):
    """gpt-oss's norm rounds after the weight multiply: equal to the standard formula in fp32 only, so it is not
    swapped even when loaded in fp32 (a later ``.to(bfloat16)`` would otherwise change its outputs), even with the
    all-ones weights of a fresh model."""
    from transformers import AutoModelForCausalLM
    from runtime_helpers import tiny_config

    path = build_checkpoint("gpt_oss", str(tmp_path / "ckpt"), seed=12)
    model = moe_adapters.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    fresh = AutoModelForCausalLM.from_config(tiny_config("gpt_oss"), dtype=torch.float32)
    assert use_fused_rms_norms(fresh) == []
    assert not any(getattr(m, "moe_adapters_fused_rms_norm", False) for m in model.modules())


def test_a_frozen_model_called_with_grad_on_still_returns_logits(tmp_path):
    """A teacher / reference model with every parameter frozen, called without ``no_grad``: nothing to train, so
    the head is not deferred and the logits come back."""
    fused, _ = _fused_and_plain(tmp_path, "qwen3_moe")
    fused.requires_grad_(False)
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    assert fused(input_ids=ids, labels=ids).logits.shape == (2, 8, 64)

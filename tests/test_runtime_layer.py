"""Our MoE block against the transformers v5 block of each family, same weights, fp32, one process.

Checked: identical routing decisions (bitwise), outputs and the gradients of the input and of every block weight
within fp32 rounding. Tolerance: max|ours - v5| / max|v5| <= 1e-6 per tensor. Measured on the 2-core CPU box:
outputs, router and shared-expert gradients bitwise equal; input gradients <= 1e-7; expert weight gradients
<= 1.2e-7 (a different but equally exact summation order); printed with -s.
"""

from __future__ import annotations

import pytest
import torch
from runtime_helpers import FAMILIES, rel_err, v5_block

from moe_adapters.runtime.experts import GroupedExperts, resolve_backend
from moe_adapters.runtime.layer import build_moe_block, copy_block_weights

TOL = 1e-6


@pytest.mark.parametrize("backend", ["loop", "grouped_mm"])
@pytest.mark.parametrize("family", FAMILIES)
def test_block_matches_v5(family, backend):
    fam, cfg, layer, v5 = v5_block(family)
    ours = build_moe_block(fam, cfg, layer, backend=backend, template=v5)
    copy_block_weights(ours, v5)
    assert list(ours.state_dict()) == list(v5.state_dict())  # same names, same order
    assert resolve_backend(backend, torch.zeros(1, 32), ours.routed_experts.in_proj) == backend

    g = torch.Generator().manual_seed(7)
    x_ref = torch.randn(3, 7, cfg["hidden_size"], generator=g, requires_grad=True)
    x = x_ref.detach().clone().requires_grad_()

    # routing decisions (eval: no sampling, no jitter): the same experts, in the same order, with the same weights
    v5.eval(), ours.eval()
    ref = v5.get_submodule(ours._router_name)(x_ref.detach().reshape(-1, cfg["hidden_size"]))
    got = ours.router(x.detach())
    logits, w, i = ours.router.routing
    assert_same_routing(ref, logits, w, i)
    assert len(got) == len(ref) and all(torch.equal(a, b.to(a.dtype)) for a, b in zip(got, ref))
    assert len(torch.unique(i)) > 1

    # the block in training (inputs cloned: v5's jittering blocks multiply their input in place); the same seed, so
    # sampling routers (PhiMoE's sparsemixer) and input jitter (PhiMoE, MiniMax here) draw the same numbers
    v5.train(), ours.train()
    torch.manual_seed(6)
    out_ref = v5(x_ref.clone())
    torch.manual_seed(6)
    out = ours(x.clone())
    if isinstance(out_ref, tuple):  # Llama 4 (logits), gpt-oss (weights): the second item as v5's
        assert isinstance(out, tuple) and len(out) == len(out_ref)
        assert torch.equal(out[1], out_ref[1].reshape(out[1].shape))
        out_ref, out = out_ref[0].reshape(out[0].shape), out[0]
    assert out.shape == out_ref.shape and out.dtype == out_ref.dtype
    errs = {"output": rel_err(out, out_ref)}
    grad_out = torch.randn(out.shape, generator=g)
    out_ref.backward(grad_out)
    out.backward(grad_out)
    errs["d input"] = rel_err(x.grad, x_ref.grad)
    ours_params = dict(ours.named_parameters())
    for name, p in v5.named_parameters():
        assert p.requires_grad == ours_params[name].requires_grad, name
        if not p.requires_grad:  # ERNIE's moe_statics bias: a frozen parameter
            continue
        assert p.grad is not None and ours_params[name].grad is not None, name
        assert p.grad.abs().sum() > 0, name  # every weight really gets a gradient in this batch
        errs[f"d {name}"] = rel_err(ours_params[name].grad, p.grad)
    print(f"\n{family}/{backend}: " + ", ".join(f"{k}={v:.1e}" for k, v in errs.items()))
    assert max(errs.values()) <= TOL, errs


def assert_same_routing(ref, logits, w, i) -> None:
    """v5's router output against ours: ``(logits, weights [T, k], experts [T, k])``, or Llama 4's ``(scores [T, E],
    logits)`` with each chosen expert's weight scattered into a zero row."""
    if len(ref) == 2:
        scores, ref_logits = ref
        assert torch.equal(logits, ref_logits)
        assert torch.equal(torch.zeros_like(scores).scatter(1, i, w.to(scores.dtype)), scores)
        return
    ref_logits, w_ref, i_ref = ref
    assert torch.equal(logits, ref_logits)
    assert torch.equal(i, i_ref) and torch.equal(w, w_ref.float())


def _first(out):
    return out[0] if isinstance(out, tuple) else out


@pytest.mark.parametrize("family", FAMILIES)
def test_grouped_mm_takes_stride0_gradient(family):
    """``out.sum().backward()`` hands torch's grouped GEMM a stride-0 gradient, which its CPU backward rejects
    unless made contiguous; the result must equal the per-expert loop's."""
    fam, cfg, layer, v5 = v5_block(family)
    grads = {}
    for backend in ("loop", "grouped_mm"):
        ours = build_moe_block(fam, cfg, layer, backend=backend, template=v5)
        copy_block_weights(ours, v5)
        x = torch.randn(2, 5, cfg["hidden_size"], generator=torch.Generator().manual_seed(0), requires_grad=True)
        torch.manual_seed(0)  # routers that sample in training (PhiMoE) and input jitter: the same draws
        _first(ours(x.clone())).sum().backward()
        grads[backend] = (x.grad, ours.routed_experts.down_proj.grad)
    assert rel_err(grads["grouped_mm"][0], grads["loop"][0]) <= TOL
    assert rel_err(grads["grouped_mm"][1], grads["loop"][1]) <= TOL


def test_declaration_must_cover_thev5_block():
    """Nemotron-H with a latent projection has weights the declaration does not describe: refuse, naming them."""
    fam, cfg, layer, v5 = v5_block("nemotron_h", moe_latent_size=16)
    with pytest.raises(ValueError, match="fc1_latent_proj"):
        build_moe_block(fam, cfg, layer, template=v5)


@pytest.mark.parametrize("backend", ["loop", "grouped_mm"])
def test_experts_skip_remote_slots_and_empty_experts(backend):
    """Ids outside [0, E_local) (-1 from a dispatcher) contribute nothing; an expert with no rows still gets a
    (zero) gradient, so every rank joins every gradient collective with the same tensors."""
    torch.manual_seed(0)
    ex = GroupedExperts(3, 8, 4, gated=True, backend=backend)
    with torch.no_grad():
        for p in ex.parameters():
            p.normal_()
    x = torch.randn(4, 8)
    idx = torch.tensor([[0, -1], [-1, -1], [2, 0], [0, 2]])
    w = torch.tensor([[0.5, 0.0], [0.0, 0.0], [0.25, 0.75], [1.0, 1.0]])
    y = ex(x, idx, w)
    assert torch.equal(y[1], torch.zeros(8))

    def mlp(e, v):
        gate, up = (ex.gate_up_proj[e] @ v).chunk(2)
        return ex.down_proj[e] @ (torch.nn.functional.silu(gate) * up)

    with torch.no_grad():
        assert rel_err(y[0], 0.5 * mlp(0, x[0])) <= TOL
        assert rel_err(y[2], 0.25 * mlp(2, x[2]) + 0.75 * mlp(0, x[2])) <= TOL
    y.sum().backward()
    assert torch.equal(ex.gate_up_proj.grad[1], torch.zeros_like(ex.gate_up_proj.grad[1]))
    assert ex.gate_up_proj.grad[0].abs().sum() > 0


def test_auto_backend_falls_back_to_loop_for_unaligned_dims():
    ex = GroupedExperts(2, 6, 3, gated=False, act="relu2")
    assert resolve_backend("auto", torch.zeros(1, 6), ex.in_proj) == "loop"  # 12- and 24-byte rows
    ex = GroupedExperts(2, 8, 4, gated=False, act="relu2")
    assert resolve_backend("auto", torch.zeros(1, 8), ex.in_proj) == "grouped_mm"

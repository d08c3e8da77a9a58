"""The grouped_mm fast path of the routed experts (runtime/experts.py), on CPU.

* the recompute-in-backward activations (``FusedActMul``, ``act_mul_backward``) give bitwise autograd's gradients
  of the plain formula (fp32 and bf16), and within fp32 rounding with the routing weight folded in;
* the slot plan (one sort + searchsorted) matches bincount/cumsum, drops ids of other ranks, and the block's
  forward + backward on the ``local`` dispatcher makes no host round trip (``item``/``tolist``/``bool`` patched to
  raise);
* the fast path against the reference (per-expert loop) path: outputs bitwise in fp32, every gradient within 1e-6;
  the weight-folded (bf16) arithmetic within fp32 rounding of the exact one;
* it keeps less for backward than v5's grouped_mm block (bytes of the tensors autograd saves, counted with saved-
  tensor hooks), and in bf16 it is as close to an fp32 reference as v5's own bf16 block.
"""

from __future__ import annotations

from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from runtime_helpers import rel_err, v5_block

from moe_adapters.runtime import experts as ex
from moe_adapters.runtime.experts import FusedActMul, GroupedExperts, act_mul_backward, act_mul_forward, plan_slots
from moe_adapters.runtime.gather_sum import GatherSum, gather_sum
from moe_adapters.runtime.layer import build_moe_block, copy_block_weights

TOL = 1e-6


def _plain(name, g, u):
    a = {"silu": F.silu, "relu2": lambda t: torch.square(F.relu(t)), "gelu": F.gelu}[name](g)
    return a * u if u is not None else a


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name,gated", [("silu", True), ("relu2", False), ("relu2", True), ("gelu", True)])
def test_fused_act_mul_grads_bitwise_autograd(name, gated, dtype):
    g0 = torch.Generator().manual_seed(0)
    g = torch.randn(37, 24, generator=g0).to(dtype)
    u = torch.randn(37, 24, generator=g0).to(dtype) if gated else None
    dh = torch.randn(37, 24, generator=g0).to(dtype)
    ga, ua = g.clone().requires_grad_(), (u.clone().requires_grad_() if gated else None)
    ref = _plain(name, ga, ua)
    ref.backward(dh)
    gb, ub = g.clone().requires_grad_(), (u.clone().requires_grad_() if gated else None)
    out = FusedActMul.apply(gb, ub, name)
    out.backward(dh)
    assert torch.equal(out, ref)
    assert torch.equal(gb.grad, ga.grad)
    if gated:
        assert torch.equal(ub.grad, ua.grad)


@pytest.mark.parametrize("name,gated", [("silu", True), ("relu2", False)])
def test_act_mul_with_folded_weight_matches_autograd(name, gated):
    """``act(g) * u * w`` with the weight folded in: outputs and (g, u, w) gradients within fp32 rounding, the
    gradients written into the two halves of one [N, 2I] buffer as the fast path does."""
    g0 = torch.Generator().manual_seed(1)
    N, I = 29, 16
    g = torch.randn(N, I, generator=g0, dtype=torch.float64)
    u = torch.randn(N, I, generator=g0, dtype=torch.float64) if gated else None
    w = torch.rand(N, generator=g0, dtype=torch.float64)
    dh = torch.randn(N, I, generator=g0, dtype=torch.float64)
    ga, wa = g.clone().requires_grad_(), w.clone().requires_grad_()
    ua = u.clone().requires_grad_() if gated else None
    (_plain(name, ga, ua) * wa.unsqueeze(-1)).backward(dh)  # fp64 truth
    g32, u32, w32, dh32 = g.float(), (u.float() if gated else None), w.float(), dh.float()
    h = act_mul_forward(name, g32, u32, w32)
    assert rel_err(h, _plain(name, g, u) * w.unsqueeze(-1)) <= TOL
    buf = torch.empty(N, 2 * I if gated else I)
    d_g, d_u, d_w = act_mul_backward(
        name, g32, u32, w32, dh32, need_dw=True, d_g_out=buf[:, :I], d_u_out=buf[:, I:] if gated else None
    )
    assert d_g.data_ptr() == buf.data_ptr()  # written in place, no extra copy
    assert rel_err(buf[:, :I], ga.grad) <= TOL and rel_err(d_w, wa.grad) <= TOL
    if gated:
        assert rel_err(buf[:, I:], ua.grad) <= TOL


def test_plan_slots_matches_bincount_and_drops_remote_ids():
    g = torch.Generator().manual_seed(2)
    idx = torch.stack([torch.randperm(8, generator=g)[:3] for _ in range(50)])  # [50, 3], distinct per row
    for assume in (True, False):
        plan = plan_slots(idx, 8, assume)
        flat = idx.reshape(-1)
        assert torch.equal(plan.offs.long(), torch.cumsum(torch.bincount(flat, minlength=8), 0))
        assert torch.equal(flat[plan.perm], torch.sort(flat, stable=True).values)
        assert torch.equal(plan.rows, plan.perm // 3)
        assert torch.equal(plan.perm[plan.inv], torch.arange(150))
    remote = idx.clone()
    remote[remote >= 5] = -1  # another rank's experts (the dispatcher writes -1)
    plan = plan_slots(remote, 5, False)
    keep = remote.reshape(-1) >= 0
    assert plan.n == int(keep.sum())
    # the inverse: -1 for a dropped slot, else its position in the sorted order
    assert torch.equal(plan.inv < 0, ~keep)
    assert torch.equal(plan.perm[plan.inv[keep]], keep.nonzero().squeeze(1))
    assert torch.equal(remote.reshape(-1)[plan.perm], torch.sort(remote.reshape(-1)[keep], stable=True).values)


def slotwise_sum(src: torch.Tensor, index: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """The definition of gather_sum, one slot at a time: fp32, j order, -1 skipped."""
    acc = torch.zeros(index.shape[0], src.shape[1], dtype=torch.float32)
    for j in range(index.shape[1]):
        col = index[:, j]
        acc += torch.where((col >= 0).unsqueeze(1), src[col.clamp(min=0)].float(), 0.0)
    return acc.to(out_dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gather_sum_is_the_slotwise_sum(dtype):
    g = torch.Generator().manual_seed(5)
    src = torch.randn(40, 24, generator=g).to(dtype)
    full = torch.randperm(40, generator=g).view(10, 4)
    dropped = full.clone()
    dropped[torch.rand(10, 4, generator=g) < 0.5] = -1
    dropped[3] = -1  # a row with nothing: zeros
    for index, complete in ((full, True), (full, False), (dropped, False)):
        want = slotwise_sum(src, index, torch.float32)
        got = gather_sum(src, index, torch.float32, complete=complete)
        assert got.dtype == torch.float32
        if complete:  # torch's own reduction over k: its order is torch's
            assert rel_err(got, want) < 1e-6
        else:
            assert torch.equal(got, want)
        assert gather_sum(src, index).dtype == dtype
    assert not gather_sum(src, dropped)[3].any()
    # autograd: each source row feeds at most one output row, so the gradient is a gather
    valid = dropped >= 0
    used = dropped[valid]
    owner = valid.nonzero()[:, 0]
    s = src[used].float().requires_grad_()  # the rows in use, renumbered
    index = torch.full_like(dropped, -1)
    index[valid] = torch.arange(len(used))
    d_out = torch.randn(10, 24, generator=g)
    out = GatherSum.apply(s, index, owner, torch.float32)
    assert torch.equal(out, slotwise_sum(s.detach(), index, torch.float32))
    out.backward(d_out)
    assert torch.equal(s.grad, d_out[owner])


def _v5_and_ours(family, backend="grouped_mm", dtype=torch.float32, **overrides):
    fam, d, layer, v5 = v5_block(family, **overrides)
    ours = build_moe_block(fam, d, layer, backend=backend, template=v5)
    copy_block_weights(ours, v5)
    return d, v5, ours.to(dtype)


FAST_FAMILIES = ["qwen3_moe", "mixtral", "deepseek_v3", "nemotron_h"]


@pytest.mark.parametrize("family", FAST_FAMILIES)
def test_block_forward_backward_without_host_sync(family):
    """On the local dispatcher the grouped_mm block never reads a tensor back to the host."""
    d, _, ours = _v5_and_ours(family)
    x = torch.randn(2, 9, d["hidden_size"], generator=torch.Generator().manual_seed(4), requires_grad=True)

    def boom(*a, **k):
        raise AssertionError("host sync in the fast path")

    with mock.patch.object(torch.Tensor, "item", boom), mock.patch.object(torch.Tensor, "tolist", boom), \
            mock.patch.object(torch.Tensor, "__bool__", boom):
        out = ours(x)
        out.backward(torch.ones_like(out))
    assert x.grad is not None and ours.routed_experts.down_proj.grad.abs().sum() > 0


@pytest.mark.parametrize("family", FAST_FAMILIES)
def test_fast_path_equals_reference_path(family):
    """grouped_mm (fast) against the per-expert loop (reference), same weights, fp32: outputs bitwise, gradients of
    the input and of every weight within 1e-6; the weight-folded arithmetic (what bf16 runs) within fp32 rounding."""
    d, v5, fast = _v5_and_ours(family, "grouped_mm")
    _, _, ref = _v5_and_ours(family, "loop")
    g = torch.Generator().manual_seed(5)
    x0 = torch.randn(3, 7, d["hidden_size"], generator=g)
    go = torch.randn(3, 7, d["hidden_size"], generator=g)
    results = {}
    for name, block, fold in (("ref", ref, None), ("fast", fast, None), ("fold", fast, True)):
        block.routed_experts.fold_routing_weights = fold
        for p in block.parameters():
            p.grad = None
        x = x0.clone().requires_grad_()
        out = block(x)
        out.backward(go)
        results[name] = (out.detach(), x.grad, {n: p.grad.clone() for n, p in block.named_parameters()})
    assert torch.equal(results["fast"][0], results["ref"][0])
    assert rel_err(results["fold"][0], results["ref"][0]) <= TOL
    for name in ("fast", "fold"):
        assert rel_err(results[name][1], results["ref"][1]) <= TOL
        for n, gr in results["ref"][2].items():
            assert rel_err(results[name][2][n], gr) <= TOL, (name, n)


def _saved_bytes(block, x) -> int:
    """Bytes of the distinct storages autograd keeps between this forward and its backward."""
    seen: dict[int, int] = {}
    params = {p.untyped_storage().data_ptr() for p in block.parameters()}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in params and st.data_ptr() != x.untyped_storage().data_ptr():
            seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        block(x)
    return sum(seen.values())


@pytest.mark.parametrize("family", ["qwen3_moe", "nemotron_h"])
def test_keeps_less_for_backward_than_v5_grouped_mm(family):
    d, v5, ours = _v5_and_ours(family, "grouped_mm", moe_intermediate_size=32)
    v5.experts.config._experts_implementation = "grouped_mm"
    x = torch.randn(4, 64, d["hidden_size"], requires_grad=True)
    ours_b, v5_b = _saved_bytes(ours, x), _saved_bytes(v5, x)
    print(f"\n{family}: saved for backward: ours {ours_b} B, v5 grouped_mm {v5_b} B ({ours_b / v5_b:.2f}x)")
    assert ours_b < 0.6 * v5_b


@pytest.mark.parametrize("family", ["qwen3_moe", "nemotron_h"])
def test_bf16_as_close_to_fp32_as_v5_bf16(family):
    """The repo's GPU rule on CPU: in bf16 ours (weight folded into the activation) may be at most twice as far from
    the fp32 v5 block as v5's own bf16 grouped_mm block, plus 1e-3 (output and input gradient)."""
    d, v5, ours32 = _v5_and_ours(family, "grouped_mm")
    x32 = torch.randn(4, 32, d["hidden_size"], generator=torch.Generator().manual_seed(6))
    go = torch.randn(4, 32, d["hidden_size"], generator=torch.Generator().manual_seed(7))
    xr = x32.clone().requires_grad_()
    ref = v5(xr)
    ref.backward(go)
    v5.experts.config._experts_implementation = "grouped_mm"
    v16 = v5.to(torch.bfloat16)
    if getattr(v16.gate, "e_score_correction_bias", None) is not None:
        v16.gate.float()
    ours = ours32.to(torch.bfloat16)
    if getattr(ours.router, "e_score_correction_bias", None) is not None:
        ours.router.float()
    errs = {}
    for name, block in (("v5", v16), ("ours", ours)):
        x = x32.to(torch.bfloat16).requires_grad_()
        out = block(x)
        out.backward(go.to(torch.bfloat16))
        errs[name] = (rel_err(out.float(), ref), rel_err(x.grad.float(), xr.grad))
    print(f"\n{family} bf16 vs fp32 (out, dx): {errs}")
    for i in range(2):
        assert errs["ours"][i] <= 2 * errs["v5"][i] + 1e-3


def test_grouped_experts_direct_call_with_remote_ids_still_masks():
    """Called directly (no MoEBlock), ids outside the rank are dropped even though the block earlier ran with the
    local dispatcher's promise (the promise is set only for the duration of the block's call)."""
    torch.manual_seed(0)
    e = GroupedExperts(3, 8, 4, gated=True, backend="grouped_mm")
    with torch.no_grad():
        for p in e.parameters():
            p.normal_()
    assert e.assume_local_ids is False
    y = e(torch.randn(2, 8), torch.tensor([[0, -1], [-1, -1]]), torch.tensor([[1.0, 0.0], [0.0, 0.0]]))
    assert torch.equal(y[1], torch.zeros(8))


def test_te_available_is_cached():
    ex._TE_AVAILABLE = None
    first = ex.te_available()
    with mock.patch.object(ex, "_te_module", side_effect=AssertionError("imported again")):
        assert ex.te_available() is first


@pytest.mark.parametrize("act,gated", [("silu", True), ("relu2", False)])
def test_compiled_activation_math_matches_autograd(act, gated):
    """The elementwise math that CUDA runs compiled (one kernel each way) equals autograd of the plain formula in
    fp64, to fp32 rounding; here it runs uncompiled on CPU."""
    from moe_adapters.runtime.experts import fused_act_backward_math, fused_act_forward_math

    torch.manual_seed(0)
    N, I = 37, 24
    g = torch.randn(N, I, dtype=torch.float32)
    u = torch.randn(N, I, dtype=torch.float32) if gated else None
    w = torch.rand(N, dtype=torch.float32)
    d_hu = torch.randn(N, I, dtype=torch.float32)
    h = fused_act_forward_math(act, g, u, w)
    hw, d_gu, d_w = fused_act_backward_math(act, g, u, w, d_hu)
    gd = g.double().requires_grad_()
    ud = u.double().requires_grad_() if gated else None
    wd = w.double().requires_grad_()
    s = torch.nn.functional.silu(gd) if act == "silu" else torch.relu(gd) ** 2
    a = s * ud if gated else s
    ref = a * wd.unsqueeze(-1)
    ref.backward(d_hu.double())
    rel = lambda x, y: ((x.double() - y).norm() / y.norm()).item()  # noqa: E731
    assert rel(h, ref.detach()) < 1e-6 and rel(hw, ref.detach()) < 1e-6
    want_gu = torch.cat([gd.grad, ud.grad], -1) if gated else gd.grad
    assert rel(d_gu, want_gu) < 1e-6
    assert rel(d_w, wd.grad) < 1e-6


def test_fp64_block_falls_back_from_grouped_mm():
    """torch's CPU grouped GEMM takes fp32 / bf16 / fp16 only: an fp64 model under ``auto`` runs the loop backend
    (it used to fail inside grouped_mm) and matches v5's fp64 block (routing weights are kept in fp32)."""
    d, v5, ours = _v5_and_ours("qwen3_moe", backend="auto", dtype=torch.float64)
    x = torch.randn(2, 5, d["hidden_size"], dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    assert not ex.grouped_mm_supported(x.view(-1, x.shape[-1]), ours.routed_experts.in_proj)
    assert rel_err(ours(x), v5.double()(x)) < 1e-6

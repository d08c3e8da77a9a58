"""CUDA tests (bf16; NCCL for EP): marked ``gpu``, skipped cleanly without CUDA (and per test without TE, DeepEP or
a second GPU).

bf16 cannot be compared bitwise with v5 (we weight and sum expert outputs in fp32, v5 partly in bf16), so each check
measures both against the fp32 v5 model on the same weights: ours may be at most twice as far from it as v5's own
bf16 run, plus 1e-3 (relative to max |fp32 output|).
"""

from __future__ import annotations

import os

import pytest
import torch
from runtime_helpers import (
    FAMILIES,
    build_checkpoint,
    gpu_ep_worker,
    randomize_,
    rank_inputs,
    rel_err,
    spawn,
    tiny_config,
)

from moe_adapters.families import detect
from moe_adapters.runtime.dispatch import deepep_available
from moe_adapters.runtime.experts import te_available
from moe_adapters.runtime.layer import block_prefix, build_moe_block, copy_block_weights

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


def _bf16_ok(ours: torch.Tensor, v5_bf16: torch.Tensor, ref32: torch.Tensor) -> tuple[float, float]:
    return rel_err(ours.float(), ref32.float()), rel_err(v5_bf16.float(), ref32.float())


def _hidden(out):
    """The hidden states of a block's output (Llama 4 and gpt-oss blocks return a pair)."""
    return out[0] if isinstance(out, tuple) else out


@pytest.mark.parametrize("backend", ["grouped_mm", "loop", "te"])
@pytest.mark.parametrize("family", FAMILIES)
def test_block_bf16_cuda(family, backend):
    if backend == "te" and not te_available():
        pytest.skip("transformer_engine does not import")
    from transformers import AutoModelForCausalLM

    cfg = tiny_config(family)
    # eval: PhiMoE samples its experts and PhiMoE / MiniMax jitter their input in training
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32, experts_implementation="eager").eval()
    randomize_(model, seed=3)
    d = cfg.to_dict()
    fam = detect(d)
    layer = fam.moe_layer_ids(d)[0]
    v5_32 = model.get_submodule(block_prefix(fam, layer)).cuda()
    x32 = torch.randn(4, 16, d["hidden_size"], device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    ref = _hidden(v5_32(x32)).detach().reshape(x32.shape)
    v5_16 = v5_32.to(torch.bfloat16)
    if hasattr(v5_16, "gate") and getattr(v5_16.gate, "e_score_correction_bias", None) is not None:
        v5_16.gate.float()  # v5 keeps the sigmoid routers in fp32 under bf16
    x16 = x32.to(torch.bfloat16)
    base = _hidden(v5_16(x16)).detach().reshape(x16.shape)
    ours = build_moe_block(fam, d, layer, backend=backend, template=v5_16, device="cuda").eval()
    copy_block_weights(ours, v5_16)
    x = x16.clone().requires_grad_()
    out = _hidden(ours(x))
    assert out.dtype == torch.bfloat16
    err, err_v5 = _bf16_ok(out, base, ref)
    print(f"\n{family}/{backend} bf16: ours {err:.2e}, v5 {err_v5:.2e}")
    assert err <= 2 * err_v5 + 1e-3
    out.float().square().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert ours.routed_experts.down_proj.grad.abs().sum() > 0


@pytest.mark.parametrize("dispatcher", ["all_to_all", "deepep"])
def test_nccl_ep2_matches_single_gpu(dispatcher, tmp_path):
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs")
    if dispatcher == "deepep" and not deepep_available():
        pytest.skip("deep_ep does not import")
    from transformers import AutoModelForCausalLM

    family = "deepseek_v3"
    path = build_checkpoint(family, str(tmp_path / family))
    spawn(gpu_ep_worker, 2, path, str(tmp_path), dispatcher, "auto", backend="nccl")
    ref32 = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, experts_implementation="eager").cuda()
    ref16 = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, experts_implementation="eager").cuda()
    for rank, (ids, _) in enumerate(rank_inputs(2)):
        r = torch.load(os.path.join(tmp_path, f"rank{rank}.pt"))
        assert r["ep"] == (2, dispatcher)
        want = ref32(input_ids=ids.cuda()).logits.float().cpu()
        base = ref16(input_ids=ids.cuda()).logits.float().cpu()
        err, err_v5 = _bf16_ok(r["logits"], base, want)
        print(f"\nEP=2 {dispatcher} rank {rank} bf16 logits: ours {err:.2e}, v5 {err_v5:.2e}")
        assert err <= 2 * err_v5 + 1e-3
        assert all(g.abs().sum() > 0 for g in r["expert_grads"].values())


def test_nccl_ep2_deepep_gradients_match_all_to_all(tmp_path):
    """DeepEP's backward (dispatch backward = combine of gradients incl. the routing weights', combine backward =
    cached-layout dispatch) gives the expert gradients all_to_all gives, on the same bf16 batch."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs")
    if not deepep_available():
        pytest.skip("deep_ep does not import")
    path = build_checkpoint("deepseek_v3", str(tmp_path / "ckpt"))
    results = {}
    for dispatcher in ("all_to_all", "deepep"):
        out = tmp_path / dispatcher
        out.mkdir()
        spawn(gpu_ep_worker, 2, path, str(out), dispatcher, "auto", backend="nccl")
        results[dispatcher] = [torch.load(out / f"rank{r}.pt") for r in range(2)]
    worst = 0.0
    for a, b in zip(results["all_to_all"], results["deepep"]):
        assert set(a["expert_grads"]) == set(b["expert_grads"])
        for name, g in a["expert_grads"].items():
            worst = max(worst, rel_err(b["expert_grads"][name], g))
        worst = max(worst, rel_err(b["logits"], a["logits"]))
    print(f"\nEP=2 deepep vs all_to_all (bf16): worst rel err {worst:.2e}")
    assert worst <= 2e-2


def test_fused_rms_norm_and_cross_entropy_cuda_bf16(device="cuda"):
    """The compiled RMSNorm (one inductor kernel each way) and the chunked loss, against v5's modules on CUDA."""
    import copy

    import torch.nn.functional as F
    from transformers.loss.loss_utils import ForCausalLMLoss
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeRMSNorm

    from moe_adapters.runtime.loss import linear_cross_entropy
    from moe_adapters.runtime.norms import rms_norm

    g = torch.Generator(device).manual_seed(0)
    norm = Qwen3MoeRMSNorm(2048).to(device, torch.bfloat16)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(2048, device=device, generator=g) + 0.5)
    norm32 = copy.deepcopy(norm).float()
    for shape in ((2, 300, 2048), (2, 300, 16, 2048)):  # the residual stream, and per-head (q_norm) rows
        x = torch.randn(*shape, device=device, generator=g).to(torch.bfloat16)
        x32 = x.float().requires_grad_()
        ref = norm32(x32)
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        base, ours = norm(xa), rms_norm(xb, norm.weight, norm.variance_epsilon)
        err, err_v5 = _bf16_ok(ours, base, ref)
        assert err <= 2 * err_v5 + 1e-3, (err, err_v5)
        d = torch.randn(ref.shape, device=device, generator=g)
        ref_dx = torch.autograd.grad(ref, x32, d)[0]
        base_dx = torch.autograd.grad(base, xa, d.bfloat16())[0]
        ours_dx = torch.autograd.grad(ours, xb, d.bfloat16())[0]
        err, err_v5 = _bf16_ok(ours_dx, base_dx, ref_dx)
        print(f"\nrms_norm {shape}: d x ours {err:.2e}, v5 {err_v5:.2e}")
        assert err <= 2 * err_v5 + 1e-3
    h = torch.randn(4, 1000, 256, device=device, generator=g).to(torch.bfloat16)
    w = (torch.randn(5000, 256, device=device, generator=g) * 0.05).to(torch.bfloat16)
    labels = torch.randint(0, 5000, (4, 1000), device=device, generator=g)
    results = {}
    for name, h0, w0 in (("ref", h.float(), w.float()), ("v5", h, w), ("ours", h, w)):
        hh, ww = h0.clone().requires_grad_(), w0.clone().requires_grad_()
        if name == "ours":
            loss = linear_cross_entropy(hh, ww, F.pad(labels, (0, 1), value=-100)[..., 1:], chunk=777)
        else:
            loss = ForCausalLMLoss(F.linear(hh, ww), labels, 5000)
        loss.backward()
        results[name] = (loss, hh.grad, ww.grad)
    for i, what in enumerate(("loss", "d h", "d W")):
        err, err_v5 = _bf16_ok(results["ours"][i], results["v5"][i], results["ref"][i])
        print(f"linear_cross_entropy {what}: ours {err:.2e}, v5 {err_v5:.2e}")
        assert err <= 2 * err_v5 + 1e-3


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("width", [2048, 2688, 100])
def test_gather_sum_kernel_is_the_slotwise_sum(dtype, width):
    """The Triton unpermute kernel against its definition: per output row, the fp32 sum of the valid slots' rows in
    slot order, rounded once (bitwise), with dropped (-1) slots and rows with none; and the EP combine's GatherSum."""
    from moe_adapters.runtime.compiled import use_triton
    from moe_adapters.runtime.gather_sum import GatherSum, gather_sum

    g = torch.Generator("cuda").manual_seed(width)
    src = torch.randn(3000, width, device="cuda", generator=g).to(dtype)
    assert use_triton(src), "Triton does not import on this CUDA machine"
    index = torch.randperm(3000, device="cuda", generator=g)[:2400].view(300, 8)
    index[torch.rand(300, 8, device="cuda", generator=g) < 0.6] = -1
    index[7] = -1
    for idx, out_dtype in ((index, dtype), (index, torch.float32), (index.abs(), dtype), (index[:, :1], dtype)):
        want = torch.zeros(idx.shape[0], width, device="cuda")
        for j in range(idx.shape[1]):
            col = idx[:, j]
            want += torch.where((col >= 0).unsqueeze(1), src[col.clamp(min=0)].float(), 0.0)
        got = gather_sum(src, idx, out_dtype)
        assert got.dtype == out_dtype and torch.equal(got, want.to(out_dtype))
    assert not gather_sum(src, index)[7].any()
    assert gather_sum(src, index[:0]).shape == (0, width)
    valid = index >= 0
    rows = index[valid]
    compact = torch.full_like(index, -1)
    compact[valid] = torch.arange(len(rows), device="cuda")
    s = src[rows].clone().requires_grad_()
    d_out = torch.randn(300, width, device="cuda", generator=g).to(dtype)
    GatherSum.apply(s, compact, valid.nonzero()[:, 0], dtype).backward(d_out)
    assert torch.equal(s.grad, d_out[valid.nonzero()[:, 0]])


@pytest.mark.parametrize(
    "act,gated,width", [("silu", True, 768), ("relu2", False, 1856), ("silu", True, 100), ("silu", True, 5000)]
)
def test_act_backward_kernel_matches_the_math(act, gated, width):
    """The one-pass Triton activation, forward and backward, against the same fp32 math run eagerly: bf16 outputs
    within one rounding (1 bf16 ulp) of it, the routing-weight gradient (fp32) to 1e-5."""
    from moe_adapters.runtime.act_kernel import act_backward, act_forward
    from moe_adapters.runtime.compiled import use_triton
    from moe_adapters.runtime.experts import fused_act_backward_math, fused_act_forward_math

    g = torch.Generator("cuda").manual_seed(width)
    N = 4099
    gu = (2 * torch.randn(N, 2 * width if gated else width, device="cuda", generator=g)).to(torch.bfloat16)
    assert use_triton(gu), "Triton does not import on this CUDA machine"
    gate, up = gu.chunk(2, dim=-1) if gated else (gu, None)
    w = torch.rand(N, device="cuda", generator=g)
    d_hu = torch.randn(N, width, device="cuda", generator=g).to(torch.bfloat16)
    got = (act_forward(act, gu, gated, w), *act_backward(act, gu, gated, w, d_hu))
    want = (fused_act_forward_math(act, gate, up, w), *fused_act_backward_math(act, gate, up, w, d_hu))
    assert got[0].shape == (N, width)
    for a, b in zip(got[:3], want[:3]):
        assert a.dtype == b.dtype == torch.bfloat16 and a.shape == b.shape
        assert bool(((a.float() - b.float()).abs() <= b.float().abs() * 2**-7 + 1e-6).all())
    assert got[3].dtype == torch.float32 and rel_err(got[3], want[3]) < 1e-5
    nan = gu.clone()
    nan[0, 0] = float("nan")  # a NaN gate stays NaN (torch's relu and silu keep it), it is not zeroed
    assert bool(act_forward(act, nan, gated, w)[0, 0].isnan())
    empty = (act_forward(act, gu[:0], gated, w[:0]), *act_backward(act, gu[:0], gated, w[:0], d_hu[:0]))
    assert [t.shape[0] for t in empty] == [0, 0, 0, 0]


@pytest.mark.parametrize("family", ["qwen3_moe", "nemotron_h"])
def test_torch_compile_of_our_block_cuda(family):
    """A user who compiles the model compiles our block too, Triton kernels inside its autograd Functions: the
    compiled block gives the eager block's output and gradients (bf16; inductor may round differently)."""
    from runtime_helpers import v5_block

    fam, d, layer, v5 = v5_block(family)
    ours = build_moe_block(fam, d, layer, template=v5)
    copy_block_weights(ours, v5)
    ours = ours.cuda().to(torch.bfloat16)
    assert ours.routed_experts.in_proj.is_cuda
    g = torch.Generator().manual_seed(6)
    x = torch.randn(2, 96, d["hidden_size"], generator=g).cuda().to(torch.bfloat16)
    go = torch.randn(2, 96, d["hidden_size"], generator=g).cuda().to(torch.bfloat16)

    def run(block):
        for p in ours.parameters():
            p.grad = None
        xi = x.clone().requires_grad_()
        out = _hidden(block(xi))
        out.backward(go)
        return out.detach(), xi.grad, {n: p.grad for n, p in ours.named_parameters() if p.grad is not None}

    out, dx, grads = run(ours)
    torch._dynamo.reset()
    c_out, c_dx, c_grads = run(torch.compile(ours))
    assert rel_err(c_out.float(), out.float()) < 2e-2 and rel_err(c_dx.float(), dx.float()) < 2e-2
    assert set(c_grads) == set(grads)
    for n in grads:
        assert rel_err(c_grads[n].float(), grads[n].float()) < 2e-2, n

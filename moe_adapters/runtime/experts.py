"""Routed experts over fused ``[E_local, ...]`` weights, with pluggable grouped-GEMM backends; and shared experts.

Parameters carry transformers v5's names and shapes so that state-dict keys match v5's (``...experts.gate_up_proj``):

* gated (SwiGLU): ``gate_up_proj [E_local, 2I, H]`` (each expert's gate rows, then its up rows), ``down_proj
  [E_local, H, I]``; ``y = down(silu(gate x) * up x)``.
* non-gated: ``up_proj [E_local, I, H]``, ``down_proj [E_local, H, I]``; ``y = down(act(up x))``, e.g. squared ReLU.
* as the declaration says for experts stacked in the checkpoint: ``transposed`` weights ``[E_local, in, out]``
  (Llama 4, gpt-oss: ``gate_up_proj [E_local, H, 2I]``), gate and up ``interleave``d (gpt-oss), biases
  (``gate_up_proj_bias [E_local, 2I]``, ``down_proj_bias [E_local, H]``, added after the matmul as v5 does), gpt-oss's
  clamped SwiGLU, and routing weights that scale the expert's input instead of its output (Llama 4). These run the
  reference path below with any backend (backends see ``[E_local, out, in]``: a transposed view, no copy).

``GroupedExperts.forward(hidden [R, H], top_k_index [R, k], top_k_weights [R, k])`` has v5's experts signature, with
*local* expert ids: an id outside ``[0, E_local)`` (DeepEP and our all-to-all write -1 there) contributes nothing.

The ``grouped_mm`` path (the fast path) works on *slots* (one per ``(row, choice)`` pair):

1. one stable ``sort`` of the slots by expert id gives the permutation; the per-expert offsets come from a
   ``searchsorted`` on the sorted ids, so nothing is read back to the host. When the dispatcher promises that every id
   is local (``assume_local_ids``, set by :class:`~.layer.MoEBlock` for the ``local`` dispatcher) there is no host sync
   at all; otherwise ids outside this rank are sorted to the tail and one ``.item()`` reads how many slots are valid
   (the EP dispatchers synchronise anyway);
2. permute = one gather of the token rows (``index_select``); unpermute = a sum over the ``k`` slots of each token,
   gathered by the inverse permutation (fp32 accumulation in slot order, deterministic; on CUDA one Triton kernel
   that skips dropped slots, :mod:`.gather_sum`);
3. the routing weight never multiplies a separate ``[N, H]`` tensor. In bf16/fp16 it is folded into the
   activation: ``down(act(gate) * up * w) == w * down(act(gate) * up)``, so it scales the ``[N, I]`` activation in
   the activation's last kernel (computed in fp32, rounded once) and the combine is a plain gather-sum. In fp32
   (what the CPU tests run) the forward keeps v5's exact arithmetic instead (``(y * w)`` in fp32, ``index_add``-ed
   per token in expert order), so logits are bitwise v5's; the backward is the same in both
   (``GroupedExperts.fold_routing_weights`` overrides the choice);
4. two autograd Functions own the block's memory: the first (permute + gate/up GEMM) saves the *unpermuted* input and
   the row indices, and regathers the permuted rows in backward (``k`` times smaller than keeping them); the second
   (activation + down GEMM + unpermute) saves only the gate/up output and recomputes the activation in backward.
   Their backward passes call ``torch`` grouped GEMM exactly as torch's own autograd formula for it does
   (``_grouped_mm_mat1_backward`` / ``_grouped_mm_mat2_backward``), so the same kernels and layouts run.

The ``loop`` and ``te`` backends keep the straightforward reference path (per-slot rows, weights applied to the
output in fp32, ``index_add``). A backend is one function ``grouped_linear(x_sorted [N, in], weight [E_local, out,
in], counts [E_local]) -> [N, out]``; see ``BACKENDS`` and docs/architecture.md for adding one.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .act_kernel import act_backward, act_forward
from .compiled import compiled, use_compiled, use_triton
from .gather_sum import gather_sum

# --- activations ---------------------------------------------------------------------------------------------------


def relu2(x: torch.Tensor) -> torch.Tensor:
    """Squared ReLU, as v5's ``ACT2FN["relu2"]``."""
    return torch.square(F.relu(x))


ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "silu": F.silu,
    "swish": F.silu,
    "relu2": relu2,
    "relu": F.relu,
    "gelu": F.gelu,
}


def clamped_swiglu(gate: torch.Tensor, up: torch.Tensor, alpha: float, limit: float) -> torch.Tensor:
    """gpt-oss's gated activation, op for op as v5's ``GptOssExperts._apply_gate``."""
    gate = gate.clamp(min=None, max=limit)
    up = up.clamp(min=-limit, max=limit)
    glu = gate * torch.sigmoid(gate * alpha)
    return (up + 1) * glu


# gated activations that combine gate and up themselves (the others are act(gate) * up); keyword args from config
GATED_ACTIVATIONS: dict[str, Callable[..., torch.Tensor]] = {"clamped_swiglu": clamped_swiglu}


def activation(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"unknown expert activation {name!r}; known: {', '.join(sorted(ACTIVATIONS))}") from None


def _weighted_(h: torch.Tensor, w: torch.Tensor | None) -> torch.Tensor:
    """``h *= w[:, None]`` in place, computed in ``w``'s (fp32) precision and rounded once to ``h``'s dtype."""
    if w is not None:
        h.mul_(w.unsqueeze(-1))
    return h


def _act(name: str, g: torch.Tensor) -> torch.Tensor:
    """The activation, with v5's op sequence (``F.silu``; ``square(relu)``)."""
    if name in ("silu", "swish"):
        return F.silu(g)
    if name == "relu2":
        return torch.square(F.relu(g))
    return activation(name)(g)


def _act_backward(name: str, g: torch.Tensor, d_s: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """``d act(g) / d g * d_s``, with the formulas torch's autograd uses for v5's ops (bitwise autograd's);
    written into ``out`` when given."""
    if name in ("silu", "swish"):
        if out is not None:
            return torch.ops.aten.silu_backward.grad_input(d_s, g, grad_input=out)
        return torch.ops.aten.silu_backward(d_s, g)
    if name == "relu2":
        r = F.relu(g)
        d_r = d_s * (2 * r)  # pow_backward of square: grad * (2 * x); then relu's threshold_backward
        if out is not None:
            return torch.ops.aten.threshold_backward.grad_input(d_r, r, 0, grad_input=out)
        return torch.ops.aten.threshold_backward(d_r, r, 0)
    with torch.enable_grad():  # any other activation: autograd over the recomputed forward
        g_ = g.detach().requires_grad_()
        (d_g,) = torch.autograd.grad(activation(name)(g_), g_, d_s)
    if out is not None:
        return out.copy_(d_g)
    return d_g


def act_mul_forward(name: str, g: torch.Tensor, u: torch.Tensor | None, w: torch.Tensor | None = None) -> torch.Tensor:
    """``act(g) * u`` (gated) or ``act(g)`` (``u is None``), times the per-row weight ``w [N]`` when given.

    The same elementwise sequence as v5 (``silu`` / ``square(relu)`` then ``*``), so it is bitwise v5's where no
    weight is folded in. Runs without autograd; :class:`FusedActMul` gives it a backward that recomputes.
    """
    h = _act(name, g)
    if h is g:  # an activation that returned its input: never write into the caller's tensor
        h = h.clone()
    if u is not None:
        h.mul_(u)
    return _weighted_(h, w)


def act_mul_backward(
    name: str,
    g: torch.Tensor,
    u: torch.Tensor | None,
    w: torch.Tensor | None,
    dh: torch.Tensor,
    *,
    need_dw: bool = False,
    d_g_out: torch.Tensor | None = None,
    d_u_out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Gradients of :func:`act_mul_forward` from its inputs alone (the activation is recomputed; nothing saved).

    Returns ``(d_g, d_u, d_w)``; ``d_g`` / ``d_u`` are written into ``d_g_out`` / ``d_u_out`` when given (e.g. the two
    halves of one ``[N, 2I]`` gradient), ``d_w`` (fp32, ``[N]``) only when ``need_dw``. For ``w is None`` these are
    the formulas torch's autograd applies to v5's op sequence, so the result is bitwise autograd's.
    """
    s = _act(name, g)
    d_w = None
    if need_dw:
        a = s * u if u is not None else s
        d_w = (dh * a).sum(-1, dtype=torch.float32)
        del a
    da = dh if w is None else _mul_rounded(dh, w)
    d_u = None
    if u is not None:
        d_u = torch.mul(da, s, out=d_u_out) if d_u_out is not None else da * s
        da = da * u
    del s
    d_g = _act_backward(name, g, da, d_g_out)
    return d_g, d_u, d_w


def _mul_rounded(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``x * w[:, None]`` computed in fp32 and written in ``x``'s dtype (no fp32 ``[N, I]`` temporary)."""
    out = torch.empty_like(x)
    return torch.mul(x, w.unsqueeze(-1), out=out)


class FusedActMul(torch.autograd.Function):
    """``act(g) * u`` (or ``act(g)``) that saves only its inputs and recomputes the activation in backward: one
    ``[N, I]`` tensor less kept per MLP than autograd of the plain formula, with bitwise the same gradients."""

    @staticmethod
    def forward(ctx, g: torch.Tensor, u: torch.Tensor | None, name: str) -> torch.Tensor:  # type: ignore[override]
        ctx.name = name
        ctx.gated = u is not None
        ctx.save_for_backward(g, u) if u is not None else ctx.save_for_backward(g)
        return act_mul_forward(name, g, u)

    @staticmethod
    def backward(ctx, dh: torch.Tensor):  # type: ignore[override]
        if ctx.gated:
            g, u = ctx.saved_tensors
        else:
            (g,), u = ctx.saved_tensors, None
        d_g, d_u, _ = act_mul_backward(ctx.name, g, u, None, dh)
        return d_g, d_u, None


def fused_act_mul(name: str, g: torch.Tensor, u: torch.Tensor | None = None) -> torch.Tensor:
    """``act(g) * u`` / ``act(g)`` with recompute-in-backward (plain autograd when nothing needs a gradient)."""
    if torch.is_grad_enabled() and (g.requires_grad or (u is not None and u.requires_grad)):
        return FusedActMul.apply(g, u, name)
    return act_mul_forward(name, g, u)


# --- backends ------------------------------------------------------------------------------------------------------

GroupedLinearFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def loop_grouped_linear(x: torch.Tensor, weight: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Reference: one ``F.linear`` per expert over its contiguous rows (the same GEMM v5's eager loop runs)."""
    outs = []
    start = 0
    for e, n in enumerate(counts.tolist()):
        if n:
            outs.append(F.linear(x[start : start + n], weight[e]))
        start += n
    if not outs:
        return x.new_zeros(0, weight.shape[1]) + 0 * weight.sum()  # keeps the graph (and weight grads) connected
    return torch.cat(outs, dim=0)


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the incoming gradient contiguous.

    torch's CPU ``_grouped_mm`` backward rejects a stride-0 gradient (what ``y.sum().backward()`` sends) and any
    gradient whose row stride is not a multiple of 16 bytes; a dense copy fixes the former.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return grad.contiguous()


def _grouped_mm_op() -> Callable[..., torch.Tensor] | None:
    return getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


def grouped_mm_supported(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether torch's grouped GEMM takes these operands: present in this torch, bf16 on CUDA (SM80+), and 16-byte
    aligned row strides (the CPU kernel's backward insists on it, so tiny odd dims fall back under ``auto``)."""
    if _grouped_mm_op() is None:
        return False
    if x.device.type == "cuda":
        if x.dtype != torch.bfloat16 or torch.cuda.get_device_capability(x.device) < (8, 0):
            return False
    elif x.device.type != "cpu" or x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return False  # the CPU kernel takes these three (an fp64 model runs the loop)
    elif x.dtype != torch.bfloat16 and torch.compiler.is_compiling():
        return False  # torch.compile's fake kernel for grouped_mm accepts bf16 only (eager CPU takes fp32 too)
    size = x.element_size()
    return all((d * size) % 16 == 0 for d in (weight.shape[1], weight.shape[2]))


def grouped_mm_grouped_linear(x: torch.Tensor, weight: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """``torch.nn.functional.grouped_mm`` (``torch._grouped_mm`` on older torch) over cumulative int32 offsets."""
    op = _grouped_mm_op()
    if op is None:
        raise RuntimeError("this torch has neither torch.nn.functional.grouped_mm nor torch._grouped_mm")
    offs = torch.cumsum(counts.to(device=x.device), dim=0, dtype=torch.int32)
    y = op(x.to(weight.dtype).contiguous(), weight.transpose(-2, -1), offs=offs)
    return _ContiguousGrad.apply(y)


def _te_module():
    import transformer_engine.pytorch as te  # noqa: PLC0415 - optional dependency

    return te


_TE_AVAILABLE: bool | None = None


def te_available() -> bool:
    """Whether transformer_engine imports (tried once: ``auto`` asks on every forward)."""
    global _TE_AVAILABLE
    if _TE_AVAILABLE is None:
        try:
            _te_module()
            _TE_AVAILABLE = True
        except Exception:  # ImportError, or a TE build that fails to load its CUDA libraries
            _TE_AVAILABLE = False
    return _TE_AVAILABLE


class TEGroupedLinear:
    """TransformerEngine's ``GroupedLinear`` driven with our fused weight.

    Written against TE's public module API (``GroupedLinear(num_gemms, in_features, out_features, bias=False,
    params_dtype=..., device=...)``, ``forward(inp, m_splits)``, which reads its weights as ``self.weight{i}`` on every
    call). The module's own per-GEMM parameters are dropped and, before each call, ``weight{i}`` is bound to the view
    ``fused[i]``: TE's autograd function returns a gradient for each view and autograd accumulates them into the
    fused parameter, so the fused parameter (v5's name and shape) stays the only trainable tensor. FP8 recipes and
    ``fuse_wgrad_accumulation`` are not used. Run on an H200 with TE 2.20.2 (docs/benchmarks.md): it passes the bf16
    equivalence tests of every family, but it is far slower than ``grouped_mm`` (per-call host sync for the splits,
    one GEMM per expert), so ``auto`` picks it only where torch's grouped GEMM does not apply.
    """

    def __init__(self) -> None:
        self._modules: dict[tuple, nn.Module] = {}

    def _module(self, weight: torch.Tensor) -> nn.Module:
        key = (weight.shape, weight.dtype, weight.device)
        mod = self._modules.get(key)
        if mod is None:
            te = _te_module()
            e, out_f, in_f = weight.shape
            mod = te.GroupedLinear(e, in_f, out_f, bias=False, params_dtype=weight.dtype, device=weight.device)
            for i in range(e):
                mod._parameters.pop(f"weight{i}", None)  # free TE's own copies; ours are bound per call
            self._modules[key] = mod
        return mod

    def __call__(self, x: torch.Tensor, weight: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        # TE reads each weight{i} as a contiguous [out, in] matrix: a transposed view (Llama 4, gpt-oss store
        # [E, in, out]) gave wrong results on the GPU; one differentiable copy makes it contiguous
        weight = weight.contiguous()
        mod = self._module(weight)
        for i in range(weight.shape[0]):
            object.__setattr__(mod, f"weight{i}", weight[i])
        try:
            return mod(x.to(weight.dtype).contiguous(), counts.tolist())
        finally:
            for i in range(weight.shape[0]):
                mod.__dict__.pop(f"weight{i}", None)


BACKENDS = ("auto", "grouped_mm", "te", "loop")


def resolve_backend(name: str, x: torch.Tensor, weight: torch.Tensor, *more: torch.Tensor) -> str:
    """``auto``: torch's grouped GEMM when it takes these operands, else TE on CUDA when it imports, else the loop.

    grouped_mm comes first because it was measured faster: on an H200 (docs/benchmarks.md, TE 2.20.2) our block with
    the ``te`` backend ran at 0.02-0.22x the speed of the same block with ``grouped_mm``."""
    if name not in BACKENDS:
        raise ValueError(f"unknown experts backend {name!r}; one of {', '.join(BACKENDS)}")
    if name != "auto":
        return name
    if all(grouped_mm_supported(x, w) for w in (weight, *more)):  # every GEMM's operands (down_proj too)
        return "grouped_mm"
    if x.device.type == "cuda" and te_available():
        return "te"
    return "loop"


# --- slot bookkeeping: one sort, no host sync ----------------------------------------------------------------------


class SlotPlan(NamedTuple):
    """Where every routed slot goes. ``n`` slots survive (all ``R * k`` when every id is local)."""

    perm: torch.Tensor  # [n] flat slot index (row * k + choice) of each sorted slot, grouped by expert
    rows: torch.Tensor  # [n] its token row (perm // k)
    inv: torch.Tensor  # [R * k] position of each slot in the sorted order, -1 where the slot was dropped
    offs: torch.Tensor  # [E_local] int32 cumulative row counts (grouped GEMM offsets)
    num_rows: int  # R
    k: int
    n: int


def plan_slots(top_k_index: torch.Tensor, num_local_experts: int, assume_local: bool = False) -> SlotPlan:
    """Sort the ``(row, choice)`` slots by local expert (stable: rows keep their order inside an expert).

    ``assume_local``: every id is in ``[0, E_local)`` (true for the ``local`` dispatcher); no mask, no host sync.
    Otherwise ids outside go to the tail and are dropped after one ``.item()`` (their count).
    """
    R, k = top_k_index.shape
    E = num_local_experts
    flat = top_k_index.reshape(-1)
    dev = flat.device
    with torch.no_grad():
        key_dtype = torch.int32 if E < 2**31 - 1 else torch.int64
        if assume_local:
            key = flat.to(key_dtype)
        else:
            key = torch.where((flat >= 0) & (flat < E), flat, E).to(key_dtype)
        sorted_key, perm = torch.sort(key, stable=True)
        bounds = torch.arange(E, device=dev, dtype=key_dtype)
        offs = torch.searchsorted(sorted_key, bounds, right=True, out_int32=True)
        n = R * k
        if not assume_local:
            n = int(offs[-1].item()) if E else 0  # the one host sync of the EP path
            if n < R * k:
                perm = perm[:n]
        inv = perm.new_empty(R * k) if n == R * k else perm.new_full((R * k,), -1)
        inv.scatter_(0, perm, torch.arange(n, device=dev, dtype=perm.dtype))
        rows = torch.div(perm, k, rounding_mode="floor") if k > 1 else perm
    return SlotPlan(perm, rows, inv, offs, R, k, n)


def _gather_sum(y: torch.Tensor, plan: SlotPlan, out_dtype: torch.dtype) -> torch.Tensor:
    """Per token row, the fp32 sum of its slots' rows of ``y`` (sorted order) -> ``[R, H]`` in ``out_dtype``: one
    pass without atomics on CUDA (:mod:`.gather_sum`), deterministic everywhere."""
    index = plan.inv.view(plan.num_rows, plan.k)
    return gather_sum(y, index, out_dtype, complete=plan.n == plan.num_rows * plan.k)


# --- the grouped_mm fast path: two autograd Functions --------------------------------------------------------------


def _gmm(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    return _grouped_mm_op()(a, b, offs=offs)


class _PermuteGateUp(torch.autograd.Function):
    """``gu = grouped_mm(x[rows], W_in^T)``. Saves ``x`` (the block input, alive anyway) and the plan, not the
    ``k``-times larger permuted rows: backward regathers them for the weight gradient."""

    @staticmethod
    def forward(ctx, x, w_in, rows, inv, offs, num_rows: int, k: int):  # type: ignore[override]
        xs = x.index_select(0, rows).to(w_in.dtype)
        gu = _gmm(xs, w_in.transpose(-2, -1), offs)
        ctx.save_for_backward(x, w_in, rows, inv, offs)
        ctx.num_rows, ctx.k = num_rows, k
        return gu

    @staticmethod
    def backward(ctx, d_gu):  # type: ignore[override]
        x, w_in, rows, inv, offs = ctx.saved_tensors
        d_gu = d_gu.contiguous()
        d_x = d_w_in = None
        if ctx.needs_input_grad[1]:
            # torch's _grouped_mm_mat2_backward for the column-major view W_in^T: grouped_mm(grad^T, mat1)
            xs = x.index_select(0, rows).to(w_in.dtype)
            d_w_in = _gmm(d_gu.t(), xs, offs)
            del xs
        if ctx.needs_input_grad[0]:
            # torch's _grouped_mm_mat1_backward for a row-major mat1: grouped_mm(grad, mat2^T) = grouped_mm(grad, W_in)
            d_xs = _gmm(d_gu, w_in, offs)
            plan = SlotPlan(None, rows, inv, offs, ctx.num_rows, ctx.k, rows.shape[0])
            d_x = _gather_sum(d_xs, plan, x.dtype)
        return d_x, d_w_in, None, None, None, None, None


# --- one-kernel activation on CUDA (torch.compile) -----------------------------------------------------------------
# With the routing weight folded in, everything between the two grouped GEMMs is elementwise over [N, I]: eager
# torch runs it as ~3 kernels forward and ~9 backward, each a full pass over memory (the largest stage measured on an
# H200, see docs/benchmarks.md). The same math written once in fp32 and compiled by inductor is one pass each way.
# Used on CUDA only; the plain functions are what the compiled ones compute (tested on CPU).

FUSABLE_ACTS = ("silu", "swish", "relu2")


def _act_f32(name: str, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(act(g), d act / d g) in fp32."""
    if name == "relu2":
        r = torch.relu(g)
        return r * r, 2 * r
    sig = torch.sigmoid(g)
    return g * sig, sig * (1 + g * (1 - sig))


def fused_act_forward_math(name: str, g: torch.Tensor, u: torch.Tensor | None, w: torch.Tensor) -> torch.Tensor:
    """``act(g) * u * w`` computed in fp32, rounded once."""
    s, _ = _act_f32(name, g.float())
    a = s * u.float() if u is not None else s
    return (a * w.float().unsqueeze(-1)).to(g.dtype)


def fused_act_backward_math(
    name: str, g: torch.Tensor, u: torch.Tensor | None, w: torch.Tensor, d_hu: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """From the gate/up GEMM output and ``d_hu = W_down^T d_row``: ``(a * w`` for the down-weight gradient, ``d gu``
    (gate half then up half), ``d w`` fp32)."""
    gf, dh, wf = g.float(), d_hu.float(), w.float().unsqueeze(-1)
    s, ds = _act_f32(name, gf)
    a = s * u.float() if u is not None else s
    d_w = (dh * a).sum(-1)
    da = dh * wf
    if u is not None:
        d_gu = torch.cat([da * u.float() * ds, da * s], dim=-1)
    else:
        d_gu = da * ds
    return (a * wf).to(g.dtype), d_gu.to(g.dtype), d_w


def fused_act_path(gu: torch.Tensor, act: str, fold: bool) -> str | None:
    """How the folded activation runs: ``"triton"`` (one hand-written kernel each way), ``"compiled"`` (inductor),
    or None (eager ops: CPU, an activation without a fused form, or the weight not folded in)."""
    if not (fold and act in FUSABLE_ACTS):
        return None
    if use_triton(gu):
        return "triton"
    return "compiled" if use_compiled(gu) else None


class _ActDownCombine(torch.autograd.Function):
    """``out[r] = sum over r's slots of w * grouped_mm(act(gate) * up, W_down^T)``. Saves only ``gu`` (the gate/up
    GEMM output) and the routing weights; the activation is recomputed in backward.

    ``fold``: the weight multiplies the ``[N, I]`` activation (``down(a * w) == w * down(a)``, one rounding, inside the
    activation's last kernel) and the combine is a plain gather-sum; otherwise v5's arithmetic, bitwise: ``(y * w)``
    in fp32, ``index_add``-ed per token in expert order (what the fp32 / CPU path uses, so logits equal v5's).
    The backward is the same for both: with ``y_u = W_down a``, ``d a = w * W_down^T d_row``, ``d w = <W_down^T d_row,
    a>``, ``d W_down = sum d_row (w a)^T``: no ``[N, H]`` expert output is kept or recomputed."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx, gu, w_slot, w_down, rows, inv, offs, num_rows: int, k: int, act: str, gated: bool, out_dtype, fold: bool
    ):
        g, u = gu.chunk(2, dim=-1) if gated else (gu, None)
        path = fused_act_path(gu, act, fold)
        if path == "triton":
            h = act_forward(act, gu, gated, w_slot)
        elif path == "compiled":
            h = compiled(fused_act_forward_math)(act, g, u, w_slot)
        else:
            h = act_mul_forward(act, g, u, w_slot if fold else None)
        y = _gmm(h, w_down.transpose(-2, -1), offs)
        del h
        if fold:
            out = _gather_sum(y, SlotPlan(None, rows, inv, offs, num_rows, k, rows.shape[0]), out_dtype)
        else:
            acc = torch.zeros(num_rows, y.shape[-1], dtype=torch.float32, device=y.device)
            out = acc.index_add_(0, rows, y.float() * w_slot.unsqueeze(-1)).to(out_dtype)
        ctx.save_for_backward(gu, w_slot, w_down, rows, offs)
        ctx.act, ctx.gated, ctx.fold = act, gated, fold
        return out

    @staticmethod
    def backward(ctx, d_out):  # type: ignore[override]
        gu, w_slot, w_down, rows, offs = ctx.saved_tensors
        act, gated = ctx.act, ctx.gated
        need_gu, need_w, need_down = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        g, u = gu.chunk(2, dim=-1) if gated else (gu, None)
        d_rows = d_out.to(w_down.dtype).contiguous().index_select(0, rows)  # unpermute's backward: one gather
        d_hu = _gmm(d_rows, w_down, offs) if (need_gu or need_w) else None  # _grouped_mm_mat1_backward, row-major
        path = fused_act_path(gu, act, ctx.fold) if d_hu is not None and w_slot.dtype == torch.float32 else None
        if path is not None:
            if path == "triton":  # one pass (inductor makes two of it: the per-row dot, then the rest)
                hw, d_gu, d_w = act_backward(act, gu, gated, w_slot, d_hu)
            else:
                hw, d_gu, d_w = compiled(fused_act_backward_math)(act, g, u, w_slot, d_hu)
            d_down = _gmm(d_rows.t(), hw, offs) if need_down else None
            return (d_gu if need_gu else None), (d_w if need_w else None), d_down, *([None] * 9)
        s = _act(act, g)
        a = s * u if gated else s  # the unweighted activation, recomputed
        d_w = None
        if need_w:  # fp32 path: the dot in fp64, so the router gradient is as exact as v5's
            acc = torch.float64 if d_hu.dtype == torch.float32 else torch.float32
            if acc == torch.float64:
                d_w = (d_hu.to(acc) * a).sum(-1, dtype=acc).float()
            else:
                d_w = (d_hu * a).sum(-1, dtype=acc)
        d_down = None
        if need_down:
            hw = _mul_rounded(a, w_slot)
            d_down = _gmm(d_rows.t(), hw, offs)  # _grouped_mm_mat2_backward for the column-major view W_down^T
            del hw
        del d_rows, a
        d_gu = None
        if need_gu:
            da = d_hu.mul_(w_slot.unsqueeze(-1))  # in place: computed in fp32, rounded once
            d_gu = torch.empty_like(gu)
            if gated:
                I = g.shape[-1]
                torch.mul(da, s, out=d_gu[:, I:])
                del s
                _act_backward(act, g, da.mul_(u), d_gu[:, :I])
            else:
                del s
                _act_backward(act, g, da, d_gu)
        return d_gu, d_w, d_down, None, None, None, None, None, None, None, None, None


# --- routed experts ------------------------------------------------------------------------------------------------


class GroupedExperts(nn.Module):
    """This rank's routed experts ``[first_expert, first_expert + num_local_experts)`` as fused parameters.

    ``assume_local_ids`` (default False): the caller promises every id in ``top_k_index`` is a valid local id (the
    ``local`` dispatcher's output always is); the grouped_mm path then runs without any host sync.
    """

    def __init__(
        self,
        num_local_experts: int,
        hidden_size: int,
        intermediate_size: int,
        *,
        gated: bool = True,
        act: str = "silu",
        backend: str = "auto",
        first_expert: int = 0,
        num_experts: int | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        transposed: bool = False,
        gate_up: str = "concat",
        bias: bool = False,
        act_args: dict[str, float] | None = None,
        scale_input: bool = False,
    ) -> None:
        super().__init__()
        if backend not in BACKENDS:
            raise ValueError(f"unknown experts backend {backend!r}; one of {', '.join(BACKENDS)}")
        if gate_up not in ("concat", "interleave"):
            raise ValueError(f"unknown gate/up layout {gate_up!r} (concat | interleave)")
        self.num_local_experts = num_local_experts
        self.num_experts = num_experts if num_experts is not None else num_local_experts
        self.first_expert = first_expert
        self.hidden_dim = hidden_size
        self.intermediate_dim = intermediate_size
        self.gated = gated
        self.act_name = act
        self.act_args = dict(act_args or {})
        if act in GATED_ACTIVATIONS and not gated:
            raise ValueError(f"activation {act!r} needs gated experts")
        self.act_fn = None if act in GATED_ACTIVATIONS else activation(act)
        self.backend = backend
        self.assume_local_ids = False
        # grouped_mm path: fold the routing weight into the activation (None: only below fp32; see _ActDownCombine)
        self.fold_routing_weights: bool | None = None
        self.transposed = transposed
        self.interleaved = gate_up == "interleave"
        self.has_bias = bias
        self.scale_input = scale_input
        # layouts the grouped_mm fast path does not cover run the reference path
        self._reference_only = transposed or self.interleaved or bias or scale_input or self.act_fn is None
        E, H, I = num_local_experts, hidden_size, intermediate_size
        kw = {"dtype": dtype, "device": device}
        n_in = 2 * I if gated else I

        def shape(out: int, inp: int) -> tuple[int, int, int]:
            return (E, inp, out) if transposed else (E, out, inp)

        self._in_name = "gate_up_proj" if gated else "up_proj"
        self.register_parameter(self._in_name, nn.Parameter(torch.empty(shape(n_in, H), **kw)))
        if bias:
            self.register_parameter(self._in_name + "_bias", nn.Parameter(torch.empty(E, n_in, **kw)))
        self.down_proj = nn.Parameter(torch.empty(shape(H, I), **kw))
        if bias:
            self.down_proj_bias = nn.Parameter(torch.empty(E, H, **kw))
        self._te = TEGroupedLinear()

    @property
    def in_proj(self) -> torch.Tensor:
        """The input projection as ``[E_local, out, in]`` (a view of the parameter when it is stored transposed)."""
        w = getattr(self, self._in_name)
        return w.transpose(-2, -1) if self.transposed else w

    @property
    def out_proj(self) -> torch.Tensor:
        """``down_proj`` as ``[E_local, H, I]`` (a view when stored transposed)."""
        return self.down_proj.transpose(-2, -1) if self.transposed else self.down_proj

    def _linear(self, backend: str) -> GroupedLinearFn:
        if backend == "grouped_mm":
            return grouped_mm_grouped_linear
        if backend == "te":
            return self._te
        return loop_grouped_linear

    def expert_mlp(self, x_sorted: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """The expert MLPs over rows already grouped by local expert (``counts[e]`` rows for expert e, in order)."""
        backend = resolve_backend(self.backend, x_sorted, self.in_proj, self.out_proj)
        linear = self._linear(backend)
        expert_of_row = None
        if self.has_bias:  # v5 adds the bias after the matmul (x @ W + b): so do we, for the same rounding
            expert_of_row = torch.repeat_interleave(torch.arange(len(counts), device=counts.device), counts)
        h = linear(x_sorted, self.in_proj, counts)
        if expert_of_row is not None:
            h = h + getattr(self, self._in_name + "_bias")[expert_of_row]
        if self.gated:
            gate, up = (h[..., ::2], h[..., 1::2]) if self.interleaved else h.chunk(2, dim=-1)
            if self.act_fn is None:
                h = GATED_ACTIVATIONS[self.act_name](gate, up, **self.act_args)
            else:
                h = self.act_fn(gate) * up
        else:
            h = self.act_fn(h)
        y = linear(h, self.out_proj, counts)
        if expert_of_row is not None:
            y = y + self.down_proj_bias[expert_of_row]
        return y

    def forward(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        R, k = top_k_index.shape
        plan = plan_slots(top_k_index, self.num_local_experts, self.assume_local_ids)
        w_slot = top_k_weights.reshape(-1).index_select(0, plan.perm)  # backward: a collision-free index_add_
        if plan.n == 0:  # nothing routed here: zeros, with every weight still in the graph (zero gradients)
            zero = sum(p.sum() for p in self.parameters()) * 0 + w_slot.sum() * 0
            return hidden_states.new_zeros(R, hidden_states.shape[-1]) + zero.to(hidden_states.dtype)
        backend = resolve_backend(self.backend, hidden_states, self.in_proj, self.out_proj)
        if backend == "grouped_mm" and not self._reference_only:
            gu = _PermuteGateUp.apply(hidden_states, self.in_proj, plan.rows, plan.inv, plan.offs, R, k)
            fold = self.fold_routing_weights
            if fold is None:  # fold for bf16 / fp16 (speed); v5's exact arithmetic in fp32 (logits bitwise v5's)
                fold = hidden_states.dtype not in (torch.float32, torch.float64)
            return _ActDownCombine.apply(
                gu, w_slot.float(), self.down_proj, plan.rows, plan.inv, plan.offs, R, k, self.act_name, self.gated,
                hidden_states.dtype, bool(fold),
            )
        # reference path (loop, te): per-slot rows, weights applied to the expert output in fp32
        counts = torch.diff(plan.offs, prepend=plan.offs.new_zeros(1))
        x = hidden_states[plan.rows]
        if self.scale_input:  # Llama 4: the weight (in the model dtype, as v5) scales the input; outputs are summed
            y = self.expert_mlp(x * w_slot.to(x.dtype).unsqueeze(-1), counts).float()
        else:
            y = self.expert_mlp(x, counts).float() * w_slot.float().unsqueeze(-1)
        out = torch.zeros(R, hidden_states.shape[-1], dtype=torch.float32, device=hidden_states.device)
        return out.index_add(0, plan.rows, y).to(hidden_states.dtype)

    def extra_repr(self) -> str:
        last = self.first_expert + self.num_local_experts
        return (
            f"experts=[{self.first_expert}, {last}) of {self.num_experts}, hidden={self.hidden_dim}, "
            f"intermediate={self.intermediate_dim}, gated={self.gated}, act={self.act_name}, backend={self.backend}"
            + "".join(f", {k}" for k in ("transposed", "interleaved", "has_bias", "scale_input") if getattr(self, k))
        )


# --- shared experts ------------------------------------------------------------------------------------------------


class SharedExpertsMLP(nn.Module):
    """The always-on dense expert(s): ``{gate,up,down}`` ``nn.Linear`` under the declared names (v5's
    ``shared_experts.gate_proj.weight`` ...); non-gated when the declaration has no gate projection. The activation
    (and the gate * up product) saves only its inputs and is recomputed in backward (:class:`FusedActMul`)."""

    def __init__(
        self,
        hidden_size: int,
        intermediate_size: int,
        *,
        gate: str | None = "gate_proj",
        up: str = "up_proj",
        down: str = "down_proj",
        act: str = "silu",
        bias: bool = False,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        kw = {"dtype": dtype, "device": device}
        self._names = (gate, up, down)
        if gate is not None:
            self.add_module(gate, nn.Linear(hidden_size, intermediate_size, bias=bias, **kw))
        self.add_module(up, nn.Linear(hidden_size, intermediate_size, bias=bias, **kw))
        self.add_module(down, nn.Linear(intermediate_size, hidden_size, bias=bias, **kw))
        self.act_name = act
        self.act_fn = activation(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up, down = (getattr(self, n) if n is not None else None for n in self._names)
        h = fused_act_mul(self.act_name, gate(x), up(x)) if gate is not None else fused_act_mul(self.act_name, up(x))
        return down(h)

"""RMSNorm that keeps 2 bytes per element for backward instead of 6, with v5's forward.

transformers v5 writes RMSNorm as eager torch (``w * (x.float() * rsqrt(mean(x.float()**2) + eps)).to(dtype)``), so
autograd keeps the fp32 copy of the input and the bf16 cast of the normalised value: measured on Qwen3-30B-A3B,
the four norms of a decoder layer (input, post-attention, per-head q and k) hold 51 of the 103 KiB per token that a
layer saves for backward (``benchmarks/activation_memory.py``). :class:`RMSNormFunction` computes the same forward and
saves only the input and one fp32 ``rstd`` per row; the backward recomputes the rest, taking autograd's steps. On
CPU both directions are v5's ops in v5's order, bit for bit (in fp32 the input's gradient arrives as one sum where
autograd would add three terms in its own order); on CUDA each direction is one inductor kernel (see
:mod:`.compiled`), which may sum a row in another order (a last-bit difference in rare elements).

:func:`use_fused_rms_norms` swaps a model's norms in place, but only those whose own forward gives bitwise the
output of the formula above on probe inputs: Gemma's ``(1 + w)`` norms, gated norms and anything else are left alone.
No family is named here; the probe decides.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from .compiled import compiled, use_compiled


def rms_norm_forward_math(x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(v5's RMSNorm output, fp32 rstd per row)."""
    x32 = x.to(torch.float32)
    rstd = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * (x32 * rstd).to(x.dtype), rstd


def rms_norm_backward_math(
    x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor, d_out: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(d x, d weight) of :func:`rms_norm_forward_math`, step by step as autograd differentiates v5's ops (so fp32
    gradients agree with v5's to the last bits): ``d x = dy rstd + (-rstd^3 / 2) sum(dy x) * 2 x / n``."""
    x32 = x.to(torch.float32)
    y = (x32 * rstd).to(x.dtype)
    dy = (d_out * weight).to(torch.float32)
    d_rstd = (dy * x32).sum(-1, keepdim=True)
    d_var = d_rstd * -0.5 * rstd.pow(3)
    d_x = dy * rstd + d_var.expand_as(x32) / x.shape[-1] * 2 * x32
    d_w = (d_out * y).reshape(-1, x.shape[-1]).sum(0, dtype=torch.float32)
    return d_x.to(x.dtype), d_w.to(weight.dtype)


class RMSNormFunction(torch.autograd.Function):
    """RMSNorm that saves ``x`` (its own dtype) and ``rstd`` (fp32, one per row) for backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:  # type: ignore[override]
        if use_compiled(x):  # rows x width: one compiled graph per width, whatever the batch and sequence
            out, rstd = compiled(rms_norm_forward_math)(x.reshape(-1, x.shape[-1]), weight, eps)
            out = out.view(x.shape)
        else:
            out, rstd = rms_norm_forward_math(x, weight, eps)
        ctx.save_for_backward(x, weight, rstd)
        return out

    @staticmethod
    def backward(ctx, d_out: torch.Tensor):  # type: ignore[override]
        x, weight, rstd = ctx.saved_tensors
        if use_compiled(x):
            H = x.shape[-1]
            d_x, d_w = compiled(rms_norm_backward_math)(x.reshape(-1, H), weight, rstd, d_out.reshape(-1, H))
            d_x = d_x.view(x.shape)
        else:
            d_x, d_w = rms_norm_backward_math(x, weight, rstd, d_out)
        return d_x, (d_w if ctx.needs_input_grad[1] else None), None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """v5's RMSNorm output; under autograd, saves 2 bytes (bf16) per element instead of 6."""
    if not torch.is_grad_enabled() or not (x.requires_grad or weight.requires_grad):
        return rms_norm_forward_math(x, weight, eps)[0]
    return RMSNormFunction.apply(x, weight, eps)


def _eps_of(module: nn.Module) -> float | None:
    for attr in ("variance_epsilon", "eps", "epsilon"):
        v = getattr(module, attr, None)
        if isinstance(v, float):
            return v
    return None


_SWAPPED: dict[type, type] = {}


def _fused_class(cls: type) -> type:
    """A subclass of the norm's own class (same name, so isinstance checks, ``_init_weights`` and printing see the
    original) whose forward is :func:`rms_norm`; one per class, so ``deepcopy`` keeps it. (Pickling a whole model
    object is not supported: the runtime's routers are generated classes too; ``save_pretrained`` is the way.)"""
    if cls not in _SWAPPED:

        def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
            return rms_norm(hidden_states, self.weight, _eps_of(self))

        _SWAPPED[cls] = type(cls.__name__, (cls,), {"forward": forward, "__module__": cls.__module__,
                                                     "moe_adapters_fused_rms_norm": True})
    return _SWAPPED[cls]


def matches_rms_norm(module: nn.Module) -> bool:
    """True when ``module(x)`` is bitwise :func:`rms_norm_forward_math` on probe inputs, for a copy of the module with
    random weights in fp32 and in bf16 (a model may be cast after loading, and some formulas agree in fp32 only, e.g.
    gpt-oss's and Nemotron-H's ``(w * x).to(dtype)``), so swapping its forward changes no output. A norm with other
    parameters, buffers or children, another formula, or a forward that needs more arguments, is not one."""
    w = getattr(module, "weight", None)
    eps = _eps_of(module)
    if (not isinstance(w, nn.Parameter) or w.dim() != 1 or w.is_meta or eps is None or list(module.children())
            or len(list(module.parameters())) != 1 or list(module.buffers())):
        return False
    g = torch.Generator(device="cpu").manual_seed(0)
    try:
        with torch.no_grad():
            for dtype in (torch.float32, torch.bfloat16):
                probe = copy.deepcopy(module).to(dtype)  # with weights that tell formulas apart (not all ones)
                probe.weight.copy_(1 + torch.randn(w.shape[0], generator=g).to(device=w.device, dtype=dtype))
                for scale in (1.0, 37.0, 0.01):
                    x = (torch.randn(3, 2, w.shape[0], generator=g) * scale).to(device=w.device, dtype=dtype)
                    got = probe(x)
                    want = rms_norm_forward_math(x, probe.weight, eps)[0]
                    if got.dtype != want.dtype or got.shape != want.shape or not torch.equal(got, want):
                        return False
    except Exception:  # noqa: BLE001 - a norm that does not take (x) alone is simply not this formula
        return False
    return True


def use_fused_rms_norms(model: nn.Module) -> list[str]:
    """Swap, in place, every RMSNorm of ``model`` whose forward is v5's standard formula (see
    :func:`matches_rms_norm`) for the memory-lean one. Returns the swapped modules' names."""
    swapped = []
    for name, module in model.named_modules():
        if getattr(module, "moe_adapters_fused_rms_norm", False) or "norm" not in type(module).__name__.lower():
            continue
        if matches_rms_norm(module):
            module.__class__ = _fused_class(type(module))
            swapped.append(name)
    return swapped

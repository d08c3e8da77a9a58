"""Causal-LM loss straight from the last hidden states, a chunk of tokens at a time: no ``[tokens, vocab]`` logits.

v5 computes ``logits = lm_head(h)`` for every token, upcasts them to fp32 and runs cross-entropy: for Qwen3-30B-A3B
(vocab 151,936) at 8,192 tokens that is 2.5 GB of bf16 logits, 5 GB of fp32 logits, 5 GB of log-softmax kept for
backward and as much again for its gradient, all alive at the moment the step's activations peak.
:func:`linear_cross_entropy` computes, ``chunk`` tokens at a time, the same bf16 logits, their fp32 log-sum-exp and
the loss, and (when a gradient is wanted) the gradients of ``h`` and of the head's weight right away, so nothing of
size ``tokens x vocab`` outlives its chunk. The backward only scales them by the incoming gradient.

:func:`use_fused_cross_entropy` makes a v5 causal LM use it whenever it is called with ``labels=`` while autograd is
on and some parameter requires a gradient: the output head returns the hidden states untouched, and the model's
``loss_function`` (v5's ``ForCausalLMLoss`` arguments: ``labels``, ``num_items_in_batch``, ``ignore_index``,
``shift_labels``) computes the loss from them. The output's ``logits`` is then left out (``None``; dropped from the
tuple with ``return_dict=False``). Under ``torch.autocast`` the head's GEMMs run in the autocast dtype, as the head
would. A model that changes its logits between the head and the loss (soft-capping, scaling; an upcast is fine) is
detected at the first such call and refused with an error.
"""

from __future__ import annotations

import threading
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .compiled import compiled, use_compiled

CHUNK_ELEMENTS = 1 << 27  # logits per chunk: 256 MiB in bf16 (and 512 MiB of fp32 where they are upcast: CPU)


def _chunk_rows(vocab: int, chunk: int | None) -> int:
    return max(1, chunk if chunk is not None else CHUNK_ELEMENTS // max(vocab, 1))


def cross_entropy_chunk_math(logits: torch.Tensor, target: torch.Tensor, ignore_index: int, scale: torch.Tensor,
                             with_grad: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """For one chunk of logits ``[C, V]`` (the head's dtype): the summed cross-entropy of its valid rows (fp32, as
    v5's upcast logits give) and, ``with_grad``, ``(softmax - onehot) * scale`` for valid rows, rounded once to the
    logits' dtype. On CUDA this is compiled: one pass for the log-sum-exp, one for the gradient, no fp32 copy."""
    x = logits.float()
    valid = target != ignore_index
    safe = torch.where(valid, target, 0)
    lse = torch.logsumexp(x, dim=-1)
    picked = x.gather(1, safe.unsqueeze(1)).squeeze(1)
    loss = torch.where(valid, lse - picked, 0.0).sum()
    if not with_grad:
        return loss, None
    onehot = torch.arange(x.shape[1], device=x.device).unsqueeze(0) == safe.unsqueeze(1)
    factor = torch.where(valid, scale, 0.0)  # not valid * scale: 0 * inf is NaN when every target is ignored
    grad = (torch.exp(x - lse.unsqueeze(1)) - onehot.float()) * factor.unsqueeze(1)
    return loss, grad.to(logits.dtype)


_ADDMM_OUT_DTYPE = [True]  # torch.addmm(..., out_dtype=float32) into an fp32 accumulator, until it fails once


def _addmm_fp32_(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """``acc += a @ b`` for an fp32 ``acc`` and bf16/fp16 ``a``, ``b``: in the GEMM itself where torch offers an fp32
    output for them (CUDA), else a GEMM and an add."""
    if a.is_cuda and a.dtype != acc.dtype and _ADDMM_OUT_DTYPE[0]:
        try:
            torch.addmm(acc, a, b, out_dtype=acc.dtype, out=acc)
            return
        except (TypeError, RuntimeError, NotImplementedError):
            _ADDMM_OUT_DTYPE[0] = False
    acc.add_(torch.mm(a, b))


class LinearCrossEntropy(torch.autograd.Function):
    """``sum over valid rows of cross_entropy(F.linear(h, W).float(), target) / denom``, gradients computed in
    forward: already divided by ``denom`` in fp32 before they are rounded to the inputs' dtypes, so that the usual
    incoming gradient (1) leaves them as they are."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx, h: torch.Tensor, weight: torch.Tensor, target: torch.Tensor, ignore_index: int, chunk: int,
        denom: torch.Tensor,
    ) -> torch.Tensor:
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        with_grad = need_h or need_w
        step = compiled(cross_entropy_chunk_math) if use_compiled(h) else cross_entropy_chunk_math
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        scale = 1.0 / denom.to(device=h.device, dtype=torch.float32)
        d_h = torch.empty_like(h) if need_h else None
        d_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        for s in range(0, h.shape[0], chunk):
            hc = h[s:s + chunk]
            loss, grad = step(F.linear(hc, weight), target[s:s + chunk], ignore_index, scale, with_grad)
            total += loss
            if need_h:
                torch.mm(grad, weight, out=d_h[s:s + chunk])
            if need_w:
                _addmm_fp32_(d_w, grad.t(), hc)  # summed over chunks in fp32
            del grad
        ctx.save_for_backward(d_h, d_w.to(weight.dtype) if need_w else None)
        return total * scale

    @staticmethod
    def backward(ctx, d_loss: torch.Tensor):  # type: ignore[override]
        d_h, d_w = ctx.saved_tensors
        scale = float(d_loss)  # a Python float: the kernels multiply in fp32, the factor itself is not rounded
        if scale != 1.0:  # e.g. a loss divided by gradient-accumulation steps: one more rounding
            d_h = d_h * scale if d_h is not None else None
            d_w = d_w * scale if d_w is not None else None
        return d_h, d_w, None, None, None, None


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    ignore_index: int = -100,
    num_items_in_batch: int | torch.Tensor | None = None,
    chunk: int | None = None,
) -> torch.Tensor:
    """Cross-entropy of ``F.linear(hidden, weight)`` against ``target`` (``[..., H]`` and ``[...]``), reduced as v5's
    ``fixed_cross_entropy``: the mean over non-ignored targets (NaN when all are ignored, as torch's), or the sum
    divided by ``num_items_in_batch``."""
    h = hidden.reshape(-1, hidden.shape[-1])
    t = target.reshape(-1).to(h.device)
    if h.shape[0] != t.shape[0]:
        raise ValueError(f"{h.shape[0]} hidden rows but {t.shape[0]} targets")
    if num_items_in_batch is None:
        denom = (t != ignore_index).sum()
    else:
        denom = torch.as_tensor(num_items_in_batch, device=h.device)
    rows = _chunk_rows(weight.shape[0], chunk)
    dev = h.device.type
    if torch.is_autocast_enabled(dev):  # as autocast would run the head: both in its dtype (the casts' backward
        dtype = torch.get_autocast_dtype(dev)  # returns the gradients in the inputs' own dtypes)
        with torch.autocast(dev, enabled=False):
            return LinearCrossEntropy.apply(h.to(dtype), weight.to(dtype), t, ignore_index, rows, denom)
    return LinearCrossEntropy.apply(h, weight, t, ignore_index, rows, denom)


class _HiddenAsLogits(torch.Tensor):
    """What the head returns while the loss is deferred: its input, marked, and the head it skipped. A change of
    dtype or device keeps the mark (Nemotron-H upcasts its logits with ``.float()``); any other operation gives a
    plain tensor, so a model that transforms its logits hands the loss something unmarked."""

    head: nn.Module

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):  # type: ignore[override]
        with torch._C.DisableTorchFunctionSubclass():
            out = func(*args, **(kwargs or {}))
        src = args[0] if args else None
        if (func in _KEEPS_MARK and isinstance(src, _HiddenAsLogits) and isinstance(out, torch.Tensor)
                and out.shape == src.shape):
            return _mark(out, src.head)
        return out


_KEEPS_MARK = (torch.Tensor.float, torch.Tensor.half, torch.Tensor.bfloat16, torch.Tensor.double, torch.Tensor.to,
               torch.Tensor.type_as, torch.Tensor.cuda, torch.Tensor.cpu)


def _mark(hidden: torch.Tensor, head: nn.Module) -> torch.Tensor:
    marked = hidden.as_subclass(_HiddenAsLogits)
    marked.head = head
    return marked


class _DeferredHead:
    """The output head's forward during a labelled forward: returns its input (marked) instead of logits."""

    def __init__(self, head: nn.Module) -> None:
        self.head = head

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        return _mark(hidden, self.head)


_ACTIVE = threading.local()  # the heads deferred by forwards now running in this thread


def _deferred_heads() -> list:
    if not hasattr(_ACTIVE, "heads"):
        _ACTIVE.heads = []
    return _ACTIVE.heads


def fused_causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor, vocab_size: int,
                         num_items_in_batch: Any = None, ignore_index: int = -100,
                         shift_labels: torch.Tensor | None = None, **kwargs: Any) -> torch.Tensor:
    """v5's ``ForCausalLMLoss`` (same arguments), computed by :func:`linear_cross_entropy` when ``logits`` is the
    head's deferred output; real logits (a forward that did not defer its head) go to v5's own function."""
    from transformers.loss.loss_utils import ForCausalLMLoss  # noqa: PLC0415

    if not isinstance(logits, _HiddenAsLogits):
        if _deferred_heads():  # the head's marked output was transformed on its way here
            raise RuntimeError(
                "fused cross-entropy: this model changes its logits between the output head and the loss "
                "(soft-capping or scaling); load it with fused_cross_entropy=False"
            )
        return ForCausalLMLoss(logits, labels, vocab_size, num_items_in_batch=num_items_in_batch,
                               ignore_index=ignore_index, shift_labels=shift_labels, **kwargs)
    if shift_labels is None:  # as v5's ForCausalLMLoss: tokens < n predict n
        shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    weight = logits.head.weight
    hidden = logits.as_subclass(torch.Tensor)
    if not torch.is_autocast_enabled(hidden.device.type):
        hidden = hidden.to(weight.dtype)  # undo an upcast made on the way (the head would have run in its dtype)
    return linear_cross_entropy(hidden, weight, shift_labels, ignore_index, num_items_in_batch)


def _wants_grad(model: nn.Module) -> bool:
    return torch.is_grad_enabled() and any(p.requires_grad for p in model.parameters())


def _before_forward(model: nn.Module, args: tuple, kwargs: dict) -> None:
    if kwargs.get("labels") is not None and _wants_grad(model):
        head = model.get_output_embeddings()
        head.forward = _DeferredHead(head)
        _deferred_heads().append(head)


def _after_forward(model: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
    head = model.get_output_embeddings()
    if not isinstance(head.__dict__.get("forward"), _DeferredHead):
        return output
    del head.forward
    heads = _deferred_heads()
    if head in heads:
        heads.remove(head)
    if isinstance(output, tuple):  # return_dict=False: the hidden states are not logits; left out, as a None is
        return tuple(x for x in output if not isinstance(x, _HiddenAsLogits))
    if isinstance(getattr(output, "logits", None), _HiddenAsLogits):
        return type(output)(**{k: v for k, v in output.items() if k != "logits"})
    return output


def use_fused_cross_entropy(model: nn.Module) -> None:
    """Make ``model(..., labels=...)`` compute its loss with :func:`linear_cross_entropy` (see the module docstring).
    The model must be a v5 causal LM whose output head is a bias-free ``nn.Linear`` and whose loss is v5's causal-LM
    loss."""
    from transformers.loss.loss_utils import LOSS_MAPPING  # noqa: PLC0415

    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not isinstance(head, nn.Linear) or head.bias is not None:
        raise ValueError(f"fused cross-entropy needs a bias-free nn.Linear output head; {type(model).__name__} has "
                         f"{type(head).__name__ if head is not None else 'none'}")
    current = model.loss_function
    if current is fused_causal_lm_loss:
        return
    if current is not LOSS_MAPPING["ForCausalLM"]:
        raise ValueError(f"fused cross-entropy replaces v5's causal-LM loss; {type(model).__name__} uses "
                         f"{getattr(current, '__name__', current)!r}")
    model.loss_function = fused_causal_lm_loss
    model.register_forward_pre_hook(_before_forward, with_kwargs=True)
    model.register_forward_hook(_after_forward, with_kwargs=True, always_call=True)

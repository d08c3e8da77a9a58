#!/usr/bin/env python3
"""The dense pieces ours replaces, on one GPU, forward + backward, against transformers v5's own:

* the causal-LM loss of Qwen3-30B-A3B's output head (hidden 2048, vocab 151,936, bf16): v5's ``lm_head`` then
  ``ForCausalLMLoss`` (full logits, fp32 upcast, log-softmax) against ours
  (:func:`moe_adapters.runtime.loss.linear_cross_entropy`: chunks of tokens, gradients computed in forward);
* RMSNorm over the residual stream ``[tokens, 2048]`` and per head ``[tokens, 32, 128]`` (Qwen3's q_norm): v5's
  ``Qwen3MoeRMSNorm`` against :func:`moe_adapters.runtime.norms.rms_norm` (one compiled kernel each way).

    python3 benchmarks/gpu_norm_loss.py [--tokens 4096,8192,16384] [--out PREFIX]

Per token count: median milliseconds of fwd+bwd over ``--iters`` after warmup, and the peak memory above what the
inputs and weights already use (``max_memory_allocated`` after a reset); for the loss, both losses (same inputs) and
the largest relative difference of the gradients, as a check that the two compute the same thing.
"""

from __future__ import annotations

import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from benchmarks.cuda_timing import parse_args, timed  # noqa: E402

H, V = 2048, 151936


def run(impl: str, h: torch.Tensor, w: torch.Tensor, labels: torch.Tensor):
    from transformers.loss.loss_utils import ForCausalLMLoss

    from moe_adapters.runtime.loss import linear_cross_entropy

    hh, ww = h.detach().requires_grad_(), w.detach().requires_grad_()
    if impl == "v5":
        loss = ForCausalLMLoss(F.linear(hh, ww), labels, V)
    else:
        loss = linear_cross_entropy(hh, ww, F.pad(labels, (0, 1), value=-100)[..., 1:])
    loss.backward()
    return loss.detach(), hh.grad, ww.grad


def measure(impl: str, tokens: int, iters: int) -> dict:
    dev = torch.device("cuda")
    g = torch.Generator(dev).manual_seed(0)
    h = torch.randn(1, tokens, H, device=dev, generator=g).to(torch.bfloat16)
    w = (torch.randn(V, H, device=dev, generator=g) * 0.02).to(torch.bfloat16)
    labels = torch.randint(0, V, (1, tokens), device=dev, generator=g)
    ms, peak, out = timed(lambda: run(impl, h, w, labels), iters)
    return {"impl": impl, "tokens": tokens, "ms": ms, "peak_gib": peak,
            "loss": float(out[0]), "grads": (out[1].float().cpu(), out[2].float().cpu())}


def measure_norm(impl: str, shape: tuple[int, ...], iters: int) -> dict:
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeRMSNorm

    from moe_adapters.runtime.norms import rms_norm

    dev = torch.device("cuda")
    norm = Qwen3MoeRMSNorm(shape[-1]).to(dev, torch.bfloat16)
    x = torch.randn(*shape, device=dev).to(torch.bfloat16).requires_grad_()
    d = torch.randn(*shape, device=dev).to(torch.bfloat16)

    def step():
        y = norm(x) if impl == "v5" else rms_norm(x, norm.weight, norm.variance_epsilon)
        return torch.autograd.grad(y, (x, norm.weight), d)

    ms, peak, _ = timed(step, iters)
    return {"impl": impl, "shape": list(shape), "ms": ms, "peak_gib": peak}


def main() -> int:
    args = parse_args(__doc__, "4096,8192,16384", 10)
    if args is None:
        return 1
    import transformers

    from moe_adapters.runtime import loss as loss_mod

    rows = []
    print(f"# Causal-LM loss, H {H}, vocab {V}, bf16, fwd+bwd ({torch.cuda.get_device_name()}, torch "
          f"{torch.__version__}, transformers {transformers.__version__})\n")
    print("| tokens | v5 ms | ours ms | speed-up | v5 peak GiB | ours peak GiB | loss v5 / ours | max rel grad diff |")
    print("|---:|---:|---:|---:|---:|---:|---|---:|")
    for t in (int(x) for x in args.tokens.split(",")):
        v5 = measure("v5", t, args.iters)
        ours = measure("ours", t, args.iters)
        diff = max(float((a - b).abs().max() / b.abs().max()) for a, b in zip(ours.pop("grads"), v5.pop("grads")))
        rows.append({"v5": v5, "ours": ours, "max_rel_grad_diff": diff})
        print(f"| {t} | {v5['ms']:.2f} | {ours['ms']:.2f} | {v5['ms'] / ours['ms']:.2f}x | {v5['peak_gib']:.2f} | "
              f"{ours['peak_gib']:.2f} | {v5['loss']:.5f} / {ours['loss']:.5f} | {diff:.1e} |", flush=True)
    print(f"\nfp32 gradient accumulation in the GEMM (addmm out_dtype): {loss_mod._ADDMM_OUT_DTYPE[0]}\n")
    print("| RMSNorm input | v5 ms | ours ms | speed-up | v5 peak GiB | ours peak GiB |")
    print("|---|---:|---:|---:|---:|---:|")
    norms = []
    for t in (int(x) for x in args.tokens.split(",")):
        for shape in ((t, 2048), (t, 32, 128)):
            v5, ours = measure_norm("v5", shape, args.iters), measure_norm("ours", shape, args.iters)
            norms.append({"v5": v5, "ours": ours})
            print(f"| {list(shape)} | {v5['ms']:.3f} | {ours['ms']:.3f} | {v5['ms'] / ours['ms']:.2f}x | "
                  f"{v5['peak_gib']:.3f} | {ours['peak_gib']:.3f} |", flush=True)
    if args.out:
        with open(args.out + ".json", "w") as f:
            json.dump({"torch": torch.__version__, "transformers": transformers.__version__,
                       "gpu": torch.cuda.get_device_name(), "addmm_out_dtype": loss_mod._ADDMM_OUT_DTYPE[0],
                       "loss": rows, "rms_norm": norms}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Where the activation memory of a training step goes: bytes kept for backward per token, by module, for one
Qwen3-30B-A3B decoder layer at its real widths (CPU, bf16), in transformers v5 and in ours with and without the
memory-lean pieces (``fused_rms_norm``, ``fused_cross_entropy``).

Counted with ``torch.autograd.graph.saved_tensors_hooks``: every distinct storage autograd keeps, attributed to the
innermost module running when it was saved; parameters are not counted. The layer rows use a 1,024-word vocabulary
(the head is measured apart); the head rows use the real 151,936 words, where v5's fp32 log-softmax dominates.

    PYTHONPATH=. python benchmarks/activation_memory.py [--tokens 512] [--head-tokens 2048]
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from benchmarks.gpu_train import hf_config, load_config_dict  # noqa: E402


def saved_by_module(model: torch.nn.Module, run) -> collections.Counter:
    """{module name: bytes} kept for backward while ``run()`` executes."""
    stack = [""]
    hooks = []
    for name, mod in model.named_modules():
        hooks.append(mod.register_forward_pre_hook(lambda m, a, name=name: stack.append(name)))
        hooks.append(mod.register_forward_hook(lambda m, a, o: (stack.pop(), None)[1]))
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: set[int] = set()
    per: collections.Counter = collections.Counter()

    def pack(t: torch.Tensor) -> torch.Tensor:
        key = t.untyped_storage().data_ptr()
        if key not in params and key not in seen:
            seen.add(key)
            per[stack[-1]] += t.untyped_storage().nbytes()
        return t

    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            run()
    finally:
        for h in hooks:
            h.remove()
    return per


def _part(name: str) -> str:
    """A module name without its layer number: ``self_attn.q_norm``, ``mlp.experts``, ``lm_head``..."""
    parts = name.split(".")
    if "layers" in parts:
        parts = parts[parts.index("layers") + 2:]
    elif parts[0] == "model":
        parts = parts[1:]
    return ".".join(parts) or "(top level: loss)"


def layer_table(tokens: int) -> list[tuple[str, dict[str, float]]]:
    import transformers

    import moe_adapters

    cfg = load_config_dict(None, 1)
    cfg["vocab_size"] = 1024
    ids = torch.randint(0, 1024, (1, tokens), generator=torch.Generator().manual_seed(0))
    with tempfile.TemporaryDirectory() as path:
        with torch.device("meta"):
            model = transformers.AutoModelForCausalLM.from_config(hf_config(cfg), dtype=torch.bfloat16)
        model.to_empty(device="cpu")
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.copy_(torch.ones_like(p) if n.endswith("norm.weight") else torch.randn(p.shape, generator=g) * 0.02)
        model.save_pretrained(path)
        del model
        setups = {
            "v5 (grouped_mm)": lambda: transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16),
            "ours, plain norms": lambda: moe_adapters.AutoModelForCausalLM.from_pretrained(
                path, dtype=torch.bfloat16, device="cpu", fused_rms_norm=False),
            "ours (default)": lambda: moe_adapters.AutoModelForCausalLM.from_pretrained(
                path, dtype=torch.bfloat16, device="cpu"),
        }
        rows = []
        for label, load in setups.items():
            model = load().train()
            per = saved_by_module(model, lambda: model(input_ids=ids, labels=ids))
            parts: dict[str, float] = collections.defaultdict(float)
            for name, b in per.items():
                if ".layers." in f".{name}.":
                    parts[_part(name)] += b / tokens / 1024
            rows.append((label, dict(parts)))
            del model
    return rows


def head_table(tokens: int) -> list[tuple[str, float]]:
    """MiB kept by the output head and loss at the real vocabulary (hidden 2048, vocab 151,936). v5 keeps the fp32
    log-softmax (grows with tokens); ours keeps the gradients it computed in forward: ``[V, H]`` for the head's weight
    (fixed) and ``[tokens, H]``."""
    from transformers.loss.loss_utils import ForCausalLMLoss

    from moe_adapters.runtime.loss import linear_cross_entropy

    H, V = 2048, 151936
    head = torch.nn.Linear(H, V, bias=False, dtype=torch.bfloat16)
    h = torch.randn(1, tokens, H, dtype=torch.bfloat16, requires_grad=True)
    labels = torch.randint(0, V, (1, tokens))
    out = []
    for label, run in (
        ("v5: lm_head + ForCausalLMLoss", lambda: ForCausalLMLoss(head(h), labels, V)),
        ("ours: linear_cross_entropy", lambda: linear_cross_entropy(h, head.weight,
                                                                     F.pad(labels, (0, 1), value=-100)[..., 1:])),
    ):
        per = saved_by_module(head, run)
        out.append((label, sum(per.values()) / 2**20))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--head-tokens", type=int, default=2048)
    args = ap.parse_args()
    rows = layer_table(args.tokens)
    parts = sorted({p for _, d in rows for p in d}, key=lambda p: -max(d.get(p, 0) for _, d in rows))
    print(f"KiB kept for backward per token, one Qwen3-30B-A3B decoder layer ({args.tokens} tokens, bf16, CPU)\n")
    print("| part | " + " | ".join(label for label, _ in rows) + " |")
    print("|---|" + "---:|" * len(rows))
    for p in parts:
        print(f"| {p} | " + " | ".join(f"{d.get(p, 0):.1f}" for _, d in rows) + " |")
    print("| **layer total** | " + " | ".join(f"**{sum(d.values()):.1f}**" for _, d in rows) + " |")
    print(f"\nOutput head + loss at vocab 151,936, {args.head_tokens} tokens: MiB kept for backward")
    for label, mib in head_table(args.head_tokens):
        print(f"- {label}: {mib:,.0f}")


if __name__ == "__main__":
    main()

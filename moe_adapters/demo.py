"""The built-in example: a small Qwen3-MoE checkpoint written by transformers, converted HF -> fused EP=4 -> HF and
verified, with the figures a user wants to see (tensors, bytes, seconds, GB/s, peak RSS)."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import time
from typing import Any, Callable

from .convert import convert, peak_rss_bytes
from .verify import verify

DEMO_CONFIG = dict(
    hidden_size=512,
    intermediate_size=1024,
    moe_intermediate_size=256,
    num_experts=32,
    num_experts_per_tok=4,
    num_hidden_layers=8,
    num_attention_heads=8,
    num_key_value_heads=2,
    head_dim=64,
    vocab_size=8192,
    norm_topk_prob=True,
)


def build_checkpoint(path: str, max_shard_size: str = "40MB") -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    torch.manual_seed(0)
    cfg = AutoConfig.for_model("qwen3_moe", **DEMO_CONFIG)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    model.save_pretrained(path, max_shard_size=max_shard_size)


def _file_hashes(folder: str) -> dict[str, str]:
    out = {}
    for name in sorted(os.listdir(folder)):
        if name.endswith((".safetensors", ".json")) and not name.startswith("."):  # not the provenance record
            with open(os.path.join(folder, name), "rb") as f:
                out[name] = hashlib.file_digest(f, "sha256").hexdigest()
    return out


def run_demo(workdir: str | None = None, reporter=None, say: Callable[[str], None] = print) -> dict[str, Any]:
    t0 = time.perf_counter()
    tmp = workdir or tempfile.mkdtemp(prefix="moe-adapters-demo-")
    try:
        hf, fused, back = (os.path.join(tmp, n) for n in ("hf", "fused-ep4", "hf-roundtrip"))
        for p in (fused, back):
            shutil.rmtree(p, ignore_errors=True)
        if not os.path.isdir(hf):
            say(f"building a Qwen3-MoE checkpoint with transformers in {hf} ...")
            build_checkpoint(hf)
        say("converting HF -> fused EP=4 ...")
        a = convert(hf, fused, ep=4, reporter=reporter)
        say("converting fused EP=4 -> HF ...")
        b = convert(fused, back, reporter=reporter)
        say("verifying ...")
        v = verify(hf, fused, reporter=reporter)
        identical_files = _file_hashes(hf) == _file_hashes(back)
        return {
            "model": f"qwen3_moe, {DEMO_CONFIG['num_hidden_layers']} layers x {DEMO_CONFIG['num_experts']} experts, bf16",
            "workdir": tmp if workdir else None,
            "tensors": v.tensors,
            "bytes": a.bytes_written,
            "to_fused_s": a.seconds,
            "to_fused_gbps": a.gbps,
            "to_hf_s": b.seconds,
            "to_hf_gbps": b.gbps,
            "verify": "identical" if v.identical else "DIFFERENT",
            "verify_s": v.seconds,
            "files_identical": identical_files,
            "peak_rss": peak_rss_bytes(),
            "seconds": time.perf_counter() - t0,
        }
    finally:
        if workdir is None:
            shutil.rmtree(tmp, ignore_errors=True)

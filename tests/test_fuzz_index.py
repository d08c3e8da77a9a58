"""Fuzz the folder reader: random mutations of a checkpoint's JSON files (the index, config.json, the fused manifest),
then the whole `convert` into a sandbox.

For every input, conversion must either succeed or raise one of our typed errors (MoeAdaptersError) with a
one-line printable message; finish quickly; allocate little (tracemalloc); and never create anything outside DST:
mutations include names such as `../../canary.safetensors` and absolute paths into the fuzz folder, and the
canaries must never appear. SRC is restored after each example and checked unchanged at the end.
"""

from __future__ import annotations

import json
import os
import shutil
import tracemalloc

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moe_adapters.convert import convert
from moe_adapters.errors import MoeAdaptersError
from test_reliability import leftovers, tree_state

FUZZ = settings(max_examples=int(os.environ.get("MOE_FUZZ_EXAMPLES", 80)), deadline=5000, suppress_health_check=list(HealthCheck))


@pytest.fixture(scope="module")
def sandbox(hf_checkpoint, tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("fuzz-index")
    out = {"root": str(root)}
    for name, src in (("hf", hf_checkpoint("mixtral")), ("qwen", hf_checkpoint("qwen3_moe"))):
        shutil.copytree(src, root / name / "src")
        out[name] = str(root / name / "src")
    convert(hf_checkpoint("mixtral"), str(root / "fused" / "src"), ep=2, max_shard_bytes=8000)
    out["fused"] = str(root / "fused" / "src")
    return out


def hostile(root: str) -> st.SearchStrategy:
    canary = os.path.join(root, "abs-canary.safetensors")
    return st.sampled_from([
        "../canary.safetensors", "../../canary.safetensors", "a/../../canary.safetensors", canary,
        "model.safetensors.index.json", "config.json", "moe_adapters.json", ".", "", "/", "a\x00b.safetensors",
        "../canary.safetensors.index.json", "\\..\\canary.safetensors", "x" * 5000, "\ud800.safetensors",
    ])


def values(root: str) -> st.SearchStrategy:
    scalars = (st.none() | st.booleans() | st.integers(-(2**64), 2**64) | st.sampled_from([0, 1, -1, 3, 16, 10**12])
               | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=10) | hostile(root))
    return st.recursive(scalars, lambda inner: st.lists(inner, max_size=5) | st.dictionaries(
        st.text(max_size=6) | hostile(root), inner, max_size=4), max_leaves=12)


def paths(obj, prefix=()):
    """Every (path, value) in a JSON document."""
    yield prefix, obj
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from paths(v, prefix + (i,))


def mutate(doc, draw, root: str):
    for _ in range(draw(st.integers(1, 3))):
        where = draw(st.sampled_from(list(paths(doc))))
        path, _ = where
        op = draw(st.sampled_from(["replace", "replace", "delete", "add"]))
        if not path:
            if op == "replace":
                doc = draw(values(root))
            continue
        parent = doc
        for k in path[:-1]:
            parent = parent[k]
        key = path[-1]
        if op == "replace":
            parent[key] = draw(values(root))
        elif op == "delete":
            del parent[key]
        elif isinstance(parent, dict):
            parent[draw(st.text(max_size=8) | hostile(root))] = draw(values(root))
        else:
            parent.insert(key, draw(values(root)))
    return doc


def encode(doc, draw) -> bytes:
    text = json.dumps(doc, allow_nan=True, ensure_ascii=draw(st.booleans()))
    raw = text.encode("utf-8", "surrogatepass")
    if draw(st.integers(0, 9)) == 0:  # blind damage too: truncation, a flipped byte
        pos = draw(st.integers(0, max(0, len(raw) - 1)))
        raw = raw[:pos] if draw(st.booleans()) else raw[:pos] + bytes([raw[pos] ^ 0x20]) + raw[pos + 1 :] if raw else raw
    return raw


TARGETS = [("hf", "model.safetensors.index.json"), ("hf", "config.json"), ("qwen", "config.json"),
           ("fused", "moe_adapters.json"), ("fused", "config.json")]


@pytest.mark.parametrize("base,target", TARGETS, ids=[f"{b}:{t}" for b, t in TARGETS])
@FUZZ
@given(data=st.data())
def test_mutated_json_never_escapes_or_crashes(base, target, sandbox, data):
    src = sandbox[base]
    path = os.path.join(src, target)
    original = open(path, "rb").read()
    doc = mutate(json.loads(original), data.draw, sandbox["root"])
    raw = encode(doc, data.draw)
    dst = os.path.join(os.path.dirname(src), "dst")
    ep = data.draw(st.sampled_from([None, 1, 2, 4]))
    to = data.draw(st.sampled_from([None, "fused", "hf"]))
    try:
        open(path, "wb").write(raw)
        tracemalloc.start()
        try:
            convert(src, dst, ep=ep if to != "hf" else None, to=to, workers=2)
        except MoeAdaptersError as e:
            assert str(e).isprintable() and len(str(e)) < 2000, str(e)
        finally:
            peak = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
        assert peak < 64 << 20, peak  # the conversion's own buffers (a few MB) plus headers; never what JSON claims
    finally:
        open(path, "wb").write(original)
        shutil.rmtree(dst, ignore_errors=True)
    parent = os.path.dirname(src)
    assert sorted(os.listdir(parent)) == ["src"] and not leftovers(parent)
    assert not [n for n in os.listdir(sandbox["root"]) if "canary" in n]


def test_sources_unchanged_after_fuzzing(sandbox, hf_checkpoint):
    """Runs after the fuzzing above (file order): every source restored, no canary anywhere above the sandbox."""
    assert tree_state(sandbox["hf"]) == tree_state(hf_checkpoint("mixtral"))
    assert not [n for n in os.listdir(os.path.dirname(sandbox["root"])) if "canary" in n]

"""`verify` misses nothing: any single flipped byte in any tensor, and any missing, extra, renamed or relabelled
tensor, on either side, in the HF and the fused layout."""

from __future__ import annotations

import hashlib
import json
import os
import shutil

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moe_adapters.checkpoint import open_checkpoint
from moe_adapters.convert import convert
from moe_adapters.layout import canonical_view
from moe_adapters.verify import verify
from test_reliability import edit_header, edit_tensors, one_error_line, run_cli

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def folders(hf_checkpoint, tmp_path_factory) -> dict[str, tuple[str, str]]:
    """name -> (pristine reference, a copy the tests damage and repair)."""
    root = tmp_path_factory.mktemp("verify")
    out = {}
    for name, src, ep in (("mixtral hf", hf_checkpoint("mixtral"), None), ("mixtral fused ep2", hf_checkpoint("mixtral"), 2),
                          ("deepseek fp8 fused ep4", hf_checkpoint("deepseek_v3", "fp8"), 4)):
        copy = str(root / name.replace(" ", "-"))
        if ep:
            convert(src, copy, ep=ep, max_shard_bytes=8000)
        else:
            shutil.copytree(src, copy)
        out[name] = (src, copy)
    return out


def owner_of(ckpt_path: str, path: str, pos: int) -> str:
    """The canonical tensor whose bytes include byte `pos` of file `path`."""
    view, _ = canonical_view(open_checkpoint(ckpt_path))
    hits = [n for n, t in view.items() for s in t.segments if s.source == path and s.start <= pos < s.stop]
    assert len(hits) == 1, hits  # the canonical view covers every data byte exactly once
    return hits[0]


@pytest.mark.parametrize("which", ["mixtral hf", "mixtral fused ep2", "deepseek fp8 fused ep4"])
@SETTINGS
@given(data=st.data())
def test_any_flipped_byte_in_any_tensor_is_found(which, folders, data):
    ref, copy = folders[which]
    ck = open_checkpoint(copy)
    rel = data.draw(st.sampled_from(sorted(ck.headers)), label="file")
    h = ck.headers[rel]
    pos = data.draw(st.integers(h.data_start, h.size - 1), label="byte")
    mask = data.draw(st.integers(1, 255), label="xor")
    with open(h.path, "r+b") as f:
        f.seek(pos)
        old = f.read(1)
        f.seek(pos)
        f.write(bytes([old[0] ^ mask]))
    try:
        r = verify(ref, copy, workers=2)
        assert not r.identical
        assert r.mismatched == [f"{owner_of(copy, h.path, pos)}: bytes differ"]
        assert r.checksum_failures == ([h.path] if ck.manifest else [])
        assert not r.only_in_a and not r.only_in_b
    finally:
        with open(h.path, "r+b") as f:
            f.seek(pos)
            f.write(old)
    assert verify(ref, copy, workers=2).identical


def _hf_copy(folders, tmp_path) -> tuple[str, str]:
    ref, _ = folders["mixtral hf"]
    copy = str(tmp_path / "copy")
    shutil.copytree(ref, copy)
    return ref, copy


def _wm(folder: str) -> dict[str, str]:
    return json.load(open(os.path.join(folder, "model.safetensors.index.json")))["weight_map"]


EXPERT = "model.layers.1.block_sparse_moe.experts.6.w2.weight"


def test_missing_extra_renamed_tensor_hf(folders, tmp_path):
    import torch

    ref, copy = _hf_copy(folders, tmp_path)
    rel = _wm(copy)[EXPERT]
    edit_tensors(copy, rel, lambda t: t.pop(EXPERT))
    r = verify(ref, copy)
    assert r.only_in_a == [EXPERT] and not r.only_in_b and not r.mismatched

    ref, copy = _hf_copy(folders, tmp_path / "extra")
    edit_tensors(copy, rel, lambda t: t.__setitem__("model.extra.weight", torch.zeros(4, dtype=torch.bfloat16)))
    r = verify(ref, copy)
    assert r.only_in_b == ["model.extra.weight"] and not r.only_in_a and not r.mismatched

    ref, copy = _hf_copy(folders, tmp_path / "renamed")
    renamed = EXPERT.replace("experts.6", "experts.9")
    edit_tensors(copy, rel, lambda t: t.__setitem__(renamed, t.pop(EXPERT)))
    r = verify(ref, copy)
    assert r.only_in_a == [EXPERT] and r.only_in_b == [renamed]
    code, err = run_cli("verify", ref, copy)
    assert code == 1 and EXPERT in err and renamed in err


@pytest.mark.parametrize("change", [{"dtype": "F16"}, {"shape": [16, 32]}])
def test_relabelled_tensor_with_the_same_bytes(change, folders, tmp_path):
    """Same bytes, other dtype or shape: still a different checkpoint."""
    ref, copy = _hf_copy(folders, tmp_path)
    edit_header(os.path.join(copy, _wm(copy)[EXPERT]), lambda h: h[EXPERT].update(change))
    r = verify(ref, copy)
    assert len(r.mismatched) == 1 and r.mismatched[0].startswith(EXPERT + ": BF16[32, 16] vs ")


def _fused_copy(folders, tmp_path) -> tuple[str, str]:
    ref, fused = folders["mixtral fused ep2"]
    copy = str(tmp_path / "fused")
    shutil.copytree(fused, copy)
    return ref, copy


def _reseal(folder: str) -> None:
    """Make the manifest agree with edited files again (sizes, sha256, tensor counts): a consistent fused folder that
    holds different weights, as a buggy tool or a deliberate edit would leave it."""
    from moe_adapters.safetensors_file import read_header

    p = os.path.join(folder, "moe_adapters.json")
    m = json.load(open(p))
    for f in m["files"]:
        fp = os.path.join(folder, f["name"])
        f.update(size=os.path.getsize(fp), sha256=hashlib.sha256(open(fp, "rb").read()).hexdigest(),
                 tensors=len(read_header(fp).tensors))
    json.dump(m, open(p, "w"))


def test_missing_extra_renamed_tensor_fused(folders, tmp_path):
    import torch

    ref, copy = _fused_copy(folders, tmp_path)
    ck = open_checkpoint(copy)
    rel = next(r for r, h in ck.headers.items() if any(e.name == "model.norm.weight" for e in h.tensors))
    edit_tensors(copy, rel, lambda t: t.__setitem__("model.norm2.weight", t.pop("model.norm.weight")))
    _reseal(copy)
    r = verify(ref, copy)
    assert r.only_in_a == ["model.norm.weight"] and r.only_in_b == ["model.norm2.weight"] and not r.checksum_failures

    ref, copy = _fused_copy(folders, tmp_path / "extra")
    edit_tensors(copy, rel, lambda t: t.__setitem__("model.extra.weight", torch.zeros(4, dtype=torch.bfloat16)))
    _reseal(copy)
    assert verify(ref, copy).only_in_b == ["model.extra.weight"]

    ref, copy = _fused_copy(folders, tmp_path / "missing")
    edit_tensors(copy, rel, lambda t: t.pop("model.norm.weight"))
    _reseal(copy)
    assert verify(ref, copy).only_in_a == ["model.norm.weight"]

    # a whole EP part of a fused expert parameter gone: the folder no longer describes a model; verify says so
    ref, copy = _fused_copy(folders, tmp_path / "part")
    ck = open_checkpoint(copy)
    rel, name = next((r, e.name) for r, h in ck.headers.items() if ck.file_ranks[r] == 1 for e in h.tensors)
    edit_tensors(copy, rel, lambda t: t.pop(name))
    _reseal(copy)
    code, err = run_cli("verify", ref, copy)
    assert code == 2 and "no part for EP rank(s) [1]" in one_error_line(err) and name in err


def test_a_changed_fused_file_fails_its_manifest_even_against_itself(folders, tmp_path):
    """Both sides the same damaged folder: the bytes agree, the manifest's sha256 does not."""
    _, copy = _fused_copy(folders, tmp_path)
    ck = open_checkpoint(copy)
    h = next(h for r, h in ck.headers.items() if ck.file_ranks[r] == 0)
    with open(h.path, "r+b") as f:
        f.seek(h.size - 1)
        b = f.read(1)
        f.seek(h.size - 1)
        f.write(bytes([b[0] ^ 1]))
    r = verify(copy, copy)
    assert not r.identical and r.checksum_failures == [h.path] and not r.mismatched
    code, err = run_cli("verify", copy, copy)
    assert code == 1 and "sha256 differs from its manifest" in err and os.path.basename(h.path) in err

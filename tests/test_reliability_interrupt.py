"""Interruption, full disks and races never leave a DST that looks complete but is not.

* SIGKILL at random moments of `moe-adapters convert` (a real subprocess, a ~220 MB checkpoint that takes about a
  second): afterwards DST is either absent or complete (every file matches the manifest's sha256), temporary folders
  are clearly named and at most one is left, and the next run removes it and succeeds.
* RLIMIT_FSIZE (the shell's `ulimit -f`) makes writes fail with EFBIG, as a full disk fails them with ENOSPC: one
  clear error, no DST, nothing left behind.
* Two conversions into one DST at once: one wins, the other says why and leaves the winner's DST alone.
"""

from __future__ import annotations

import json
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import time

import pytest

from moe_adapters.atomic import OLD_MARK, TMP_MARK, AtomicFolder, _HOST
from moe_adapters.checkpoint import open_checkpoint
from moe_adapters.convert import convert
from moe_adapters.errors import DestinationError
from moe_adapters.manifest import check_files, checksum_failures
from moe_adapters.verify import verify
from test_reliability import leftovers, one_error_line, tree_state

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KILLS = 24


def build_big(path: str) -> str:
    """The demo's Qwen3-MoE (8 layers x 32 experts, ~220 MB bf16), saved by transformers in 40 MB shards; weights
    are random bytes (no init: a meta-device model materialised empty, then filled), which is 2x faster to build."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    from moe_adapters.demo import DEMO_CONFIG

    hf_logging.disable_progress_bar()
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model("qwen3_moe", **DEMO_CONFIG), dtype=torch.bfloat16)
    model.to_empty(device="cpu")
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.view(torch.uint8).random_(0, 256, generator=gen)
    model.save_pretrained(path, max_shard_size="40MB")
    return path


@pytest.fixture(scope="module")
def big(tmp_path_factory) -> str:
    return build_big(str(tmp_path_factory.mktemp("big") / "hf"))


def cmd(src: str, dst: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "moe_adapters", "--quiet", "convert", src, dst, *extra]


def popen(args: list[str], **kw) -> subprocess.Popen:
    return subprocess.Popen(args, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, **kw)


def complete(dst: str) -> None:
    """DST is a finished fused folder: valid manifest, every file present with the recorded size and sha256."""
    ck = open_checkpoint(dst)
    assert ck.layout == "fused" and ck.ep_size == 4
    check_files(ck)
    assert checksum_failures(ck, 2) == []


def test_sigkill_at_random_points_never_leaves_a_partial_dst(big, tmp_path):
    src_state = tree_state(big)
    out = tmp_path / "out"  # DST's parent: nothing but DST and our clearly named folders may appear here
    out.mkdir()
    dst, ref_dir = str(out / "dst"), str(tmp_path / "ref")
    t0 = time.perf_counter()
    p = popen(cmd(big, ref_dir, "--ep", "4"))
    assert p.wait(timeout=120) == 0, p.stderr.read()
    full = time.perf_counter() - t0
    complete(ref_dir)
    ref = tree_state(ref_dir)

    rng = random.Random(7)
    outcomes = {"finished before the kill": 0, "killed while writing (temp folder left)": 0,
                "killed while starting, planning or after the rename": 0, "DST absent after": 0,
                "DST complete after": 0}
    for i in range(KILLS):
        # half the runs write a fresh DST, half replace a complete one (--overwrite: the two-rename path)
        shutil.rmtree(dst, ignore_errors=True)
        if i % 2:
            shutil.copytree(ref_dir, dst, copy_function=os.link)  # hard links: instant, and never written through
        earlier = set(leftovers(str(out)))
        p = popen(cmd(big, dst, "--ep", "4", "--overwrite"))
        time.sleep(rng.uniform(0.0, full * 1.3))
        finished = p.poll() is not None
        p.send_signal(signal.SIGKILL)
        p.wait(timeout=60)
        left = leftovers(str(out))
        tmp_left = [n for n in left if TMP_MARK in n]
        if finished:
            assert p.returncode == 0, p.stderr.read()
        new_tmp = [n for n in tmp_left if n not in earlier]
        key = ("finished before the kill" if finished else "killed while writing (temp folder left)" if new_tmp
               else "killed while starting, planning or after the rename")
        outcomes[key] += 1
        outcomes["DST complete after" if os.path.lexists(dst) else "DST absent after"] += 1
        # the invariant: DST absent or complete (every file identical to a run that finished, which passed
        # `complete`); an old DST moved aside is complete too; at most one temporary folder, clearly named
        if os.path.lexists(dst):
            assert tree_state(dst) == ref
        for n in left:
            assert n.startswith((".dst" + TMP_MARK, ".dst" + OLD_MARK, ".dst.moe_adapters.lock")), left
            if OLD_MARK in n:
                assert tree_state(str(out / n)) == ref
        assert len(tmp_left) <= 1, left
        assert set(os.listdir(out)) - set(left) <= {"dst"}

    # a rerun succeeds, removes what the killed runs left, and the result is the same weights as the source
    shutil.rmtree(dst, ignore_errors=True)
    p = popen(cmd(big, dst, "--ep", "4"))
    assert p.wait(timeout=120) == 0, p.stderr.read()
    assert leftovers(str(out)) == []
    assert tree_state(dst) == ref and verify(big, dst).identical
    assert tree_state(big) == src_state
    print(f"\n{KILLS} SIGKILLs, full run {full:.2f} s: {outcomes}")
    assert outcomes["killed while writing (temp folder left)"] >= 3, outcomes  # the kills did land mid-conversion


def _limit_fsize(limit: int):
    def pre() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # so write() fails with EFBIG instead of killing us
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return pre


@pytest.mark.parametrize("direction", ["to fused", "to hf"])
@pytest.mark.parametrize("where", ["first file", "last file"])
def test_file_size_limit_is_a_clean_error(direction, where, hf_checkpoint, tmp_path):
    src = hf_checkpoint("mixtral")
    if direction == "to hf":
        src = str(tmp_path / "fused")
        convert(hf_checkpoint("mixtral"), src, ep=2)
    good = str(tmp_path / "good")
    convert(src, good, ep=2 if direction == "to fused" else None)
    sizes = sorted(os.path.getsize(os.path.join(good, n)) for n in os.listdir(good))
    # "first file": nothing fits; "last file": all but the largest file(s) fit
    limit = 4096 if where == "first file" else sizes[-1] - 1
    before = tree_state(src)
    dst = str(tmp_path / "dst")
    p = subprocess.run(cmd(src, dst, *(["--ep", "2"] if direction == "to fused" else [])), cwd=ROOT,
                       capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL,
                       preexec_fn=_limit_fsize(limit))
    line = one_error_line(p.stderr)
    assert p.returncode == 2 and "File too large" in line and str(tmp_path) in line, line
    assert not os.path.lexists(dst) and leftovers(str(tmp_path)) == []
    assert tree_state(src) == before


def test_two_conversions_into_one_dst(big, tmp_path):
    dst = str(tmp_path / "dst")
    for _ in range(2):
        shutil.rmtree(dst, ignore_errors=True)
        ps = [popen(cmd(big, dst, "--ep", "4")) for _ in range(2)]
        results = [(p.wait(timeout=120), p.stderr.read()) for p in ps]
        codes = sorted(c for c, _ in results)
        assert codes == [0, 2], results
        loser = one_error_line(next(e for c, e in results if c == 2))
        assert dst in loser and any(
            s in loser for s in ("another conversion is writing", "already exists", "appeared while converting")
        ), loser
        complete(dst)
        assert leftovers(str(tmp_path)) == []


def test_a_held_lock_refuses_at_once(hf_checkpoint, tmp_path):
    dst = str(tmp_path / "dst")
    with AtomicFolder(dst):
        with pytest.raises(DestinationError, match="another conversion is writing this destination now"):
            convert(hf_checkpoint("mixtral"), dst)
    assert not os.path.lexists(dst)
    convert(hf_checkpoint("mixtral"), dst)  # and once released, it works
    assert leftovers(str(tmp_path)) == []


def _dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


def test_stale_temporary_folders_are_cleaned_only_when_stale(hf_checkpoint, tmp_path):
    dead = _dead_pid()
    stale = tmp_path / f".dst{TMP_MARK}{_HOST}-{dead}-abcdef"
    other_host = tmp_path / f".dst{TMP_MARK}otherhost-{dead}-abcdef"  # a shared filesystem: not ours to judge
    alive = tmp_path / f".dst{TMP_MARK}{_HOST}-{os.getpid()}-abcdef"
    other_dst = tmp_path / f".other{TMP_MARK}{_HOST}-{dead}-abcdef"
    for d in (stale, other_host, alive, other_dst):
        d.mkdir()
        (d / "model-00001-of-00002.safetensors").write_bytes(b"partial")
    convert(hf_checkpoint("mixtral"), str(tmp_path / "dst"))
    assert not stale.exists() and other_host.exists() and alive.exists() and other_dst.exists()


def test_an_interrupted_overwrite_is_put_back(hf_checkpoint, tmp_path):
    """A kill between --overwrite's two renames leaves the old DST moved aside; the next run restores it."""
    src, dst = hf_checkpoint("mixtral"), str(tmp_path / "dst")
    convert(src, dst, ep=2)
    old = tree_state(dst)
    dead = _dead_pid()
    os.rename(dst, tmp_path / f".dst{OLD_MARK}{_HOST}-{dead}-abcdef")
    (tmp_path / f".dst{TMP_MARK}{_HOST}-{dead}-abcdef").mkdir()  # the new one, never renamed in
    with pytest.raises(DestinationError, match="already exists"):
        convert(src, dst, ep=4)  # without --overwrite: the old DST is back, and it is not replaced
    assert tree_state(dst) == old and leftovers(str(tmp_path)) == []
    convert(src, dst, ep=4, overwrite=True)
    assert json.load(open(os.path.join(dst, "moe_adapters.json")))["ep_size"] == 4
    assert leftovers(str(tmp_path)) == []

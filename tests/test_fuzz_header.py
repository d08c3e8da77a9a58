"""Fuzz the safetensors header reader (`read_header`, `parse_header`) with mutations of real headers.

Seeds are headers transformers wrote (Mixtral, DeepSeek FP8) and ones our engine wrote (fused). Mutations are both
blind (flip, overwrite, insert, delete, truncate bytes, rewrite the 8-byte length) and JSON-aware (replace a field or
a whole entry with a random JSON value, drop or add entries, repeat a key, pad differently). For every input the
reader must:

* return a header whose tensors tile the data blob exactly (so no later read can leave the file), or raise one of
  our typed errors (MoeAdaptersError) whose message is one printable line of bounded length; nothing else;
* finish quickly (hypothesis' deadline);
* allocate no more than the input justifies (tracemalloc peak bounded by a small multiple of the file size).
"""

from __future__ import annotations

import json
import os
import tempfile
import tracemalloc

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moe_adapters.convert import convert
from moe_adapters.converters import DTYPE_SIZES
from moe_adapters.errors import MoeAdaptersError
from moe_adapters.safetensors_file import SafetensorsHeader, parse_header, read_header

FUZZ = settings(max_examples=int(os.environ.get("MOE_FUZZ_EXAMPLES", 300)), deadline=2000, suppress_health_check=list(HealthCheck))


class Seeds(list):
    """The seed files; a short repr, so that a failing example does not print them all."""

    def __repr__(self) -> str:
        return f"<{len(self)} seed files>"


@pytest.fixture(scope="module")
def seeds(hf_checkpoint, tmp_path_factory) -> list[bytes]:
    """The first bytes of real files: header plus a little data (the data is never the interesting part)."""
    fused = str(tmp_path_factory.mktemp("fuzz") / "fused")
    convert(hf_checkpoint("mixtral"), fused, ep=2, max_shard_bytes=8000)
    out = Seeds()
    for folder in (hf_checkpoint("mixtral"), hf_checkpoint("deepseek_v3", "fp8"), fused):
        for n in sorted(os.listdir(folder))[:4]:
            if n.endswith(".safetensors"):
                out.append(open(os.path.join(folder, n), "rb").read())
    return out


def check(path: str, size: int, call) -> None:
    """Run the reader; assert the outcome is a valid header or a clean typed error, and memory stayed bounded."""
    tracemalloc.start()
    try:
        try:
            h = call()
        except MoeAdaptersError as e:
            msg = str(e)
            assert msg.isprintable() and "\n" not in msg, msg
            assert len(msg) < 1000 + len(path), len(msg)
            h = None
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < (1 << 20) + 64 * size, (peak, size)
    if h is not None:
        assert isinstance(h, SafetensorsHeader)
        pos = 0
        for e in h.tensors:  # sorted, contiguous, sized as dtype x shape says, inside the file
            assert e.begin == pos and e.dtype in DTYPE_SIZES
            n = DTYPE_SIZES[e.dtype]
            for d in e.shape:
                n *= d
            assert e.end - e.begin == n
            pos = e.end
        assert h.data_start + pos == h.size == size


def blind_mutation(data: bytes, draw) -> bytes:
    b = bytearray(data)
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "set", "insert", "delete", "truncate", "length"]))
        pos = draw(st.integers(0, max(0, len(b) - 1)))
        if op == "flip" and b:
            b[pos] ^= 1 << draw(st.integers(0, 7))
        elif op == "set" and b:
            b[pos] = draw(st.sampled_from(b'{}[]":,0123456789-eE.ntfu\\ \x00\xff'))
        elif op == "insert":
            b[pos:pos] = draw(st.binary(min_size=1, max_size=16))
        elif op == "delete":
            del b[pos : pos + draw(st.integers(1, 16))]
        elif op == "truncate":
            del b[pos:]
        elif op == "length" and len(b) >= 8:
            n = int.from_bytes(b[:8], "little")
            new = draw(st.one_of(st.integers(0, 2**64 - 1), st.integers(max(0, n - 64), min(n + 64, 2**64 - 1)),
                                 st.sampled_from([0, 1, 7, 8, 2**31, 2**32, 2**63, 2**64 - 1, 100 << 20, 300 << 20])))
            b[:8] = new.to_bytes(8, "little")
    return bytes(b)


JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12) | st.sampled_from(["BF16", "F32", "F8_E4M3", "F4", "", "__metadata__"]),
    lambda inner: st.lists(inner, max_size=6) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20,
)


def json_mutation(data: bytes, draw) -> tuple[bytes, int]:
    """A header edited as JSON, re-encoded, followed by the original data blob; and a file size to claim."""
    n = int.from_bytes(data[:8], "little")
    hdr = json.loads(data[8 : 8 + n])
    names = [k for k in hdr if k != "__metadata__"]
    for _ in range(draw(st.integers(1, 3))):
        op = draw(st.sampled_from(["field", "entry", "drop", "add", "metadata", "offsets"]))
        name = draw(st.sampled_from(names)) if names else None
        if op == "field" and name in hdr and isinstance(hdr[name], dict):
            hdr[name][draw(st.sampled_from(["dtype", "shape", "data_offsets", "extra"]))] = draw(JSON)
        elif op == "entry" and name:
            hdr[name] = draw(JSON)
        elif op == "drop" and name:
            hdr.pop(name, None)
        elif op == "add":
            hdr[draw(st.text(max_size=20))] = draw(JSON)
        elif op == "metadata":
            hdr["__metadata__"] = draw(JSON)
        elif op == "offsets" and name in hdr and isinstance(hdr[name], dict):
            a, b = draw(st.integers(-4, 2**40)), draw(st.integers(-4, 2**40))
            hdr[name]["data_offsets"] = [a, b]
            hdr[name]["shape"] = draw(st.lists(st.integers(0, 2**40), max_size=draw(st.sampled_from([3, 5000]))))
    text = json.dumps(hdr, allow_nan=True).encode()
    if draw(st.booleans()) and names:  # a key twice: JSON allows it, a header must not
        text = text[:-1] + b', "' + names[0].encode() + b'": {}}'
    text += b" " * draw(st.integers(0, 9))
    blob = data[8 + n :]
    size = 8 + len(text) + len(blob) + draw(st.sampled_from([0, 0, 0, -1, 1, -(2**20)]))
    return len(text).to_bytes(8, "little") + text + blob, size


@FUZZ
@given(data=st.data())
def test_read_header_blind_mutations(seeds, data):
    raw = blind_mutation(data.draw(st.sampled_from(seeds)), data.draw)
    with tempfile.NamedTemporaryFile(suffix=".safetensors") as f:
        f.write(raw)
        f.flush()
        check(f.name, len(raw), lambda: read_header(f.name))


@FUZZ
@given(data=st.data())
def test_parse_header_json_mutations(seeds, data):
    raw, size = json_mutation(data.draw(st.sampled_from(seeds)), data.draw)
    n = int.from_bytes(raw[:8], "little")
    check("fuzz.safetensors", max(size, 0), lambda: parse_header("fuzz.safetensors", raw[8 : 8 + n], size))
    if size == len(raw):  # the same bytes as a file, through the full reader
        with tempfile.NamedTemporaryFile(suffix=".safetensors") as f:
            f.write(raw)
            f.flush()
            check(f.name, len(raw), lambda: read_header(f.name))


@settings(max_examples=200, deadline=2000)
@given(st.binary(max_size=64))
def test_read_header_of_random_bytes(raw):
    with tempfile.NamedTemporaryFile(suffix=".safetensors") as f:
        f.write(raw)
        f.flush()
        check(f.name, len(raw), lambda: read_header(f.name))


def test_deep_nesting_and_huge_numbers_are_clean_errors(tmp_path):
    """Inputs that crash naive readers: JSON nested 100k deep (RecursionError), a 5000-digit integer (ValueError
    since Python 3.11), a shape of 10^5 dims of 2**40 (quadratic big-integer product without the early exit)."""
    for text in (b'{"a":' + b"[" * 100_000 + b"]" * 100_000 + b"}", b'{"a":{"dtype":"F32","shape":[' + b"9" * 5000 + b'],"data_offsets":[0,4]}}',
                 b'{"a":{"dtype":"F32","shape":[' + b",".join([b"1099511627776"] * 100_000) + b'],"data_offsets":[0,4]}}'):
        p = str(tmp_path / "x.safetensors")
        with open(p, "wb") as f:
            f.write(len(text).to_bytes(8, "little") + text + b"\0" * 4)
        check(p, os.path.getsize(p), lambda: read_header(p))

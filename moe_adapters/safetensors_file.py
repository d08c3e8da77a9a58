"""Read and validate the header of one safetensors file, without reading its data.

Validation follows the format's own rules (the `safetensors` library applies the same): the header is a JSON object
no larger than 100 MB, every tensor's byte count matches its dtype and shape, and the data offsets tile the data
blob exactly: sorted, starting at 0, no overlap, no gap, ending at the end of the file. Anything else is an error
that names the file, so no later step ever reads outside what a file justifies.
"""

from __future__ import annotations

import json
import os
import stat
import struct
from dataclasses import dataclass
from typing import Any

from .converters import DTYPE_SIZES, ByteTensor
from .errors import CheckpointError

MAX_HEADER_BYTES = 100 * 1024 * 1024


@dataclass(frozen=True)
class TensorEntry:
    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int  # relative to the data blob
    end: int


@dataclass(frozen=True)
class SafetensorsHeader:
    path: str
    size: int  # file size in bytes
    header_text: bytes  # the raw JSON header exactly as stored (with its padding): needed to rebuild files bitwise
    metadata: dict[str, str] | None
    tensors: tuple[TensorEntry, ...]  # in data order

    @property
    def data_start(self) -> int:
        return 8 + len(self.header_text)

    def ref(self, entry: TensorEntry) -> ByteTensor:
        return ByteTensor.contiguous(entry.dtype, entry.shape, self.path, self.data_start + entry.begin)


def _fail(path: str, msg: str, tensor: str | None = None) -> CheckpointError:
    return CheckpointError(msg, file=path, tensor=tensor)


def _short(value: object, limit: int = 80) -> str:
    """repr of a value from the file, cut short: a hostile header must not turn one error line into megabytes."""
    r = repr(value)
    return r if len(r) <= limit else r[: limit - 3] + "..."


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """object_pairs_hook: JSON allows a key twice (the last silently wins); a header or index must not."""
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise DuplicateKey(k)
        out[k] = v
    return out


class DuplicateKey(ValueError):
    """A JSON object with one key twice (`key`): refused rather than letting the last value win unseen."""

    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def load_json_strict(text: bytes) -> Any:
    """Parse JSON as UTF-8, refusing duplicate keys. Raises ValueError (incl. DuplicateKey) or RecursionError.

    `json.loads(bytes)` would also guess UTF-16/32; the safetensors format (and the Rust reader transformers uses)
    is UTF-8 only, so decode explicitly and accept nothing the real loader would not.
    """
    return json.loads(text.decode("utf-8"), object_pairs_hook=_unique_keys)


def _nbytes(shape: list[int], itemsize: int, limit: int) -> int | None:
    """Bytes a shape needs, or None once the count exceeds `limit`: a header of many large dims must not make us
    multiply ever-growing integers (quadratic time) when a few steps prove it too big for the file."""
    if 0 in shape:
        return 0
    n = itemsize
    for d in shape:
        n *= d
        if n > limit:
            return None
    return n


def parse_header(path: str, header_text: bytes, file_size: int) -> SafetensorsHeader:
    """Validate a header already read from `path` (split out so fuzz tests can drive it directly)."""
    if not header_text[:1] == b"{":
        raise _fail(path, "safetensors header does not start with '{'")
    try:
        obj = load_json_strict(header_text)
    except DuplicateKey as e:
        raise _fail(path, f"key {_short(e.key)} appears twice in the safetensors header") from None
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise _fail(path, f"safetensors header is not valid JSON ({type(e).__name__})") from None
    if not isinstance(obj, dict):
        raise _fail(path, "safetensors header is not a JSON object")
    metadata = obj.pop("__metadata__", None)
    if metadata is not None and (
        not isinstance(metadata, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items())
    ):
        raise _fail(path, "__metadata__ must map strings to strings")
    blob = file_size - 8 - len(header_text)
    if blob < 0:
        raise _fail(path, f"header of {len(header_text)} bytes does not fit in a file of {file_size} bytes")
    entries: list[TensorEntry] = []
    for name, info in obj.items():
        if not isinstance(info, dict):
            raise _fail(path, "tensor entry is not an object", name)
        dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if not isinstance(dtype, str) or dtype not in DTYPE_SIZES:
            raise _fail(path, f"unsupported dtype {_short(dtype)}", name)
        if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
            raise _fail(path, f"bad shape {_short(shape)}", name)
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(type(o) is int for o in offsets)
            or not 0 <= offsets[0] <= offsets[1]
        ):
            raise _fail(path, f"bad data_offsets {_short(offsets)}", name)
        if offsets[1] > blob:
            raise _fail(path, f"data_offsets {_short(offsets)} run past the end of the file (data is {blob} bytes)", name)
        nbytes = _nbytes(shape, DTYPE_SIZES[dtype], blob)
        if nbytes != offsets[1] - offsets[0]:
            need = "more than the file holds" if nbytes is None else f"{nbytes} bytes"
            raise _fail(
                path, f"{dtype}{_short(shape)} needs {need} but data_offsets {_short(offsets)} hold {offsets[1] - offsets[0]}", name
            )
        entries.append(TensorEntry(name, dtype, tuple(shape), offsets[0], offsets[1]))
    entries.sort(key=lambda e: (e.begin, e.end))
    pos = 0
    for e in entries:
        if e.begin < pos:
            raise _fail(path, f"data_offsets [{e.begin}, {e.end}] overlap the previous tensor", e.name)
        if e.begin > pos:
            raise _fail(path, f"{e.begin - pos} unreferenced bytes before this tensor", e.name)
        pos = e.end
    if pos != blob:
        raise _fail(path, f"tensors cover {pos} bytes but the data blob is {blob} bytes")
    return SafetensorsHeader(path, file_size, header_text, metadata, tuple(entries))


def open_regular(path: str) -> tuple[int, int]:
    """Open `path` read-only as (fd, size), refusing anything but a regular file.

    O_NONBLOCK keeps a FIFO planted in a checkpoint folder from hanging the open (it is then refused by the
    S_ISREG check); the size comes from the descriptor itself, so it describes the file we actually read.
    """
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise _fail(path, "not a regular file")
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd, st.st_size


def pread_exact(fd: int, n: int, offset: int) -> bytes:
    """Up to `n` bytes at `offset` (fewer only at end of file): one read may return less than asked."""
    parts, got = [], 0
    while got < n:
        b = os.pread(fd, n - got, offset + got)
        if not b:
            break
        parts.append(b)
        got += len(b)
    return b"".join(parts)


def read_header(path: str) -> SafetensorsHeader:
    """Read and validate the header of one safetensors file; never reads (or allocates) more than it justifies.

    The 8-byte length is checked against the 100 MB cap and the file size *before* anything is allocated, so a
    file that claims a header of hundreds of MB costs nothing.
    """
    try:
        fd, size = open_regular(path)
        try:
            head = pread_exact(fd, 8, 0)
            if len(head) < 8:
                raise _fail(path, f"truncated: {size} bytes is shorter than the 8-byte header length")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER_BYTES:
                raise _fail(path, f"header length {n} exceeds the {MAX_HEADER_BYTES}-byte limit")
            if n > size - 8:
                raise _fail(path, f"header length {n} is larger than the file ({size} bytes): truncated?")
            text = pread_exact(fd, n, 8)
        finally:
            os.close(fd)
    except OSError as e:
        raise _fail(path, f"cannot read: {e.strerror or e}") from None
    if len(text) != n:
        raise _fail(path, "truncated header (the file shrank while reading?)")
    return parse_header(path, text, size)


def encode_header(tensors: list[tuple[str, str, tuple[int, ...], int, int]], metadata: dict[str, str] | None) -> bytes:
    """A header for tensors (name, dtype, shape, begin, end), padded with spaces to 8 bytes like safetensors does."""
    obj: dict[str, object] = {}
    if metadata is not None:
        obj["__metadata__"] = metadata
    for name, dtype, shape, begin, end in tensors:
        obj[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [begin, end]}
    text = json.dumps(obj, separators=(",", ":")).encode()
    return text + b" " * (-len(text) % 8)

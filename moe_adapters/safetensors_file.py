"""Read and validate the header of one safetensors file, without reading its data.

Validation follows the format's own rules (the `safetensors` library applies the same): the header is a JSON object
no larger than 100 MB, every tensor's byte count matches its dtype and shape, and the data offsets tile the data
blob exactly: sorted, starting at 0, no overlap, no gap, ending at the end of the file. Anything else is an error
that names the file, so no later step ever reads outside what a file justifies.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from math import prod

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


def parse_header(path: str, header_text: bytes, file_size: int) -> SafetensorsHeader:
    """Validate a header already read from `path` (split out so fuzz tests can drive it directly)."""
    try:
        obj = json.loads(header_text)
    except (UnicodeDecodeError, ValueError) as e:
        raise _fail(path, f"safetensors header is not valid JSON ({type(e).__name__})") from None
    if not isinstance(obj, dict):
        raise _fail(path, "safetensors header is not a JSON object")
    metadata = obj.pop("__metadata__", None)
    if metadata is not None and (
        not isinstance(metadata, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items())
    ):
        raise _fail(path, "__metadata__ must map strings to strings")
    blob = file_size - 8 - len(header_text)
    entries: list[TensorEntry] = []
    for name, info in obj.items():
        if not isinstance(info, dict):
            raise _fail(path, "tensor entry is not an object", name)
        dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if dtype not in DTYPE_SIZES:
            raise _fail(path, f"unsupported dtype {dtype!r}", name)
        if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
            raise _fail(path, f"bad shape {shape!r}", name)
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(type(o) is int for o in offsets)
            or not 0 <= offsets[0] <= offsets[1]
        ):
            raise _fail(path, f"bad data_offsets {offsets!r}", name)
        nbytes = prod(shape) * DTYPE_SIZES[dtype]
        if offsets[1] - offsets[0] != nbytes:
            raise _fail(
                path, f"{dtype}{shape} needs {nbytes} bytes but data_offsets {offsets} hold {offsets[1] - offsets[0]}", name
            )
        if offsets[1] > blob:
            raise _fail(path, f"data_offsets {offsets} run past the end of the file (data is {blob} bytes)", name)
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


def read_header(path: str) -> SafetensorsHeader:
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise _fail(path, f"truncated: {size} bytes is shorter than the 8-byte header length")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER_BYTES:
                raise _fail(path, f"header length {n} exceeds the {MAX_HEADER_BYTES}-byte limit")
            if n > size - 8:
                raise _fail(path, f"header length {n} is larger than the file ({size} bytes): truncated?")
            text = f.read(n)
    except OSError as e:
        raise _fail(path, f"cannot read: {e.strerror or e}") from None
    if len(text) != n:
        raise _fail(path, "truncated header")
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

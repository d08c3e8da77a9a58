"""Output files as plans: a header plus the ordered byte ranges that fill each tensor. No data is read here."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from .converters import ByteTensor
from .errors import ModelError
from .safetensors_file import SafetensorsHeader, encode_header

DEFAULT_SHARD_BYTES = 5 * 1000**3
SAFETENSORS_METADATA = {"format": "pt"}


@dataclass
class OutFile:
    name: str  # relative to the output folder
    rank: int | None  # EP rank whose experts it holds (None: shared by all ranks)
    header: bytes
    parts: list[tuple[str, ByteTensor]]  # tensors in data order

    @property
    def size(self) -> int:
        return 8 + len(self.header) + sum(t.nbytes for _, t in self.parts)


def layout_file(name: str, rank: int | None, tensors: list[tuple[str, ByteTensor]]) -> OutFile:
    """A new safetensors file holding `tensors` back to back in the given order."""
    entries = []
    pos = 0
    for tname, t in tensors:
        entries.append((tname, t.dtype, t.shape, pos, pos + t.nbytes))
        pos += t.nbytes
    return OutFile(name, rank, encode_header(entries, SAFETENSORS_METADATA), list(tensors))


def shard(tensors: list[tuple[str, ByteTensor]], max_bytes: int) -> list[list[tuple[str, ByteTensor]]]:
    """Greedy split into groups of at most `max_bytes` (a larger single tensor gets a group of its own)."""
    groups: list[list[tuple[str, ByteTensor]]] = []
    size = 0
    for item in tensors:
        n = item[1].nbytes
        if not groups or (size + n > max_bytes and groups[-1]):
            groups.append([])
            size = 0
        groups[-1].append(item)
        size += n
    return groups


def rebuild_file(name: str, original: SafetensorsHeader | dict, resolve: Callable[[str], ByteTensor]) -> OutFile:
    """A file identical to a recorded original: its raw header, and each tensor's bytes found by `resolve`."""
    if isinstance(original, dict):
        from .safetensors_file import parse_header

        text = original["header"].encode()
        hdr = parse_header(name, text, int(original["size"]))
    else:
        hdr = original
    parts = []
    for e in hdr.tensors:
        t = resolve(e.name)
        if (t.dtype, t.shape) != (e.dtype, e.shape):
            raise ModelError(
                f"recorded as {e.dtype}{list(e.shape)} but the checkpoint holds {t.dtype}{list(t.shape)}",
                file=name,
                tensor=e.name,
            )
        parts.append((e.name, t))
    return OutFile(name, None, hdr.header_text, parts)

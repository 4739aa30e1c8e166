"""Canonical binary encoding of flat SecAgg message dicts.

Layout: magic ``PFSA\x01``, u32 field count, then per field (keys sorted): u16 key length,
key (UTF-8), one type tag and the value: ``i`` int64, ``f`` float64, ``s`` str and ``b`` bytes
(u32 length + data), ``I`` list of int64 (u32 count + items), ``B`` list of bytes (u32 count,
then u32 length + data per item). Equal dicts give equal bytes; decoding rejects truncated,
trailing or unknown data with ``ContractError``.
"""

from __future__ import annotations

import struct
from typing import Any

from shared.secagg.errors import ContractError

_MAGIC = b"PFSA\x01"


def dict_to_bytes(d: dict[str, Any]) -> bytes:
    """Canonical encoding of a flat dict (keys sorted) of int/float/str/bytes/lists."""
    out = [_MAGIC, struct.pack("<I", len(d))]
    for key in sorted(d):
        kb = key.encode()
        out.append(struct.pack("<H", len(kb)) + kb)
        out.append(_encode_value(d[key], key))
    return b"".join(out)


def _encode_value(v: Any, key: str) -> bytes:
    if isinstance(v, bool):
        raise ContractError(f"field {key!r}: bool is not a wire type")
    if isinstance(v, int):
        return b"i" + struct.pack("<q", v)
    if isinstance(v, float):
        return b"f" + struct.pack("<d", v)
    if isinstance(v, str):
        raw = v.encode()
        return b"s" + struct.pack("<I", len(raw)) + raw
    if isinstance(v, bytes):
        return b"b" + struct.pack("<I", len(v)) + v
    if isinstance(v, list) and all(isinstance(x, int) and not isinstance(x, bool) for x in v):
        return b"I" + struct.pack(f"<I{len(v)}q", len(v), *v)
    if isinstance(v, list) and all(isinstance(x, bytes) for x in v):
        return b"B" + struct.pack("<I", len(v)) + b"".join(struct.pack("<I", len(x)) + x for x in v)
    raise ContractError(f"field {key!r}: unsupported wire type {type(v).__name__}")


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data, self.pos = memoryview(data), 0

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise ContractError("truncated SecAgg message")
        chunk = bytes(self.data[self.pos : self.pos + n])
        self.pos += n
        return chunk

    def unpack(self, fmt: str) -> tuple[Any, ...]:
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))


def dict_from_bytes(data: bytes) -> dict[str, Any]:
    """Inverse of ``dict_to_bytes``; raises ``ContractError`` on malformed input."""
    r = _Reader(data)
    if r.take(len(_MAGIC)) != _MAGIC:
        raise ContractError("not a privfed SecAgg message (bad magic or version)")
    out: dict[str, Any] = {}
    for _ in range(r.unpack("<I")[0]):
        key = r.take(r.unpack("<H")[0]).decode()
        tag = r.take(1)
        if tag == b"i":
            out[key] = r.unpack("<q")[0]
        elif tag == b"f":
            out[key] = r.unpack("<d")[0]
        elif tag in (b"s", b"b"):
            raw = r.take(r.unpack("<I")[0])
            out[key] = raw.decode() if tag == b"s" else raw
        elif tag == b"I":
            n = r.unpack("<I")[0]
            out[key] = list(r.unpack(f"<{n}q"))
        elif tag == b"B":
            out[key] = [r.take(r.unpack("<I")[0]) for _ in range(r.unpack("<I")[0])]
        else:
            raise ContractError(f"field {key!r}: unknown wire tag {tag!r}")
    if r.pos != len(r.data):
        raise ContractError("trailing bytes after SecAgg message")
    return out

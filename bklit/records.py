"""The spool's records: how one operation is written to a segment file.

A segment (``bklit.spool``) is a sequence of records::

    4 bytes  payload length (big endian)
    4 bytes  CRC-32 of the payload
    payload  one operation: a JSON array of strings

A record cut short (a crash, a full disk) or whose CRC does not match ends
what can be read of a segment.
"""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path

HEADER = struct.Struct(">II")


def encode(op: list[str]) -> bytes:
    """One record: header and payload."""
    payload = json.dumps(op, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    return HEADER.pack(len(payload), zlib.crc32(payload)) + payload


def decode(data: bytes, offset: int) -> tuple[list[str] | None, int]:
    """The record at ``offset`` and the offset after it; ``(None, offset)`` if none is whole there."""
    if len(data) - offset < HEADER.size:
        return None, offset
    size, crc = HEADER.unpack_from(data, offset)
    start = offset + HEADER.size
    payload = data[start:start + size]
    if len(payload) < size or zlib.crc32(payload) != crc:
        return None, offset
    return json.loads(payload), start + size


def whole_length(path: Path) -> int:
    """How many leading bytes of a segment are whole, valid records."""
    data = path.read_bytes()
    offset = 0
    while True:
        op, after = decode(data, offset)
        if op is None:
            return offset
        offset = after

"""TransferChunk (proto/hack_kv.proto) encoded and parsed by hand on gRPC's data path.

The protobuf library copies a chunk's `data` once more on each side: building a 1 MiB chunk
(join, assign, serialize) took 0.31 ms against 0.06 ms for one join here, and parsing it 0.16 ms
against a memoryview slice. The bytes are ordinary protobuf, so peers that use the generated
classes interoperate; tests check both directions against the protobuf library.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from ..proto import hack_kv_pb2 as pb

_DATA = 5  # field number of `bytes data`
_LEN, _VARINT, _I64, _I32 = 2, 0, 1, 5  # wire types


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b, n = n & 0x7F, n >> 7
        if not n:
            out.append(b)
            return bytes(out)
        out.append(b | 0x80)


def _read_varint(mv: memoryview, pos: int) -> tuple[int, int]:
    value = 0
    for shift in range(0, 70, 7):
        if pos >= len(mv):
            raise ValueError("truncated varint")
        b = mv[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if not b & 0x80:
            return value, pos
    raise ValueError("varint longer than 10 bytes")


def encode_chunk(head: pb.TransferChunk | None, pieces: Sequence[memoryview]) -> bytes:
    """A serialized TransferChunk: `head`'s fields (the first chunk of a stream; its data unset),
    then `pieces` concatenated as `data`, in one copy."""
    prefix = head.SerializeToString() if head is not None else b""
    size = sum(len(p) for p in pieces)
    return b"".join([prefix, _varint(_DATA << 3 | _LEN), _varint(size), *pieces])


@dataclass
class Chunk:
    """A parsed TransferChunk; `data` is a view of the received message (no copy)."""

    key: str = ""
    stream_index: int = 0
    num_streams: int = 0
    num_frames: int = 0
    data: memoryview = field(default_factory=lambda: memoryview(b""))


_UINTS = {2: "stream_index", 3: "num_streams", 4: "num_frames"}


def parse_chunk(raw: bytes) -> Chunk:
    """Parse a serialized TransferChunk as protobuf does (last value of a field wins, unknown
    fields skipped); ValueError on malformed bytes."""
    mv, pos, chunk = memoryview(raw), 0, Chunk()
    while pos < len(mv):
        tag, pos = _read_varint(mv, pos)
        number, wire_type = tag >> 3, tag & 7
        if wire_type == _VARINT:
            value, pos = _read_varint(mv, pos)
            if number in _UINTS:
                setattr(chunk, _UINTS[number], value & 0xFFFFFFFF)
        elif wire_type == _LEN:
            size, pos = _read_varint(mv, pos)
            if pos + size > len(mv):
                raise ValueError(f"field {number} runs past the message")
            value, pos = mv[pos : pos + size], pos + size
            if number == 1:
                chunk.key = str(value, "utf-8")
            elif number == _DATA:
                chunk.data = value
        elif wire_type in (_I64, _I32):
            pos += 8 if wire_type == _I64 else 4
        else:
            raise ValueError(f"unsupported wire type {wire_type}")
        if number == 0 or pos > len(mv):
            raise ValueError("malformed TransferChunk")
    return chunk

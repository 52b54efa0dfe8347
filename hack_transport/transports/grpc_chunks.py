"""TransferChunk (proto/hack_kv.proto) encoded and parsed by hand on gRPC's data path.

The protobuf library copies a chunk's `data` once more on each side: building a 1 MiB chunk
(join, assign, serialize) took 0.31 ms against 0.06 ms for one join here, and parsing it 0.16 ms
against a memoryview slice. The bytes are ordinary protobuf, so peers that use the generated
classes interoperate; tests check both directions against the protobuf library.

A sender may put a `pad` field (ignored by every reader) before `data` so that a chosen byte of
`data` (a frame's first payload byte) lands at a multiple of MESSAGE_ALIGN inside the message:
grpc hands the receiver each message as a Python bytes object, whose contents start 16-aligned
in CPython (32 bytes into a 16-aligned malloc block), so the receiver can keep the message as
the frame's payload instead of copying it out (FrameAssembler checks the address itself).
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence
from dataclasses import dataclass, field

from ..proto import hack_kv_pb2 as pb

_DATA = 5  # field number of `bytes data`
_PAD = 6  # field number of `bytes pad` (alignment only)
MESSAGE_ALIGN = 16  # where a CPython bytes object's contents start, modulo this
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


def encode_chunk(
    head: pb.TransferChunk | None, pieces: Sequence[memoryview], align_at: int | None = None
) -> bytes:
    """A serialized TransferChunk: `head`'s fields (the first chunk of a stream; its data unset),
    then `pieces` concatenated as `data`, in one copy. align_at: a `pad` field before `data`
    puts data byte `align_at` at a multiple of MESSAGE_ALIGN from the message's start."""
    prefix = head.SerializeToString() if head is not None else b""
    size = sum(len(p) for p in pieces)
    data_head = _varint(_DATA << 3 | _LEN) + _varint(size)
    pad = b""
    if align_at is not None:
        n = -(len(prefix) + 2 + len(data_head) + align_at) % MESSAGE_ALIGN  # 2: pad's tag, length
        pad = bytes([_PAD << 3 | _LEN, n]) + bytes(n)
    return b"".join([prefix, pad, data_head, *pieces])


@dataclass
class Chunk:
    """A parsed TransferChunk; `data` is a view of the received message (no copy), and
    `data_address` the memory address of its first byte when the message was a bytes object."""

    key: str = ""
    stream_index: int = 0
    num_streams: int = 0
    num_frames: int = 0
    data: memoryview = field(default_factory=lambda: memoryview(b""))
    data_address: int | None = None


def bytes_address(raw: bytes) -> int:
    """The address of a bytes object's contents (ctypes points at them, it does not copy)."""
    return ctypes.cast(ctypes.c_char_p(raw), ctypes.c_void_p).value or 0


_UINTS = {2: "stream_index", 3: "num_streams", 4: "num_frames"}


def parse_chunk(raw: bytes) -> Chunk:
    """Parse a serialized TransferChunk as protobuf does (last value of a field wins, unknown
    fields skipped); ValueError on malformed bytes."""
    mv, pos, chunk, data_at = memoryview(raw), 0, Chunk(), 0
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
                chunk.data, data_at = value, pos - size
        elif wire_type in (_I64, _I32):
            pos += 8 if wire_type == _I64 else 4
        else:
            raise ValueError(f"unsupported wire type {wire_type}")
        if number == 0 or pos > len(mv):
            raise ValueError("malformed TransferChunk")
    if type(raw) is bytes and len(chunk.data):
        chunk.data_address = bytes_address(raw) + data_at
    return chunk

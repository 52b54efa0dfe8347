"""The on-disk chunk file: a checksummed header naming the key, then the value.

    magic        8 bytes   b"HKVCHNK1"
    header_len   u32 LE    length of the msgpack header (bounded by MAX_HEADER)
    header       msgpack   {"model", "hash", "layer_group", "tp_rank", "size", "xxh3"}
    header_xxh3  u64 LE    xxh3-64 of the header bytes
    value        `size` bytes, whose xxh3-64 is header["xxh3"]

The value is an encoded wire frame, opaque here; the header's checksum lets a restart index the
file without reading the value, and the value's checksum is verified on every read.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import msgpack
import xxhash

from .errors import CorruptChunkError
from .keys import ChunkKey

MAGIC = b"HKVCHNK1"
PREFIX = struct.Struct("<8sI")
HEADER_SUM = struct.Struct("<Q")
MAX_HEADER = 4096


@dataclass(frozen=True)
class FileHeader:
    key: ChunkKey
    size: int
    xxh3: int
    header_bytes: int  # bytes before the value

    @property
    def file_bytes(self) -> int:
        return self.header_bytes + self.size


def encode_header(key: ChunkKey, value: bytes | memoryview, xxh3: int | None = None) -> bytes:
    """Everything that precedes the value in the file (xxh3: the value's, if already known)."""
    header = msgpack.packb(
        {
            "model": key.model,
            "hash": key.chunk_hash,
            "layer_group": key.layer_group,
            "tp_rank": key.tp_rank,
            "size": len(value),
            "xxh3": xxhash.xxh3_64_intdigest(value) if xxh3 is None else xxh3,
        },
        use_bin_type=True,
    )
    return (
        PREFIX.pack(MAGIC, len(header)) + header + HEADER_SUM.pack(xxhash.xxh3_64_intdigest(header))
    )


def read_header(f, path: str) -> FileHeader:
    """Parse and verify the header at the start of open file `f`; raises CorruptChunkError."""
    prefix = f.read(PREFIX.size)
    if len(prefix) != PREFIX.size:
        raise CorruptChunkError(f"{path}: truncated before the header")
    magic, n = PREFIX.unpack(prefix)
    if magic != MAGIC:
        raise CorruptChunkError(f"{path}: bad magic {magic!r}")
    if n > MAX_HEADER:
        raise CorruptChunkError(f"{path}: header length {n} exceeds {MAX_HEADER}")
    raw = f.read(n + HEADER_SUM.size)
    if len(raw) != n + HEADER_SUM.size:
        raise CorruptChunkError(f"{path}: truncated header")
    header, (want,) = raw[:n], HEADER_SUM.unpack(raw[n:])
    if xxhash.xxh3_64_intdigest(header) != want:
        raise CorruptChunkError(f"{path}: header checksum mismatch")
    try:
        h = msgpack.unpackb(header, raw=False)
        key = ChunkKey(h["model"], h["hash"], h["layer_group"], h["tp_rank"])
        size, xxh3 = int(h["size"]), int(h["xxh3"])
    except Exception as e:  # a header that passed its checksum but does not parse: still corrupt
        raise CorruptChunkError(f"{path}: unreadable header ({e})") from e
    if size < 0:
        raise CorruptChunkError(f"{path}: negative value size")
    return FileHeader(key, size, xxh3, PREFIX.size + n + HEADER_SUM.size)


def read_value(f, header: FileHeader, path: str) -> bytes:
    """Read and verify the value that follows `header` in `f`; raises CorruptChunkError."""
    value = f.read(header.size + 1)  # one byte more to detect trailing garbage
    if len(value) != header.size:
        raise CorruptChunkError(f"{path}: value is {len(value)} bytes, header says {header.size}")
    if xxhash.xxh3_64_intdigest(value) != header.xxh3:
        raise CorruptChunkError(f"{path}: value checksum mismatch")
    return value

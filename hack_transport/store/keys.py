"""Chunk keys: model identity + chained prefix hash + layer group + tensor-parallel rank.

A prompt is cut into chunks of `chunk_tokens` tokens (the last one may be shorter). Chunk i's hash is
xxh3-128 over chunk i-1's hash and chunk i's token ids, so a chunk's hash covers every token up to
its end and equal prefixes share keys. The chain starts from a seed that names the chunk size, so
the same tokens cut into chunks of another size never collide.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import xxhash

HASH_BYTES = 16
MAX_MODEL_CHARS = 512
MAX_LAYER_GROUP = 1 << 16
MAX_TP_RANK = 1 << 16


def _check_key_fields(model: str, chunk_hash: bytes, layer_group: int, tp_rank: int) -> None:
    from .errors import InvalidKeyError

    if not isinstance(model, str) or not model or len(model) > MAX_MODEL_CHARS:
        raise InvalidKeyError(f"model identity must be a string of 1..{MAX_MODEL_CHARS} characters")
    if not isinstance(chunk_hash, bytes) or len(chunk_hash) != HASH_BYTES:
        raise InvalidKeyError(f"chunk_hash must be {HASH_BYTES} bytes")
    if not isinstance(layer_group, int) or not 0 <= layer_group < MAX_LAYER_GROUP:
        raise InvalidKeyError(f"layer_group must be in [0, {MAX_LAYER_GROUP}), got {layer_group!r}")
    if not isinstance(tp_rank, int) or not 0 <= tp_rank < MAX_TP_RANK:
        raise InvalidKeyError(f"tp_rank must be in [0, {MAX_TP_RANK}), got {tp_rank!r}")


@dataclass(frozen=True)
class ChunkKey:
    """Where one chunk of KV lives; validated at construction."""

    model: str
    chunk_hash: bytes
    layer_group: int = 0
    tp_rank: int = 0

    def __post_init__(self) -> None:
        _check_key_fields(self.model, self.chunk_hash, self.layer_group, self.tp_rank)

    def canonical(self) -> bytes:
        """Unambiguous byte form: length-prefixed model, hash, layer group, rank."""
        m = self.model.encode()
        return (
            struct.pack("<H", len(m))
            + m
            + self.chunk_hash
            + struct.pack("<II", self.layer_group, self.tp_rank)
        )

    def digest(self) -> str:
        """Hex name of the key (file names on disk)."""
        return xxhash.xxh3_128_hexdigest(self.canonical())

    def __str__(self) -> str:
        return f"{self.model}@{self.tp_rank}@{self.layer_group}@{self.chunk_hash.hex()}"


def as_token_array(tokens: Sequence[int] | np.ndarray) -> np.ndarray:
    """Token ids as little-endian int64 (a torch tensor, numpy array or list of ints)."""
    if hasattr(tokens, "detach"):  # torch.Tensor, without importing torch here
        tokens = tokens.detach().cpu().numpy()
    arr = np.asarray(tokens)
    if arr.ndim != 1:
        raise ValueError(f"tokens must be one-dimensional, got shape {arr.shape}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"tokens must be integers, got {arr.dtype}")
    return arr.astype("<i8", copy=False)


def chunk_bounds(num_tokens: int, chunk_tokens: int) -> list[tuple[int, int]]:
    """[start, end) of each chunk: full chunks, then a shorter last one if tokens remain."""
    if chunk_tokens <= 0:
        raise ValueError(f"chunk_tokens must be positive, got {chunk_tokens}")
    return [(s, min(s + chunk_tokens, num_tokens)) for s in range(0, num_tokens, chunk_tokens)]


def chunk_hashes(tokens: Sequence[int] | np.ndarray, chunk_tokens: int) -> list[bytes]:
    """The chained hash of every chunk of `tokens`, in order."""
    arr = as_token_array(tokens)
    prev = xxhash.xxh3_128_digest(b"hack-kv chunk chain" + struct.pack("<I", chunk_tokens))
    out = []
    for start, end in chunk_bounds(len(arr), chunk_tokens):
        prev = xxhash.xxh3_128_digest(prev + arr[start:end].tobytes())
        out.append(prev)
    return out


@dataclass(frozen=True)
class ChunkSpec:
    """Cuts prompts into keyed chunks for one model, chunk size and tensor-parallel rank."""

    model: str
    chunk_tokens: int = 256
    tp_rank: int = 0
    partition: int | None = None

    def __post_init__(self) -> None:
        if self.chunk_tokens <= 0:
            raise ValueError(f"chunk_tokens must be positive, got {self.chunk_tokens}")
        if self.partition and self.chunk_tokens % self.partition:
            raise ValueError(
                f"chunk_tokens {self.chunk_tokens} must be a whole number of partitions "
                f"of {self.partition} tokens"
            )
        _check_key_fields(self.model, bytes(HASH_BYTES), 0, self.tp_rank)

    def keys(
        self, tokens: Sequence[int] | np.ndarray, layer_group: int = 0
    ) -> list[tuple[int, int, ChunkKey]]:
        """(start, end, key) of each chunk of `tokens` for one layer group."""
        arr = as_token_array(tokens)
        bounds = chunk_bounds(len(arr), self.chunk_tokens)
        hashes = chunk_hashes(arr, self.chunk_tokens)
        return [
            (s, e, ChunkKey(self.model, h, layer_group, self.tp_rank))
            for (s, e), h in zip(bounds, hashes, strict=True)
        ]

"""Chunk keys: the chained hash against an independent recomputation, prefix sharing, validation."""

from __future__ import annotations

import struct

import numpy as np
import pytest
import torch
import xxhash

from hack_transport.store import ChunkKey, ChunkSpec, InvalidKeyError, chunk_hashes

pytestmark = pytest.mark.timeout(60)


def reference_hashes(tokens: list[int], chunk_tokens: int) -> list[bytes]:
    """Second implementation: plain Python ints packed one by one."""
    prev = xxhash.xxh3_128(b"hack-kv chunk chain" + struct.pack("<I", chunk_tokens)).digest()
    out = []
    for start in range(0, len(tokens), chunk_tokens):
        h = xxhash.xxh3_128()
        h.update(prev)
        for t in tokens[start : start + chunk_tokens]:
            h.update(struct.pack("<q", t))
        prev = h.digest()
        out.append(prev)
    return out


@pytest.mark.parametrize(
    "n,chunk", [(1, 256), (255, 256), (256, 256), (257, 256), (1000, 64), (129, 1)]
)
def test_hashes_match_reference(n, chunk):
    rng = np.random.default_rng(n * 7 + chunk)
    tokens = rng.integers(0, 200_000, n).tolist()
    assert chunk_hashes(tokens, chunk) == reference_hashes(tokens, chunk)
    # numpy int32 and torch tensors give the same keys as lists
    assert chunk_hashes(np.asarray(tokens, dtype=np.int32), chunk) == reference_hashes(
        tokens, chunk
    )
    assert chunk_hashes(torch.tensor(tokens), chunk) == reference_hashes(tokens, chunk)


def test_equal_prefixes_share_keys_and_a_change_moves_every_later_key():
    rng = np.random.default_rng(1)
    a = rng.integers(0, 50_000, 1100)
    spec = ChunkSpec("m@1", 256, partition=64)
    ka = [k for _, _, k in spec.keys(a)]
    b = a.copy()
    b[600] += 1  # inside chunk 2
    kb = [k for _, _, k in spec.keys(b)]
    assert ka[:2] == kb[:2]
    assert all(x != y for x, y in zip(ka[2:], kb[2:], strict=True))
    # a longer prompt with the same prefix shares every full chunk
    kc = [k for _, _, k in spec.keys(np.concatenate([a[:1024], [7, 8, 9]]))]
    assert kc[:4] == ka[:4]
    # the bounds: full chunks, then the remainder
    assert [(s, e) for s, e, _ in spec.keys(a)] == [
        (0, 256),
        (256, 512),
        (512, 768),
        (768, 1024),
        (1024, 1100),
    ]


def test_key_fields_separate_model_group_rank_and_chunk_size():
    tokens = list(range(300))
    base = ChunkSpec("m@1", 256).keys(tokens)[0][2]
    others = [
        ChunkSpec("m@2", 256).keys(tokens)[0][2],
        ChunkSpec("m@1", 256).keys(tokens, layer_group=1)[0][2],
        ChunkSpec("m@1", 256, tp_rank=1).keys(tokens)[0][2],
        ChunkSpec("m@1", 128).keys(tokens)[1][2],  # same end token (256), other chunk size
    ]
    assert all(o != base and o.digest() != base.digest() for o in others)


def test_bad_keys_and_specs_are_refused():
    with pytest.raises(InvalidKeyError, match="chunk_hash"):
        ChunkKey("m", b"short")
    with pytest.raises(InvalidKeyError, match="model"):
        ChunkKey("", bytes(16))
    with pytest.raises(InvalidKeyError, match="layer_group"):
        ChunkKey("m", bytes(16), -1)
    with pytest.raises(ValueError, match="whole number of partitions"):
        ChunkSpec("m", 100, partition=64)
    with pytest.raises(ValueError, match="one-dimensional"):
        ChunkSpec("m", 64).keys(np.zeros((2, 2), dtype=np.int64))
    with pytest.raises(ValueError, match="integers"):
        ChunkSpec("m", 64).keys([0.5, 1.5])

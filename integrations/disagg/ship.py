"""Moving frames from the prefill process to the decode process: through the KV store service
(`hack-kv serve`, gRPC Put/Get, keys chained over the prompt's tokens) or directly over one of the
transports (tcp, grpc, ucx). --bandwidth-limit emulates a slower link (hack_transport.link)."""

from __future__ import annotations

import time

from hack_transport import wire
from hack_transport.link import EmulatedLink
from hack_transport.store.client import StoreClient
from hack_transport.store.keys import ChunkKey, chunk_hashes

STORE = "store"


def block_key(block: wire.Block, tokens: list[int], model_key: str) -> ChunkKey:
    """Store key of a block: model (and codec) name + the hash of the prompt prefix it ends at."""
    end = block.tokens[1]
    return ChunkKey(model_key, chunk_hashes(tokens[:end], end)[0], 0, 0)


def store_put(
    address: str, blocks, tokens, model_key: str, bandwidth: float | None
) -> tuple[int, float]:
    """Encode and put every block; (bytes put, seconds)."""
    t0 = time.perf_counter()
    total = 0
    # One link for the whole put: a fresh bucket per frame (before) never made a frame wait.
    link = EmulatedLink(bandwidth) if bandwidth else None
    with StoreClient(address, shm=False) as client:
        for block in blocks:
            key = block_key(block, tokens, model_key)
            frame = wire.encode_frame(block)
            if link is not None:
                link.take_blocking(len(frame))
            client.put(key, frame)
            total += len(frame)
    if link is not None:
        link.drain_blocking()
    return total, time.perf_counter() - t0


def store_get(
    address: str, keys: list[ChunkKey], ident: wire.ModelIdentity
) -> tuple[list[wire.Block], int, float]:
    """Fetch and verify every frame; (blocks, bytes, seconds). A missing key is an error."""
    t0 = time.perf_counter()
    blocks, total = [], 0
    with StoreClient(address, shm=False) as client:
        for key in keys:
            data = client.get(key)
            if data is None:
                raise KeyError(f"the store has no chunk {key}")
            blocks.append(wire.decode_frame(data, expect_model=ident))
            total += len(data)
    return blocks, total, time.perf_counter() - t0

"""The hack-kv KV store: LMCache-style chunks in GPU, CPU and disk tiers, in-process or as a service.

    store = KVStore(cpu_capacity=1 << 30, disk_dir="/var/cache/hack-kv", disk_capacity=64 << 30)
    spec = ChunkSpec(model="llama-8b@<geometry>", chunk_tokens=256)
    for start, end, key in spec.keys(tokens):
        store.put(key, frame_bytes)          # a hack_transport.wire frame
    store.lookup(spec, tokens)               # leading tokens stored

StoreClient has the same methods against `hack-kv serve` (service.py). It is imported on first
use, so the in-process store needs neither grpcio nor the protobuf runtime.

    hack-kv serve --cpu 8GiB --disk 200GiB --metrics-port 9464 --token "$HACK_KV_TOKEN"
    client = StoreClient("127.0.0.1:50061", token=...)   # same host: values go through /dev/shm
    client.put(key, frame); client.get_into(key, buffer); client.lookup(spec, tokens)
"""

from .errors import (
    AuthError,
    CapacityError,
    ChunkTooLargeError,
    CorruptChunkError,
    DiskFullError,
    InvalidKeyError,
    InvalidRequestError,
    RemoteError,
    StoreError,
    StoreUnavailableError,
)
from .keys import ChunkKey, ChunkSpec, chunk_hashes
from .store import KVStore

__all__ = [
    "AuthError",
    "CapacityError",
    "ChunkKey",
    "ChunkSpec",
    "ChunkTooLargeError",
    "CorruptChunkError",
    "DiskFullError",
    "InvalidKeyError",
    "InvalidRequestError",
    "KVStore",
    "RemoteError",
    "StoreClient",
    "StoreError",
    "StoreUnavailableError",
    "chunk_hashes",
]


def __getattr__(name: str):
    if name == "StoreClient":
        from .client import StoreClient

        return StoreClient
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

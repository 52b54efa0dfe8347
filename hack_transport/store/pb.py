"""Conversions between store objects and their protobuf messages."""

from __future__ import annotations

from ..proto import hack_kv_store_pb2 as pb
from .errors import InvalidKeyError
from .keys import ChunkKey


def key_to_pb(key: ChunkKey) -> pb.ChunkKey:
    return pb.ChunkKey(
        model=key.model, chunk_hash=key.chunk_hash, layer_group=key.layer_group, tp_rank=key.tp_rank
    )


def key_from_pb(msg: pb.ChunkKey) -> ChunkKey:
    """A validated ChunkKey; raises InvalidKeyError naming the bad field."""
    return ChunkKey(msg.model, bytes(msg.chunk_hash), msg.layer_group, msg.tp_rank)


def require_key(msg) -> ChunkKey:
    if not msg.HasField("key"):
        raise InvalidKeyError("request carries no key")
    return key_from_pb(msg.key)


def stats_to_pb(s: dict) -> pb.StatsReply:
    return pb.StatsReply(
        tiers=[pb.TierStats(**t) for t in s["tiers"]],
        misses=s["misses"],
        corrupt_dropped=s["corrupt_dropped"],
        puts=s["puts"],
        put_failures=s["put_failures"],
    )


def stats_from_pb(msg: pb.StatsReply) -> dict:
    fields = ("name", "chunks", "bytes", "capacity_bytes", "hits", "evictions")
    return {
        "tiers": [{f: getattr(t, f) for f in fields} for t in msg.tiers],
        "misses": msg.misses,
        "corrupt_dropped": msg.corrupt_dropped,
        "puts": msg.puts,
        "put_failures": msg.put_failures,
    }

"""The in-process store: LRU against a reference model, spill to disk, restart, corruption, quotas."""

from __future__ import annotations

import os
import threading
from collections import OrderedDict

import numpy as np
import pytest

from hack_transport.store import ChunkKey, ChunkSpec, DiskFullError, KVStore
from hack_transport.store.disk import SUFFIX
from hack_transport.store.diskfile import encode_header

pytestmark = pytest.mark.timeout(60)


def key(i: int, model: str = "m@1") -> ChunkKey:
    return ChunkKey(model, i.to_bytes(16, "little"))


def value(i: int, n: int) -> bytes:
    return np.random.default_rng(i).integers(0, 256, n, dtype=np.uint8).tobytes()


def chunk_files(root) -> list:
    return sorted((root / "chunks").glob(f"*/*{SUFFIX}"))


def test_memory_lru_matches_a_reference_model():
    rng = np.random.default_rng(0)
    cap = 10_000
    store = KVStore(cpu_capacity=cap)
    ref: OrderedDict[int, int] = OrderedDict()
    for _ in range(600):
        i = int(rng.integers(0, 40))
        if rng.random() < 0.6:
            n = int(rng.integers(1, 3000))
            store.put(key(i), value(i * 7919 + n, n))
            ref.pop(i, None)
            while sum(ref.values()) + n > cap:
                ref.popitem(last=False)
            ref[i] = n
        else:
            got = store.get(key(i))
            if i in ref:
                ref.move_to_end(i)
                assert got is not None and len(got) == ref[i]
            else:
                assert got is None
        tier = store.memory[0]
        assert tier.index.used == sum(ref.values()) <= cap
        assert [k.chunk_hash for k in tier.index.keys()] == [key(i).chunk_hash for i in ref]


@pytest.mark.parametrize("write_through", [True, False])
def test_spill_to_disk_restart_and_exact_gets(tmp_path, write_through):
    vals = {i: value(i, 1000 + 37 * i) for i in range(30)}
    store = KVStore(4000, tmp_path, 1 << 20, write_through=write_through)
    for i, v in vals.items():
        store.put(key(i), v)
    assert store.memory[0].index.used <= 4000
    assert store.memory[0].evictions > 0
    in_memory = len(store.memory[0].index)
    # write-through: every chunk is on disk; write-back: those memory evicted
    assert len(chunk_files(tmp_path)) == (30 if write_through else 30 - in_memory)
    for i in reversed(range(30)):
        assert store.get(key(i)) == vals[i]
    # a new process on the same directory finds them all
    store.close()
    if write_through:
        again = KVStore(4000, tmp_path, 1 << 20)
        assert again.stats()["tiers"][1]["chunks"] == 30
        assert all(again.get(key(i)) == v for i, v in vals.items())


def test_oversized_for_memory_goes_to_disk_and_oversized_for_store_is_refused(tmp_path):
    store = KVStore(1000, tmp_path, 1 << 20, max_chunk_bytes=5000)
    v = value(1, 3000)
    assert store.put(key(1), v) == "disk"
    assert store.get(key(1)) == v
    with pytest.raises(ValueError, match="exceeds the store's limit"):
        store.put(key(2), value(2, 5001))
    assert not store.exists(key(2))


@pytest.mark.parametrize("where", ["value", "header", "truncate", "trailing"])
def test_corrupt_files_are_dropped_counted_and_never_served(tmp_path, where):
    store = KVStore(1 << 20, tmp_path, 1 << 20)
    v = value(3, 5000)
    store.put(key(3), v)
    (path,) = chunk_files(tmp_path)
    data = bytearray(path.read_bytes())
    head = len(encode_header(key(3), v))
    if where == "value":
        data[head + 1234] ^= 0x10
    elif where == "header":
        data[20] ^= 0x01
    elif where == "truncate":
        data = data[:-1]
    else:
        data += b"\0"
    path.write_bytes(bytes(data))
    store.close()
    # a restart sees every kind of damage to the header or length; value damage shows on read
    fresh = KVStore(1 << 20, tmp_path, 1 << 20)
    assert fresh.get(key(3)) is None
    assert fresh.stats()["corrupt_dropped"] == 1
    assert not path.exists()
    assert fresh.get(key(3)) is None and fresh.stats()["corrupt_dropped"] == 1


def test_restart_drops_interrupted_writes(tmp_path):
    store = KVStore(1 << 20, tmp_path, 1 << 20)
    store.put(key(1), value(1, 100))
    (tmp_path / "tmp" / "abc.1.0.tmp").write_bytes(b"half a chunk")
    store.close()
    again = KVStore(1 << 20, tmp_path, 1 << 20)
    assert list((tmp_path / "tmp").iterdir()) == []
    assert again.get(key(1)) == value(1, 100)


def test_disk_quota_without_eviction_refuses_whole_and_keeps_serving(tmp_path):
    store = KVStore(0, tmp_path, 20_000, disk_evict=False)
    kept = {}
    with pytest.raises(DiskFullError, match="disk tier full"):
        for i in range(100):
            store.put(key(i), value(i, 3000))
            kept[i] = value(i, 3000)
    assert 0 < len(kept) < 100
    assert store.stats()["tiers"][1]["bytes"] <= 20_000
    assert len(chunk_files(tmp_path)) == len(kept)
    assert list((tmp_path / "tmp").iterdir()) == []
    assert not store.exists(key(len(kept)))
    assert all(store.get(key(i)) == v for i, v in kept.items())


def test_disk_quota_with_eviction_holds_capacity(tmp_path):
    store = KVStore(0, tmp_path, 20_000)
    for i in range(50):
        store.put(key(i), value(i, 3000))
        assert store.disk.index.used <= 20_000
    assert store.get(key(49)) == value(49, 3000)
    assert store.get(key(0)) is None
    assert sum(f.stat().st_size for f in chunk_files(tmp_path)) <= 20_000


def test_a_chunk_being_read_is_not_evicted(tmp_path):
    store = KVStore(0, tmp_path, 10_000)
    store.put(key(1), value(1, 4000))
    store.disk.index.pin(key(1))  # as get() does while it reads
    store.put(key(2), value(2, 4000))
    with pytest.raises(DiskFullError):
        store.put(key(3), value(3, 6000))  # only key 2 may go, and that is not enough
    store.put(key(4), value(4, 3000))  # evicts key 2, never the pinned key 1
    assert store.exists(key(1)) and not store.exists(key(2))
    store.disk.index.unpin(key(1))
    assert store.get(key(1)) == value(1, 4000)


def test_concurrent_puts_and_gets_under_eviction_pressure(tmp_path):
    store = KVStore(30_000, tmp_path, 1 << 20, write_through=False, fsync=False)
    errors = []

    def work(t: int) -> None:
        try:
            for j in range(60):
                i = t * 1000 + j
                v = value(i, 2000 + (i % 500))
                store.put(key(i), v)
                back = store.get(key(i))
                if back is not None and back != v:
                    errors.append(f"{i} differs")
                if j > 3:
                    old = t * 1000 + j - 3
                    got = store.get(key(old))
                    if got is not None and got != value(old, 2000 + (old % 500)):
                        errors.append(f"{old} differs")
        except Exception as e:  # surfaced below
            errors.append(repr(e))

    threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(60)
    assert errors == []
    s = store.stats()
    assert s["tiers"][0]["bytes"] <= 30_000 and s["tiers"][0]["evictions"] > 100
    # the disk holds them all: nothing was lost in flight between memory and disk
    everything = [t * 1000 + j for t in range(4) for j in range(60)]
    assert all(store.get(key(i)) == value(i, 2000 + (i % 500)) for i in everything)


def test_lookup_counts_leading_stored_tokens_over_layer_groups():
    store = KVStore(1 << 20)
    spec = ChunkSpec("m@1", 64, partition=64)
    tokens = np.arange(300) * 3
    chunks = spec.keys(tokens)
    assert store.lookup(spec, tokens) == 0
    for g in (0, 1):
        for _, _, k in spec.keys(tokens, g)[:3]:
            store.put(k, b"x")
    assert store.lookup(spec, tokens) == 192
    assert store.lookup(spec, tokens, layer_groups=[0, 1]) == 192
    store.delete(spec.keys(tokens, 1)[1][2])
    assert store.lookup(spec, tokens, layer_groups=[0, 1]) == 64
    assert store.lookup(spec, tokens[:100]) == 64  # the 100-token prompt's last chunk is not stored
    for _, _, k in chunks[3:]:
        store.put(k, b"y")
    assert store.lookup(spec, tokens) == 300
    assert store.lookup(spec, np.concatenate([tokens[:130], [1]])) == 128


@pytest.mark.skipif(
    not __import__("torch").cuda.is_available(), reason="GPU tier needs CUDA (none on this machine)"
)
def test_gpu_tier_spills_to_cpu_then_disk(tmp_path):
    store = KVStore(6000, tmp_path, 1 << 20, gpu_capacity=6000, write_through=False)
    vals = {i: os.urandom(2500) for i in range(10)}
    for i, v in vals.items():
        store.put(key(i), v)
    s = {t["name"]: t for t in store.stats()["tiers"]}
    assert s["gpu"]["bytes"] <= 6000 and s["cpu"]["bytes"] <= 6000 and s["disk"]["chunks"] >= 6
    assert all(store.get(key(i)) == v for i, v in vals.items())


def test_one_store_per_directory(tmp_path):
    store = KVStore(0, tmp_path, 1 << 20)
    with pytest.raises(RuntimeError, match=f"in use by another store \\(pid {os.getpid()}\\)"):
        KVStore(0, tmp_path, 1 << 20)
    store.close()
    KVStore(0, tmp_path, 1 << 20).close()

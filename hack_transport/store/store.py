"""KVStore: the tiers (GPU, CPU, disk) behind one in-process interface.

A put lands in the fastest memory tier; what a memory tier evicts moves down a tier, and what the
last memory tier evicts is written to disk unless the disk already holds it. With write_through
(the default when there is a disk tier) a put returns only once the chunk is on disk, so an
acknowledged chunk survives a crash. A get looks from the fastest tier down and copies a disk hit
back into memory. Values are immutable bytes, so a get in progress never loses its chunk to an
eviction; the disk tier pins a file while it is read.

A key names its content (model identity + token prefix + layer group + rank), so two puts of one
key carry equivalent KV; when they race, either may be the one a later get returns, always whole.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Iterable, Sequence

import numpy as np

from .disk import DiskTier
from .entry import Entry
from .errors import CapacityError, ChunkTooLargeError, DiskFullError
from .keys import ChunkKey, ChunkSpec
from .memory import GpuTier, MemoryTier

log = logging.getLogger("hack_kv.store")

DEFAULT_MAX_CHUNK_BYTES = 256 << 20


class KVStore:
    """Tiered chunk store; thread-safe."""

    def __init__(
        self,
        cpu_capacity: int,
        disk_dir: str | os.PathLike | None = None,
        disk_capacity: int = 0,
        *,
        gpu_capacity: int = 0,
        write_through: bool | None = None,
        disk_evict: bool = True,
        fsync: bool = True,
        max_chunk_bytes: int = DEFAULT_MAX_CHUNK_BYTES,
        validator: Callable[[bytes], None] | None = None,
    ) -> None:
        self.memory: list[MemoryTier] = []
        if gpu_capacity:
            self.memory.append(GpuTier(gpu_capacity))
        self.memory.append(MemoryTier(cpu_capacity))
        self.disk = (
            DiskTier(disk_dir, disk_capacity, evict=disk_evict, fsync=fsync, validator=validator)
            if disk_dir is not None
            else None
        )
        self.write_through = self.disk is not None if write_through is None else write_through
        if self.write_through and self.disk is None:
            raise ValueError("write_through needs a disk tier")
        self.max_chunk_bytes = max_chunk_bytes
        self._lock = threading.Lock()
        self._spilling: dict[ChunkKey, Entry] = {}  # evicted from memory, being written to disk
        self.misses = 0
        self.puts = 0
        self.put_failures = 0
        self.spill_failures = 0

    # -- puts --------------------------------------------------------------------------------

    def put(self, key: ChunkKey, value: bytes, xxh3: int | None = None) -> str:
        """Store `value` under `key`; returns the tier that holds it. Raises CapacityError if none can.

        xxh3: the value's xxh3-64 when the caller has already verified it (saves recomputing).
        """
        if not isinstance(key, ChunkKey):
            raise TypeError(f"key must be a ChunkKey, got {type(key).__name__}")
        value = bytes(value)
        if len(value) > self.max_chunk_bytes:
            raise ChunkTooLargeError(
                f"chunk of {len(value)} bytes exceeds the store's limit of {self.max_chunk_bytes}"
            )
        entry = Entry.of(value, xxh3)
        try:
            if self.write_through:
                self.disk.put(key, value, entry.xxh3)
            tier = self._insert_memory(key, entry, from_disk=self.write_through)
            if tier is None:
                if self.disk is None:
                    raise CapacityError(
                        f"chunk of {len(value)} bytes does not fit any memory tier and there is no disk tier"
                    )
                if not self.write_through:
                    self.disk.put(key, value, entry.xxh3)
                tier = "disk"
        except Exception:
            with self._lock:
                self.put_failures += 1
            raise
        with self._lock:
            self.puts += 1
        return tier

    def _insert_memory(self, key: ChunkKey, entry: Entry, from_disk: bool) -> str | None:
        """Put `entry` in the fastest memory tier it fits, cascading evictions down the tiers."""
        with self._lock:
            for tier in self.memory:
                tier.discard(key)
            pending = [(key, entry)]
            placed = None
            for tier in self.memory:
                moving, pending = pending, []
                for k, e in moving:
                    if not tier.fits(len(e.value)):
                        pending.append((k, e))
                        continue
                    evicted = tier.make_room(len(e.value))
                    if evicted is None:  # cannot happen for unpinned memory tiers; keep going down
                        pending.append((k, e))
                        continue
                    tier.insert(k, e)
                    if k is key and placed is None:
                        placed = tier.name
                    pending.extend(evicted)
            spill = [(k, e) for k, e in pending if k is not key] if self.disk is not None else []
            for k, e in spill:
                self._spilling[k] = e
        for k, e in spill:
            self._spill(k, e)
        if placed is None and from_disk:
            placed = "disk"
        return placed

    def _spill(self, key: ChunkKey, entry: Entry) -> None:
        """Write a chunk evicted from memory to disk (unless it is there already)."""
        try:
            if not self.disk.touch_if_present(key):
                self.disk.put(key, entry.value, entry.xxh3)
        except (DiskFullError, OSError) as e:
            with self._lock:
                self.spill_failures += 1
            log.warning(
                "could not spill an evicted chunk to disk", extra={"key": str(key), "error": str(e)}
            )
        finally:
            with self._lock:
                if self._spilling.get(key) is entry:
                    del self._spilling[key]

    # -- gets --------------------------------------------------------------------------------

    def get_entry(self, key: ChunkKey) -> Entry | None:
        """The value of `key` with its xxh3-64, or None. Disk hits are verified and copied back
        into memory."""
        with self._lock:
            for tier in self.memory:
                entry = tier.get(key)
                if entry is not None:
                    return entry
            entry = self._spilling.get(key)
            if entry is not None:
                return entry
        entry = self.disk.get(key) if self.disk is not None else None
        if entry is None:
            with self._lock:
                self.misses += 1
            return None
        self._insert_memory(key, entry, from_disk=True)
        return entry

    def get(self, key: ChunkKey) -> bytes | None:
        """The value of `key`, or None."""
        entry = self.get_entry(key)
        return None if entry is None else entry.value

    def exists(self, key: ChunkKey) -> bool:
        with self._lock:
            if any(key in tier for tier in self.memory) or key in self._spilling:
                return True
        return self.disk is not None and key in self.disk

    def lookup(
        self,
        spec: ChunkSpec,
        tokens: Sequence[int] | np.ndarray,
        layer_groups: Iterable[int] = (0,),
    ) -> int:
        """How many leading tokens of `tokens` are stored (every listed layer group present)."""
        groups = list(layer_groups) or [0]
        per_group = [spec.keys(tokens, g) for g in groups]
        stored = 0
        for chunk in zip(*per_group, strict=True):
            if not all(self.exists(key) for _, _, key in chunk):
                break
            stored = chunk[0][1]
        return stored

    def delete(self, key: ChunkKey) -> bool:
        with self._lock:
            found = any([tier.discard(key) for tier in self.memory])
            found = self._spilling.pop(key, None) is not None or found
        if self.disk is not None:
            found = self.disk.delete(key) or found
        return found

    # -- accounting --------------------------------------------------------------------------

    def stats(self) -> dict:
        with self._lock:
            tiers = [tier.stats() for tier in self.memory]
            out = {
                "misses": self.misses,
                "puts": self.puts,
                "put_failures": self.put_failures,
                "spill_failures": self.spill_failures,
            }
        if self.disk is not None:
            tiers.append(self.disk.stats())
        out["tiers"] = tiers
        out["corrupt_dropped"] = self.disk.corrupt_dropped if self.disk is not None else 0
        return out

    def close(self) -> None:
        """Release the disk tier's directory. Nothing is buffered: disk writes are synchronous."""
        if self.disk is not None:
            self.disk.close()

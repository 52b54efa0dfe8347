"""Byte-accounted LRU order with pin counts, shared by every tier.

Not thread-safe: the owning tier holds its lock around every call.
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from collections.abc import Hashable


class LruIndex:
    """Sizes of the entries of one tier, least recently used first."""

    def __init__(self, capacity: int) -> None:
        if capacity < 0:
            raise ValueError(f"capacity must be >= 0, got {capacity}")
        self.capacity = capacity
        self.used = 0
        self._sizes: OrderedDict[Hashable, int] = OrderedDict()
        self._pins: Counter[Hashable] = Counter()

    def __contains__(self, key: Hashable) -> bool:
        return key in self._sizes

    def __len__(self) -> int:
        return len(self._sizes)

    def keys(self) -> list[Hashable]:
        return list(self._sizes)

    def size(self, key: Hashable) -> int:
        return self._sizes[key]

    def touch(self, key: Hashable) -> None:
        self._sizes.move_to_end(key)

    def add(self, key: Hashable, size: int) -> None:
        """Insert or resize `key` as most recently used (the caller made room)."""
        self.used += size - self._sizes.pop(key, 0)
        self._sizes[key] = size

    def remove(self, key: Hashable) -> int:
        size = self._sizes.pop(key)
        self.used -= size
        return size

    def pin(self, key: Hashable) -> None:
        self._pins[key] += 1

    def unpin(self, key: Hashable) -> None:
        self._pins[key] -= 1
        if self._pins[key] <= 0:
            del self._pins[key]

    def pinned(self, key: Hashable) -> bool:
        return key in self._pins

    def victims(
        self, need: int, reserved: int = 0, keep: Hashable | None = None
    ) -> list[Hashable] | None:
        """Least recently used unpinned keys whose removal leaves room for `need` more bytes.

        Returns None when even evicting every unpinned entry would not make room.
        """
        free = self.capacity - self.used - reserved
        if free >= need:
            return []
        out = []
        for key, size in self._sizes.items():
            if key in self._pins or key == keep:
                continue
            out.append(key)
            free += size
            if free >= need:
                return out
        return None


def tier_stats(name: str, index: LruIndex, hits: int, evictions: int) -> dict:
    """The per-tier numbers every tier reports."""
    return {
        "name": name,
        "chunks": len(index),
        "bytes": index.used,
        "capacity_bytes": index.capacity,
        "hits": hits,
        "evictions": evictions,
    }

"""Memory tiers: CPU (bytes) and, where CUDA is present, GPU (uint8 tensors). LRU by bytes."""

from __future__ import annotations

from collections.abc import Hashable

from .entry import Entry
from .lru import LruIndex, tier_stats


class MemoryTier:
    """Values held in process memory; the store's lock guards every call."""

    name = "cpu"

    def __init__(self, capacity: int) -> None:
        self.index = LruIndex(capacity)
        self._values: dict[Hashable, object] = {}
        self.hits = 0
        self.evictions = 0

    @property
    def capacity(self) -> int:
        return self.index.capacity

    def __contains__(self, key: Hashable) -> bool:
        return key in self._values

    def _to_tier(self, entry: Entry) -> object:
        return entry

    def _from_tier(self, held: object) -> Entry:
        return held  # type: ignore[return-value]

    def get(self, key: Hashable) -> Entry | None:
        held = self._values.get(key)
        if held is None:
            return None
        self.index.touch(key)
        self.hits += 1
        return self._from_tier(held)

    def fits(self, size: int) -> bool:
        return size <= self.capacity

    def make_room(self, size: int) -> list[tuple[Hashable, Entry]] | None:
        """Evict LRU entries until `size` bytes fit; returns them, or None if they cannot."""
        keys = self.index.victims(size)
        if keys is None:
            return None
        out = []
        for key in keys:
            out.append((key, self._from_tier(self._values.pop(key))))
            self.index.remove(key)
            self.evictions += 1
        return out

    def insert(self, key: Hashable, entry: Entry) -> None:
        self._values[key] = self._to_tier(entry)
        self.index.add(key, len(entry.value))

    def discard(self, key: Hashable) -> bool:
        if self._values.pop(key, None) is None:
            return False
        self.index.remove(key)
        return True

    def stats(self) -> dict:
        return tier_stats(self.name, self.index, self.hits, self.evictions)


class GpuTier(MemoryTier):
    """Values as uint8 tensors in GPU memory (only constructed where CUDA is available)."""

    name = "gpu"

    def __init__(self, capacity: int, device: str = "cuda") -> None:
        import torch

        if not torch.cuda.is_available():
            raise RuntimeError("the GPU tier needs CUDA; none is available")
        super().__init__(capacity)
        self._torch = torch
        self.device = device

    def _to_tier(self, entry: Entry) -> object:
        t = self._torch.frombuffer(bytearray(entry.value), dtype=self._torch.uint8)
        return t.to(self.device), entry.xxh3

    def _from_tier(self, held: object) -> Entry:
        t, xxh3 = held  # type: ignore[misc]
        return Entry(t.cpu().numpy().tobytes(), xxh3)

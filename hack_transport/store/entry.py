"""A stored value with its xxh3-64, computed once when it enters the store."""

from __future__ import annotations

from typing import NamedTuple

import xxhash


class Entry(NamedTuple):
    value: bytes
    xxh3: int

    @classmethod
    def of(cls, value: bytes, xxh3: int | None = None) -> Entry:
        return cls(value, xxhash.xxh3_64_intdigest(value) if xxh3 is None else xxh3)

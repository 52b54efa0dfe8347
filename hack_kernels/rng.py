"""Counter-based uniform noise for stochastic rounding.

The noise of an element is a hash of (seed, stream, its absolute coordinates), not a draw from a
stateful generator: quantizing a sequence whole or group by group (QuantizedKV.append) gives the
same codes, and any element's noise can be recomputed anywhere.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

_MASK32 = 0xFFFFFFFF
_GOLDEN = 0x9E3779B9


def _mix32(h: torch.Tensor) -> torch.Tensor:
    # A 32-bit integer finalizer; multipliers stay below 2^31 so int64 products never overflow.
    h = ((h >> 16) ^ h) * 0x45D9F3B & _MASK32
    h = ((h >> 16) ^ h) * 0x45D9F3B & _MASK32
    return (h >> 16) ^ h


def uniform_noise(
    shape: Sequence[int],
    seed: int,
    stream: int,
    device: torch.device | str = "cpu",
    axis_offsets: dict[int, int] | None = None,
) -> torch.Tensor:
    """float32 noise in [0, 1) of `shape`, a pure function of (seed, stream, coordinates).

    axis_offsets shifts the coordinate along an axis (absolute token index of a slice).
    """
    offsets = axis_offsets or {}
    h = _mix32(torch.tensor((seed * 0x2545F491 + stream * _GOLDEN) & _MASK32, device=device))
    for axis, size in enumerate(shape):
        coord = torch.arange(size, device=device, dtype=torch.int64) + offsets.get(axis, 0)
        view = [1] * len(shape)
        view[axis] = size
        h = _mix32((h + coord.view(view) + _GOLDEN) & _MASK32)
    return (h >> 8).to(torch.float32) * (1.0 / (1 << 24))

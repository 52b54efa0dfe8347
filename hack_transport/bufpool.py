"""Receive buffers reused across transfers instead of a fresh mapping per frame.

Mapping and populating fresh pages (wire.alloc_payload) cost a receiver more CPU than copying the
bytes into them (benchmarks/results/transfer_notes.md). A decode server lands KV in memory it
keeps; this pool does the same for frame payloads: a buffer goes back to the pool only once
nothing references it any more, so a block handed to a commit callback stays valid for as long
as anyone holds one of its tensors, and a buffer is never handed out twice at once.

On a machine with CUDA the pooled buffers are page-locked (pinned) host memory by default: a
decode server moves the received KV to its GPU with one asynchronous DMA per tensor instead of
a driver-staged synchronous copy (benchmarks/device_pinned.py measures both).

How a release is noticed: each acquire() exports the pooled mapping through a fresh ctypes array
(which supports weak references); every view of the returned memoryview, every tensor made from
it with torch.frombuffer and every slice of those keeps that array alive, and a
weakref.finalize on it returns the mapping to the pool when the last of them is gone.
"""

from __future__ import annotations

import ctypes
import logging
import mmap
import threading
import weakref

import torch

from . import wire

GRAIN = 1 << 16  # capacities are multiples of this (a frame may reuse a slightly larger one)
DEFAULT_IDLE_BYTES = 1 << 30
log = logging.getLogger(__name__)


def _capacity(n: int) -> int:
    """Size class of an n-byte request: within 1/8 of n above 512 KiB, so frames of nearly the
    same size (the last block of a request) share buffers and waste stays under 12.5%."""
    step = max(GRAIN, 1 << max(0, n.bit_length() - 4))
    return max(GRAIN, -(-n // step) * step)


def pinned_host_bytes(n: int) -> torch.Tensor:
    """n bytes of page-locked host memory (torch's caching host allocator), uninitialised."""
    return torch.empty(n, dtype=torch.uint8, pin_memory=True)


class PayloadPool:
    """acquire(n) -> a writable memoryview of exactly n bytes whose content is undefined (the
    caller overwrites every byte). Released buffers are kept up to `max_idle_bytes`.

    pinned: page-locked buffers (every size); None = when CUDA is available, falling back to
    pageable memory (with a warning) if pinning then fails, e.g. in a process forked after CUDA
    started. Pinned buffers come from torch's caching host allocator, which keeps them for reuse
    after the pool drops them."""

    def __init__(self, max_idle_bytes: int = DEFAULT_IDLE_BYTES, pinned: bool | None = None):
        cuda = torch.cuda.is_available()
        if pinned and not cuda:
            raise ValueError("pinned receive buffers need CUDA, which this machine does not have")
        self.pinned = cuda if pinned is None else pinned
        self._auto = pinned is None
        self.max_idle_bytes = max_idle_bytes
        self.idle_bytes = 0
        self.mapped = 0  # buffers created (what a reused buffer saves)
        self.reused = 0
        self._free: dict[int, list] = {}
        self._lock = threading.Lock()  # a release runs wherever the last reference dies

    def acquire(self, n: int) -> memoryview:
        if (n < GRAIN or self.max_idle_bytes <= 0) and not self.pinned:
            return wire.alloc_payload(n)
        cap = _capacity(n)
        with self._lock:
            free = self._free.get(cap)
            m = free.pop() if free else None
            if m is not None:
                self.idle_bytes -= cap
                self.reused += 1
        if m is None:
            m = self._fresh(cap)
            if not isinstance(m, (mmap.mmap, torch.Tensor)):  # no MAP_POPULATE: nothing to keep
                return memoryview(m)[:n]
            self.mapped += 1
        export = (ctypes.c_char * n).from_buffer(m.numpy() if isinstance(m, torch.Tensor) else m)
        weakref.finalize(export, self._release, cap, m)
        return memoryview(export).cast("B")

    def _fresh(self, cap: int) -> mmap.mmap | torch.Tensor | bytearray:
        if self.pinned:
            try:
                return pinned_host_bytes(cap)
            except RuntimeError as e:  # CUDA unusable in this process after all
                if not self._auto:
                    raise
                log.warning("pinned receive buffers unavailable, using pageable memory: %s", e)
                self.pinned = False
        return wire.alloc_payload(cap).obj

    def _release(self, cap: int, m: mmap.mmap | torch.Tensor) -> None:
        with self._lock:
            if self.idle_bytes + cap <= self.max_idle_bytes:
                self._free.setdefault(cap, []).append(m)
                self.idle_bytes += cap
        # otherwise the mapping is unmapped once its last export is gone

    def clear(self) -> None:
        with self._lock:
            self._free.clear()
            self.idle_bytes = 0

"""The emulated link behind `--bandwidth-limit`: one model for every transport and the raw socket.

A sender hands its messages to a link of `rate` bytes/s through a transmit queue. The link sends
the queued bytes back to back; it idles only when the queue is empty. A message may enter the
queue once at most `queue_s` seconds of the link's work are ahead of it, so a sender is never more
than `queue_s * rate` bytes plus one message ahead of the link: over any window of W seconds it
hands over at most `rate * W + queue_s * rate` bytes, plus the message at the window's end.

Why a queue of that size: the emulation waits with sleeps, and a sleep wakes late (asyncio's
epoll timeout is rounded up to whole milliseconds; a loaded box adds more). A real NIC keeps
draining its queue while the application is late, so a wake-up up to `queue_s` late costs this
link nothing; a later one idles it for the excess only. The former token bucket was this model
with a 256 KiB queue (its burst: 0.2 ms at 10 Gbit/s), so nearly every late millisecond was idle
link time: HACK p64 frames over TCP (about 60 sleeps a request) took 103-109 ms at 10 Gbit/s
against the ideal 70.5 ms, while the raw-socket baseline paced against an absolute schedule with
unbounded catch-up, a different model (transfer_notes.md, 2026-11-22, night).

A transfer is not over before the link has sent its last byte: senders wait for `drain()` before
they report a transfer done (the bytes themselves cross the loopback earlier).
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Awaitable, Callable

# 2 ms of the link's time: twice asyncio's timer granularity (sleeps wake up to 1 ms late).
QUEUE_S = 0.002


class EmulatedLink:
    """A link of `rate` bytes/s behind a transmit queue of `queue_s` seconds of its time.

    `clock` (seconds, monotonic) is injectable so that tests can drive it; every method reads it
    afresh. One link may be shared by several concurrent senders of one event loop (the gRPC
    streams of a transfer): each hands its messages over in turn.
    """

    def __init__(
        self,
        rate: float,
        queue_s: float = QUEUE_S,
        clock: Callable[[], float] = time.perf_counter,
    ):
        if not rate > 0 or not math.isfinite(rate):
            raise ValueError(f"link rate must be a positive number of bytes/s, got {rate!r}")
        if not queue_s >= 0:
            raise ValueError(f"queue_s must not be negative, got {queue_s!r}")
        self.rate, self.queue_s, self.clock = float(rate), float(queue_s), clock
        self.free_at = -math.inf  # when the link will have sent every byte handed to it

    def wait_s(self) -> float:
        """Seconds until the queue holds at most `queue_s` of the link's work (0: a message may
        enter now)."""
        return max(0.0, self.free_at - self.queue_s - self.clock())

    def drain_s(self) -> float:
        """Seconds until the link has sent every byte handed to it."""
        return max(0.0, self.free_at - self.clock())

    def hand_over(self, n: int) -> None:
        """n bytes enter the queue now: the link sends them after the bytes queued before, or at
        once if it is idle (an idle link's unused time is gone, not credit)."""
        self.free_at = max(self.free_at, self.clock()) + n / self.rate

    async def take(self, n: int, sleep: Callable[[float], Awaitable[object]] = asyncio.sleep):
        """Wait until n bytes may enter the queue, then hand them over (the caller sends them)."""
        while (d := self.wait_s()) > 0:  # again after a wake-up: another sender may have gone
            await sleep(d)
        self.hand_over(n)

    def take_blocking(self, n: int, sleep: Callable[[float], object] = time.sleep) -> None:
        """take() for a blocking sender (the raw-socket baseline, the store client)."""
        while (d := self.wait_s()) > 0:
            sleep(d)
        self.hand_over(n)

    async def drain(self, sleep: Callable[[float], Awaitable[object]] = asyncio.sleep) -> None:
        while (d := self.drain_s()) > 0:
            await sleep(d)

    def drain_blocking(self, sleep: Callable[[float], object] = time.sleep) -> None:
        while (d := self.drain_s()) > 0:
            sleep(d)

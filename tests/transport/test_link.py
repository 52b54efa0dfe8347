"""The emulated link (hack_transport.link) on an injected clock: no test here times anything.

Each schedule is checked against one computed independently of the implementation: by hand for
small cases, and otherwise from the closed form of a FIFO link's finish times,
F_k = max over j <= k of (h_j + (n_j + ... + n_k) / rate), where h_j is when message j was
handed over.
"""

from __future__ import annotations

import asyncio
import random

import pytest

from hack_transport.link import EmulatedLink

MS = 1e-3


class Clock:
    """A fake clock whose sleeps wake `late` seconds after they were due (late may be a list,
    one value per sleep, as a loaded event loop would); `sleeps` records every sleep asked."""

    def __init__(self, late: float | list[float] = 0.0):
        self.t, self.late, self.sleeps = 0.0, late, []

    def __call__(self) -> float:
        return self.t

    def sleep(self, d: float) -> None:
        assert d > 0  # the link never asks for an empty sleep
        self.sleeps.append(d)
        self.t += d + (self.late.pop(0) if isinstance(self.late, list) else self.late)

    async def asleep(self, d: float) -> None:
        self.sleep(d)
        await asyncio.sleep(0)  # let other senders of the same link run, as a real sleep would


def send_all(link: EmulatedLink, clock: Clock, sizes, work=None, use_async=False):
    """Hand `sizes` over one after another (the sender busy `work[i]` s before message i);
    returns the hand-over times and the time the drained transfer ends."""
    work = work or [0.0] * len(sizes)
    handed = []

    async def run_async():
        for n, w in zip(sizes, work, strict=True):
            clock.t += w
            await link.take(n, sleep=clock.asleep)
            handed.append(clock.t)
        await link.drain(sleep=clock.asleep)

    if use_async:
        asyncio.run(run_async())
    else:
        for n, w in zip(sizes, work, strict=True):
            clock.t += w
            link.take_blocking(n, sleep=clock.sleep)
            handed.append(clock.t)
        link.drain_blocking(sleep=clock.sleep)
    return handed, clock.t


def finish(handed: list[float], sizes: list[int], rate: float) -> float:
    """When a FIFO link has sent every message, in closed form (not the recursion the
    implementation uses): the latest of h_j + (n_j + ... + n_last) / rate over all j."""
    best, tail = -float("inf"), 0
    for h, n in zip(reversed(handed), reversed(sizes), strict=True):
        tail += n
        best = max(best, h + tail / rate)
    return best


@pytest.mark.parametrize("use_async", [False, True])
def test_late_wakeups_within_the_queue_cost_nothing(use_async):
    """1 ms messages on a link with a 2 ms queue; every sleep wakes 1.5 ms late (worked by
    hand below). The link never idles: 10 messages end at exactly 10 ms."""
    clock = Clock(late=[1.5 * MS] * 4 + [0.0])  # the drain's sleep wakes on time
    link = EmulatedLink(1e6, queue_s=2 * MS, clock=clock)
    handed, end = send_all(link, clock, [1000] * 10, use_async=use_async)
    # Messages 0-2 enter at once (at most 2 ms of work queued ahead of each); message 3 waits
    # until the queue is down to 2 ms (t = 1), wakes at 2.5 when 1.5 ms are queued, and so on.
    expected = [0, 0, 0, 2.5, 2.5, 4.5, 4.5, 6.5, 6.5, 8.5]
    assert handed == pytest.approx([x * MS for x in expected], abs=1e-12)
    assert clock.sleeps == pytest.approx([1 * MS, 0.5 * MS, 0.5 * MS, 0.5 * MS, 1.5 * MS])
    assert end == pytest.approx(10 * MS, abs=1e-12)
    assert finish(handed, [1000] * 10, 1e6) == pytest.approx(10 * MS, abs=1e-12)


def test_a_wakeup_later_than_the_queue_idles_the_link_for_the_excess_only():
    """Sleeps wake 3 ms late against a 2 ms queue: the link idles 1 ms per sleep, no more."""
    clock = Clock(late=[3 * MS] * 3 + [0.0])
    link = EmulatedLink(1e6, queue_s=2 * MS, clock=clock)
    handed, end = send_all(link, clock, [3000] * 4)
    # 3 ms messages: the first goes at 0 (link busy to 3); the second sleeps until 2 ms are
    # left (t = 1) and wakes at 4 (link idle 3-4, busy to 7); the third wakes at 5 + 3 = 8
    # (idle 7-8, busy to 11), the fourth at 12 (busy to 15): 12 ms of bytes in 15.
    assert handed == pytest.approx([0, 4 * MS, 8 * MS, 12 * MS], abs=1e-12)
    assert end == pytest.approx(15 * MS, abs=1e-12)


def test_an_idle_link_gives_no_credit():
    """A sender that paused does not get to burst past the queue afterwards."""
    clock = Clock()
    link = EmulatedLink(1e6, queue_s=2 * MS, clock=clock)
    sizes, work = [1000] * 8, [0.0] * 4 + [50 * MS] + [0.0] * 3
    handed, end = send_all(link, clock, sizes, work)
    # Before the pause: 0, 0, 0, then 1 (queue down to 2 ms). After it (t = 51), the link is
    # idle: three messages at once, the fourth once the queue is down to 2 ms again (t = 52).
    assert handed == pytest.approx([x * MS for x in [0, 0, 0, 1, 51, 51, 51, 52]], abs=1e-12)
    assert end == pytest.approx(55 * MS, abs=1e-12)


def expected_schedule(sizes, work, late, rate, queue_s):
    """The hand-over times the link's rule gives, from the closed-form finish times: message k
    goes when its sender is ready if at most queue_s of work is queued then, else it sleeps
    until the queue is down to queue_s and wakes `late` after that."""
    handed, t, lates = [], 0.0, list(late)
    for k, w in enumerate(work):
        t += w
        if k:
            due = finish(handed, sizes[:k], rate) - queue_s
            if due > t:
                t = due + lates.pop(0)
        handed.append(t)
    return handed


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("use_async", [False, True])
def test_random_schedules_match_the_closed_form_and_never_exceed_the_rate(seed, use_async):
    rng = random.Random(seed)
    rate, queue_s = 1.25e9, 2 * MS  # 10 Gbit/s
    m = 200
    sizes = [rng.choice([4, 739, 65536, 131072, 1 << 20, 8 << 20]) for _ in range(m)]
    work = [rng.choice([0.0, 0.0, 0.0, 20e-6, 300e-6, 5 * MS]) for _ in range(m)]
    late = [rng.uniform(0, 3 * MS) for _ in range(m + 1)]
    clock = Clock(late=list(late))
    link = EmulatedLink(rate, queue_s=queue_s, clock=clock)
    handed, end = send_all(link, clock, sizes, work, use_async=use_async)
    assert handed == pytest.approx(expected_schedule(sizes, work, late, rate, queue_s), abs=1e-9)
    last = finish(handed, sizes, rate)
    assert end >= last - 1e-12  # done only once the link has sent the last byte
    # The rate bound: between two hand-overs, at most rate * gap + the queue went out.
    cum = [0]
    for n in sizes:
        cum.append(cum[-1] + n)
    for j in range(m):
        for k in range(j + 1, m):
            assert cum[k] - cum[j] <= rate * (handed[k] - handed[j]) + rate * queue_s + 1e-3
    # The link idles only when the sender was not ready or woke later than the queue lasted.
    idle = last - handed[0] - sum(sizes) / rate
    excess = sum(max(0.0, x - queue_s) for x in late)
    gaps = sum(work)
    assert -1e-9 <= idle <= excess + gaps + 1e-9


def test_two_senders_share_one_link():
    """The streams of one gRPC transfer share their sender's link: together they stay within it
    and keep it busy."""
    clock = Clock(late=0.5 * MS)
    link = EmulatedLink(1e6, queue_s=2 * MS, clock=clock)
    handed: list[tuple[float, int]] = []

    async def stream(n: int, count: int) -> None:
        for _ in range(count):
            await link.take(n, sleep=clock.asleep)
            handed.append((clock.t, n))

    async def main() -> None:
        await asyncio.gather(stream(1000, 10), stream(500, 10))
        await link.drain(sleep=clock.asleep)

    asyncio.run(main())
    total = 10 * 1000 + 10 * 500
    assert clock.t == pytest.approx(total / 1e6 + 0.5 * MS, abs=1e-12)  # + the drain's late wake
    times, sizes = [t for t, _ in handed], [n for _, n in handed]
    assert finish(times, sizes, 1e6) == pytest.approx(total / 1e6, abs=1e-12)
    for j in range(len(handed)):
        for k in range(j + 1, len(handed)):
            assert sum(sizes[j:k]) <= 1e6 * (times[k] - times[j]) + 1e6 * 2 * MS + 1e-6


@pytest.mark.parametrize("rate", [0, -1.0, float("nan"), float("inf")])
def test_bad_rate_is_refused(rate):
    with pytest.raises(ValueError, match="rate"):
        EmulatedLink(rate)


def test_negative_queue_is_refused():
    with pytest.raises(ValueError, match="queue_s"):
        EmulatedLink(1e6, queue_s=-1.0)


@pytest.mark.parametrize("gbit", [10, 40, 50])
def test_default_queue_absorbs_millisecond_timer_wakeups(gbit):
    """asyncio rounds a sleep up to whole milliseconds: with the default queue, HACK p64 frames
    (the benchmark's buffers, 32 layers) whose every sleep wakes 1 ms late still take exactly
    their bytes / rate. (A 256 KiB queue, the former token bucket's burst, loses most of each
    late millisecond.)"""
    frame = [4, 41, 739, 1 << 20, 131072, 131072, 65536, 1 << 20, 131072, 131072, 65536, 739]
    sizes = frame * 32
    clock = Clock(late=1 * MS)
    link = EmulatedLink(gbit * 1e9 / 8, clock=clock)
    handed, end = send_all(link, clock, sizes, use_async=True)
    rate = gbit * 1e9 / 8
    assert clock.sleeps  # the link binds
    assert finish(handed, sizes, rate) == pytest.approx(sum(sizes) / rate, abs=1e-9)

"""One interface for every transport: a sender sends a request's blocks under a key, a receiver
verifies every frame, commits the whole transfer at once and acknowledges it.

The message-based transports (TCP, UCX) share the session protocol below:

    sender -> receiver   control message: u32 length | msgpack {"key", "frames", "token"}
    sender -> receiver   per frame: prefix, header, then each payload part (wire.FrameHeader.parts)
    receiver -> sender   control message: msgpack {"ok", "error", "tensor", "bytes"}

A transfer is done only when the sender has read {"ok": true}. The receiver keeps a transfer's
blocks private until every checksum passed, then hands them to its commit callback in one call.
"""

from __future__ import annotations

import abc
import asyncio
import hmac
import logging
import struct
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

import msgpack

from .. import wire
from ..bufpool import PayloadPool
from ..link import EmulatedLink

log = logging.getLogger(__name__)
T = TypeVar("T")
Buffer = bytes | bytearray | memoryview
FrameLike = wire.Block | Sequence[Buffer]
_LEN = struct.Struct("<I")


class TransferError(RuntimeError):
    """A transfer that did not complete; `tensor` names the offending tensor when the receiver
    rejected a frame."""

    def __init__(self, message: str, tensor: str | None = None):
        self.tensor = tensor
        super().__init__(message)


class Unauthorized(TransferError):
    pass


@dataclass(frozen=True)
class TransferLimits:
    """What a receiver accepts per transfer, on top of the per-frame wire.Limits."""

    frame: wire.Limits = field(default_factory=wire.Limits)
    max_frames: int = 1 << 16
    max_transfer_bytes: int = 32 << 30
    max_control_bytes: int = 64 << 10


@dataclass(frozen=True)
class RetryPolicy:
    """Connection attempts with exponential backoff (connection refused, not yet listening)."""

    attempts: int = 5
    initial_delay: float = 0.05
    factor: float = 2.0
    max_delay: float = 2.0


@dataclass
class TransferResult:
    key: str
    frames: int
    bytes: int
    seconds: float
    receiver_tail_s: float | None = None  # last payload byte to ack, as the receiver measured


async def connect_with_retry(
    connect: Callable[[], Awaitable[T]], policy: RetryPolicy, where: str
) -> T:
    delay, last = policy.initial_delay, None
    for attempt in range(policy.attempts):
        try:
            return await connect()
        except (ConnectionError, OSError) as e:
            last = e
            log.debug("connect to %s failed (attempt %d): %s", where, attempt + 1, e)
        except Exception as e:  # ucxx raises its own error types for a refused connection
            if "refused" not in str(e).lower() and "unreachable" not in str(e).lower():
                raise
            last = e
        if attempt + 1 < policy.attempts:
            await asyncio.sleep(delay)
            delay = min(delay * policy.factor, policy.max_delay)
    raise TransferError(f"could not connect to {where} after {policy.attempts} attempts: {last}")


def frame_buffers(item: FrameLike) -> list[Buffer]:
    """A block's wire buffers (encoded now) or already-encoded buffers (passed through)."""
    return wire.encode_block(item) if isinstance(item, wire.Block) else list(item)


class LazyFrames(Sequence):
    """A transfer's frames, each encoded when a transport first asks for it: frame i + 1 is
    checksummed while frame i is still draining through the socket, so only the first frame's
    encoding precedes the first byte. Slices share the encodings; `nbytes` counts the frames
    encoded so far (all of them once the transfer is sent)."""

    def __init__(self, items: Sequence[FrameLike], _cache: dict | None = None, _base: int = 0):
        # Lazily built blocks stay lazy (frame i's block is gathered when frame i goes out).
        self._items = items if isinstance(items, wire.LazyBlocks) else list(items)
        self._cache, self._base = {} if _cache is None else _cache, _base

    def __len__(self) -> int:
        return len(self._items)

    def __getitem__(self, i):  # noqa: ANN001, ANN204 (int or slice, as Sequence)
        if isinstance(i, slice):
            start = range(len(self._items))[i].start if len(self._items) else 0
            return LazyFrames(self._items[i], self._cache, self._base + start)
        i = range(len(self._items))[i]
        key = self._base + i
        if key not in self._cache:
            self._cache[key] = frame_buffers(self._items[i])
        return self._cache[key]

    @property
    def nbytes(self) -> int:
        return sum(memoryview(x).nbytes for f in self._cache.values() for x in f)


COALESCE = 1 << 20  # run size of a sender whose hello names none (NIXL, senders before 4 MiB UCX)
RUN_BYTES_RANGE = (64 << 10, 64 << 20)  # what a hello's run_bytes may say


def runs(lengths: Sequence[int], limit: int = COALESCE) -> list[tuple[int, int]]:
    """Consecutive payload parts sent as one message: small parts are grouped up to `limit`
    bytes, a large part goes alone. Sender and receiver derive the same runs from the header (the
    sender names its limit in the hello), so message transports (UCX) see few messages and the
    receiver still reads straight into place."""
    out, start, size = [], 0, 0
    for i, n in enumerate(lengths):
        if size and size + n > limit:
            out.append((start, i))
            start, size = i, 0
        size += n
    if start < len(lengths):
        out.append((start, len(lengths)))
    return out


def payload_runs(header: wire.FrameHeader, limit: int = COALESCE) -> list[tuple[int, int]]:
    """(start, end) payload offsets of the frame's non-empty runs, as the receiver reads them."""
    parts = header.parts()
    out = []
    for a, b in runs([n for _, n in parts], limit):
        off, end = parts[a][0], parts[b - 1][0] + parts[b - 1][1]
        if end > off:
            out.append((off, end))
    return out


def message_parts(
    buffers: Sequence[Buffer], limit: int = COALESCE, joined_head: bool = False
) -> list[memoryview]:
    """The frame as the receiver reads it: prefix, header (one message with `joined_head`), then
    the payload's non-empty runs."""
    mvs = [memoryview(b).cast("B") for b in buffers]
    first = mvs[0]
    if len(first) == wire.PREFIX.size + int.from_bytes(first[8:12], "little"):
        head, parts = [first[: wire.PREFIX.size], first[wire.PREFIX.size :]], mvs[1:]
    else:  # a contiguous stored frame: cut it where the receiver reads
        head, parts = _cut_stored_frame(first)
        parts += mvs[1:]
    out = [memoryview(b"".join(head))] if joined_head else head
    for a, b in runs([len(m) for m in parts], limit):
        msg = parts[a] if b - a == 1 else memoryview(b"".join(parts[a:b]))
        if len(msg):
            out.append(msg)
    return out


def _cut_stored_frame(mv: memoryview) -> tuple[list[memoryview], list[memoryview]]:
    start = wire.PREFIX.size + int.from_bytes(mv[8:12], "little")
    head = [mv[: wire.PREFIX.size], mv[wire.PREFIX.size : start]]
    try:
        header = wire.parse_header(bytes(mv[: wire.PREFIX.size]), mv[wire.PREFIX.size : start])
    except wire.FrameError:  # the receiver will refuse it at the header: send the rest as is
        return head, [mv[start:]]
    return head, [mv[start + off : start + off + n] for off, n in header.parts()]


class Channel(Protocol):
    """An ordered, reliable byte/message pipe; recv_into fills exactly len(mv) bytes."""

    async def send(self, buffers: Sequence[memoryview]) -> None: ...

    async def recv_into(self, mv: memoryview) -> None: ...


class ThrottledChannel:
    """A channel whose sends go through an emulated link (the --bandwidth-limit of the benchmark)."""

    def __init__(self, inner: Channel, link: EmulatedLink):
        self.inner, self.link = inner, link

    async def send(self, buffers: Sequence[memoryview]) -> None:
        # Whole buffers: message transports (UCX) must keep the receiver's message boundaries.
        for b in buffers:
            await self.link.take(len(b))
            await self.inner.send([b])

    async def recv_into(self, mv: memoryview) -> None:
        await self.inner.recv_into(mv)


async def send_msg(ch: Channel, obj: dict) -> None:
    body = msgpack.packb(obj, use_bin_type=True)
    await ch.send([memoryview(_LEN.pack(len(body))), memoryview(body)])


async def recv_msg(ch: Channel, limit: int) -> dict:
    n = bytearray(_LEN.size)
    await ch.recv_into(memoryview(n))
    (size,) = _LEN.unpack(n)
    if size > limit:
        raise wire.LimitError(f"control message of {size} bytes exceeds {limit}", "control")
    body = bytearray(size)
    await ch.recv_into(memoryview(body))
    try:
        obj = msgpack.unpackb(body, raw=False)
    except Exception as e:
        raise wire.FrameError(f"control message is not msgpack: {e}", "control") from None
    if not isinstance(obj, dict):
        raise wire.FrameError("control message is not a map", "control")
    return obj


async def send_parts(
    ch: Channel, buffers: Sequence[Buffer], limit: int = COALESCE, joined_head: bool = False
) -> None:
    await ch.send(message_parts(buffers, limit, joined_head))


async def send_session(
    ch: Channel,
    key: str,
    frames: Sequence[Sequence[Buffer]],
    token: str | None,
    hello: dict | None = None,
    send_frame: Callable[[Channel, Sequence[Buffer]], Awaitable[None]] = send_parts,
) -> dict:
    """Sender side; returns the receiver's acknowledgement. The ack is read concurrently, so a
    receiver that rejects a frame early stops the sender at once. `hello` adds fields to the first
    message and `send_frame` replaces how a frame's buffers go out (NIXL)."""

    async def push() -> None:
        await send_msg(ch, {**(hello or {}), "key": key, "frames": len(frames), "token": token})
        for bufs in frames:
            await send_frame(ch, bufs)

    pusher = asyncio.ensure_future(push())
    acker = asyncio.ensure_future(recv_msg(ch, 1 << 20))
    try:
        done, _ = await asyncio.wait({pusher, acker}, return_when=asyncio.FIRST_COMPLETED)
        if acker in done:  # early answer: a rejection (or a protocol error)
            pusher.cancel()
            return acker.result()
        try:
            pusher.result()
        except (ConnectionError, OSError) as e:
            # The receiver may have closed after rejecting: prefer its reason if it sent one.
            try:
                return await asyncio.wait_for(acker, 1.0)
            except Exception:
                raise TransferError(f"connection lost while sending: {e}") from e
        return await acker
    finally:
        for t in (pusher, acker):
            if not t.done():
                t.cancel()


async def within(aw: Awaitable[T], seconds: float) -> T:
    """asyncio.wait_for without a task per call where asyncio.timeout exists (3.11+): a frame's
    deadline then costs a timer, not two extra event-loop rounds."""
    if hasattr(asyncio, "timeout"):
        async with asyncio.timeout(seconds):
            return await aw
    return await asyncio.wait_for(aw, seconds)


def check_ack(ack: dict, key: str) -> None:
    if not ack.get("ok"):
        err = str(ack.get("error", "rejected"))
        cls = Unauthorized if ack.get("unauthorized") else TransferError
        raise cls(f"receiver rejected transfer {key!r}: {err}", ack.get("tensor"))


def token_ok(expected: str | None, given: object) -> bool:
    if expected is None:
        return True
    return isinstance(given, str) and hmac.compare_digest(given.encode(), expected.encode())


SLICE = 1 << 20  # a stream channel reports progress at least this often inside a large run
VERIFY_BATCH = 1 << 20  # bytes verified at a time while a payload arrives (and at its end)


class KVReceiver(abc.ABC):
    """Holds committed transfers; subclasses feed it verified blocks.

    commit(key, blocks) runs once per complete, verified transfer (default: keep them in
    `received`). `pending_bytes` counts payload buffers of transfers in flight: it returns to 0
    when a transfer is committed or abandoned. Payloads land in buffers of `pool` (by default one
    per receiver), reused once nothing references a delivered block any more.
    """

    def __init__(
        self,
        *,
        limits: TransferLimits | None = None,
        token: str | None = None,
        expect_model: wire.ModelIdentity | None = None,
        commit: Callable[[str, list[wire.Block]], None] | None = None,
        idle_timeout: float = 30.0,
        pool: PayloadPool | None = None,
    ):
        self.limits = limits or TransferLimits()
        self.pool = pool or PayloadPool()
        self.token = token
        self.expect_model = expect_model
        self._commit_cb = commit
        self.idle_timeout = idle_timeout  # a frame must arrive within this (a silent peer)
        self.received: dict[str, list[wire.Block]] = {}
        self.rejected: list[str] = []
        self.aborted = 0
        self.pending_bytes = 0
        self._cond = threading.Condition()

    def commit(self, key: str, blocks: list[wire.Block]) -> None:
        if self._commit_cb is not None:
            self._commit_cb(key, blocks)
        with self._cond:
            if self._commit_cb is None:
                self.received[key] = blocks
            self._cond.notify_all()

    def note_failure(self, why: str, aborted: bool) -> None:
        with self._cond:
            if aborted:
                self.aborted += 1
            else:
                self.rejected.append(why)
            self._cond.notify_all()

    def wait_for(self, key: str, timeout: float) -> list[wire.Block]:
        """Block the calling thread until `key` is committed (only with the default commit)."""
        with self._cond:
            if not self._cond.wait_for(lambda: key in self.received, timeout):
                raise TimeoutError(f"transfer {key!r} not committed within {timeout} s")
            return self.received[key]

    def wait_until(self, predicate: Callable[[], bool], timeout: float) -> bool:
        """Poll `predicate` (e.g. on pending_bytes, which changes without notification)."""
        end = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > end:
                return False
            time.sleep(0.02)
        return True

    @abc.abstractmethod
    async def start(self, host: str = "127.0.0.1", port: int = 0) -> tuple[str, int]: ...

    @abc.abstractmethod
    async def close(self) -> None: ...

    async def receive_sessions(self, ch: Channel) -> None:
        """Serve transfers one after another on a connection until it closes or loses sync."""
        while await self.receive_session(ch):
            pass

    async def receive_session(self, ch: Channel) -> bool:
        """Receiver side of the session protocol; True if the connection can carry another
        (a failed transfer may leave the stream mid-frame: the caller then closes it)."""
        lim = self.limits
        try:
            hello = await recv_msg(ch, lim.max_control_bytes)
        except (ConnectionError, OSError, asyncio.IncompleteReadError, wire.FrameError):
            return False
        key, n = hello.get("key"), hello.get("frames")
        if not token_ok(self.token, hello.get("token")):
            self.note_failure("bad token", aborted=False)
            await send_msg(
                ch, {"ok": False, "error": "missing or wrong token", "unauthorized": True}
            )
            return False
        if not isinstance(key, str) or not isinstance(n, int) or not 0 < n <= lim.max_frames:
            await send_msg(ch, {"ok": False, "error": f"bad hello: key {key!r}, frames {n!r}"})
            return False
        run_bytes = hello.get("run_bytes", COALESCE)  # the sender's message runs (UCX, NIXL)
        lo, hi = RUN_BYTES_RANGE
        if type(run_bytes) is not int or not lo <= run_bytes <= hi:
            await send_msg(ch, {"ok": False, "error": f"bad hello: run_bytes {run_bytes!r}"})
            return False
        head = hello.get("head", "split")  # "joined": prefix and header in one message
        if head not in ("split", "joined") or head == "joined" and getattr(ch, "stream", False):
            await send_msg(ch, {"ok": False, "error": f"bad hello: head {head!r}"})
            return False
        # A joined head arrives in a receive of the largest allowed size; only the prefix says
        # how much of it is the header (the header checksum covers those bytes).
        scratch = (
            bytearray(wire.PREFIX.size + lim.frame.max_header_bytes) if head == "joined" else None
        )
        used = 0
        try:
            session = self.session_start(hello)
        except wire.FrameError as e:
            await send_msg(ch, {"ok": False, "error": str(e)})
            return False
        held, last_byte = 0, 0.0

        async def frame() -> wire.Block:
            nonlocal held, last_byte, used
            if scratch is None:
                pre = bytearray(wire.PREFIX.size)
                await ch.recv_into(memoryview(pre))
                _, hlen, prefix = wire.parse_prefix(pre, lim.frame)
                hb = bytearray(hlen)
                await ch.recv_into(memoryview(hb))
            else:  # a shorter message must not find the previous header's bytes there
                scratch[:used] = bytes(used)
                await ch.recv_into(memoryview(scratch))
                _, hlen, prefix = wire.parse_prefix(scratch, lim.frame)
                used = wire.PREFIX.size + hlen
                hb = memoryview(scratch)[wire.PREFIX.size : used]
            header = wire.parse_header(prefix, hb, lim.frame, self.expect_model)
            if held + header.payload_len > lim.max_transfer_bytes:
                raise wire.LimitError(f"transfer exceeds {lim.max_transfer_bytes} bytes", "payload")
            payload = self.pool.acquire(header.payload_len)  # only after validation
            first = header.entries[0].offset if header.entries else header.payload_len
            if first:  # no run covers it: a reused buffer must not keep older bytes there
                payload[:first] = bytes(first)
            held += header.payload_len
            self.pending_bytes += header.payload_len
            verifier = wire.PayloadVerifier(header, payload)
            queued, arrived = 0, 0.0

            def filled(n: int) -> None:
                # Verify what has arrived, in batches, while the kernel goes on buffering the
                # bytes behind it: after the last byte only the last batch is left to hash.
                nonlocal queued, arrived
                if n == header.payload_len:
                    arrived = time.perf_counter()
                if n - queued >= VERIFY_BATCH or n == header.payload_len:
                    verifier.advance(n)
                    queued = n

            await self.recv_payload(ch, header, payload, session, filled, run_bytes)
            last_byte = arrived or time.perf_counter()
            return verifier.block()  # verified; private to this transfer until the commit

        try:
            blocks = []
            for _ in range(n):
                try:
                    blocks.append(await within(frame(), self.idle_timeout))
                except asyncio.TimeoutError:
                    raise ConnectionError(f"no frame within {self.idle_timeout} s") from None
            self.commit(key, blocks)  # every checksum of every frame passed: now visible
            self.pending_bytes -= held
            held = 0
            # tail_s: from the last payload byte to this ack (what verification and commit add
            # to the transfer's critical path); an informational field senders may ignore.
            tail = time.perf_counter() - last_byte
            nbytes = sum(b.nbytes for b in blocks)
            await send_msg(ch, {"ok": True, "bytes": nbytes, "tail_s": tail})
            return True
        except wire.FrameError as e:
            self.note_failure(str(e), aborted=False)
            try:
                await send_msg(ch, {"ok": False, "error": str(e), "tensor": e.tensor})
            except (ConnectionError, OSError):
                pass
        except (ConnectionError, OSError, asyncio.IncompleteReadError) as e:
            log.info("transfer %r aborted by the peer: %s", key, e)
            self.note_failure(str(e), aborted=True)
        finally:
            self.pending_bytes -= held  # the partial blocks are dropped with this frame
            self.session_end(session)
        return False

    def session_start(self, hello: dict) -> object:
        """Per-transfer state from the hello (NIXL: the sender's agent); FrameError refuses."""
        return None

    def session_end(self, session: object) -> None:
        return None

    async def recv_payload(
        self,
        ch: Channel,
        header: wire.FrameHeader,
        payload: memoryview,
        session: object,
        filled: Callable[[int], None] = lambda n: None,
        run_bytes: int = COALESCE,
    ) -> None:
        """Fill the validated payload buffer: each run (of the sender's `run_bytes`) straight into
        its place (a byte stream: all runs at once, in slices). filled(n) is told when the first
        n bytes are in place (the tensors among them are verified while later bytes are still in
        flight)."""
        pv = memoryview(payload)
        if not getattr(ch, "stream", False):  # UCX: one message per run
            return await _recv_runs(ch, pv, payload_runs(header, run_bytes), filled)
        # A byte stream: the runs are contiguous, from the first tensor to the end.
        first = header.entries[0].offset if header.entries else header.payload_len
        for a in range(first, header.payload_len, SLICE):
            b = min(a + SLICE, header.payload_len)
            await ch.recv_into(pv[a:b])
            filled(b)


async def _recv_runs(
    ch: Channel, pv: memoryview, spans: list[tuple[int, int]], filled: Callable[[int], None]
) -> None:
    """A frame's runs as messages, every receive posted at once (in order: tasks start in the
    order they were made): the transport can pull run i + 1 while run i is still being verified,
    instead of a round trip per run after each wake-up."""
    if len(spans) == 1:  # the common case with 4 MiB runs: no task to make
        ((a, b),) = spans
        await ch.recv_into(pv[a:b])
        return filled(b)
    tasks = [asyncio.ensure_future(ch.recv_into(pv[a:b])) for a, b in spans]
    try:
        for (_, b), t in zip(spans, tasks, strict=True):
            await t
            filled(b)
    finally:
        for t in tasks:
            t.cancel()


class KVSender(abc.ABC):
    """Sends a request's blocks (wire.Block or already-encoded buffers) under a key."""

    def __init__(
        self,
        *,
        timeout: float = 60.0,
        retry: RetryPolicy | None = None,
        token: str | None = None,
        bandwidth: float | None = None,
    ):
        """bandwidth: emulate a link of that many bytes/s (hack_transport.link, one per sender,
        shared by its transfers as a NIC would be); None = as fast as it goes."""
        self.timeout = timeout
        self.retry = retry or RetryPolicy()
        self.token = token
        self.bandwidth = bandwidth
        self.link = EmulatedLink(bandwidth) if bandwidth else None

    def throttle(self, ch: Channel) -> Channel:
        return ThrottledChannel(ch, self.link) if self.link is not None else ch

    @abc.abstractmethod
    async def _send(self, key: str, frames: Sequence[list[Buffer]]) -> dict: ...

    async def send(self, key: str, blocks: Sequence[FrameLike]) -> TransferResult:
        """Send and wait for the receiver's acknowledgement (TransferError within `timeout`).
        Blocks are encoded as they go out (LazyFrames), each block's checksums once."""
        frames = LazyFrames(blocks)
        t0 = time.perf_counter()
        try:
            ack = await asyncio.wait_for(self._send(key, frames), self.timeout)
        except asyncio.TimeoutError:
            raise TransferError(
                f"transfer {key!r} not acknowledged within {self.timeout} s"
            ) from None
        except (ConnectionError, OSError, wire.FrameError) as e:
            raise TransferError(f"transfer {key!r} failed: {e}") from e
        check_ack(ack, key)
        if self.link is not None:  # done when the emulated link has sent the last byte
            await self.link.drain()
        secs = time.perf_counter() - t0
        tail = ack.get("tail_s")
        return TransferResult(
            key, len(frames), frames.nbytes, secs, tail if isinstance(tail, float) else None
        )

    def send_sync(self, key: str, blocks: Sequence[FrameLike]) -> TransferResult:
        """send() on a private event loop; connections do not outlive the call."""

        async def once() -> TransferResult:
            try:
                return await self.send(key, blocks)
            finally:
                await self.close()

        return asyncio.run(once())

    async def close(self) -> None:
        return None


class ServerThread:
    """Runs an async receiver on its own event loop in a daemon thread (sync use, tests)."""

    def __init__(self, receiver: KVReceiver, host: str = "127.0.0.1", port: int = 0):
        self.receiver = receiver
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()
        fut = asyncio.run_coroutine_threadsafe(receiver.start(host, port), self.loop)
        self.address = fut.result(30)

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self.receiver.close(), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)

    def __enter__(self) -> ServerThread:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

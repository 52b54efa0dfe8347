"""gRPC transport (proto/hack_kv.proto, service KVTransfer): client streaming of frames in chunks
of >= 1 MiB over several parallel streams, shared-secret token, optional TLS.

The frames of one transfer are spread over `streams` RPCs. The receiver verifies each stream's
frames, holds them privately, and commits the transfer when its last stream has verified; any
failed stream discards the whole transfer.
"""

from __future__ import annotations

import asyncio
import ctypes
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import grpc

from .. import wire
from ..bufpool import DEFAULT_IDLE_BYTES
from ..proto import hack_kv_pb2 as pb
from ..proto import hack_kv_pb2_grpc as pb_grpc
from .assembler import FrameAssembler
from .base import (
    Buffer,
    KVReceiver,
    KVSender,
    TransferError,
    Unauthorized,
    connect_with_retry,
    token_ok,
)
from .grpc_chunks import encode_chunk, parse_chunk

CHUNK = 1 << 20
MIN_CHUNK = 1 << 20
# Frames up to this size travel as one message each, kept by the receiver as their payload; it
# stays under the 5 MiB receive limit that every receiver has had (older ones copy it out).
WHOLE_FRAME = 4 << 20
TOKEN_HEADER = "x-hack-kv-token"
SERVICE = "hack_kv.v1.KVTransfer"
TAIL_HEADER = "x-hack-kv-tail-s"


def _options(max_message: int) -> list[tuple[str, int]]:
    return [
        ("grpc.max_receive_message_length", max_message),
        ("grpc.max_send_message_length", max_message),
    ]


_HEAP_TUNED = False


def keep_heap_pages(
    mmap_threshold: int = 8 << 20, trim_threshold: int = DEFAULT_IDLE_BYTES
) -> bool:
    """Let glibc reuse freed heap memory for gRPC's received messages instead of returning it to
    the kernel. grpc hands each message to Python as a fresh bytes object, allocated on grpc's
    own threads; their malloc arenas mapped and trimmed such blocks over and over, so page
    faults and page zeroing took about a fifth of the receiver's CPU (perf: clear_page,
    exc_page_fault), and Llama-8B 4K p64 requests took 84-99 ms against 72-83 with this
    (transfer_notes.md). A whole-frame message is kept as its frame's payload until the
    transfer is committed and dropped, so a whole transfer's messages are freed at once: the
    trim threshold is the receive-buffer pool's idle bound (1 GiB), below which freed memory
    stays for the next transfer as the pool's buffers do (32 MiB trimmed ~100 MB after each
    Llama-8B 4K request and faulted it in again). Process-wide and once; False where malloc
    is not glibc's or the environment already tunes it (MALLOC_*_ or GLIBC_TUNABLES), which
    then wins."""
    global _HEAP_TUNED
    if _HEAP_TUNED:
        return True
    env_tuned = "malloc" in os.environ.get("GLIBC_TUNABLES", "") or any(
        k.startswith("MALLOC_") and k.endswith("_") for k in os.environ
    )
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None)
    if env_tuned or mallopt is None:
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # <malloc.h>
    _HEAP_TUNED = bool(mallopt(m_mmap_threshold, mmap_threshold)) and bool(
        mallopt(m_trim_threshold, trim_threshold)
    )
    return _HEAP_TUNED


@dataclass
class _Pending:
    num_streams: int
    parts: dict[int, list[wire.Block]] = field(default_factory=dict)
    failed: str | None = None
    since: float = field(default_factory=time.monotonic)
    held: int = 0


class _Servicer(pb_grpc.KVTransferServicer):
    def __init__(self, owner: GrpcReceiver):
        self.owner = owner

    async def Transfer(self, request_iterator, context):  # noqa: N802 (generated name)
        return await self.owner._transfer(request_iterator, context)


class GrpcReceiver(KVReceiver):
    def __init__(
        self,
        *,
        tls: tuple[bytes, bytes] | None = None,
        pending_timeout: float = 120.0,
        tune_malloc: bool = True,
        **kw,
    ):
        """tls: (private key PEM, certificate chain PEM) to serve TLS. tune_malloc: call
        keep_heap_pages() when the server starts (a process-wide malloc setting)."""
        super().__init__(**kw)
        self.tls = tls
        self.tune_malloc = tune_malloc
        self.pending_timeout = pending_timeout
        self._pending: dict[str, _Pending] = {}
        # Frame payloads kept as the received message (whole-frame messages) or copied out.
        self.payload_views = self.payload_copies = 0

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> tuple[str, int]:
        max_msg = 4 * CHUNK + (1 << 20)
        if self.tune_malloc:
            keep_heap_pages()
        self._server = grpc.aio.server(options=_options(max_msg))
        # The generated servicer's wiring, with the chunk parser that keeps `data` a view.
        handlers = {
            "Transfer": grpc.stream_unary_rpc_method_handler(
                _Servicer(self).Transfer,
                request_deserializer=parse_chunk,
                response_serializer=pb.TransferAck.SerializeToString,
            )
        }
        self._server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(SERVICE, handlers),)
        )
        self._server.add_registered_method_handlers(SERVICE, handlers)
        addr = f"{host}:{port}"
        if self.tls:
            bound = self._server.add_secure_port(addr, grpc.ssl_server_credentials([self.tls]))
        else:
            bound = self._server.add_insecure_port(addr)
        await self._server.start()
        return host, bound

    async def close(self) -> None:
        await self._server.stop(grace=None)

    def _expire(self) -> None:
        now = time.monotonic()
        for key, p in list(self._pending.items()):
            if now - p.since > self.pending_timeout:
                self._drop(key, "expired")

    def _drop(self, key: str, why: str) -> None:
        p = self._pending.pop(key, None)
        if p is not None:
            self.pending_bytes -= p.held
            p.parts.clear()

    async def _transfer(self, chunks, context) -> pb.TransferAck:
        meta = dict(context.invocation_metadata() or ())
        if not token_ok(self.token, meta.get(TOKEN_HEADER)):
            self.note_failure("bad token", aborted=False)
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong token")
        self._expire()
        asm, key, held, last_byte = None, None, 0, 0.0

        def alloc(n: int) -> None:
            nonlocal held
            held += n
            self.pending_bytes += n

        try:
            async for chunk in chunks:
                if asm is None:
                    key, idx, n_streams = chunk.key, chunk.stream_index, chunk.num_streams
                    if not key or not 0 <= idx < n_streams <= 256:
                        return pb.TransferAck(
                            ok=False,
                            error=f"bad first chunk: key {key!r}, stream {idx}/{n_streams}",
                        )
                    p = self._pending.setdefault(key, _Pending(n_streams))
                    if p.num_streams != n_streams or idx in p.parts:
                        return pb.TransferAck(
                            ok=False,
                            error=f"stream {idx}/{n_streams} conflicts with the transfer in progress",
                        )
                    asm = FrameAssembler(
                        self.limits,
                        self.expect_model,
                        alloc,
                        self.pool.acquire,
                        keep_views=not self.pool.pinned,  # pinned buffers: copy into those
                    )
                    expected_frames = chunk.num_frames
                last_byte = time.perf_counter()  # before this chunk's checks
                asm.feed(chunk.data, chunk.data_address)
            if asm is None:
                return pb.TransferAck(ok=False, error="empty stream")
            if not asm.idle or len(asm.blocks) != expected_frames:
                raise wire.TruncatedFrame(
                    f"stream ended after {len(asm.blocks)} of {expected_frames} frames", "payload"
                )
        except wire.FrameError as e:
            self.note_failure(str(e), aborted=False)
            self._fail(key, str(e))
            self.pending_bytes -= held
            return pb.TransferAck(ok=False, error=str(e), tensor=e.tensor or "")
        except BaseException as e:  # peer gone mid-stream (cancelled) or a broken stream
            self.note_failure(str(e) or type(e).__name__, aborted=True)
            self._fail(key, "a stream was aborted")
            self.pending_bytes -= held
            raise
        finally:
            if asm is not None:
                self.payload_views += asm.views
                self.payload_copies += asm.copies
        p = self._pending.get(key)
        if p is None or p.failed:
            self.pending_bytes -= held
            return pb.TransferAck(
                ok=False, error=f"transfer failed: {p.failed if p else 'expired'}"
            )
        p.parts[idx] = asm.blocks
        p.held += held
        if len(p.parts) < p.num_streams:
            return pb.TransferAck(ok=True, committed=False, bytes=held)
        self._pending.pop(key)
        blocks = [b for i in sorted(p.parts) for b in p.parts[i]]
        self.commit(key, blocks)
        self.pending_bytes -= p.held
        # Informational, like the TCP ack's tail_s: last byte of this stream to the commit.
        tail = time.perf_counter() - last_byte
        context.set_trailing_metadata(((TAIL_HEADER, f"{tail:.6f}"),))
        return pb.TransferAck(ok=True, committed=True, bytes=held)

    def _fail(self, key: str | None, why: str) -> None:
        if key is None:
            return
        p = self._pending.get(key)
        if p is not None:
            self.pending_bytes -= p.held
            p.held = 0
            p.parts.clear()
            p.failed = why


def _payload_at(frame: list[memoryview]) -> int | None:
    """Offset of a frame's first payload byte (after prefix and header), None if not a frame."""
    head = frame[0] if frame and len(frame[0]) >= wire.PREFIX.size else b"".join(frame)
    if len(head) < wire.PREFIX.size:
        return None
    magic, _, _, hlen, _ = wire.PREFIX.unpack_from(head)
    return wire.PREFIX.size + hlen if magic == wire.MAGIC else None


def _chunks(
    first: pb.TransferChunk, frames: Sequence[Sequence[Buffer]], size: int, whole: int = 0
) -> Iterator[bytes]:
    """The stream's serialized messages, one copy of the frame bytes. A frame of `size` to
    `whole` bytes is a message of its own, smaller ones share one until it reaches `size`
    (staying under `whole`); the first frame's payload is aligned (encode_chunk's pad) for the
    receiver to keep as is. Larger frames (all with whole=0) go in chunks of `size` that run
    across frames."""
    pieces: list[memoryview] = []
    total, head, align_at, grouped, sent = 0, first, None, False, False

    def flush() -> bytes:
        nonlocal pieces, total, head, align_at, grouped, sent
        msg = encode_chunk(head, pieces, align_at)
        pieces, total, head, align_at, grouped, sent = [], 0, None, None, False, True
        return msg

    for frame in frames:
        bufs = [memoryview(buf).cast("B") for buf in frame]
        n = sum(len(b) for b in bufs)
        if n <= whole:
            if pieces and (not grouped or total + n > whole or n >= size):
                yield flush()  # a frame of `size` or more starts a message: its payload aligned
            if not pieces:
                grouped, align_at = True, _payload_at(bufs)
            pieces += bufs
            total += n
            if total >= size:
                yield flush()
            continue
        if grouped:  # whole frames pending: they go first
            yield flush()
        for mv in bufs:
            while len(mv):
                take = min(size - total, len(mv))
                pieces.append(mv[:take])
                total += take
                mv = mv[take:]
                if total == size:
                    yield flush()
    if pieces or not sent:
        yield flush()


class GrpcSender(KVSender):
    """Keeps one channel (one HTTP/2 connection) across transfers, on the event loop that made
    it, shared by concurrent transfers; close() ends it. A transfer that fails cancels only its
    own streams; a channel whose connection broke is replaced before the next transfer."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        streams: int = 2,
        chunk_bytes: int = CHUNK,
        whole_frames: bool = True,
        root_certificates: bytes | None = None,
        tls_server_name: str | None = None,
        **kw,
    ):
        super().__init__(**kw)
        if chunk_bytes < MIN_CHUNK:
            raise ValueError(f"chunk_bytes must be at least {MIN_CHUNK}")
        self.target = f"{host}:{port}"
        self.streams = streams
        self.chunk_bytes = chunk_bytes
        self.whole = WHOLE_FRAME if whole_frames else 0  # 0: every frame in chunk_bytes chunks
        self.root_certificates = root_certificates
        self.tls_server_name = tls_server_name
        self._ch: grpc.aio.Channel | None = None
        self._lock: asyncio.Lock | None = None

    async def close(self) -> None:
        ch, self._ch, self._lock = self._ch, None, None
        if ch is not None:
            await ch.close()

    async def _ready_channel(self) -> grpc.aio.Channel:
        """The sender's channel, kept across transfers: a fresh one pays HTTP/2's handshake and
        grows its flow-control windows from 64 KiB again. Concurrent transfers share it; one
        that is no longer READY (its peer went away) is replaced, once."""
        self._lock = self._lock or asyncio.Lock()
        async with self._lock:
            ch = self._ch
            if ch is not None and ch.get_state() != grpc.ChannelConnectivity.READY:
                self._ch = None
                await ch.close()  # transfers still on it have failed with its connection
                ch = None
            if ch is None:
                where = f"grpc://{self.target}"
                ch = self._ch = await connect_with_retry(self._connect, self.retry, where)
            return ch

    def _channel(self) -> grpc.aio.Channel:
        opts = _options(max(self.chunk_bytes, self.whole) + (1 << 20))
        if self.root_certificates is None:
            return grpc.aio.insecure_channel(self.target, options=opts)
        if self.tls_server_name:
            opts.append(("grpc.ssl_target_name_override", self.tls_server_name))
        creds = grpc.ssl_channel_credentials(root_certificates=self.root_certificates)
        return grpc.aio.secure_channel(self.target, creds, options=opts)

    async def _connect(self, wait: float = 5.0) -> grpc.aio.Channel:
        """A fresh channel that reached READY; ConnectionRefusedError on its first failure."""
        channel = self._channel()
        try:
            state = channel.get_state(try_to_connect=True)
            while state != grpc.ChannelConnectivity.READY:
                if state == grpc.ChannelConnectivity.TRANSIENT_FAILURE:
                    raise ConnectionRefusedError(f"no gRPC server at {self.target}")
                await asyncio.wait_for(channel.wait_for_state_change(state), wait)
                state = channel.get_state(try_to_connect=True)
        except BaseException as e:
            await channel.close()
            if isinstance(e, asyncio.TimeoutError):
                raise ConnectionRefusedError(
                    f"gRPC server at {self.target} not ready in {wait} s"
                ) from None
            raise
        return channel

    async def _send(self, key: str, frames: list[list[Buffer]]) -> dict:
        try:
            acks, tails = await self._over(await self._ready_channel(), key, frames)
        except grpc.aio.AioRpcError as e:  # a broken connection leaves the channel not READY
            if e.code() == grpc.StatusCode.UNAUTHENTICATED:
                raise Unauthorized(f"receiver refused transfer {key!r}: {e.details()}") from None
            raise TransferError(
                f"gRPC transfer {key!r} failed: {e.code().name} {e.details()}"
            ) from None
        bad = [a for a in acks if not a.ok]
        if bad:
            # Every stream of a failed transfer reports it; only the one that carried the bad
            # frame names the tensor, and stream order is arbitrary.
            first = next((a for a in bad if a.tensor), bad[0])
            return {"ok": False, "error": first.error, "tensor": first.tensor or None}
        if sum(a.committed for a in acks) != 1:
            return {"ok": False, "error": "receiver did not commit the transfer"}
        return {"ok": True, **({"tail_s": tails[0]} if tails else {})}

    async def _over(
        self, channel: grpc.aio.Channel, key: str, frames: Sequence[list[Buffer]]
    ) -> tuple[list[pb.TransferAck], list[float]]:
        """The transfer over `channel`: the frames split over `streams` RPCs; their acks and the
        receiver's tail (from the stream that committed)."""
        # As the generated stub, but the chunks arrive serialized (encode_chunk).
        transfer = channel.stream_unary(
            f"/{SERVICE}/Transfer", response_deserializer=pb.TransferAck.FromString
        )
        n = max(1, min(self.streams, len(frames)))
        cuts = [round(i * len(frames) / n) for i in range(n + 1)]
        groups = [frames[cuts[i] : cuts[i + 1]] for i in range(n)]  # contiguous, in order
        meta = ((TOKEN_HEADER, self.token),) if self.token else ()
        link = self.link  # the sender's one link, shared by the streams
        tails: list[float] = []

        async def paced(chunks: Iterator[bytes]):
            for c in chunks:
                await link.take(len(c))
                yield c

        async def one(i: int) -> pb.TransferAck:
            first = pb.TransferChunk(
                key=key, stream_index=i, num_streams=n, num_frames=len(groups[i])
            )
            chunks = _chunks(first, groups[i], self.chunk_bytes, self.whole)
            call = transfer(paced(chunks) if link is not None else chunks, metadata=meta)
            ack = await call
            if ack.committed:
                for k, v in await call.trailing_metadata() or ():
                    if k == TAIL_HEADER:
                        try:
                            tails.append(float(v))
                        except ValueError:  # informational only
                            pass
            return ack

        tasks = [asyncio.ensure_future(one(i)) for i in range(n)]
        try:
            return list(await asyncio.gather(*tasks)), tails
        finally:  # one stream failed: the others are cancelled, not left on the kept channel
            for t in tasks:
                t.cancel()

"""UCX transport through ucxx: header first, then each payload part as its own tagged message,
received straight into the payload buffer. Without RDMA, UCX runs over tcp and shared memory
(UCX_TLS=tcp,sm,self as in ENVIRONMENT.md; set before ucxx is first imported)."""

from __future__ import annotations

import asyncio
import functools
import logging
import os
from collections.abc import Sequence

from .base import Buffer, KVReceiver, KVSender, connect_with_retry, send_parts, send_session

os.environ.setdefault("UCX_TLS", "tcp,sm,self")
os.environ.setdefault("UCXPY_PROGRESS_MODE", "blocking")
os.environ.setdefault("UCX_WARN_UNUSED_ENV_VARS", "n")
# UCX's tcp transport moves data in segments of 8 KiB by default: each costs a progress round,
# and that, not the socket, bounded a 2-core loopback (512 KiB: 1.3-1.7x the rate, see
# benchmarks/results/transfer_notes.md). Both ends set it; the environment still wins.
os.environ.setdefault("UCX_TCP_TX_SEG_SIZE", "512k")
os.environ.setdefault("UCX_TCP_RX_SEG_SIZE", "512k")
import ucxx  # noqa: E402  (configured by the environment above)

log = logging.getLogger(__name__)

# A frame's payload parts go in messages of up to 4 MiB (named in the hello; the receiver
# follows): a HACK frame of a Llama-8B layer (2.4-3.4 MB) is one message instead of four, two a
# frame with its prefix and header. Each message costs a rendezvous and ucxx's Python; the parts
# are joined into one buffer (a copy on the sender, whose core spins in ucxx's progress loop
# anyway). Llama-8B 4K p64: 34-36 -> 33 ms a request, p128 32-34 -> 30-31 (transfer_notes.md,
# 2026-11-22, night). Larger parts (16-bit K or V of a layer) still go alone, not joined. The
# prefix and header go as one message too ("head": "joined"): one event-loop round a frame fewer
# on the receiver (p64 29.7-31.1 -> 29.3-29.5 ms, p128 28.3-28.9 -> 27.7-28.2).
RUN_BYTES = 4 << 20

# ucxx makes every endpoint with peer error handling, and UCX leaves its shared-memory transports
# (posix, sysv) out of such endpoints unless they expose error handling, which is off by default
# (openucx/ucx#6595): two processes on one host talked over tcp/lo. With it on they use sysv
# (p64 frames 45 -> 33 ms a request, transfer_notes.md); a dead peer is still noticed through the
# tcp connection manager and UCX's keepalive. Peers on other hosts keep tcp. Given to ucxx's own
# context, not the environment: NIXL's UCX reads the same variables, and with shared memory its
# receiver missed a killed sender. UCX_MM_ERROR_HANDLING in the environment wins.
UCXX_OPTIONS = {"MM_ERROR_HANDLING": "y"}
try:
    ucxx.init(options=UCXX_OPTIONS, env_takes_precedence=True)
except RuntimeError:  # ucxx was started before this module: its settings stand
    log.warning("ucxx already initialised; UCX shared memory may stay off (%s)", UCXX_OPTIONS)


class UcxChannel:
    def __init__(self, ep: object):
        self.ep = ep

    async def send(self, buffers: Sequence[memoryview]) -> None:
        # Every message posted at once (UCX keeps their order on the endpoint): waiting for each
        # rendezvous in turn cost a round trip per message (p64 frames: 0.53 -> 0.60 of raw).
        tasks = [asyncio.ensure_future(self.ep.send(b)) for b in buffers]
        try:
            for t in tasks:
                await t
        finally:
            for t in tasks:
                t.cancel()

    async def recv_into(self, mv: memoryview) -> None:
        try:
            await self.ep.recv(mv)
        except ucxx.exceptions.UCXError as e:  # peer gone: surface as a connection error
            raise ConnectionError(f"UCX receive failed: {e}") from e


class UcxReceiver(KVReceiver):
    async def start(self, host: str = "127.0.0.1", port: int = 0) -> tuple[str, int]:
        self._listener = ucxx.create_listener(self._serve, port)
        return host, self._listener.port

    async def _serve(self, ep: object) -> None:
        try:
            await self.receive_sessions(UcxChannel(ep))
        finally:
            try:
                await ep.close()
            except Exception:  # already torn down by the peer
                pass

    async def close(self) -> None:
        self._listener.close()


class UcxSender(KVSender):
    """Keeps its endpoint between transfers (creating one takes tens of ms here); one transfer at
    a time per sender, on the event loop that made the endpoint. close() ends it."""

    def __init__(self, host: str, port: int, **kw: object):
        super().__init__(**kw)
        self.host, self.port = host, port
        self._ep = None
        self._lock: asyncio.Lock | None = None

    async def _connect(self):
        try:
            return await ucxx.create_endpoint(self.host, self.port)
        except ucxx.exceptions.UCXError as e:
            raise ConnectionRefusedError(str(e)) from e

    async def _send(self, key: str, frames: list[list[Buffer]]) -> dict:
        self._lock = self._lock or asyncio.Lock()
        async with self._lock:
            if self._ep is None or self._ep.closed:
                where = f"ucx://{self.host}:{self.port}"
                self._ep = await connect_with_retry(self._connect, self.retry, where)
            ok = False
            try:
                ch = self.throttle(_SendChannel(self._ep))
                ack = await send_session(
                    ch,
                    key,
                    frames,
                    self.token,
                    hello={"run_bytes": RUN_BYTES, "head": "joined"},
                    send_frame=functools.partial(send_parts, limit=RUN_BYTES, joined_head=True),
                )
                ok = bool(ack.get("ok"))
                return ack
            finally:
                if not ok:  # the stream may be mid-frame: start afresh next time
                    await self.close()

    async def close(self) -> None:
        ep, self._ep = self._ep, None
        if ep is not None:
            try:
                await ep.close()
            except Exception:  # already torn down by the peer
                pass


class _SendChannel(UcxChannel):
    async def send(self, buffers: Sequence[memoryview]) -> None:
        try:
            await super().send(buffers)
        except ucxx.exceptions.UCXError as e:
            raise ConnectionError(f"UCX send failed: {e}") from e

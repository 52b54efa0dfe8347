"""Plain TCP on asyncio: the dependency-free transport. Zero-copy both ways (sock_sendall of the
tensors' own memory, sock_recv_into the receiver's payload buffer)."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Sequence

from .base import Buffer, KVReceiver, KVSender, connect_with_retry, send_session

SOCK_BUF = 4 << 20
LOWAT = 1 << 20
IOV_MAX = 512  # buffers per sendmsg (Linux allows 1024)


class SocketChannel:
    stream = True  # a byte stream: a run may be received in several pieces

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.loop = asyncio.get_running_loop()
        self._lowat = 1

    async def send(self, buffers: Sequence[memoryview]) -> None:
        """All of `buffers`, gathered: one sendmsg per socket-buffer's worth, no joining copy."""
        bufs = [m for m in (memoryview(b).cast("B") for b in buffers) if len(m)]
        while bufs:
            try:
                n = self.sock.sendmsg(bufs[:IOV_MAX])
            except (BlockingIOError, InterruptedError):
                await self._ready(self.loop.add_writer, self.loop.remove_writer)
                continue
            while n:  # drop what went out, keep the rest of a partly sent buffer
                if n >= len(bufs[0]):
                    n -= len(bufs.pop(0))
                else:
                    bufs[0], n = bufs[0][n:], 0

    async def recv_into(self, mv: memoryview) -> None:
        got, n = 0, len(mv)
        while got < n:
            try:  # what has arrived already needs no wake-up (the next header usually has)
                k = self.sock.recv_into(mv[got:])
            except (BlockingIOError, InterruptedError):
                # Wake up only once a good share of what is missing has arrived: each wake-up of
                # the event loop costs more CPU than copying the bytes it brings.
                want = min(n - got, LOWAT)
                if want != self._lowat:
                    self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, want)
                    self._lowat = want
                await self._ready(self.loop.add_reader, self.loop.remove_reader)
                continue
            if k == 0:
                raise ConnectionError(f"peer closed the connection after {got} of {n} bytes")
            got += k

    async def _ready(self, add, remove) -> None:  # noqa: ANN001 (loop.add_reader / add_writer)
        fut = self.loop.create_future()
        fd = self.sock.fileno()
        add(fd, lambda: fut.done() or fut.set_result(None))
        try:
            await fut
        finally:
            remove(fd)


def tune(sock: socket.socket) -> None:
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
        sock.setsockopt(socket.SOL_SOCKET, opt, SOCK_BUF)
    sock.setblocking(False)


class TcpReceiver(KVReceiver):
    async def start(self, host: str = "127.0.0.1", port: int = 0) -> tuple[str, int]:
        self._lsock = socket.create_server((host, port), backlog=64)
        self._lsock.setblocking(False)
        self._tasks: set[asyncio.Task] = set()
        self._accept = asyncio.ensure_future(self._accept_loop())
        return self._lsock.getsockname()[:2]

    async def _accept_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            conn, _ = await loop.sock_accept(self._lsock)
            tune(conn)
            task = asyncio.ensure_future(self._serve(conn))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _serve(self, conn: socket.socket) -> None:
        with conn:
            await self.receive_sessions(SocketChannel(conn))

    async def close(self) -> None:
        self._accept.cancel()
        for t in list(self._tasks):
            t.cancel()
        self._lsock.close()


class TcpSender(KVSender):
    def __init__(self, host: str, port: int, **kw: object):
        super().__init__(**kw)
        self.host, self.port = host, port

    async def _connect(self) -> socket.socket:
        loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        tune(sock)
        try:
            await loop.sock_connect(sock, (self.host, self.port))
        except BaseException:
            sock.close()
            raise
        return sock

    async def _send(self, key: str, frames: list[list[Buffer]]) -> dict:
        sock = await connect_with_retry(self._connect, self.retry, f"tcp://{self.host}:{self.port}")
        with sock:
            ch = self.throttle(SocketChannel(sock))
            # A byte stream needs no message runs: each frame's buffers go out as they are.
            return await send_session(ch, key, frames, self.token, send_frame=_send_frame)


async def _send_frame(ch, buffers: Sequence[Buffer]) -> None:  # noqa: ANN001 (a Channel)
    await ch.send(buffers)

"""UCX transport through ucxx: header first, then each payload part as its own tagged message,
received straight into the payload buffer. Without RDMA, UCX runs over tcp and shared memory
(UCX_TLS=tcp,sm,self as in ENVIRONMENT.md; set before ucxx is first imported)."""

from __future__ import annotations

import os
from collections.abc import Sequence

from .base import Buffer, KVReceiver, KVSender, connect_with_retry, send_session

os.environ.setdefault("UCX_TLS", "tcp,sm,self")
os.environ.setdefault("UCXPY_PROGRESS_MODE", "blocking")
os.environ.setdefault("UCX_WARN_UNUSED_ENV_VARS", "n")
import ucxx  # noqa: E402  (configured by the environment above)


class UcxChannel:
    def __init__(self, ep: object):
        self.ep = ep

    async def send(self, buffers: Sequence[memoryview]) -> None:
        for b in buffers:
            await self.ep.send(b)

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
            await self.receive_session(UcxChannel(ep))
        finally:
            try:
                await ep.close()
            except Exception:  # already torn down by the peer
                pass

    async def close(self) -> None:
        self._listener.close()


class UcxSender(KVSender):
    def __init__(self, host: str, port: int, **kw: object):
        super().__init__(**kw)
        self.host, self.port = host, port

    async def _send(self, key: str, frames: list[list[Buffer]]) -> dict:
        async def connect():
            try:
                return await ucxx.create_endpoint(self.host, self.port)
            except ucxx.exceptions.UCXError as e:
                raise ConnectionRefusedError(str(e)) from e

        ep = await connect_with_retry(connect, self.retry, f"ucx://{self.host}:{self.port}")
        try:
            return await send_session(self.throttle(_SendChannel(ep)), key, frames, self.token)
        finally:
            try:
                await ep.close()
            except Exception:
                pass


class _SendChannel(UcxChannel):
    async def send(self, buffers: Sequence[memoryview]) -> None:
        try:
            await super().send(buffers)
        except ucxx.exceptions.UCXError as e:
            raise ConnectionError(f"UCX send failed: {e}") from e

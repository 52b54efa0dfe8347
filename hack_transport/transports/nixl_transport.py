"""NIXL transport (what NVIDIA Dynamo uses): control over TCP, payload pulled by the receiver with
a one-sided NIXL READ from the sender's registered memory, straight into the payload buffer it
allocated after validating the header.

Session: the TCP session of base.py, where the hello also carries the sender's NIXL agent
metadata and, per frame, the payload runs are replaced by one control message listing the
(address, length) of each run in the sender's registered memory. The receiver checks that list
against the header's runs before reading, verifies every checksum, then commits and acknowledges
over TCP; the sender keeps its memory registered until the acknowledgement.
"""

from __future__ import annotations

import asyncio
import itertools
import os
from collections.abc import Callable

import numpy as np

from .. import wire
from .base import (
    COALESCE,
    Buffer,
    Channel,
    connect_with_retry,
    message_parts,
    payload_runs,
    recv_msg,
    send_msg,
    send_session,
)
from .tcp import SocketChannel, TcpReceiver, TcpSender

os.environ.setdefault("UCX_TLS", "tcp,sm,self")
_ids = itertools.count()


def _agent(role: str):
    from nixl._api import nixl_agent, nixl_agent_config

    name = f"hack-kv-{role}-{os.getpid()}-{next(_ids)}"
    cfg = nixl_agent_config(enable_prog_thread=True, enable_listen_thread=False, backends=["UCX"])
    agent = nixl_agent(name, cfg)
    _state["started"] = True
    return name, agent


_first_agent: list = []
_state = {"started": False}


def started() -> bool:
    """Whether this process has created a NIXL agent (and so loaded NIXL's UCX)."""
    return _state["started"]


def load_ucx_first() -> None:
    """Create (once) an agent, so that NIXL's UCX is loaded before ucxx's: in that order both work
    in one process (the other order aborts; see __init__.py)."""
    if not _first_agent:
        _first_agent.append(_agent("probe"))


def _address(buf: Buffer) -> int:
    return np.frombuffer(buf, dtype=np.uint8).ctypes.data if len(memoryview(buf)) else 0


def _merge(spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """(address, length) spans with overlaps merged: frames may share memory (one tensor sent in
    several transfers, layers that are views of one buffer), and registering the same memory twice
    crashes NIXL's UCX plugin."""
    out: list[list[int]] = []
    for a, n in sorted(spans):
        if out and a < out[-1][0] + out[-1][1]:
            out[-1][1] = max(out[-1][1], a + n - out[-1][0])
        else:
            out.append([a, n])
    return [(a, n) for a, n in out]


class NixlReceiver(TcpReceiver):
    def __init__(self, **kw: object):
        super().__init__(**kw)
        self.name, self.agent = _agent("rx")

    def session_start(self, hello: dict) -> str:
        meta = hello.get("nixl_agent")
        if not isinstance(meta, bytes) or len(meta) > self.limits.max_control_bytes:
            raise wire.FrameError("hello lacks the sender's NIXL agent metadata", "control")
        try:
            return self.agent.add_remote_agent(meta).decode()
        except Exception as e:  # nixl's own error types
            raise wire.FrameError(f"bad NIXL agent metadata: {e!r}", "control") from None

    def session_end(self, session: object) -> None:
        if session:
            self.agent.remove_remote_agent(session)

    async def recv_payload(
        self,
        ch: Channel,
        header: wire.FrameHeader,
        payload: memoryview,
        session: object,
        filled: Callable[[int], None] = lambda n: None,
        run_bytes: int = COALESCE,
    ) -> None:
        msg = await recv_msg(ch, self.limits.max_control_bytes)
        remote = msg.get("runs")
        local = payload_runs(header, run_bytes)
        ok = isinstance(remote, list) and len(remote) == len(local)
        ok = ok and all(
            isinstance(r, list)
            and len(r) == 2
            and all(isinstance(x, int) for x in r)
            and r[1] == end - off
            for r, (off, end) in zip(remote, local, strict=False)
        )
        if not ok:
            raise wire.FrameError(
                f"run list {remote!r:.200} does not match the header's runs", "payload"
            )
        if not local:
            return
        base = _address(payload)
        reg = self.agent.register_memory([(base, len(payload), 0, "")], "DRAM")
        handle = None
        try:
            mine = self.agent.get_xfer_descs(
                [(base + off, end - off, 0) for off, end in local], "DRAM"
            )
            theirs = self.agent.get_xfer_descs([(a, n, 0) for a, n in remote], "DRAM")
            handle = self.agent.initialize_xfer("READ", mine, theirs, session)
            state, pause = self.agent.transfer(handle), 1e-4
            while state == "PROC":  # polled: the READ completes in NIXL's progress thread
                await asyncio.sleep(pause)
                pause = min(pause * 2, 5e-3)
                state = self.agent.check_xfer_state(handle)
            if state != "DONE":
                raise ConnectionError(f"NIXL READ from {session} failed ({state})")
        except (ConnectionError, wire.FrameError):
            raise
        except Exception as e:  # nixl's own error types: the peer or its memory is gone
            raise ConnectionError(f"NIXL READ from {session} failed: {e!r}") from e
        finally:
            if handle is not None:
                self.agent.release_xfer_handle(handle)
            self.agent.deregister_memory(reg)


class NixlSender(TcpSender):
    def __init__(self, host: str, port: int, **kw: object):
        super().__init__(host, port, **kw)
        self.name, self.agent = _agent("tx")

    async def _send(self, key: str, frames: list[list[Buffer]]) -> dict:
        framed = [message_parts(f) for f in frames]
        runs = [[[_address(m), len(m)] for m in parts[2:]] for parts in framed]
        regions = [(a, n, 0, "") for a, n in _merge([(a, n) for r in runs for a, n in r])]
        reg = self.agent.register_memory(regions, "DRAM") if regions else None
        per_frame = iter(zip(framed, runs, strict=True))

        async def send_frame(ch: Channel, _buffers: object) -> None:
            parts, frame_runs = next(per_frame)
            await ch.send(parts[:2])  # prefix and header over TCP; the payload is read by the peer
            await send_msg(ch, {"runs": frame_runs})

        try:
            where = f"nixl+tcp://{self.host}:{self.port}"
            sock = await connect_with_retry(self._connect, self.retry, where)
            with sock:
                # Metadata after registration: it tells the peer which memory it may read.
                hello = {"nixl_agent": self.agent.get_agent_metadata()}
                ch = SocketChannel(sock)
                return await send_session(ch, key, frames, self.token, hello, send_frame)
        finally:
            del framed  # the run buffers stay alive (and registered) until here
            if reg is not None:
                self.agent.deregister_memory(reg)

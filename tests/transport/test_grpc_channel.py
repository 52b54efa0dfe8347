"""The gRPC sender keeps one channel across transfers (no HTTP/2 handshake and window ramp per
transfer) and replaces it when the receiver went away in between."""

from __future__ import annotations

import asyncio

import pytest

from hack_transport.transports.base import TransferError
from hack_transport.transports.grpc_transport import GrpcReceiver, GrpcSender

from .kvgen import layered

pytestmark = pytest.mark.timeout(60)


class _PeerLog(GrpcReceiver):
    """A real receiver that notes the client address (host:port) of every stream it serves."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.peers: list[str] = []

    async def _transfer(self, chunks, context):
        self.peers.append(context.peer())
        return await super()._transfer(chunks, context)


class _CountingSender(GrpcSender):
    """A real sender that counts the channels it opens."""

    connects = 0

    async def _connect(self, wait: float = 5.0):
        self.connects += 1
        return await super()._connect(wait)


@pytest.fixture(scope="module")
def small():
    return layered("small", 300)  # 4 closed partitions of 64 and an open group of 44


def _same_blocks(a, b) -> bool:
    return [x.tensors.keys() for x in a] == [y.tensors.keys() for y in b] and all(
        (x.tensors[n] == y.tensors[n]).all() for x, y in zip(a, b, strict=True) for n in x.tensors
    )


def test_transfers_share_one_connection(small):
    _, model, blocks = small

    async def go():
        rcv = _PeerLog(expect_model=model)
        _, port = await rcv.start()
        s = GrpcSender("127.0.0.1", port, timeout=20, streams=2)
        try:
            for i in range(3):
                await s.send(f"r{i}", blocks)
        finally:
            await s.close()
            await rcv.close()
        return rcv

    rcv = asyncio.run(go())
    assert sorted(rcv.received) == ["r0", "r1", "r2"]
    assert all(_same_blocks(rcv.received[k], blocks) for k in rcv.received)
    assert len(rcv.peers) == 6 and len(set(rcv.peers)) == 1, rcv.peers


def test_a_receiver_restarted_between_transfers_gets_the_next_one(small):
    _, model, blocks = small

    async def go():
        first = _PeerLog(expect_model=model)
        _, port = await first.start()
        s = GrpcSender("127.0.0.1", port, timeout=20, streams=2)
        try:
            await s.send("before", blocks)
            await first.close()
            second = _PeerLog(expect_model=model)
            await second.start(port=port)
            try:
                await s.send("after", blocks)
            finally:
                await second.close()
        finally:
            await s.close()
        return first, second

    first, second = asyncio.run(go())
    assert list(first.received) == ["before"] and list(second.received) == ["after"]
    assert _same_blocks(second.received["after"], blocks)
    assert set(first.peers).isdisjoint(second.peers)  # a new connection to the new receiver


def test_concurrent_transfers_share_the_channel_and_all_commit(small):
    _, model, blocks = small

    async def go():
        rcv = _PeerLog(expect_model=model)
        _, port = await rcv.start()
        s = _CountingSender("127.0.0.1", port, timeout=20, streams=2)
        try:
            await asyncio.gather(*(s.send(f"c{i}", blocks) for i in range(4)))
        finally:
            await s.close()
            await rcv.close()
        return rcv, s.connects

    rcv, connects = asyncio.run(go())
    assert connects == 1  # one channel opened, none leaked
    assert sorted(rcv.received) == [f"c{i}" for i in range(4)] and rcv.pending_bytes == 0
    assert all(_same_blocks(rcv.received[k], blocks) for k in rcv.received)
    assert len(rcv.peers) == 8 and len(set(rcv.peers)) == 1, rcv.peers


def test_a_rejected_transfer_leaves_the_channel_for_the_next(small):
    """A frame for another model is refused (the receiver names it); the same sender's next
    transfer goes over the same connection and commits."""
    _, model, blocks = small
    _, other, wrong = layered("other", 64, layers=1)

    async def go():
        rcv = _PeerLog(expect_model=model)
        _, port = await rcv.start()
        s = GrpcSender("127.0.0.1", port, timeout=20, streams=1)
        try:
            with pytest.raises(TransferError, match="model"):
                await s.send("wrong", wrong)
            await s.send("right", blocks)
        finally:
            await s.close()
            await rcv.close()
        return rcv

    rcv = asyncio.run(go())
    assert list(rcv.received) == ["right"] and len(set(rcv.peers)) == 1

"""Message runs and the joined head of the session protocol (UCX, NIXL): the sender names its run
size and head mode in the hello and the receiver posts receives of the sizes the sender sends.
Over an in-memory message pipe that refuses a message longer than its receive, as UCX's tag
matching does (a shorter one fills the start of the buffer); strict pipes refuse any other size."""

from __future__ import annotations

import asyncio

import pytest
import torch

from hack_transport import wire
from hack_transport.transports.base import (
    COALESCE,
    KVReceiver,
    runs,
    send_parts,
    send_session,
)

pytestmark = pytest.mark.timeout(60)


class End:
    """One end of a message pipe: every buffer sent is one message."""

    def __init__(self, tx: asyncio.Queue, rx: asyncio.Queue, strict: bool = True):
        self.tx, self.rx, self.received, self.strict = tx, rx, [], strict

    async def send(self, buffers) -> None:
        for b in buffers:
            await self.tx.put(bytes(b))

    async def recv_into(self, mv: memoryview) -> None:
        msg = await self.rx.get()
        if msg is None:
            raise ConnectionError("peer closed")
        if len(msg) > len(mv) or self.strict and len(msg) != len(mv):
            raise ConnectionError(f"message of {len(msg)} bytes into a receive of {len(mv)}")
        mv[: len(msg)] = msg
        self.received.append(len(msg))


class Receiver(KVReceiver):
    async def start(self, host: str = "127.0.0.1", port: int = 0) -> tuple[str, int]:
        return host, port

    async def close(self) -> None:
        return None


@pytest.fixture(scope="module")
def blocks():
    """Two layers of 16-bit KV of 1 MiB per tensor (K and V): runs of 1 MiB keep them apart,
    runs of 4 MiB join them."""
    g = torch.Generator().manual_seed(3)
    ks = [torch.randn(1, 2, 2048, 128, generator=g).half() for _ in range(2)]
    vs = [torch.randn(1, 2, 2048, 128, generator=g).half() for _ in range(2)]
    model = wire.model_identity("m", 2, 2, 128, torch.float16, None)
    return [
        b
        for i in range(2)
        for b in wire.split_raw(ks[i : i + 1], vs[i : i + 1], 2048, model, layer_start=i)
    ]


def transfer(blocks, hello: dict | None, limit: int, joined: bool = False, frames=None):
    """Send `blocks` (or already-cut `frames`: lists of messages) with messages of `limit`-byte
    runs (the head in one message if `joined`) and `hello`; (ack, receiver, messages the
    receiver took). A joined head needs UCX's semantics (a short message into a larger receive)."""

    async def go():
        a2b, b2a = asyncio.Queue(), asyncio.Queue()
        snd, rcv_end = End(a2b, b2a), End(b2a, a2b, strict=not joined)
        rcv = Receiver()

        async def serve() -> None:
            try:
                await rcv.receive_session(rcv_end)
            finally:
                await b2a.put(None)  # the receiver hangs up: the sender's wait for an ack ends

        serving = asyncio.ensure_future(serve())

        async def send_frame(ch, bufs):
            await send_parts(ch, bufs, limit, joined)

        async def send_cut(ch, msgs):
            await ch.send(msgs)

        todo = frames or [wire.encode_block(b) for b in blocks]
        how = send_cut if frames else send_frame
        try:
            ack = await asyncio.wait_for(
                send_session(snd, "k", todo, None, hello=hello, send_frame=how), 30
            )
        except ConnectionError:
            ack = None
        finally:
            await a2b.put(None)  # the sender is gone: a waiting receive fails
            await asyncio.wait_for(serving, 30)
        return ack, rcv, rcv_end.received

    return asyncio.run(go())


def test_runs_group_small_parts_up_to_the_limit():
    assert runs([4, 1 << 20, 1 << 20, 100, 100], 1 << 20) == [(0, 1), (1, 2), (2, 3), (3, 5)]
    assert runs([4, 1 << 20, 1 << 20, 100, 100], 4 << 20) == [(0, 5)]
    assert runs([8 << 20, 100, 8 << 20], 4 << 20) == [(0, 1), (1, 2), (2, 3)]  # large goes alone


@pytest.mark.parametrize(
    ("hello", "limit", "payload_messages"),
    [
        (None, COALESCE, 2),  # a sender that names no run size (before 4 MiB UCX runs): 1 MiB
        ({"run_bytes": 4 << 20}, 4 << 20, 1),  # K and V of a layer in one message
        ({"run_bytes": 64 << 10}, 64 << 10, 2),
    ],
)
def test_receiver_follows_the_run_size_the_sender_names(blocks, hello, limit, payload_messages):
    ack, rcv, sizes = transfer(blocks, hello, limit)
    assert ack["ok"], ack
    got = rcv.received["k"]
    for b, r in zip(blocks, got, strict=True):
        for name, t in b.tensors.items():
            assert torch.equal(t, r.tensors[name])
    # Per frame: prefix, header, then the payload's runs, each received as one message.
    n_hello = 2
    per_frame = (len(sizes) - n_hello) // len(blocks)
    assert per_frame == 2 + payload_messages


def test_a_sender_that_does_not_name_its_runs_fails_cleanly(blocks):
    """4 MiB messages against receives of 1 MiB: the transfer fails, nothing is committed."""
    ack, rcv, _ = transfer(blocks, None, 4 << 20)
    assert ack is None  # the receiver hung up without an ack
    assert rcv.received == {} and rcv.pending_bytes == 0 and rcv.aborted == 1


@pytest.mark.parametrize("bad", [0, -1, 1 << 40, "4M", True, 1.5, None])
def test_bad_run_size_is_refused(blocks, bad):
    ack, rcv, _ = transfer(blocks[:1], {"run_bytes": bad}, COALESCE)
    assert not ack["ok"] and "run_bytes" in ack["error"]
    assert rcv.received == {} and rcv.pending_bytes == 0


def test_joined_head_round_trip(blocks):
    """UCX's default: prefix and header in one message, payload in 4 MiB runs: two a frame."""
    ack, rcv, sizes = transfer(blocks, {"run_bytes": 4 << 20, "head": "joined"}, 4 << 20, True)
    assert ack["ok"], ack
    for b, r in zip(blocks, rcv.received["k"], strict=True):
        for name, t in b.tensors.items():
            assert torch.equal(t, r.tensors[name])
    assert (len(sizes) - 2) // len(blocks) == 2


def test_joined_head_into_a_receiver_expecting_a_split_one_fails_cleanly(blocks):
    """A sender that joins its head without saying so: its head does not fit the 20-byte prefix
    receive, the transfer fails and nothing is committed."""
    ack, rcv, _ = transfer(blocks, {"run_bytes": 4 << 20}, 4 << 20, True)
    assert ack is None and rcv.received == {} and rcv.pending_bytes == 0 and rcv.aborted == 1


def test_short_joined_head_does_not_reuse_the_previous_header(blocks):
    """Frame 2's head message is frame 1's prefix alone: the header bytes it announces are not
    in the message, and the receiver must not take them from frame 1's (still in its buffer)."""
    from hack_transport.transports.base import message_parts

    first = message_parts(wire.encode_block(blocks[0]), 4 << 20, joined_head=True)
    prefix_only = [first[0][: wire.PREFIX.size], *first[1:]]
    hello = {"run_bytes": 4 << 20, "head": "joined"}
    ack, rcv, _ = transfer(blocks, hello, 4 << 20, True, frames=[first, prefix_only])
    assert ack is not None and not ack["ok"] and ack["tensor"] == "header", ack
    assert rcv.received == {} and rcv.pending_bytes == 0


@pytest.mark.parametrize("bad", ["both", 1, None, True])
def test_bad_head_mode_is_refused(blocks, bad):
    ack, rcv, _ = transfer(blocks[:1], {"head": bad}, COALESCE)
    assert not ack["ok"] and "head" in ack["error"]
    assert rcv.received == {}


def test_joined_head_on_a_byte_stream_is_refused():
    """A stream channel (TCP) reads by length: a receive of the largest header would swallow the
    payload behind it."""
    from hack_transport.transports.base import recv_msg, send_msg

    async def go():
        a2b, b2a = asyncio.Queue(), asyncio.Queue()
        snd, rcv_end = End(a2b, b2a), End(b2a, a2b)
        rcv_end.stream = True
        await send_msg(snd, {"key": "k", "frames": 1, "token": None, "head": "joined"})
        assert not await Receiver().receive_session(rcv_end)
        return await recv_msg(snd, 1 << 20)

    ack = asyncio.run(go())
    assert not ack["ok"] and "head" in ack["error"]

"""Message runs of the session protocol (UCX, NIXL): the sender names its run size in the hello
and the receiver posts receives of exactly the sizes the sender sends. Over an in-memory message
pipe that refuses a message into a receive of another size, as a tag-matched transport would."""

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

    def __init__(self, tx: asyncio.Queue, rx: asyncio.Queue):
        self.tx, self.rx, self.received = tx, rx, []

    async def send(self, buffers) -> None:
        for b in buffers:
            await self.tx.put(bytes(b))

    async def recv_into(self, mv: memoryview) -> None:
        msg = await self.rx.get()
        if msg is None:
            raise ConnectionError("peer closed")
        if len(msg) != len(mv):
            raise ConnectionError(f"message of {len(msg)} bytes into a receive of {len(mv)}")
        mv[:] = msg
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


def transfer(blocks, hello: dict | None, limit: int):
    """Send `blocks` with messages of `limit`-byte runs and `hello`; (ack, receiver, messages
    the receiver took)."""

    async def go():
        a2b, b2a = asyncio.Queue(), asyncio.Queue()
        snd, rcv_end = End(a2b, b2a), End(b2a, a2b)
        rcv = Receiver()

        async def serve() -> None:
            try:
                await rcv.receive_session(rcv_end)
            finally:
                await b2a.put(None)  # the receiver hangs up: the sender's wait for an ack ends

        serving = asyncio.ensure_future(serve())
        frames = [wire.encode_block(b) for b in blocks]

        async def send_frame(ch, bufs):
            await send_parts(ch, bufs, limit)

        try:
            ack = await asyncio.wait_for(
                send_session(snd, "k", frames, None, hello=hello, send_frame=send_frame), 30
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

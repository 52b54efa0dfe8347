"""gRPC whole-frame messages: the sender's pad field puts a frame's payload at an aligned offset
inside the message, and the receiver keeps such a payload as a view of the message instead of
copying it; misaligned, split or small payloads are copied, with the same checks either way."""

from __future__ import annotations

import asyncio
import ctypes
import random

import pytest
import torch

from hack_transport import wire
from hack_transport.bufpool import PayloadPool
from hack_transport.proto import hack_kv_pb2 as pb
from hack_transport.transports import make_receiver, make_sender
from hack_transport.transports.assembler import FrameAssembler
from hack_transport.transports.base import TransferError, TransferLimits
from hack_transport.transports.grpc_chunks import (
    MESSAGE_ALIGN,
    bytes_address,
    encode_chunk,
    parse_chunk,
)

from .kvgen import layered
from .test_transports import _flip

pytestmark = pytest.mark.timeout(60)


@pytest.mark.parametrize("seed", range(3))
def test_pad_puts_the_chosen_data_byte_on_an_aligned_offset(seed):
    rng = random.Random(seed)
    for _ in range(40):
        head = pb.TransferChunk(key="k" * rng.randrange(0, 300), num_frames=rng.randrange(1 << 20))
        data = rng.randbytes(rng.choice([64, 1000, 70000]))
        at = rng.randrange(0, 64)
        raw = encode_chunk(head if rng.random() < 0.5 else None, [memoryview(data)], at)
        ref = pb.TransferChunk.FromString(raw)  # protobuf reads it: pad is zeros, data intact
        assert ref.data == data and not any(ref.pad) and len(ref.pad) < MESSAGE_ALIGN
        offset = raw.index(data)  # independent of parse_chunk
        assert (offset + at) % MESSAGE_ALIGN == 0, (offset, at)
        got = parse_chunk(raw)
        assert bytes(got.data) == data
        assert got.data_address == bytes_address(raw) + offset
        assert ctypes.string_at(got.data_address, 16) == data[:16]


def test_chunks_without_pad_still_parse_and_memoryviews_have_no_address():
    raw = encode_chunk(None, [memoryview(b"abc")])
    assert pb.TransferChunk.FromString(raw).pad == b""
    assert parse_chunk(memoryview(raw)).data_address is None


@pytest.fixture(scope="module")
def big():
    """Two layers whose p64 frames are 2.7 MB each (8 kv heads, 4096 tokens, d128)."""
    return layered("big", 4096)


def _same(kv, block) -> bool:
    (back,) = wire.join_blocks([block])
    return all(
        torch.equal(getattr(kv.k_q, p), getattr(back.k_q, p))
        and torch.equal(getattr(kv.v_q, p), getattr(back.v_q, p))
        for p in ("codes", "mins", "scales", "sums")
    )


def _payload_at(frame: bytes) -> int:
    return wire.PREFIX.size + int.from_bytes(frame[8:12], "little")


def _message(frame: bytes, shift: int) -> tuple[memoryview, int, bytes]:
    """(a view of the frame inside a bytes object, its address, the owner) with the payload's
    address congruent to `shift` modulo 16."""
    for lead in range(MESSAGE_ALIGN):
        owner = bytes(lead) + frame
        addr = bytes_address(owner) + lead
        if (addr + _payload_at(frame)) % MESSAGE_ALIGN == shift:
            return memoryview(owner)[lead:], addr, owner
    raise AssertionError("no lead byte count gives that shift")


def _asm(model) -> FrameAssembler:
    return FrameAssembler(TransferLimits(), model)


@pytest.mark.parametrize("shift", [0, 8, 4, 1])
def test_an_aligned_payload_is_kept_a_misaligned_one_copied(big, shift):
    kvs, model, blocks = big
    frame = wire.encode_frame(blocks[0])
    mv, addr, owner = _message(frame, shift)
    asm = _asm(model)
    asm.feed(mv, addr)
    (block,) = asm.blocks
    kept = shift % wire.ALIGN == 0
    assert (asm.views, asm.copies) == ((1, 0) if kept else (0, 1))
    end = addr + len(mv)
    for name, t in block.tensors.items():
        if not t.numel():
            continue
        assert t.data_ptr() % wire.ALIGN == 0, name  # every tensor aligned, on both paths
        assert (addr <= t.data_ptr() < end) == kept, name  # a view of the message, or not
    assert _same(kvs[0], block)


def test_split_small_or_addressless_payloads_are_copied(big):
    kvs, model, blocks = big
    frame = wire.encode_frame(blocks[0])
    mv, addr, owner = _message(frame, 0)
    cut = _payload_at(frame) + 1000
    split = _asm(model)  # the payload runs across two messages
    split.feed(mv[:cut], addr)
    split.feed(mv[cut:], addr + cut)
    unknown = _asm(model)  # an older sender or a memoryview message: no address
    unknown.feed(mv)
    small = _asm(model)  # the payload fills less than half of what was fed
    tail = bytes(len(frame) + 8)
    both = frame + wire.encode_frame(blocks[1]) + tail
    small_mv, small_addr, _ = _message(both, 0)  # frame 0's payload aligned
    small.feed(small_mv[: len(frame) * 2 + 8], small_addr)
    for asm in (split, unknown):
        assert (asm.views, asm.copies) == (0, 1) and _same(kvs[0], asm.blocks[0])
    assert small.views == 0 and small.copies == 2 and _same(kvs[1], small.blocks[1])


def test_a_flipped_byte_in_a_kept_payload_names_the_tensor(big):
    _, model, blocks = big
    (bad,) = _flip(wire.encode_block(blocks[0]), "v.scales")
    mv, addr, owner = _message(bad, 0)
    asm = _asm(model)
    with pytest.raises(wire.ChecksumError) as e:
        asm.feed(mv, addr)
    assert e.value.tensor == "v.scales" and asm.views == 1 and not asm.blocks


@pytest.mark.parametrize("whole", [True, False])
def test_grpc_keeps_whole_frame_messages_and_copies_chunked_ones(big, whole):
    """A real server: a 2.7 MB frame per stream goes as one message and is kept; an older
    sender's 1 MiB chunks (whole_frames=False) are copied. Both bit-exact."""
    kvs, model, blocks = big

    async def go():
        # pageable buffers (a CUDA machine would pin them and copy: test_pinned_cuda.py)
        rcv = make_receiver("grpc", expect_model=model, pool=PayloadPool(pinned=False))
        _, port = await rcv.start()
        try:
            s = make_sender("grpc", "127.0.0.1", port, timeout=20, whole_frames=whole)
            await s.send("r", blocks)
            with pytest.raises(TransferError) as e:
                await s.send("bad", [_flip(wire.encode_block(blocks[0]), "k.codes")])
            await s.close()
            return rcv, e.value
        finally:
            await rcv.close()

    rcv, err = asyncio.run(go())
    assert err.tensor == "k.codes" and list(rcv.received) == ["r"] and rcv.pending_bytes == 0
    views, copies = (3, 0) if whole else (0, 3)
    assert (rcv.payload_views, rcv.payload_copies) == (views, copies)
    assert all(_same(kv, b) for kv, b in zip(kvs, rcv.received["r"], strict=True))


def test_messages_carry_the_frames_in_order_whole_frames_aligned_large_ones_chunked(big):
    """Frames of mixed sizes: every message's data concatenates to the frames; a frame of
    `size` to `whole` bytes is a message of its own with its payload on a 16-byte offset, small
    frames share one, a larger frame goes in `size` chunks."""
    from hack_transport.transports.grpc_transport import _chunks

    _, _, blocks = big
    frame = wire.encode_frame(blocks[0])  # 2.7 MB
    small = frame[: _payload_at(frame)] + bytes(1000)  # a prefix and header: not a real frame
    sizes = {"size": 1 << 20, "whole": 4 << 20}
    frames = [[frame], [frame + frame], [frame], [small], [small], [frame], [frame]]
    first = pb.TransferChunk(key="k", num_frames=len(frames))
    msgs = list(_chunks(first, frames, **sizes))
    datas = [bytes(parse_chunk(m).data) for m in msgs]
    assert b"".join(datas) == b"".join(f[0] for f in frames)
    assert pb.TransferChunk.FromString(msgs[0]).key == "k"
    # frame | 1 MiB x 5 + rest of the 5.4 MB frame | frame | small + small | frame | frame
    lengths = [len(d) for d in datas]
    double = 2 * len(frame)
    assert lengths == [len(frame)] + [1 << 20] * 5 + [double - (5 << 20)] + [
        len(frame), 2 * len(small), len(frame), len(frame),
    ]  # fmt: skip
    for i in (0, 7, 9, 10):  # the whole frames: payload on a 16-byte offset of the message
        assert datas[i] == frame
        assert (msgs[i].index(frame) + _payload_at(frame)) % MESSAGE_ALIGN == 0
    old = list(_chunks(first, frames, 1 << 20))  # whole=0: every message a 1 MiB chunk
    assert b"".join(bytes(parse_chunk(m).data) for m in old) == b"".join(f[0] for f in frames)
    assert all(len(parse_chunk(m).data) == 1 << 20 for m in old[:-1])

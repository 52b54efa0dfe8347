"""Checksums off the critical path: verification while a payload arrives, checksums computed once
per block, frames encoded as they are sent, payload buffers. Values are checked against xxhash
run directly on the bytes and against a frame decoded in one piece."""

from __future__ import annotations

import asyncio
import random

import pytest
import torch
import xxhash

from hack_kernels import HackConfig, quantize_kv
from hack_transport import wire
from hack_transport.transports import make_receiver, make_sender
from hack_transport.transports.base import LazyFrames

pytestmark = pytest.mark.timeout(120)


def _hack_block(tokens=3 * 64 + 5, heads=3, d=64, layers=2, seed=0):
    cfg = HackConfig(partition=64, sink_tokens=0)
    g = torch.Generator().manual_seed(seed)
    kvs = []
    for _ in range(layers):
        k = (torch.randn(1, heads, tokens, d, generator=g) * 3).half()
        kvs.append(quantize_kv(k, torch.randn(k.shape, generator=g).half(), cfg))
    model = wire.model_identity("m", layers, heads, d, torch.float16, cfg)
    return model, wire.split_kv(kvs, 1 << 20, model)[0]


def _raw_block(tokens, heads=2, d=128, seed=1):
    """A raw16 block whose k and v are several MiB each (streamed through the verifier)."""
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(1, heads, tokens, d, generator=g).half()
    v = torch.randn(1, heads, tokens, d, generator=g).half()
    model = wire.model_identity("raw", 1, heads, d, torch.float16, None)
    return model, wire.split_raw([k], [v], tokens, model)[0]


def _split(frame: bytes, model):
    _, hlen, prefix = wire.parse_prefix(frame)
    header = wire.parse_header(prefix, frame[20 : 20 + hlen], expect_model=model)
    return header, bytearray(frame[20 + hlen :])


def test_directory_checksums_are_xxh3_of_the_tensor_bytes():
    model, block = _hack_block()
    header, payload = _split(wire.encode_frame(block), model)
    for e in header.entries:
        want = xxhash.xxh3_64_intdigest(bytes(payload[e.offset : e.offset + e.length]))
        assert e.checksum == want, e.name


@pytest.mark.parametrize("maker", ["hack", "raw"])
def test_verifier_fed_in_random_pieces_matches_one_piece_decode(maker):
    model, block = _hack_block() if maker == "hack" else _raw_block(4 * 4096 + 3)
    frame = wire.encode_frame(block)
    header, payload = _split(frame, model)
    whole = wire.decode_frame(frame, expect_model=model)
    rng = random.Random(5)
    for _ in range(3):
        buf = wire.alloc_payload(len(payload))
        v = wire.PayloadVerifier(header, buf)
        filled = 0
        while filled < len(payload):
            step = rng.choice([1, 7, 4096, 1 << 20, 3 << 20])
            nxt = min(len(payload), filled + step)
            buf[filled:nxt] = payload[filled:nxt]
            filled = nxt
            v.advance(filled)
        got = v.block()
        assert v.done
        for name, t in whole.tensors.items():
            assert torch.equal(t, got.tensors[name]), name


@pytest.mark.parametrize("maker", ["hack", "raw"])
def test_a_flipped_byte_is_caught_when_its_tensor_is_complete_and_named(maker):
    model, block = _hack_block(seed=3) if maker == "hack" else _raw_block(4 * 4096 + 3, seed=4)
    header, payload = _split(wire.encode_frame(block), model)
    rng = random.Random(9)
    for e in header.entries:
        if not e.length:
            continue
        bad = bytearray(payload)
        bad[e.offset + rng.randrange(e.length)] ^= 1 << rng.randrange(8)
        v = wire.PayloadVerifier(header, bad)
        # Until the tensor's last byte is here it is not judged (a large one's front may be
        # hashed already); the tensors before it pass.
        v.advance(e.offset + e.length - 1)
        with pytest.raises(wire.ChecksumError) as err:
            v.advance(header.payload_len)
        assert err.value.tensor == e.name


def test_nonzero_padding_is_caught_while_streaming():
    model, block = _raw_block(3, heads=1, d=1)  # 6 bytes of k, then 2 of padding
    header, payload = _split(wire.encode_frame(block), model)
    gaps = [
        (a.offset + a.length, b.offset, a.name)
        for a, b in zip(header.entries, header.entries[1:], strict=False)
    ]
    gaps = [g for g in gaps if g[1] > g[0]]
    assert gaps, "this geometry should leave alignment padding"
    start, _, name = gaps[0]
    bad = bytearray(payload)
    bad[start] = 1
    with pytest.raises(wire.ChecksumError) as err:
        wire.PayloadVerifier(header, bad).advance(header.payload_len)
    assert err.value.tensor == name


def test_checksums_are_computed_once_and_follow_in_place_writes(monkeypatch):
    model, block = _hack_block(seed=7)
    first = wire.encode_frame(block)
    calls = []
    real = wire.xxhash.xxh3_64_intdigest
    monkeypatch.setattr(wire.xxhash, "xxh3_64_intdigest", lambda b: calls.append(1) or real(b))
    assert wire.encode_frame(block) == first and not calls  # a resend hashes nothing
    # A decoded block carries its verified checksums: forwarding it hashes nothing either.
    got = wire.decode_frame(first, expect_model=model)
    calls.clear()
    assert wire.encode_frame(got) == first and not calls
    # An in-place write invalidates the cached value of that tensor only.
    block.tensors["k.scales"].add_(1)
    header, payload = _split(wire.encode_frame(block), model)
    assert len(calls) == 1
    e = next(e for e in header.entries if e.name == "k.scales")
    assert e.checksum == real(bytes(payload[e.offset : e.offset + e.length]))
    wire.decode_payload(header, payload)  # and the frame is still valid


def test_alloc_payload_is_zeroed_and_writable():
    for n in (0, 1, 4097, (1 << 16) + 3, 3 << 20):
        buf = wire.alloc_payload(n)
        assert len(buf) == n and not any(bytes(buf[:4096])) and not any(bytes(buf[-4096:]))
        if n:
            buf[n - 1] = 7
            assert buf[n - 1] == 7


def test_lazy_frames_encode_on_demand_and_slices_share():
    model, block = _hack_block(seed=2)
    blocks = [block, [wire.encode_frame(block)], block]
    lazy = LazyFrames(blocks)
    assert len(lazy) == 3 and lazy.nbytes == 0
    tail = lazy[1:]
    assert len(tail) == 2 and b"".join(tail[0]) == wire.encode_frame(block)
    assert lazy.nbytes == len(wire.encode_frame(block))  # only frame 1 so far
    assert [b"".join(f) for f in lazy] == [wire.encode_frame(block)] * 3
    assert lazy.nbytes == 3 * len(wire.encode_frame(block))
    with pytest.raises(IndexError):
        lazy[3]


@pytest.mark.parametrize("kind", ["tcp", "grpc"])
def test_large_tensors_stream_through_and_the_ack_reports_the_tail(kind):
    """A raw16 frame of two 4 MiB tensors (received and hashed in slices) arrives bit-exact;
    the receiver's tail (last byte to ack) comes back with the acknowledgement."""
    model, block = _raw_block(8192)

    async def go():
        rcv = make_receiver(kind, expect_model=model)
        _, port = await rcv.start()
        try:
            res = await make_sender(kind, "127.0.0.1", port, timeout=60).send("big", [block])
            return rcv, res
        finally:
            await rcv.close()

    rcv, res = asyncio.run(go())
    got = rcv.received["big"][0]
    assert torch.equal(got.tensors["k"], block.tensors["k"])
    assert torch.equal(got.tensors["v"], block.tensors["v"])
    assert isinstance(res.receiver_tail_s, float) and res.receiver_tail_s >= 0
    assert rcv.pending_bytes == 0

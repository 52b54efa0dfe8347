"""The hand-written TransferChunk codec against the protobuf library, both directions, with
random fields and sizes (including empty data and multi-byte varints), and malformed bytes."""

from __future__ import annotations

import random

import pytest

from hack_transport.proto import hack_kv_pb2 as pb
from hack_transport.transports.grpc_chunks import encode_chunk, parse_chunk


def _random_head(rng):
    return pb.TransferChunk(
        key="".join(rng.choice("abcé漢-/0") for _ in range(rng.randrange(0, 40))),
        stream_index=rng.choice([0, 1, 127, 128, 300, 2**32 - 1]),
        num_streams=rng.choice([0, 1, 256, 2**20]),
        num_frames=rng.randrange(0, 1 << 17),
    )


@pytest.mark.parametrize("seed", range(4))
def test_encode_parses_with_protobuf_and_parse_matches_it(seed):
    rng = random.Random(seed)
    for _ in range(25):
        head = _random_head(rng) if rng.random() < 0.5 else None
        data = rng.randbytes(rng.choice([0, 1, 127, 128, 16383, 16384, 70000]))
        cut = rng.randrange(0, len(data) + 1)
        raw = encode_chunk(head, [memoryview(data)[:cut], memoryview(data)[cut:]])
        ref = pb.TransferChunk.FromString(raw)  # protobuf reads what we wrote
        assert ref.data == data
        if head is not None:
            assert (ref.key, ref.stream_index, ref.num_streams, ref.num_frames) == (
                head.key, head.stream_index, head.num_streams, head.num_frames,
            )  # fmt: skip
        # ...and we read what protobuf writes (field order, unknown-free messages).
        msg = pb.TransferChunk(data=data)
        if head is not None:
            msg.MergeFrom(head)
        got = parse_chunk(msg.SerializeToString())
        assert bytes(got.data) == msg.data
        assert (got.key, got.stream_index, got.num_streams, got.num_frames) == (
            msg.key, msg.stream_index, msg.num_streams, msg.num_frames,
        )  # fmt: skip


def test_unknown_fields_are_skipped_and_the_last_value_wins():
    a = pb.TransferChunk(key="first", data=b"old").SerializeToString()
    b = pb.TransferChunk(key="second", data=b"new").SerializeToString()
    unknown = bytes([9 << 3 | 0, 0x96, 0x01, 10 << 3 | 5, 1, 2, 3, 4, 11 << 3 | 1]) + bytes(8)
    got = parse_chunk(a + unknown + b)
    ref = pb.TransferChunk.FromString(a + unknown + b)
    assert (got.key, bytes(got.data)) == (ref.key, ref.data) == ("second", b"new")


@pytest.mark.parametrize(
    "raw",
    [
        bytes([5 << 3 | 2, 10]) + b"short",  # length past the end
        bytes([5 << 3 | 2]),  # truncated length
        bytes([2 << 3 | 0]) + b"\xff" * 11,  # varint too long
        bytes([5 << 3 | 3]),  # group wire type
        bytes([0 << 3 | 0, 1]),  # field number 0
        bytes([1 << 3 | 2, 2]) + b"\xff\xfe",  # key not UTF-8
    ],
)
def test_malformed_chunks_raise(raw):
    with pytest.raises(ValueError):
        parse_chunk(raw)

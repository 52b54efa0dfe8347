"""Wire format: bit-exact round trips through blocks and frames, and rejection of bad frames."""

from __future__ import annotations

import random

import msgpack
import pytest
import torch

from hack_kernels import HackConfig, dequantize, quantize_kv
from hack_transport import wire

pytestmark = pytest.mark.timeout(120)

QPARTS = ("codes", "mins", "scales", "sums")


def _kvs(layers, b, h, t, d, cfg, dtype=torch.float16, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(layers):
        k = (torch.randn(b, h, t, d, generator=g) * 3).to(dtype)
        v = torch.randn(b, h, t, d, generator=g).to(dtype)
        out.append(quantize_kv(k, v, cfg))
    return out


def _assert_same(a, b):
    for n in ("k_sink", "v_sink", "k_open", "v_open"):
        x, y = getattr(a, n), getattr(b, n)
        assert x.dtype == y.dtype and torch.equal(x, y), n
    for s in ("k_q", "v_q"):
        qa, qb = getattr(a, s), getattr(b, s)
        assert (qa.shape, qa.dim, qa.bits, qa.partition, qa.dtype) == (
            qb.shape,
            qb.dim,
            qb.bits,
            qb.partition,
            qb.dtype,
        )
        for p in QPARTS:
            x, y = getattr(qa, p), getattr(qb, p)
            assert x.dtype == y.dtype and torch.equal(x, y), (s, p)
    assert a.config == b.config


def _model(kvs):
    kv = kvs[0]
    return wire.model_identity(
        "test-model", len(kvs), kv.kv_heads, kv.head_dim, kv.k_open.dtype, kv.config
    )


CASES = [
    # layout, partition, sinks, tokens, head_dim, dtype
    ("paper", 64, 0, 1, 64, torch.float16),
    ("paper", 64, 0, 63, 128, torch.float16),
    ("paper", 64, 0, 64, 128, torch.bfloat16),
    ("paper", 32, 4, 33, 80, torch.float16),
    ("paper", 128, 4, 3 * 128 + 5, 128, torch.float16),
    ("kivi", 64, 0, 65, 128, torch.float16),
    ("kivi", 32, 3, 7 * 32 + 31, 96, torch.bfloat16),
    ("kivi", 128, 0, 256, 64, torch.float16),
]


@pytest.mark.parametrize("layout,p,sinks,t,d,dtype", CASES)
def test_split_encode_decode_join_is_bit_exact(layout, p, sinks, t, d, dtype):
    cfg = HackConfig(partition=p, layout=layout, sink_tokens=sinks)
    kvs = _kvs(2, 1 + t % 2, 3, t, d, cfg, dtype, seed=t)
    model = _model(kvs)
    for mult in (1, 2, 3):
        blocks = wire.split_kv(kvs, mult * p, model, layer_start=5)
        # Blocks tile the prompt: contiguous token ranges, whole partitions of closed tokens.
        assert blocks[0].tokens[0] == 0 and blocks[-1].tokens[1] == t
        for a, b in zip(blocks, blocks[1:], strict=False):
            assert a.tokens[1] == b.tokens[0]
        for b in blocks:
            assert b.sections[1] % p == 0 and b.sections[1] <= mult * p
            assert b.layers == (5, 7)
        frames = [wire.encode_frame(b) for b in blocks]
        decoded = [wire.decode_frame(f, expect_model=model) for f in reversed(frames)]
        back = wire.join_blocks(decoded)
        assert len(back) == len(kvs)
        for a, b in zip(kvs, back, strict=True):
            _assert_same(a, b)
            assert b.num_tokens == t


def test_blocks_hold_the_right_tokens():
    """A block's closed part dequantizes to the same values as that token range of the whole."""
    cfg = HackConfig(partition=32, layout="paper", sink_tokens=2)
    kv = _kvs(1, 1, 2, 2 + 5 * 32 + 7, 64, cfg)[0]
    full_k = dequantize(kv.k_q)  # K^T [B, H, D, C]
    full_v = dequantize(kv.v_q)  # V [B, H, C, D]
    blocks = wire.split_kv([kv], 64, _model([kv]))
    c0 = 0
    for b in blocks:
        part = b.layer_kv()[0]
        c1 = c0 + b.sections[1]
        assert torch.equal(dequantize(part.k_q), full_k[..., c0:c1])
        assert torch.equal(dequantize(part.v_q), full_v[:, :, c0:c1])
        c0 = c1
    assert c0 == kv.num_closed


def test_head_range_and_tp_travel():
    cfg = HackConfig(partition=64)
    kvs = _kvs(1, 1, 4, 130, 64, cfg)
    blocks = wire.split_kv(kvs, 64, _model(kvs), heads=(1, 3), tp=(1, 2))
    d = wire.decode_frame(wire.encode_frame(blocks[0]))
    assert d.heads == (1, 3) and d.tp == (1, 2)
    whole = wire.split_kv(kvs, 64, _model(kvs))[0]
    for name, t in d.tensors.items():
        assert torch.equal(t, whole.tensors[name][:, :, 1:3]), name


def test_raw16_round_trip():
    g = torch.Generator().manual_seed(3)
    ks = [torch.randn(1, 2, 77, 64, generator=g).half() for _ in range(3)]
    vs = [torch.randn(1, 2, 77, 64, generator=g).half() for _ in range(3)]
    model = wire.model_identity("m", 3, 2, 64, torch.float16, None)
    blocks = wire.split_raw(ks, vs, 32, model)
    dec = [wire.decode_frame(wire.encode_frame(b), expect_model=model) for b in blocks]
    k = torch.cat([b.raw_kv()[0] for b in dec], 3)
    assert torch.equal(k, torch.stack(ks))
    assert dec[0].codec == wire.CODEC_RAW16


@pytest.mark.parametrize("p,limit", [(32, 0.205), (64, 0.165), (128, 0.15)])
def test_wire_bytes_ratio(p, limit):
    """Known answer: 2-bit codes plus fp16 min and scale and the code sum per group, over 16 bit."""
    cfg = HackConfig(partition=p)
    kvs = _kvs(4, 1, 8, 512, 128, cfg)
    sum_bytes = 1 if p * 3 <= 255 else 2
    ideal = (2 / 8 + (2 + 2 + sum_bytes) / p) / 2
    blocks = wire.split_kv(kvs, 256, _model(kvs))
    sent = sum(len(wire.encode_frame(b)) for b in blocks)
    ratio = sent / (2 * 2 * 4 * 8 * 512 * 128)
    assert ideal <= ratio <= ideal * 1.01
    assert ratio <= limit


# ---------------------------------------------------------------------------------------------
# Bad frames.


@pytest.fixture(scope="module")
def sample():
    cfg = HackConfig(partition=32, sink_tokens=4)
    kvs = _kvs(2, 1, 2, 4 + 64 + 5, 64, cfg)
    model = _model(kvs)
    block = wire.split_kv(kvs, 64, model)[0]
    return model, wire.encode_frame(block)


def _layout_of(frame):
    """Independent reading of the frame: (start, stop, name) of each region, from the raw bytes."""
    hlen = int.from_bytes(frame[8:12], "little")
    header = msgpack.unpackb(frame[20 : 20 + hlen])
    base = 20 + hlen
    # The header checksum covers minor version and length (prefix bytes 6-12): errors there name
    # the header. A tensor's alignment padding belongs to the tensor.
    regions = [(0, 6, "prefix"), (6, base, "header")]
    entries = header["tensors"]
    for i, (name, _dt, _shape, off, _length, _sum) in enumerate(entries):
        end = entries[i + 1][3] if i + 1 < len(entries) else header["payload"]
        regions.append((base + off, base + end, name))
    return regions


def test_every_flipped_byte_is_named(sample):
    model, frame = sample
    rng = random.Random(0)
    for start, stop, name in _layout_of(frame):
        if stop == start:
            continue
        for pos in {start, stop - 1, rng.randrange(start, stop)}:
            bad = bytearray(frame)
            bad[pos] ^= 1 << rng.randrange(8)
            with pytest.raises(wire.FrameError) as e:
                wire.decode_frame(bytes(bad), expect_model=model)
            assert e.value.tensor == name, (pos, name, str(e.value))
            assert name in str(e.value)


def test_truncation_is_rejected(sample):
    model, frame = sample
    rng = random.Random(1)
    for cut in [0, 5, 19, 20, 21, len(frame) - 1, *(rng.randrange(len(frame)) for _ in range(20))]:
        with pytest.raises(wire.TruncatedFrame):
            wire.decode_frame(frame[:cut], expect_model=model)
    with pytest.raises(wire.FrameError):
        wire.decode_frame(frame + b"\0", expect_model=model)


def _rewrite(frame, edit, major=wire.MAJOR):
    """Re-pack a frame's header after `edit(header)`, with a valid header checksum."""
    hlen = int.from_bytes(frame[8:12], "little")
    header = msgpack.unpackb(frame[20 : 20 + hlen])
    edit(header)
    hb = msgpack.packb(header)
    return wire.pack_prefix(hb, major, 7) + hb + frame[20 + hlen :]


def test_versions(sample):
    model, frame = sample
    with pytest.raises(wire.VersionError, match="major version 2"):
        wire.decode_frame(_rewrite(frame, lambda h: None, major=2))
    # A newer minor version with fields this reader does not know decodes.
    newer = _rewrite(frame, lambda h: h.update(future_field={"x": 1}))
    assert wire.decode_frame(newer, expect_model=model).tokens == (0, 73)


def test_model_identity_mismatch(sample):
    model, frame = sample
    other = wire.model_identity("test-model", 2, 2, 64, torch.float16, HackConfig(partition=64))
    assert other.name == model.name and other != model
    with pytest.raises(wire.ModelMismatch, match="test-model"):
        wire.decode_frame(frame, expect_model=other)


def _set_entry(i, field, value):
    def edit(h):
        h["tensors"][i][field] = value

    return edit


@pytest.mark.parametrize(
    "edit,error,match",
    [
        (lambda h: h.update(payload=1 << 50), wire.LimitError, "exceeds the limit"),
        (lambda h: h.update(payload=-1), wire.FrameError, "payload"),
        (lambda h: h.update(batch=1 << 45), wire.FrameError, "batch"),
        (lambda h: h.update(layers=[0, 1 << 20]), wire.LimitError, "layers"),
        (lambda h: h.update(tensors=[["k.codes"]] * 10_000), wire.LimitError, "directory"),
        (_set_entry(2, 4, -5), wire.FrameError, "length"),
        (_set_entry(2, 4, 1 << 40), wire.FrameError, "length"),
        (_set_entry(2, 3, -8), wire.FrameError, "offset"),
        (_set_entry(3, 3, 0), wire.FrameError, "overlaps"),
        (_set_entry(2, 2, [1 << 30, 1 << 30, 1 << 30]), wire.FrameError, "shape"),
        (_set_entry(2, 1, "float32"), wire.FrameError, "dtype"),
        (lambda h: h["codec"].update(bit_order="big"), wire.FrameError, "bit order"),
        (lambda h: h["codec"].update(name="pickle"), wire.FrameError, "unknown codec"),
    ],
)
def test_hostile_headers_are_rejected_before_allocation(sample, edit, error, match):
    _, frame = sample
    bad = _rewrite(frame, edit)
    hlen = int.from_bytes(bad[8:12], "little")
    _, n, prefix = wire.parse_prefix(bad[:20])
    assert n == hlen
    # parse_header sees only the header bytes: it decides before any payload exists.
    with pytest.raises(error, match=match):
        wire.parse_header(prefix, bad[20 : 20 + hlen], wire.Limits(max_payload_bytes=1 << 30))


def test_oversized_header_rejected_from_prefix():
    prefix = wire.PREFIX.pack(wire.MAGIC, wire.MAJOR, 0, 1 << 31, 0)
    with pytest.raises(wire.LimitError):
        wire.parse_prefix(prefix, wire.Limits(max_header_bytes=1 << 20))
    with pytest.raises(wire.FrameError, match="magic"):
        wire.parse_prefix(b"GET / HTTP/1.1\r\n\r\n..", wire.Limits())


def test_split_rejects_bad_block_sizes():
    kvs = _kvs(1, 1, 1, 100, 64, HackConfig(partition=64))
    with pytest.raises(ValueError, match="multiple of partition"):
        wire.split_kv(kvs, 96, _model(kvs))
    blocks = wire.split_kv(_kvs(1, 1, 1, 200, 64, HackConfig(partition=64)), 64, _model(kvs))
    with pytest.raises(ValueError, match="contiguous"):
        wire.join_blocks([blocks[0], blocks[2]])

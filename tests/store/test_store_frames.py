"""Real HACK and 16-bit wire frames through the service, verified as frames on put and disk read."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hack_kernels.config import HackConfig
from hack_kernels.kv import quantize_kv
from hack_transport import wire
from hack_transport.store import ChunkSpec, InvalidRequestError
from hack_transport.store.disk import SUFFIX
from hack_transport.store.diskfile import encode_header

pytestmark = pytest.mark.timeout(120)

LAYERS, HEADS, DIM = 3, 2, 64


def request_kv(tokens: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    ks = [torch.randn(1, HEADS, tokens, DIM, generator=g).half() for _ in range(LAYERS)]
    vs = [torch.randn(1, HEADS, tokens, DIM, generator=g).half() for _ in range(LAYERS)]
    return ks, vs


def test_hack_and_raw16_chunks_round_trip_bit_exact(start_server, tmp_path):
    server = start_server("--cpu", "256K", "--disk-dir", str(tmp_path / "d"), "--verify-frames")
    cfg = HackConfig(partition=64)
    n = 600  # 2 full chunks of 256 and a last one of 64 closed + 24 open tokens
    ks, vs = request_kv(n, 0)
    kvs = [quantize_kv(k, v, cfg) for k, v in zip(ks, vs, strict=True)]
    ident = wire.model_identity("tiny", LAYERS, HEADS, DIM, torch.float16, cfg)
    model = f"{ident.name}@{ident.geometry}"
    spec = ChunkSpec(model, 256, partition=64)
    tokens = np.random.default_rng(0).integers(0, 32_000, n)
    hack_blocks = wire.split_kv(kvs, 256, ident)
    raw_blocks = wire.split_raw(ks, vs, 256, wire.model_identity("tiny", LAYERS, HEADS, DIM))
    chunks = spec.keys(tokens)
    assert [b.tokens for b in hack_blocks] == [(s, e) for s, e, _ in chunks]
    with server.client() as c:
        for (_, _, k), hb in zip(chunks, hack_blocks, strict=True):
            c.put(k, wire.encode_frame(hb))
        raw_spec = ChunkSpec(model + "+raw16", 256)
        for (_, _, k), rb in zip(raw_spec.keys(tokens), raw_blocks, strict=True):
            c.put(k, wire.encode_frame(rb))
        assert c.lookup(spec, tokens) == n
        # the CPU tier holds 256 KiB, so most of these come back from disk
        got_hack = [wire.decode_frame(c.get(k)) for _, _, k in chunks]
        got_raw = [wire.decode_frame(c.get(k)) for _, _, k in raw_spec.keys(tokens)]
        assert {t["name"]: t for t in c.stats()["tiers"]}["disk"]["hits"] > 0
    for want, got in zip(hack_blocks + raw_blocks, got_hack + got_raw, strict=True):
        assert want.tokens == got.tokens and set(want.tensors) == set(got.tensors)
        for name, t in want.tensors.items():
            assert torch.equal(t, got.tensors[name]), name
    # and the joined result equals the original K and V (the raw codec) / codes (the HACK codec)
    k_back, v_back = (torch.cat([b.tensors[s] for b in got_raw], 3) for s in "kv")
    assert torch.equal(k_back, torch.stack(ks)) and torch.equal(v_back, torch.stack(vs))
    joined = wire.join_blocks(got_hack)
    assert all(torch.equal(a.k_q.codes, b.k_q.codes) for a, b in zip(joined, kvs, strict=True))


def test_bad_frames_are_refused_on_put_and_dropped_on_read(start_server, tmp_path):
    disk = tmp_path / "d"
    server = start_server("--cpu", "0", "--disk-dir", str(disk), "--verify-frames")
    cfg = HackConfig(partition=32)
    ks, vs = request_kv(64, 1)
    ident = wire.model_identity("tiny", LAYERS, HEADS, DIM, torch.float16, cfg)
    block = wire.split_kv([quantize_kv(k, v, cfg) for k, v in zip(ks, vs, strict=True)], 64, ident)[
        0
    ]
    frame = wire.encode_frame(block)
    spec = ChunkSpec("tiny", 64)
    ((_, _, k0),) = spec.keys(np.arange(64))
    with server.client() as c:
        with pytest.raises(InvalidRequestError, match="not a hack-kv frame"):
            c.put(k0, b"garbage" * 10)
        broken = bytearray(frame)
        broken[-5] ^= 0xFF
        with pytest.raises(InvalidRequestError, match="checksum"):
            c.put(k0, bytes(broken))
        assert not c.exists(k0)
        c.put(k0, frame)
        # Damage the frame on disk and re-seal the file's own checksum: only frame checks see it.
        (path,) = (disk / "chunks").glob(f"*/*{SUFFIX}")
        path.write_bytes(encode_header(k0, bytes(broken)) + bytes(broken))
        assert c.get(k0) is None
        assert c.stats()["corrupt_dropped"] == 1
        assert not path.exists() and not c.exists(k0)

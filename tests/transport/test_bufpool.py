"""The receive-buffer pool: a buffer is reused only once nothing references it, and transfers that
land in reused buffers keep every guarantee (bit-exact, a flipped byte rejected naming the
tensor, earlier transfers untouched)."""

from __future__ import annotations

import gc
import random

import pytest
import torch

from hack_kernels import HackConfig, quantize_kv
from hack_transport import wire
from hack_transport.bufpool import GRAIN, PayloadPool, _capacity
from hack_transport.transports import make_sender
from hack_transport.transports.base import TransferError

from .test_transports import KINDS, _flip, _serve, run

pytestmark = pytest.mark.timeout(60)


def _pooled_sender(kind: str, port: int):
    """A sender whose frames land in pooled buffers: gRPC's whole-frame messages are kept as the
    payload itself (no pool), its chunked messages are copied into pooled buffers."""
    extra = {"whole_frames": False} if kind == "grpc" else {}
    return make_sender(kind, "127.0.0.1", port, timeout=20, **extra)


def _address(buf: memoryview) -> int:
    return torch.frombuffer(buf, dtype=torch.uint8).data_ptr()


def test_capacity_covers_the_request_with_bounded_waste():
    rng = random.Random(3)
    sizes = [GRAIN, GRAIN + 1, (512 << 10) - 1, 512 << 10, (1 << 20) + 1, 2_752_512, 3 << 30]
    for n in sizes + [rng.randrange(GRAIN, 1 << 32) for _ in range(500)]:
        cap = _capacity(n)
        assert cap >= n and cap % GRAIN == 0, n
        # An eighth of n above 512 KiB, one grain below it.
        assert cap - n < (n / 8 if n >= 512 << 10 else GRAIN), (n, cap)


def test_a_referenced_buffer_is_never_handed_out_again():
    pool = PayloadPool(pinned=False)
    n = 300_001
    a = pool.acquire(n)
    a[:] = random.Random(5).randbytes(n)
    expect = bytes(a[1000:3000])
    view = torch.frombuffer(a, dtype=torch.uint8)[1000:3000]  # what a block's tensor holds
    first = _address(a)
    del a
    gc.collect()
    b = pool.acquire(n)  # `view` still lives: b must be other memory
    assert pool.reused == 0 and _address(b) != first
    b[:] = b"\xff" * n
    assert bytes(view.numpy()) == expect
    second = _address(b)
    del view, b
    gc.collect()
    c = pool.acquire(n - 7)  # both free again: one of them comes back
    assert pool.reused == 1 and _address(c) in (first, second) and len(c) == n - 7


def test_small_requests_and_a_disabled_pool_map_fresh_zeroed_memory():
    for pool, n in (
        (PayloadPool(pinned=False), GRAIN - 1),
        (PayloadPool(max_idle_bytes=0, pinned=False), 1 << 20),
    ):
        for _ in range(2):
            buf = pool.acquire(n)
            assert len(buf) == n and not any(bytes(buf))
            buf[:] = b"\x01" * n
            del buf
            gc.collect()
        assert pool.reused == 0 and pool.idle_bytes == 0


def test_idle_memory_stays_under_the_bound():
    pool = PayloadPool(max_idle_bytes=1 << 20, pinned=False)
    bufs = [pool.acquire(512 << 10) for _ in range(4)]
    assert pool.mapped == 4
    del bufs
    gc.collect()
    assert pool.idle_bytes == 1 << 20  # two kept, two unmapped
    again = [pool.acquire(512 << 10) for _ in range(3)]
    assert pool.reused == 2 and pool.mapped == 5 and pool.idle_bytes == 0
    del again


def _request(seed: int):
    """One layer, large enough (codes of 96 KiB) for pooled buffers: 3 sinks, 47 groups of 32
    closed tokens, 5 open tokens, 3 kv heads of d128."""
    cfg = HackConfig(partition=32, sink_tokens=3)
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(1, 3, 3 + 47 * 32 + 5, 128, generator=g).half()
    kv = quantize_kv(k, torch.randn(k.shape, generator=g).half(), cfg)
    model = wire.model_identity("pool", 1, 3, 128, torch.float16, cfg)
    return kv, model, wire.split_kv([kv], 47 * 32, model)


def _same(kv, blocks) -> bool:
    (back,) = wire.join_blocks(blocks)
    return all(
        torch.equal(getattr(kv, n), getattr(back, n)) for n in ("k_sink", "v_open", "k_open")
    ) and all(
        torch.equal(getattr(a, p), getattr(b, p))
        for a, b in ((kv.k_q, back.k_q), (kv.v_q, back.v_q))
        for p in ("codes", "mins", "scales", "sums")
    )


@pytest.mark.parametrize("kind", KINDS)
def test_reused_buffers_leave_held_transfers_intact(kind):
    (kv_a, model, blocks_a), (kv_b, _, blocks_b) = _request(1), _request(2)
    kv_c, _, blocks_c = _request(3)
    assert blocks_a[0].nbytes > 4 * GRAIN  # the payloads go through the pool

    async def go():
        rcv, port = await _serve(kind, expect_model=model)
        try:
            s = _pooled_sender(kind, port)
            await s.send("a", blocks_a)
            await s.send("b", blocks_b)  # "a" is held in rcv.received: fresh buffers
            assert rcv.pool.reused == 0 and _same(kv_a, rcv.received["a"])
            del rcv.received["a"]
            gc.collect()
            await s.send("c", blocks_c)  # lands in a's buffers
            await s.close()
            return rcv
        finally:
            await rcv.close()

    rcv = run(go())
    assert rcv.pool.reused >= 1
    assert _same(kv_b, rcv.received["b"]) and _same(kv_c, rcv.received["c"])


@pytest.mark.parametrize("kind", KINDS)
def test_flipped_byte_in_a_reused_buffer_is_rejected_naming_the_tensor(kind):
    kv, model, blocks = _request(4)
    bad = [_flip(wire.encode_block(b), "k.codes") for b in blocks]
    kept = []

    async def go():
        rcv, port = await _serve(kind, expect_model=model, commit=lambda k, b: kept.append(k))
        try:
            s = _pooled_sender(kind, port)
            await s.send("good", blocks)  # committed and dropped: its buffers return
            gc.collect()
            with pytest.raises(TransferError) as e:
                await s.send("bad", bad)
            await s.close()
            return rcv, e.value
        finally:
            await rcv.close()

    rcv, err = run(go())
    assert rcv.pool.reused >= 1  # the corrupt frame landed in a reused buffer
    assert err.tensor == "k.codes" and "k.codes" in str(err)
    assert kept == ["good"] and rcv.pending_bytes == 0

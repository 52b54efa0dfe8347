"""GPU blocks over the transports (needs CUDA; ran on the lent H100 through
benchmarks/device_pinned.py): a sender stages a GPU block through page-locked memory and sends
the same bytes as for its CPU copy; a receiver on a CUDA machine lands payloads in pinned
buffers (gRPC copies into them rather than keeping the message) and to_device moves a received
block to the GPU bit-exactly."""

from __future__ import annotations

import asyncio
import random

import pytest
import torch

from hack_kernels import HackConfig, quantize_kv
from hack_transport import wire
from hack_transport.bufpool import PayloadPool
from hack_transport.transports import available_kinds, make_receiver, make_sender

pytestmark = [
    pytest.mark.timeout(120),
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]
KINDS = [k for k in ("tcp", "grpc", "ucx") if k in available_kinds()]


def _blocks(tokens: int, partition: int, sinks: int, seed: int, raw: bool = False):
    """A GPU request of 2 layers, 2 kv heads, d64, split into blocks of 128 tokens."""
    cfg = HackConfig(partition=partition, sink_tokens=sinks)
    g = torch.Generator(device="cuda").manual_seed(seed)
    shape = (1, 2, tokens, 64)
    kvs = []
    for _ in range(2):
        k = torch.randn(shape, generator=g, device="cuda").half()
        v = torch.randn(shape, generator=g, device="cuda").half()
        kvs.append((k, v) if raw else quantize_kv(k, v, cfg))
    model = wire.model_identity("gpu", 2, 2, 64, torch.float16, None if raw else cfg)
    if raw:
        return model, wire.split_raw([k for k, _ in kvs], [v for _, v in kvs], 128, model)
    return model, wire.split_kv(kvs, 128, model)


def _cpu(block: wire.Block) -> wire.Block:
    return block.to_device("cpu")


@pytest.mark.parametrize("tokens", [1, 63, 65, 300])
@pytest.mark.parametrize("raw", [False, True])
def test_a_gpu_block_encodes_to_the_bytes_of_its_cpu_copy(tokens, raw):
    model, blocks = _blocks(tokens, 64, 0 if raw else 1, seed=tokens, raw=raw)
    for b in blocks:
        assert all(t.is_cuda for t in b.tensors.values())
        assert wire.encode_frame(b) == wire.encode_frame(_cpu(b))


def test_host_tensors_stages_gpu_tensors_in_pinned_memory_and_leaves_cpu_ones():
    gpu = torch.randint(0, 255, (3, 1001), dtype=torch.uint8, device="cuda")
    half = torch.randn(7, 65, device="cuda").half()
    cpu = torch.arange(5)
    out = wire.host_tensors({"a": gpu, "b": half, "c": cpu})
    assert out["c"] is cpu
    for name, ref in (("a", gpu), ("b", half)):
        assert out[name].device.type == "cpu" and out[name].is_pinned(), name
        assert torch.equal(out[name], ref.cpu()), name


def test_pinned_pool_buffers_are_pinned_and_reused():
    pool = PayloadPool()
    assert pool.pinned
    for n in (1, 1000, 70_000, 3 << 20):
        mv = pool.acquire(n)
        t = torch.frombuffer(mv, dtype=torch.uint8)
        assert len(mv) == n and t.is_pinned(), n
        t.fill_(7)
        del t, mv
    again = pool.acquire(3 << 20)
    assert pool.reused >= 1 and torch.frombuffer(again, dtype=torch.uint8).is_pinned()


@pytest.mark.parametrize("kind", KINDS)
def test_gpu_blocks_arrive_in_pinned_buffers_and_go_back_to_the_gpu_bit_exact(kind):
    rng = random.Random(kind)
    tokens = rng.choice([129, 255, 300])
    model, blocks = _blocks(tokens, 64, 1, seed=tokens)

    async def go():
        rcv = make_receiver(kind, expect_model=model)
        _, port = await rcv.start()
        try:
            s = make_sender(kind, "127.0.0.1", port, timeout=30)
            await s.send("gpu", blocks)
            await s.close()
        finally:
            await rcv.close()
        return rcv

    rcv = asyncio.run(go())
    got = rcv.received["gpu"]
    assert len(got) == len(blocks)
    if kind == "grpc":  # whole-frame messages are copied into the pinned buffers, not kept
        assert rcv.payload_views == 0 and rcv.payload_copies == len(blocks)
    for b, ref in zip(got, blocks, strict=True):
        for name, t in b.tensors.items():
            assert t.device.type == "cpu" and (t.is_pinned() or not t.numel()), name
        back = b.to_device("cuda")
        for name, t in back.tensors.items():
            assert t.is_cuda and torch.equal(t, ref.tensors[name]), name

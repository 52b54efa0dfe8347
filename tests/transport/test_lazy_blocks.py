"""Lazily built blocks: split_kv_lazy / split_raw_lazy build a block (gather its token range of
every layer) only when it is first asked for, equal to the eager split, and a transfer of them
builds each block as its frame goes out."""

from __future__ import annotations

import asyncio

import pytest
import torch

from hack_kernels import HackConfig
from hack_transport import wire
from hack_transport.transports import available_kinds, make_receiver, make_sender
from hack_transport.transports.base import LazyFrames

from .test_wire import _kvs, _model

pytestmark = pytest.mark.timeout(120)


def _equal(a: wire.Block, b: wire.Block) -> bool:
    return (a.tokens, a.sections, a.layers, a.heads) == (b.tokens, b.sections, b.layers, b.heads) and (
        a.tensors.keys() == b.tensors.keys()
        and all(torch.equal(a.tensors[n], b.tensors[n]) for n in a.tensors)
    )  # fmt: skip


@pytest.mark.parametrize("t,sinks", [(1, 0), (63, 0), (65, 2), (64 * 5 + 1, 3)])
def test_lazy_hack_blocks_are_built_on_demand_and_equal_the_eager_split(t, sinks):
    kvs = _kvs(3, 1, 2, t, 64, HackConfig(partition=64, sink_tokens=sinks), seed=t)
    model = _model(kvs)
    eager = wire.split_kv(kvs, 128, model)
    lazy = wire.split_kv_lazy(kvs, 128, model)
    assert len(lazy) == len(eager) and not lazy._built  # nothing gathered yet
    last = lazy[-1]
    assert list(lazy._built) == [len(eager) - 1] and _equal(last, eager[-1])
    assert lazy[len(lazy) - 1] is last  # kept, not rebuilt
    tail = lazy[1:]
    assert len(tail) == len(eager) - 1 and len(lazy._built) == 1
    assert all(_equal(x, y) for x, y in zip(tail, eager[1:], strict=True))
    assert all(_equal(x, y) for x, y in zip(lazy, eager, strict=True))
    assert len(eager) == 1 or tail[-1] is last  # slices share the built blocks


@pytest.mark.parametrize("t", [1, 31, 33, 100])
def test_lazy_raw_blocks_cover_every_token_once(t):
    g = torch.Generator().manual_seed(t)
    ks = [torch.randn(1, 2, t, 64, generator=g).half() for _ in range(3)]
    vs = [torch.randn(1, 2, t, 64, generator=g).half() for _ in range(3)]
    model = wire.model_identity("m", 3, 2, 64, torch.float16, None)
    lazy = wire.split_raw_lazy(ks, vs, 32, model)
    assert len(lazy) == -(-t // 32) and not lazy._built
    k = torch.cat([b.raw_kv()[0] for b in lazy], 3)
    v = torch.cat([b.raw_kv()[1] for b in lazy], 3)
    assert torch.equal(k, torch.stack(ks)) and torch.equal(v, torch.stack(vs))
    assert all(_equal(x, y) for x, y in zip(lazy, wire.split_raw(ks, vs, 32, model), strict=True))


def test_raw_split_names_mismatched_layers():
    ks = [torch.zeros(1, 2, 8, 64, dtype=torch.float16)] * 2
    vs = [torch.zeros(1, 2, 9, 64, dtype=torch.float16)] * 2
    model = wire.model_identity("m", 2, 2, 64, torch.float16, None)
    with pytest.raises(ValueError, match=r"\[B, H, T, D\]"):
        wire.split_raw_lazy(ks, vs, 4, model)
    with pytest.raises(ValueError, match=r"\[B, H, T, D\]"):
        wire.split_raw(ks, [k.float() for k in ks], 4, model)


@pytest.mark.parametrize("kind", [k for k in available_kinds() if k != "nixl"])
def test_lazy_frames_keep_lazy_blocks_lazy_and_a_transfer_builds_them_all(kind):
    kvs = _kvs(2, 1, 2, 64 * 6 + 5, 64, HackConfig(partition=64), seed=9)
    model = _model(kvs)
    lazy = wire.split_kv_lazy(kvs, 64, model)
    frames = LazyFrames(lazy)  # 6 closed partitions, the open 5 tokens with the last
    assert len(frames) == 6 and not lazy._built
    frames[3]
    assert list(lazy._built) == [3]

    async def go():
        rcv = make_receiver(kind, expect_model=model)
        _, port = await rcv.start()
        try:
            s = make_sender(kind, "127.0.0.1", port, timeout=20)
            await s.send("lazy", lazy)
            await s.close()
        finally:
            await rcv.close()
        return rcv

    rcv = asyncio.run(go())
    assert len(lazy._built) == 6
    eager = wire.split_kv(kvs, 64, model)
    assert all(_equal(x, y) for x, y in zip(rcv.received["lazy"], eager, strict=True))

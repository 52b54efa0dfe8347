"""Pinned receive buffers and GPU blocks, the parts that run without a GPU: the pool's choice of
buffers, a clear error where pinning is asked for without CUDA, and an assembler that copies an
aligned payload (into pinned buffers) instead of keeping the message. The GPU side is in
test_pinned_cuda.py."""

from __future__ import annotations

import pytest
import torch

from hack_transport import wire
from hack_transport.bufpool import PayloadPool
from hack_transport.transports.assembler import FrameAssembler
from hack_transport.transports.base import TransferLimits

from .kvgen import layered
from .test_grpc_whole_frames import _message, _same


def test_the_pool_pins_by_default_exactly_when_cuda_is_there():
    assert PayloadPool().pinned == torch.cuda.is_available()
    assert not PayloadPool(pinned=False).pinned


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_asking_for_pinned_buffers_without_cuda_names_cuda():
    with pytest.raises(ValueError, match="CUDA"):
        PayloadPool(pinned=True)


@pytest.fixture(scope="module")
def one_layer():
    return layered("pin", 4096, layers=1)  # one block of 1.3 MB


@pytest.mark.parametrize("keep", [True, False])
def test_an_assembler_told_not_to_keep_views_copies_an_aligned_payload(one_layer, keep):
    kvs, model, blocks = one_layer
    frame = wire.encode_frame(blocks[0])
    mv, addr, owner = _message(frame, 0)  # aligned: kept unless told otherwise
    got: list[int] = []

    def alloc(n: int) -> memoryview:
        got.append(n)
        return wire.alloc_payload(n)

    asm = FrameAssembler(TransferLimits(), model, alloc=alloc, keep_views=keep)
    asm.feed(mv, addr)
    (block,) = asm.blocks
    assert (asm.views, asm.copies) == ((1, 0) if keep else (0, 1))
    assert len(got) == (0 if keep else 1)
    end = addr + len(mv)
    inside = [addr <= t.data_ptr() < end for t in block.tensors.values() if t.numel()]
    assert all(inside) if keep else not any(inside)
    assert _same(kvs[0], block)


def test_to_device_on_the_cpu_keeps_every_tensor(one_layer):
    _, _, blocks = one_layer
    moved = blocks[0].to_device("cpu")
    assert moved.tensors.keys() == blocks[0].tensors.keys()
    assert all(torch.equal(moved.tensors[n], t) for n, t in blocks[0].tensors.items())


def test_an_automatic_pool_falls_back_to_pageable_memory_when_pinning_fails(monkeypatch, caplog):
    """No GPU here: a CUDA machine whose pinning fails (a process forked after CUDA started) is
    faked by switching an automatic pool to pinned and making the pinned allocation raise."""
    import hack_transport.bufpool as bp

    def no_pinning(n: int):
        raise RuntimeError("Cannot re-initialize CUDA in forked subprocess")

    monkeypatch.setattr(bp, "pinned_host_bytes", no_pinning)
    auto = PayloadPool()
    auto.pinned = True  # as on a CUDA machine
    buf = auto.acquire(3 << 20)
    assert len(buf) == 3 << 20 and not auto.pinned and "pageable" in caplog.text
    buf[:] = b"\x05" * len(buf)  # writable, ordinary memory
    explicit = PayloadPool()
    explicit.pinned, explicit._auto = True, False  # as PayloadPool(pinned=True) on a CUDA machine
    with pytest.raises(RuntimeError, match="forked"):
        explicit.acquire(3 << 20)

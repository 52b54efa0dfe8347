"""Quantized KV of a few layers for transport tests, one frame per layer."""

from __future__ import annotations

import torch

from hack_kernels import HackConfig, QuantizedKV, quantize_kv
from hack_transport import wire


def layered(
    name: str, tokens: int, *, layers: int = 2, heads: int = 8, seed: int = 5
) -> tuple[list[QuantizedKV], wire.ModelIdentity, list[wire.Block]]:
    """`layers` layers of random K and V (d128, partition 64), each layer one block."""
    cfg = HackConfig(partition=64)
    g = torch.Generator().manual_seed(seed)
    kvs = []
    for _ in range(layers):
        k = torch.randn(1, heads, tokens, 128, generator=g).half()
        kvs.append(quantize_kv(k, torch.randn(k.shape, generator=g).half(), cfg))
    model = wire.model_identity(name, layers, heads, 128, torch.float16, cfg)
    blocks = [
        b for i, kv in enumerate(kvs) for b in wire.split_kv([kv], 4096, model, layer_start=i)
    ]
    return kvs, model, blocks

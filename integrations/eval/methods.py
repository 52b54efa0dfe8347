"""The compared KV methods: each turns a context's 16-bit K/V into the cache decode continues from."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers import DynamicCache
from transformers.cache_utils import Cache, DynamicLayer

from hack_kernels import HackConfig

from ..transformers_cache import HackCache
from . import baselines

KV = list[tuple[torch.Tensor, torch.Tensor]]  # per layer, [1, kv_heads, T, head_dim]


@dataclass(frozen=True)
class Method:
    name: str
    kind: str  # "fp16", "hack", "hack_dq", "kivi", "kivi_r0", "cachegen", "kvquant"
    bits: int = 16
    hack: HackConfig | None = field(default=None)

    @property
    def attn(self) -> str:
        """The attention implementation decode runs with."""
        return "hack" if self.kind in ("hack", "hack_dq") else "sdpa"


def hack_method(bits: int, partition: int, layout: str, sinks: int = 0) -> Method:
    cfg = HackConfig(bits=bits, partition=partition, layout=layout, sink_tokens=sinks)
    name = f"HACK {bits}b p{partition} {layout}" + (f" s{sinks}" if sinks else "")
    return Method(name, "hack", bits, cfg)


FP16 = Method("16-bit", "fp16")
KIVI2 = Method("KIVI-style 2b g32 r128", "kivi", 2)
KIVI4 = Method("KIVI-style 4b g32 r128", "kivi", 4)
# KIVI's arithmetic with no fp16 residual: bytes close to HACK's, for a like-for-like comparison.
KIVI2_R0 = Method("KIVI-style 2b g32 r0", "kivi_r0", 2)
# Diagnostic: the same HACK cache (codes, groups closing as decode goes), attended after
# dequantization in float (no 8-bit Q and P): separates the codes' error from the arithmetic's.
HACK_DQ = Method(
    "HACK 2b p64 kivi s4, float attention over its codes",
    "hack_dq",
    2,
    HackConfig(bits=2, partition=64, layout="kivi", sink_tokens=4),
)
CACHEGEN = Method("CacheGen-like 4/3/2b", "cachegen", 3)
KVQUANT3 = Method("KVQuant-like 3b pre-RoPE 1%", "kvquant", 3)


def default_methods() -> list[Method]:
    hack = [hack_method(2, p, lay) for lay in ("paper", "kivi") for p in (32, 64, 128)]
    hack += [hack_method(2, 64, lay, sinks=4) for lay in ("paper", "kivi")]
    hack += [hack_method(4, 64, lay) for lay in ("paper", "kivi")]
    hack += [hack_method(4, 64, "kivi", sinks=4)]
    return [FP16, *hack, HACK_DQ, KIVI2, KIVI4, KIVI2_R0, CACHEGEN, KVQUANT3]


def find_method(name: str) -> Method:
    for m in default_methods():
        if m.name == name:
            return m
    raise ValueError(f"unknown method {name!r}; known: {[m.name for m in default_methods()]}")


def to_16bit(kv: KV) -> KV:
    return [(k.half().float(), v.half().float()) for k, v in kv]


def build_cache(method: Method, kv16: KV, rope) -> tuple[object, float]:
    """(cache holding the context for decode, bytes of the context's KV under this method).

    kv16: the context's K/V rounded to 16 bits. rope(T) -> (cos, sin) [1, T, D] of the model.
    """
    if method.kind == "hack":
        cache = HackCache.from_kv(kv16, method.hack)
        return cache, float(cache.nbytes)
    if method.kind == "hack_dq":
        cache = HackCache.from_kv(kv16, method.hack, float_attention=True)
        return cache, float(cache.nbytes)
    out, nbytes = [], 0.0
    cos_sin = rope(kv16[0][0].shape[2]) if method.kind == "kvquant" else None
    for i, (k, v) in enumerate(kv16):
        if method.kind == "fp16":
            kq, vq, nb = k, v, 2 * k.numel() * 2
        elif method.kind in ("kivi", "kivi_r0"):
            residual = 0 if method.kind == "kivi_r0" else 128
            kq, vq, nb = baselines.kivi(k, v, bits=method.bits, residual=residual)
            kq, vq = k, v  # KiviCache below quantizes, now and as decode appends
        elif method.kind == "cachegen":
            kq, vq, nb = baselines.cachegen(i, len(kv16), k, v)
        elif method.kind == "kvquant":
            kq, vq, nb = baselines.kvquant(k, v, *cos_sin, bits=method.bits)
        else:
            raise ValueError(f"unknown method kind {method.kind!r}")
        out.append((kq, vq))
        nbytes += nb
    if method.kind in ("kivi", "kivi_r0"):
        return KiviCache(method.bits, 0 if method.kind == "kivi_r0" else 128, out), nbytes
    return _dynamic(out), nbytes


class KiviLayer(DynamicLayer):
    """KIVI's decode-time rule: whole groups of 32 tokens older than the newest `residual` tokens
    are quantized (K per channel, V per token), the rest stays full precision; as tokens arrive,
    groups leave the residual and are quantized, as HACK's groups close."""

    def __init__(self, bits: int, residual: int, group: int = 32):
        super().__init__()
        self.bits, self.residual, self.group, self.done = bits, residual, group, 0

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        super().update(key_states, value_states)
        t = self.keys.shape[-2]
        upto = max(0, (t - self.residual) // self.group * self.group)
        if upto > self.done:
            part = slice(self.done, upto)
            self.keys[:, :, part] = baselines.fake_quant(
                self.keys[:, :, part], 2, self.group, self.bits
            )
            self.values[:, :, part] = baselines.fake_quant(
                self.values[:, :, part], 3, self.group, self.bits
            )
            self.done = upto
        return self.keys, self.values


class KiviCache(Cache):
    def __init__(self, bits: int, residual: int, kv: KV):
        super().__init__(layers=[KiviLayer(bits, residual) for _ in kv])
        for i, (k, v) in enumerate(kv):
            self.update(k, v, i)


def _dynamic(kv: KV) -> DynamicCache:
    cache = DynamicCache()
    for i, (k, v) in enumerate(kv):
        cache.update(k, v, i)
    return cache

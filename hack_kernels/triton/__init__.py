"""Triton kernels: quantize-and-pack, fused homomorphic prefill attention, paged decode."""

from .decode import decode_attention, warmup_decode
from .paged_cache import PagedHackCache
from .prefill import attend_quantized, prefill_attention
from .quantize import quantize_groups_triton, quantize_kv_triton

__all__ = [
    "PagedHackCache",
    "attend_quantized",
    "decode_attention",
    "prefill_attention",
    "quantize_groups_triton",
    "quantize_kv_triton",
    "warmup_decode",
]

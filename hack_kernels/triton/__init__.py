"""Triton kernels: quantize-and-pack, fused homomorphic prefill attention, paged decode."""

from .quantize import quantize_groups_triton, quantize_kv_triton

__all__ = ["quantize_groups_triton", "quantize_kv_triton"]

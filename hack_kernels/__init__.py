"""hack_kernels: HACK's quantization core, PyTorch reference attention and Triton kernels."""

from .config import HackConfig
from .homomorphic import homomorphic_matmul
from .kv import QuantizedKV, quantize_kv
from .quantize import QuantizedTensor, dequantize, quantize
from .reference import dequantize_kv, reference_attention

__all__ = [
    "HackConfig",
    "QuantizedKV",
    "QuantizedTensor",
    "dequantize",
    "dequantize_kv",
    "homomorphic_matmul",
    "quantize",
    "quantize_kv",
    "reference_attention",
    "PagedHackCache",
    "decode_attention",
    "prefill_attention",
    "quantize_kv_triton",
]

# The GPU kernels import Triton; load them on first use so that the core stays light.
_TRITON_EXPORTS = ("PagedHackCache", "decode_attention", "prefill_attention", "quantize_kv_triton")


def __getattr__(name: str):
    if name in _TRITON_EXPORTS:
        from . import triton as _kernels

        return getattr(_kernels, name)
    raise AttributeError(f"module 'hack_kernels' has no attribute {name!r}")

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
]

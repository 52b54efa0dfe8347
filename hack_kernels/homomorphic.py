"""Matrix products on quantized operands, the paper's Eq. (1), with no dequantization.

For C = A @ B with A grouped along its last axis (K) and B along its first (K), per partition g:

  sum_z a_z b_z = s_a s_b sum_z a'_z b'_z + m_b s_a sum_z a'_z + m_a s_b sum_z b'_z + Z m_a m_b

a', b' are integer codes, sum_z a'_z and sum_z b'_z the stored code sums, Z the group's length.
"""

from __future__ import annotations

import torch

from . import layout
from .quantize import QuantizedTensor


def integer_group_products(a_codes: torch.Tensor, b_codes: torch.Tensor) -> torch.Tensor:
    """Per-partition integer dot products: [..., M, G, p] x [..., N, G, p] -> [..., M, N, G].

    Computed with float32 matrix units because every partial sum is an integer below 2^24
    (255 * 255 * 128 at most), where float32 is exact: the result equals the int32 product.
    """
    return torch.einsum("...mgp,...ngp->...mng", a_codes.float(), b_codes.float())


def _check_operands(a_q: QuantizedTensor, b_q: QuantizedTensor) -> None:
    if a_q.dim != len(a_q.shape) - 1:
        raise ValueError("a_q must be quantized along its last dimension")
    if len(b_q.shape) < 2 or b_q.dim != len(b_q.shape) - 2:
        raise ValueError("b_q must be quantized along its first matrix dimension (dim -2)")
    if a_q.length != b_q.length:
        raise ValueError(f"inner dimensions differ: A has {a_q.length}, B has {b_q.length}")
    if a_q.partition != b_q.partition:
        raise ValueError(f"partitions differ: {a_q.partition} and {b_q.partition}")
    for q in (a_q, b_q):
        if q.partition * 255 * ((1 << q.bits) - 1) >= layout.FLOAT32_EXACT_INT:
            raise ValueError("partition too large for exact integer products")


def homomorphic_matmul(a_q: QuantizedTensor, b_q: QuantizedTensor) -> torch.Tensor:
    """A @ B (float32) from a_q (groups along A's last dim) and b_q (groups along B's first dim)."""
    _check_operands(a_q, b_q)
    prod = integer_group_products(a_q.unpacked_codes(), b_q.unpacked_codes())  # [..., M, N, G]
    sa, ma = a_q.scales.float(), a_q.mins.float()  # [..., M, G]
    sb, mb = b_q.scales.float(), b_q.mins.float()  # [..., N, G]
    suma, sumb = a_q.sums.float(), b_q.sums.float()
    z = layout.group_lengths(a_q.length, a_q.partition, a_q.codes.device).float()
    mbt, sbt = mb.transpose(-1, -2), sb.transpose(-1, -2)
    out = torch.einsum("...mng,...mg,...ng->...mn", prod, sa, sb)
    out = out + (sa * suma) @ mbt  # m_b s_a sum a'
    out = out + ma @ (sbt * sumb.transpose(-1, -2))  # m_a s_b sum b'
    out = out + (ma * z) @ mbt  # Z m_a m_b
    return out

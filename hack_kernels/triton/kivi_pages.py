"""Decode pages of the kivi layout, built from the canonical QuantizedTensor form (pure PyTorch).

One page is one closed token partition of p tokens for every kv head; batch axis first:
    k_codes   uint8 [B, G, H, p, D*bits/8]  K codes, token rows, planar-packed along D
    k_mins, k_scales   [B, G, H, D]          one group per channel over the page's p tokens
    v_codes   uint8 [B, G, H, D, p*bits/8]  V codes, channel rows, planar-packed along tokens
    v_mins, v_scales   [B, G, H, p, E]       E = ceil(D / p) groups per token along D
    v_colsums [B, G, H, D]                   sum over the page's tokens of each channel's codes
Both code tiles are stored contiguous along the reduction dimension of their product (D for
Q.K^T, tokens for P.V), as 8-bit tensor-core operands need. v_colsums is summation elimination
for the kivi layout: P is rounded to codes 0..255 and enters the tensor cores as code - 128, and
the correction 128 * sum(V codes) is read instead of recomputed every step.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from .. import layout
from ..quantize import QuantizedTensor


@dataclass
class KiviPages:
    k_codes: torch.Tensor
    k_mins: torch.Tensor
    k_scales: torch.Tensor
    v_codes: torch.Tensor
    v_mins: torch.Tensor
    v_scales: torch.Tensor
    v_colsums: torch.Tensor

    def tensors(self) -> dict[str, torch.Tensor]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def kivi_pages(k_q: QuantizedTensor, v_q: QuantizedTensor) -> KiviPages:
    """Pages of closed kivi-layout K (grouped along tokens) and V (grouped along D), whose
    logical shapes are [B, H, C, D] with C a multiple of the partition."""
    b, h, c, d = v_q.shape
    p, bits = v_q.partition, v_q.bits
    if c % p:
        raise ValueError(f"{c} closed tokens are not whole pages of {p}")
    g = c // p
    kc = k_q.unpacked_codes()[..., :p]  # [B, H, D, G, p]
    k_codes = layout.pack_planar(kc.permute(0, 3, 1, 4, 2), bits)  # [B, G, H, p, D/per]
    vc = v_q.unpacked_codes().flatten(-2)[..., :d]  # [B, H, C, D]
    vc = vc.reshape(b, h, g, p, d).permute(0, 2, 1, 4, 3)  # [B, G, H, D, p]
    colsums = vc.to(torch.int32).sum(-1).to(layout.sum_dtype(bits, p))
    e = v_q.num_groups

    def per_token(meta: torch.Tensor) -> torch.Tensor:  # [B, H, C, E] -> [B, G, H, p, E]
        return meta.reshape(b, h, g, p, e).permute(0, 2, 1, 3, 4)

    return KiviPages(
        k_codes=k_codes.contiguous(),
        k_mins=k_q.mins.permute(0, 3, 1, 2).contiguous(),
        k_scales=k_q.scales.permute(0, 3, 1, 2).contiguous(),
        v_codes=layout.pack_planar(vc, bits).contiguous(),
        v_mins=per_token(v_q.mins).contiguous(),
        v_scales=per_token(v_q.scales).contiguous(),
        v_colsums=colsums.contiguous(),
    )

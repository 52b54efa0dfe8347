"""Per-group quantization arithmetic shared by the quantize-and-pack kernels.

Same semantics as hack_kernels.quantize (the PyTorch path): the min is rounded down and the scale
up in the metadata dtype, codes are floor((x - min) * (1 / scale) + 0.5) (or + uniform noise).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# integer type of the metadata dtype's width (for stepping a float by one ulp)
INT_OF = {torch.float16: tl.int16, torch.bfloat16: tl.int16, torch.float32: tl.int32}


@triton.jit
def _round_down_meta(v, META: tl.constexpr, INT: tl.constexpr):
    """v (float32) rounded toward -inf into the metadata dtype."""
    r = v.to(META)
    bits = r.to(INT, bitcast=True)
    down = tl.where(bits < 0, bits + 1, bits - 1).to(META, bitcast=True)
    return tl.where(r.to(tl.float32) > v, down, r)


@triton.jit
def _scale_up_meta(m, hi, LEVELS: tl.constexpr, META: tl.constexpr, INT: tl.constexpr):
    """Smallest stored scale s (as quantize._min_and_scale) with m + s * LEVELS >= hi."""
    mf = m.to(tl.float32)
    s = tl.div_rn(hi - mf, tl.full(hi.shape, LEVELS, tl.float32)).to(META)  # IEEE division
    for _ in tl.static_range(3):
        # max(., 0) keeps the product a separate rounding step (no fused multiply-add), as in torch.
        top = mf + tl.maximum(s.to(tl.float32) * LEVELS, 0.0)
        up = (s.to(INT, bitcast=True) + 1).to(META, bitcast=True)
        s = tl.where(top < hi, up, s)
    return s


@triton.jit
def group_min_scale(lo, hi, LEVELS: tl.constexpr, META: tl.constexpr, INT: tl.constexpr):
    """Stored min and scale of groups with float32 extremes lo/hi, and 1 / scale (0 if scale 0)."""
    m = _round_down_meta(lo, META, INT)
    s = _scale_up_meta(m, hi, LEVELS, META, INT)
    sf = s.to(tl.float32)
    inv = tl.where(sf > 0, tl.div_rn(tl.full(sf.shape, 1.0, tl.float32), sf), 0.0)
    return m, s, inv


@triton.jit
def group_codes(x, m, inv, noise, LEVELS: tl.constexpr, STOCHASTIC: tl.constexpr):
    """int32 codes of float32 x given its group's stored min m and 1 / scale (broadcast to x)."""
    t = (x - m.to(tl.float32)) * inv
    t = tl.maximum(t, 0.0)  # t >= 0 already; this keeps t + 0.5 from fusing into an fma
    if STOCHASTIC:
        t = t + noise
    else:
        t = t + 0.5
    return tl.minimum(tl.maximum(tl.floor(t), 0.0), LEVELS).to(tl.int32)

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


@triton.jit
def floor_codes(y, LEVELS: tl.constexpr, ASM: tl.constexpr):
    """min(floor(y), LEVELS) as int32 for 0 <= y < 2^23. On the GPU one add rounded toward -inf
    puts floor(y) in the low mantissa bits of y + 2^23 (floor and float-to-int conversions run
    at a quarter of the add rate)."""
    if ASM:
        r = tl.inline_asm_elementwise(
            "add.rm.f32 $0, $1, 0f4B000000;", "=r,r", [y], dtype=tl.float32, is_pure=True, pack=1
        )
        q = r.to(tl.int32, bitcast=True) - 0x4B000000
    else:
        q = tl.floor(y).to(tl.int32)
    return tl.minimum(q, LEVELS)


@triton.jit
def pack_last(q, ROWS: tl.constexpr, N: tl.constexpr, BITS: tl.constexpr):
    """int32 codes q [ROWS, N] -> [ROWS, N * BITS // 8] packed little-endian along the last axis
    (layout.py's bit order). tl.split keeps the codes of a byte in one thread."""
    if BITS == 8:
        return q
    elif BITS == 4:
        a, b = tl.split(tl.reshape(q, (ROWS, N // 2, 2)))
        return a | (b << 4)
    else:
        a, b = tl.split(tl.reshape(q, (ROWS, N // 4, 2, 2)))  # codes 4j + 2u and 4j + 2u + 1
        c, e = tl.split(a | (b << 2))  # u = 0: codes 4j, 4j + 1; u = 1: 4j + 2, 4j + 3
        return c | (e << 4)


@triton.jit
def unfused_codes(
    x, m, inv, noise, LEVELS: tl.constexpr, STOCHASTIC: tl.constexpr, ASM: tl.constexpr
):
    """group_codes for kernels launched with enable_fp_fusion=False (the subtract, multiply and
    add round apart, as in torch), with floor_codes' conversion."""
    t = (x - m) * inv
    if STOCHASTIC:
        t = t + noise
    else:
        t = t + 0.5
    return floor_codes(t, LEVELS, ASM)

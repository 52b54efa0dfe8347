"""Quantize-and-pack of the kivi layout: K along tokens, V along head_dim, rows read in order.

The kivi layout groups K along tokens (one min and scale per channel and partition) and V along
head_dim (per token and channel group). The generic kernel (quantize.py) reads K's groups along
a strided axis; these two kernels read both tensors as rows of contiguous channels instead:
- K: a program takes one token partition of BLOCK_D channels, read as 8 // bits sub-tiles of
  rows j, j + per, ... (per codes to a byte), so the codes that share a byte sit in one thread
  and packing is elementwise; the per-channel extremes are reductions along rows.
- V: a program takes BLOCK_T whole rows; each row splits into channel groups in registers.
Outputs are exactly the canonical QuantizedTensors of layout.py (the generic path's bits).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import layout
from ..quantize import QuantizedTensor, meta_dtype_for
from ..rng import uniform_noise
from .launch import interpreting, launch_params
from .quantize_math import INT_OF, group_min_scale, pack_last, unfused_codes


@triton.jit
def _k_rows(x_ptr, n_ptr, rows, d, dmask, st, nbase, D, STOCHASTIC: tl.constexpr):
    """One sub-tile of K: `rows` (token indices) x channels d, and its noise."""
    mask = dmask[None, :] & (rows >= 0)[:, None]
    x = tl.load(x_ptr + rows[:, None].to(tl.int64) * st + d[None, :], mask=mask, other=0.0)
    noise = 0.0
    if STOCHASTIC:
        noise = tl.load(n_ptr + nbase + rows[:, None].to(tl.int64) * D + d[None, :], mask=mask)
    return x, noise


@triton.jit
def _k_sub_tiles(x_ptr, n_ptr, rows, d, dmask, st, nbase, D, PER: tl.constexpr,
                 STOCHASTIC: tl.constexpr):  # fmt: skip
    """The per sub-tiles of one set of bytes: sub-tile j holds rows + j (bit field j)."""
    x0, n0 = _k_rows(x_ptr, n_ptr, rows, d, dmask, st, nbase, D, STOCHASTIC)
    x1, n1 = x0, n0
    x2, n2 = x0, n0
    x3, n3 = x0, n0
    if PER >= 2:
        x1, n1 = _k_rows(x_ptr, n_ptr, rows + 1, d, dmask, st, nbase, D, STOCHASTIC)
    if PER == 4:
        x2, n2 = _k_rows(x_ptr, n_ptr, rows + 2, d, dmask, st, nbase, D, STOCHASTIC)
        x3, n3 = _k_rows(x_ptr, n_ptr, rows + 3, d, dmask, st, nbase, D, STOCHASTIC)
    return x0, x1, x2, x3, n0, n1, n2, n3


@triton.jit
def _k_bytes(x0, x1, x2, x3, n0, n1, n2, n3, mf, inv, PER: tl.constexpr, BITS: tl.constexpr,
             STOCHASTIC: tl.constexpr, ASM: tl.constexpr):  # fmt: skip
    """Packed bytes of the sub-tiles (int32, one byte each) and their code sums per element."""
    LEVELS: tl.constexpr = (1 << BITS) - 1
    q = unfused_codes(x0.to(tl.float32), mf, inv, n0, LEVELS, STOCHASTIC, ASM)
    packed = q
    total = q
    if PER >= 2:
        q = unfused_codes(x1.to(tl.float32), mf, inv, n1, LEVELS, STOCHASTIC, ASM)
        packed = packed | (q << BITS)
        total += q
    if PER == 4:
        q = unfused_codes(x2.to(tl.float32), mf, inv, n2, LEVELS, STOCHASTIC, ASM)
        packed = packed | (q << 2 * BITS)
        total += q
        q = unfused_codes(x3.to(tl.float32), mf, inv, n3, LEVELS, STOCHASTIC, ASM)
        packed = packed | (q << 3 * BITS)
        total += q
    return packed, total


@triton.jit
def _quantize_k_kernel(
    k_ptr, nk_ptr, codes_ptr, mins_ptr, scales_ptr, sums_ptr,
    H, C, D, skb, skh, skt,
    PART: tl.constexpr, BITS: tl.constexpr, BLOCK_D: tl.constexpr,
    STOCHASTIC: tl.constexpr, INT: tl.constexpr, ASM: tl.constexpr,
):  # fmt: skip
    """One token partition of BLOCK_D channels: codes as 16-bit words (codes_ptr is int16;
    bytes 2r and 2r + 1 come from separate sub-tiles, so reordering them for the store moves
    half as many units), min, scale and code sum per channel, the metadata as [B, H, G, D]
    (transposed by the caller: one contiguous run of channels per program instead of a 2-byte
    write every G entries, which bound the kernel by L2 transactions)."""
    # channel blocks vary fastest, so the programs that share token rows run side by side
    d = tl.program_id(0) * BLOCK_D + tl.arange(0, BLOCK_D)
    g = tl.program_id(1)  # token partition
    bh = tl.program_id(2)
    LEVELS: tl.constexpr = (1 << BITS) - 1
    PER: tl.constexpr = 8 // BITS
    UNITS: tl.constexpr = PART // PER // 2  # 16-bit words of one channel's group
    META: tl.constexpr = mins_ptr.dtype.element_ty
    G = C // PART
    dmask = d < D
    x_ptr = k_ptr + (bh // H).to(tl.int64) * skb + (bh % H).to(tl.int64) * skh
    nbase = bh.to(tl.int64) * C * D
    rows = g * PART + tl.arange(0, UNITS) * (2 * PER)  # first token of byte 2r
    a0, a1, a2, a3, na0, na1, na2, na3 = _k_sub_tiles(
        x_ptr, nk_ptr, rows, d, dmask, skt, nbase, D, PER, STOCHASTIC
    )
    b0, b1, b2, b3, nb0, nb1, nb2, nb3 = _k_sub_tiles(  # the odd bytes
        x_ptr, nk_ptr, rows + PER, d, dmask, skt, nbase, D, PER, STOCHASTIC
    )
    # extremes in the input dtype (exact), two to an instruction; masked channels read 0
    lo = tl.minimum(tl.minimum(a0, a1), tl.minimum(a2, a3))
    hi = tl.maximum(tl.maximum(a0, a1), tl.maximum(a2, a3))
    lo = tl.minimum(lo, tl.minimum(tl.minimum(b0, b1), tl.minimum(b2, b3)))
    hi = tl.maximum(hi, tl.maximum(tl.maximum(b0, b1), tl.maximum(b2, b3)))
    lo = tl.min(lo, axis=0).to(tl.float32)
    hi = tl.max(hi, axis=0).to(tl.float32)
    m, s, inv = group_min_scale(lo, hi, LEVELS, META, INT)
    mf = m.to(tl.float32)[None, :]
    inv = inv[None, :]
    even, total = _k_bytes(a0, a1, a2, a3, na0, na1, na2, na3, mf, inv, PER, BITS,
                           STOCHASTIC, ASM)  # fmt: skip
    odd, total_odd = _k_bytes(b0, b1, b2, b3, nb0, nb1, nb2, nb3, mf, inv, PER, BITS,
                              STOCHASTIC, ASM)  # fmt: skip
    total = tl.sum(total + total_odd, axis=0)
    meta = (bh.to(tl.int64) * G + g) * D + d
    tl.store(mins_ptr + meta, m, mask=dmask)
    tl.store(scales_ptr + meta, s, mask=dmask)
    tl.store(sums_ptr + meta, total.to(sums_ptr.dtype.element_ty), mask=dmask)
    grp = (bh.to(tl.int64) * D + d) * G + g  # canonical K codes: [B, H, D, G, 2 * UNITS]
    words = (even | (odd << 8)).to(tl.int16)  # little-endian: the even byte first
    r = tl.arange(0, UNITS)
    tl.store(codes_ptr + grp[None, :] * UNITS + r[:, None], words, mask=dmask[None, :])


@triton.jit
def _meta_to_canonical_kernel(
    a_src, a_dst, b_src, b_dst, c_src, c_dst, G, D,
    BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """K's three metadata arrays [BH, G, D] -> the canonical [BH, D, G], in one launch."""
    g = tl.program_id(0) * BLOCK_G + tl.arange(0, BLOCK_G)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    base = tl.program_id(2).to(tl.int64) * G * D
    mask = (g < G)[:, None] & (d < D)[None, :]
    src = base + g[:, None] * D + d[None, :]
    dst = base + d[None, :] * G + g[:, None]
    tl.store(a_dst + dst, tl.load(a_src + src, mask=mask), mask=mask)
    tl.store(b_dst + dst, tl.load(b_src + src, mask=mask), mask=mask)
    tl.store(c_dst + dst, tl.load(c_src + src, mask=mask), mask=mask)


@triton.jit
def _quantize_v_kernel(
    v_ptr, nv_ptr, codes_ptr, mins_ptr, scales_ptr, sums_ptr,
    H, C, D, svb, svh, svt,
    PART: tl.constexpr, BITS: tl.constexpr, BLOCK_T: tl.constexpr, E: tl.constexpr,
    EVEN: tl.constexpr, STOCHASTIC: tl.constexpr, INT: tl.constexpr, ASM: tl.constexpr,
):  # fmt: skip
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    bh = tl.program_id(1)
    LEVELS: tl.constexpr = (1 << BITS) - 1
    PER: tl.constexpr = 8 // BITS
    DP: tl.constexpr = E * PART  # a row's groups, padding included
    META: tl.constexpr = mins_ptr.dtype.element_ty
    d = tl.arange(0, DP)
    mask = (d < D)[None, :] & (t >= 0)[:, None]  # BLOCK_T divides C: every row is whole
    x_ptr = v_ptr + (bh // H).to(tl.int64) * svb + (bh % H).to(tl.int64) * svh
    xh = tl.load(x_ptr + t[:, None].to(tl.int64) * svt + d[None, :], mask=mask, other=0.0)
    x3h = tl.reshape(xh, (BLOCK_T, E, PART))
    m3 = tl.reshape(mask, (BLOCK_T, E, PART))
    if EVEN:  # extremes in the input dtype (exact), two to an instruction
        lo = tl.min(x3h, axis=2).to(tl.float32)
        hi = tl.max(x3h, axis=2).to(tl.float32)
    else:
        lo = tl.min(tl.where(m3, x3h.to(tl.float32), float("inf")), axis=2)
        hi = tl.max(tl.where(m3, x3h.to(tl.float32), -float("inf")), axis=2)
    m, s, inv = group_min_scale(lo, hi, LEVELS, META, INT)
    noise = 0.0
    if STOCHASTIC:
        nptr = nv_ptr + (bh.to(tl.int64) * C + t[:, None]) * D + d[None, :]
        noise = tl.reshape(tl.load(nptr, mask=mask, other=0.0), (BLOCK_T, E, PART))
    q3 = unfused_codes(x3h.to(tl.float32), m.to(tl.float32)[:, :, None], inv[:, :, None], noise,
                       LEVELS, STOCHASTIC, ASM)  # fmt: skip
    if not EVEN:
        q3 = tl.where(m3, q3, 0)  # padding of a short last group is code 0
    row = bh.to(tl.int64) * C + t  # canonical V: [B, H, C, E, PART // PER]
    grp = row[:, None] * E + tl.arange(0, E)[None, :]
    tl.store(mins_ptr + grp, m)
    tl.store(scales_ptr + grp, s)
    tl.store(sums_ptr + grp, tl.sum(q3, axis=2).to(sums_ptr.dtype.element_ty))
    packed = pack_last(tl.reshape(q3, (BLOCK_T, DP)), BLOCK_T, DP, BITS)
    cols = tl.arange(0, DP // PER)
    tl.store(codes_ptr + row[:, None] * (DP // PER) + cols[None, :], packed.to(tl.uint8))


def kivi_fast_path(head_dim: int, partition: int) -> bool:
    """Shapes the kivi kernels take: a row's channel groups tile a power of two."""
    groups = layout.num_groups(head_dim, partition)
    return triton.next_power_of_2(groups * partition) == groups * partition <= 256


def _empty(lead, groups, bits, partition, meta, device) -> dict[str, torch.Tensor]:
    per = layout.codes_per_byte(bits)
    return dict(
        codes=torch.empty(
            (*lead, groups, partition // per), dtype=layout.CODE_DTYPE, device=device
        ),
        mins=torch.empty((*lead, groups), dtype=meta, device=device),
        scales=torch.empty((*lead, groups), dtype=meta, device=device),
        sums=torch.empty((*lead, groups), dtype=layout.sum_dtype(bits, partition), device=device),
    )


def _launch_common(x: torch.Tensor, bits: int, partition: int, rounding: str) -> dict:
    c, d = x.shape[2:]
    if c % partition or not kivi_fast_path(d, partition) or x.stride(-1) != 1:
        raise ValueError(f"kivi fast path: tokens {c} / head_dim {d} / partition {partition}")
    return dict(
        PART=partition, BITS=bits, STOCHASTIC=rounding == "stochastic",
        INT=INT_OF[meta_dtype_for(x.dtype)], ASM=not interpreting(), enable_fp_fusion=False,
    )  # fmt: skip


def _noise(x, rounding, seed, stream, token_start) -> torch.Tensor:
    if rounding != "stochastic":
        return x  # unused placeholder pointer
    return uniform_noise(list(x.shape), seed, stream, x.device, {2: token_start})


def quantize_k_tokens(
    k: torch.Tensor, bits: int, partition: int, rounding: str = "nearest", seed: int = 0,
    stream: int = 0, token_start: int = 0,
) -> QuantizedTensor:  # fmt: skip
    """K [B, H, C, D] grouped along tokens: quantize_groups_triton(k, -2, ...)'s result."""
    common = _launch_common(k, bits, partition, rounding)
    bsz, heads, c, d = k.shape
    kq = _empty((bsz, heads, d), c // partition, bits, partition, meta_dtype_for(k.dtype), k.device)
    if k.numel():
        tune = launch_params("quantize_kivi", d, partition)
        block_d = min(tune["BLOCK_D"], triton.next_power_of_2(d))
        g = c // partition
        # metadata as [B, H, G, D], then one transpose launch (see _quantize_k_kernel)
        meta = [kq[n].new_empty((bsz, heads, g, d)) for n in ("mins", "scales", "sums")]
        _quantize_k_kernel[(triton.cdiv(d, block_d), g, bsz * heads)](
            k, _noise(k, rounding, seed, stream, token_start), kq["codes"].view(torch.int16),
            *meta, heads, c, d, k.stride(0), k.stride(1), k.stride(2),
            BLOCK_D=block_d, num_warps=tune["k_warps"], **common,
        )  # fmt: skip
        _meta_to_canonical_kernel[(triton.cdiv(g, 64), triton.cdiv(d, 64), bsz * heads)](
            meta[0], kq["mins"], meta[1], kq["scales"], meta[2], kq["sums"], g, d,
            BLOCK_G=64, BLOCK_D=64,
        )  # fmt: skip
    return QuantizedTensor(**kq, shape=tuple(k.shape), dim=2, bits=bits, partition=partition,
                           dtype=k.dtype)  # fmt: skip


def quantize_v_rows(
    v: torch.Tensor, bits: int, partition: int, rounding: str = "nearest", seed: int = 0,
    stream: int = 0, token_start: int = 0,
) -> QuantizedTensor:  # fmt: skip
    """V [B, H, C, D] grouped along head_dim: quantize_groups_triton(v, -1, ...)'s result."""
    common = _launch_common(v, bits, partition, rounding)
    bsz, heads, c, d = v.shape
    e = layout.num_groups(d, partition)
    vq = _empty((bsz, heads, c), e, bits, partition, meta_dtype_for(v.dtype), v.device)
    if v.numel():
        tune = launch_params("quantize_kivi", d, partition)
        block_t = tune["BLOCK_T"]
        _quantize_v_kernel[(triton.cdiv(c, block_t), bsz * heads)](
            v, _noise(v, rounding, seed, stream, token_start),
            vq["codes"], vq["mins"], vq["scales"], vq["sums"],
            heads, c, d, v.stride(0), v.stride(1), v.stride(2),
            BLOCK_T=block_t, E=e, EVEN=d == e * partition, num_warps=tune["v_warps"], **common,
        )  # fmt: skip
    return QuantizedTensor(**vq, shape=tuple(v.shape), dim=3, bits=bits, partition=partition,
                           dtype=v.dtype)  # fmt: skip


def quantize_kivi_triton(
    k: torch.Tensor,
    v: torch.Tensor,
    bits: int,
    partition: int,
    rounding: str = "nearest",
    seed: int = 0,
    streams: tuple[int, int] = (0, 0),
    token_start: int = 0,
) -> tuple[QuantizedTensor, QuantizedTensor]:
    """K [B, H, C, D] along tokens and V along head_dim, C a whole number of partitions; the same
    QuantizedTensors as quantize_groups_triton(k, -2, ...) and (v, -1, ...). head_dim must pass
    kivi_fast_path and be contiguous."""
    args = dict(bits=bits, partition=partition, rounding=rounding, seed=seed)
    return (
        quantize_k_tokens(k, **args, stream=streams[0], token_start=token_start),
        quantize_v_rows(v, **args, stream=streams[1], token_start=token_start),
    )

"""Quantize-and-pack of the kivi layout: K and V of one token partition in one program.

The kivi layout groups K along tokens (one min and scale per channel and partition) and V along
head_dim (per token and channel group). The generic kernel (quantize.py) sees K's groups along a
strided axis; here a program reads the [partition, head_dim] tile of K and of V in memory order
instead (rows of head_dim contiguous elements), so every load is a full coalesced row:
- K: the tile is read as 8 // bits sub-tiles of rows j, j + per, ... (per codes to a byte), so
  the codes that share a byte sit in one thread and packing is elementwise; the per-channel
  extremes are reductions along rows.
- V: the tile is read whole; each row splits into channel groups in registers.
Outputs are exactly the canonical QuantizedTensors of layout.py (same bits as the generic path).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import layout
from ..quantize import QuantizedTensor, meta_dtype_for
from ..rng import uniform_noise
from .quantize_math import INT_OF, group_codes, group_min_scale


@triton.jit
def _k_rows(x_ptr, n_ptr, base, nbase, t0, k: tl.constexpr, st, D, PER: tl.constexpr,
            ROWS: tl.constexpr, DP: tl.constexpr, STOCHASTIC: tl.constexpr):  # fmt: skip
    """Sub-tile k of K's partition: rows t0 + per * i + k, all channels (float32), and noise."""
    i = tl.arange(0, ROWS)
    d = tl.arange(0, DP)
    t = t0 + i * PER + k
    mask = (d < D)[None, :] & (i >= 0)[:, None]
    x = tl.load(x_ptr + base + t[:, None].to(tl.int64) * st + d[None, :], mask=mask, other=0.0)
    noise = 0.0
    if STOCHASTIC:
        noise = tl.load(n_ptr + nbase + t[:, None].to(tl.int64) * D + d[None, :], mask=mask)
    return x.to(tl.float32), noise


@triton.jit
def _quantize_kivi_kernel(
    k_ptr, v_ptr, nk_ptr, nv_ptr,
    kc_ptr, km_ptr, ks_ptr, ksum_ptr,
    vc_ptr, vm_ptr, vs_ptr, vsum_ptr,
    H, C, D,
    skb, skh, skt, svb, svh, svt,
    PART: tl.constexpr, BITS: tl.constexpr, DP: tl.constexpr, E: tl.constexpr,
    STOCHASTIC: tl.constexpr, INT: tl.constexpr,
):  # fmt: skip
    g = tl.program_id(0)  # token partition
    h = tl.program_id(1)
    b = tl.program_id(2)
    LEVELS: tl.constexpr = (1 << BITS) - 1
    PER: tl.constexpr = 8 // BITS
    ROWS: tl.constexpr = PART // PER
    META: tl.constexpr = km_ptr.dtype.element_ty
    G = C // PART
    bh = b * H + h
    t0 = g * PART
    nbase = bh.to(tl.int64) * C * D

    # ---- K: groups along tokens, one per channel; byte i of channel d holds rows per*i + k.
    kbase = b.to(tl.int64) * skb + h.to(tl.int64) * skh
    x0, n0 = _k_rows(k_ptr, nk_ptr, kbase, nbase, t0, 0, skt, D, PER, ROWS, DP, STOCHASTIC)
    x1, n1 = x0, n0
    x2, n2 = x0, n0
    x3, n3 = x0, n0
    if PER >= 2:
        x1, n1 = _k_rows(k_ptr, nk_ptr, kbase, nbase, t0, 1, skt, D, PER, ROWS, DP, STOCHASTIC)
    if PER == 4:
        x2, n2 = _k_rows(k_ptr, nk_ptr, kbase, nbase, t0, 2, skt, D, PER, ROWS, DP, STOCHASTIC)
        x3, n3 = _k_rows(k_ptr, nk_ptr, kbase, nbase, t0, 3, skt, D, PER, ROWS, DP, STOCHASTIC)
    lo = tl.min(tl.minimum(tl.minimum(x0, x1), tl.minimum(x2, x3)), axis=0)
    hi = tl.max(tl.maximum(tl.maximum(x0, x1), tl.maximum(x2, x3)), axis=0)
    m, s, inv = group_min_scale(lo, hi, LEVELS, META, INT)
    q = group_codes(x0, m[None, :], inv[None, :], n0, LEVELS, STOCHASTIC)
    packed = q
    total = tl.sum(q, axis=0)
    if PER >= 2:
        q = group_codes(x1, m[None, :], inv[None, :], n1, LEVELS, STOCHASTIC)
        packed = packed | (q << BITS)
        total += tl.sum(q, axis=0)
    if PER == 4:
        q = group_codes(x2, m[None, :], inv[None, :], n2, LEVELS, STOCHASTIC)
        packed = packed | (q << 2 * BITS)
        total += tl.sum(q, axis=0)
        q = group_codes(x3, m[None, :], inv[None, :], n3, LEVELS, STOCHASTIC)
        packed = packed | (q << 3 * BITS)
        total += tl.sum(q, axis=0)
    d = tl.arange(0, DP)
    dmask = d < D
    krow = (bh.to(tl.int64) * D + d) * G + g  # canonical K: [B, H, D, G, ROWS]
    tl.store(km_ptr + krow, m, mask=dmask)
    tl.store(ks_ptr + krow, s, mask=dmask)
    tl.store(ksum_ptr + krow, total.to(ksum_ptr.dtype.element_ty), mask=dmask)
    i = tl.arange(0, ROWS)
    tl.store(kc_ptr + krow[None, :] * ROWS + i[:, None], packed.to(tl.uint8), mask=dmask[None, :])

    # ---- V: groups along head_dim, E per token; the row is contiguous in the canonical codes.
    t = t0 + tl.arange(0, PART)
    mask = (d < D)[None, :] & (t >= 0)[:, None]
    vptr = v_ptr + b.to(tl.int64) * svb + h.to(tl.int64) * svh + t[:, None].to(tl.int64) * svt
    x = tl.load(vptr + d[None, :], mask=mask, other=0.0).to(tl.float32)
    x3 = tl.reshape(x, (PART, E, PART))
    m3 = tl.reshape(mask, (PART, E, PART))
    lo = tl.min(tl.where(m3, x3, float("inf")), axis=2)
    hi = tl.max(tl.where(m3, x3, -float("inf")), axis=2)
    m, s, inv = group_min_scale(lo, hi, LEVELS, META, INT)
    noise = 0.0
    if STOCHASTIC:
        nptr = nv_ptr + nbase + t[:, None].to(tl.int64) * D + d[None, :]
        noise = tl.reshape(tl.load(nptr, mask=mask, other=0.0), (PART, E, PART))
    q3 = group_codes(x3, m[:, :, None], inv[:, :, None], noise, LEVELS, STOCHASTIC)
    q3 = tl.where(m3, q3, 0)  # padding of a short last group is code 0
    vrow = (bh.to(tl.int64) * C + t) * E  # canonical V: [B, H, C, E, ROWS]
    e = tl.arange(0, E)
    vgrp = vrow[:, None] + e[None, :]
    tl.store(vm_ptr + vgrp, m)
    tl.store(vs_ptr + vgrp, s)
    tl.store(vsum_ptr + vgrp, tl.sum(q3, axis=2).to(vsum_ptr.dtype.element_ty))
    q = tl.reshape(q3, (PART, DP))
    if PER > 1:
        shifts = tl.arange(0, PER) * BITS
        q = tl.sum(tl.reshape(q, (PART, DP // PER, PER)) << shifts[None, None, :], axis=2)
    cols = tl.arange(0, DP // PER)
    tl.store(vc_ptr + vrow[:, None] * ROWS + cols[None, :], q.to(tl.uint8))


def kivi_fast_path(head_dim: int, partition: int) -> bool:
    """Shapes the fused kernel takes: the channel groups of a row tile a power of two."""
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


def quantize_kivi_triton(
    k: torch.Tensor,
    v: torch.Tensor,
    bits: int,
    partition: int,
    rounding: str = "nearest",
    seed: int = 0,
    streams: tuple[int, int] = (0, 0),
    token_start: int = 0,
    num_warps: int = 4,
) -> tuple[QuantizedTensor, QuantizedTensor]:
    """K [B, H, C, D] along tokens and V along head_dim, C a whole number of partitions; the same
    QuantizedTensors as quantize_groups_triton(k, -2, ...) and (v, -1, ...). head_dim must pass
    kivi_fast_path and be contiguous."""
    bsz, heads, c, d = k.shape
    if c % partition or not kivi_fast_path(d, partition) or k.stride(-1) != 1 or v.stride(-1) != 1:
        raise ValueError(f"kivi fast path: tokens {c} / head_dim {d} / partition {partition}")
    meta = meta_dtype_for(k.dtype)
    e = layout.num_groups(d, partition)
    kq = _empty((bsz, heads, d), c // partition, bits, partition, meta, k.device)
    vq = _empty((bsz, heads, c), e, bits, partition, meta, k.device)
    if k.numel():
        nk = nv = k  # unused placeholder pointers
        if rounding == "stochastic":
            offs = {2: token_start}
            nk = uniform_noise(list(k.shape), seed, streams[0], k.device, offs)
            nv = uniform_noise(list(v.shape), seed, streams[1], k.device, offs)
        _quantize_kivi_kernel[(c // partition, heads, bsz)](
            k, v, nk, nv,
            kq["codes"], kq["mins"], kq["scales"], kq["sums"],
            vq["codes"], vq["mins"], vq["scales"], vq["sums"],
            heads, c, d,
            k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
            PART=partition, BITS=bits, DP=e * partition, E=e,
            STOCHASTIC=rounding == "stochastic", INT=INT_OF[meta], num_warps=num_warps,
        )  # fmt: skip
    common = dict(shape=tuple(k.shape), bits=bits, partition=partition, dtype=k.dtype)
    return QuantizedTensor(**kq, dim=2, **common), QuantizedTensor(**vq, dim=3, **common)

"""The 16-bit part of a decode step (sinks and the open page) beside decode kernels that read
closed pages only (kivi_gluon.py), in one of two forms:
- open_partial_kernel: one program per (sequence, kv head) attends its GQA group over the sinks
  and the open page with 16-bit products and writes (acc, m, l) as partial IDX, which
  combine_splits merges with the closed pages' partials (a launch of its own);
- combine_with_16bit_kernel: the split merge itself first attends its row over those tokens on
  CUDA cores (each channel block recomputes the row's scores), one launch fewer: for small
  batches, where a launch is much of a decode call and the recomputation is cheap.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .attention_kernel import _attend16, _merge_partials


@triton.jit(do_not_specialize=["NPART", "IDX"])
def open_partial_kernel(
    q_ptr, sq_b, sq_h,
    part_ptr, ml_ptr, NPART, IDX,
    seq_ptr,
    ks_ptr, vs_ptr, sks_b, sks_h, sks_t,
    ko_ptr, vo_ptr, sko_b, sko_h, sko_t,
    NSINK, KVH, qk_scale,
    D: tl.constexpr, PART: tl.constexpr, G: tl.constexpr, ROWS: tl.constexpr,
    BLOCK16: tl.constexpr, INTERP: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(0) // KVH
    kvh = tl.program_id(0) % KVH
    bk = b.to(tl.int64)
    r = tl.arange(0, ROWS)
    row_ok = r < G
    head = (kvh * G + r).to(tl.int64)
    qoff = bk * sq_b + head * sq_h
    T = tl.load(seq_ptr + b)
    n_sink = tl.minimum(T, NSINK)
    n_closed = (T - n_sink) // PART * PART
    m_i = tl.full([ROWS], -float("inf"), tl.float32)
    l_i = tl.zeros([ROWS], tl.float32)
    acc = tl.zeros([ROWS, D], tl.float32)
    q_abs = tl.zeros([ROWS], tl.int32) + T - 1  # decode: the query is the last token
    m_i, l_i, acc = _attend16(
        q_ptr, qoff, row_ok, q_abs, ks_ptr, vs_ptr, bk * sks_b + kvh * sks_h, sks_t,
        n_sink, 0, m_i, l_i, acc, qk_scale, D, BLOCK16, False, INTERP,
    )  # fmt: skip
    m_i, l_i, acc = _attend16(
        q_ptr, qoff, row_ok, q_abs, ko_ptr, vo_ptr, bk * sko_b + kvh * sko_h, sko_t,
        T - n_sink - n_closed, n_sink + n_closed, m_i, l_i, acc, qk_scale, D, BLOCK16, False,
        INTERP,
    )  # fmt: skip
    prow = (bk * KVH * G + head) * NPART + IDX
    dch = tl.arange(0, D)
    tl.store(part_ptr + prow[:, None] * D + dch[None, :], acc, mask=row_ok[:, None])
    tl.store(ml_ptr + prow * 2, m_i, mask=row_ok)
    tl.store(ml_ptr + prow * 2 + 1, l_i, mask=row_ok)


@triton.jit
def _attend16_row(
    q, k_ptr, v_ptr, base, st, n_tok, dch, m_i, l_i, acc, qk_scale,
    D: tl.constexpr, BLOCK16: tl.constexpr,
):  # fmt: skip
    """Online softmax of one query row q [D] (float32) over n_tok 16-bit tokens, accumulating
    the channels dch of their values."""
    for t0 in range(0, n_tok, BLOCK16):
        tok = t0 + tl.arange(0, BLOCK16)
        ok = tok < n_tok
        rows = k_ptr + base + tok[:, None] * st
        k = tl.load(rows + tl.arange(0, D)[None, :], mask=ok[:, None], other=0.0)
        s = tl.where(ok, tl.sum(k.to(tl.float32) * q[None, :], axis=1) * qk_scale, -float("inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=0))
        m_safe = tl.where(m_new == -float("inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe)
        l_i = l_i * alpha + tl.sum(p, axis=0)
        v = tl.load(v_ptr + base + tok[:, None] * st + dch[None, :], mask=ok[:, None], other=0.0)
        acc = acc * alpha + tl.sum(p[:, None] * v.to(tl.float32), axis=0)
        m_i = m_new
    return m_i, l_i, acc


@triton.jit(do_not_specialize=["NSPLIT"])
def combine_with_16bit_kernel(
    o_ptr, ml_ptr, out_ptr, NSPLIT,
    q_ptr, sq_b, sq_h, seq_ptr,
    ks_ptr, vs_ptr, sks_b, sks_h, sks_t,
    ko_ptr, vo_ptr, sko_b, sko_h, sko_t,
    NSINK, HQ, G, qk_scale,
    D: tl.constexpr, PART: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr,
    BLOCK16: tl.constexpr,
):  # fmt: skip
    """out[row] for the channels of block program_id(1): the row's 16-bit sinks and open page,
    then its NSPLIT closed-page partials, merged online (combine_splits_kernel's merge)."""
    row = tl.program_id(0).to(tl.int64)
    b = row // HQ
    head = row % HQ
    kvh = head // G
    dch = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    T = tl.load(seq_ptr + b)
    n_sink = tl.minimum(T, NSINK)
    n_closed = (T - n_sink) // PART * PART
    q = tl.load(q_ptr + b * sq_b + head * sq_h + tl.arange(0, D)).to(tl.float32)
    # loop-carried through the helpers: typed scalars, not Python constants
    m_i = tl.full([], -float("inf"), tl.float32)
    l_i = tl.zeros([], tl.float32)
    acc = tl.zeros([BLOCK_D], tl.float32)
    m_i, l_i, acc = _attend16_row(
        q, ks_ptr, vs_ptr, b * sks_b + kvh * sks_h, sks_t, n_sink, dch, m_i, l_i, acc,
        qk_scale, D, BLOCK16,
    )  # fmt: skip
    m_i, l_i, acc = _attend16_row(
        q, ko_ptr, vo_ptr, b * sko_b + kvh * sko_h, sko_t, T - n_sink - n_closed, dch,
        m_i, l_i, acc, qk_scale, D, BLOCK16,
    )  # fmt: skip
    m_i, l_i, acc = _merge_partials(
        o_ptr, ml_ptr + row * NSPLIT * 2, row, NSPLIT, dch, m_i, l_i, acc, D, BLOCK_S
    )
    tl.store(out_ptr + row * D + dch, (acc / l_i).to(out_ptr.dtype.element_ty))


_ = triton  # imported for the decorator's module

"""The split merge of the Gluon decode kernel's partials, which also attends the 16-bit tokens.

kivi_gluon.py reads closed pages only. combine_with_16bit_kernel merges its split-K partials
for one query row and one block of channels, and first attends that row over the sequence's
16-bit sinks and open page on CUDA cores (each channel block recomputes the row's scores: under
70 tokens). One launch does what a separate 16-bit kernel and the merge did: on the H100 that
took 1.5-2 us off every decode call at batch 1 and up to 1.4 us at batch 16
(`attention_h100_fused_16bit_ab.json`, `attention_h100_fused_16bit_batches.json`).
"""

from __future__ import annotations

import triton
import triton.language as tl

from .attention_kernel import _merge_partials


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

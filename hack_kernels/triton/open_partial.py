"""The 16-bit part of a decode step (sinks and the open page) as one split-K partial.

Used beside decode kernels that read closed pages only (kivi_gluon.py): one program per
(sequence, kv head) attends its GQA group over the sinks and the open page in 16 bits and
writes (acc, m, l) as partial IDX, which combine_splits merges with the closed pages' partials.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .attention_kernel import _attend16


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


_ = triton  # imported for the decorator's module

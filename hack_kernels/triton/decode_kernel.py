"""Decode kernel with page slots: the 16 tensor-core rows hold SLOTS pages x G query heads.

hack_attn_kernel gives decode 16 rows of which only G (the GQA group, 4 for Llama-8B) are real,
and pays the per-row work (Eq. (1) terms, softmax, P quantization, accumulator update) on all 16
for every page. Here row r = (slot r // G, head r % G): each iteration takes SLOTS consecutive
pages, slot s scoring page j0 + s through a product with Q masked to its own rows, so the per-row
work runs once per SLOTS pages. Each slot keeps its own online softmax and is written as its own
split-K partial; combine_splits_kernel merges them with the splits.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .attention_kernel import _attend16, _pick, _q_group, _quant8_rows, _unpack


@triton.jit(do_not_specialize=["NSPLIT"])
def hack_decode_slots_kernel(
    q_ptr, sq_b, sq_h,
    o_ptr, ml_ptr,
    seq_ptr, bt_ptr, sbt_b,
    kc_ptr, skc_p, skc_h, skc_t,
    km_ptr, kss_ptr, ksum_ptr, skm_p, skm_h, skm_t,
    vc_ptr, svc_p, svc_h, svc_d,
    vm_ptr, vss_ptr, vsum_ptr, svm_p, svm_h, svm_d,
    ks_ptr, vs_ptr, sks_b, sks_h, sks_t,
    ko_ptr, vo_ptr, sko_b, sko_h, sko_t,
    NSINK, NSPLIT, HKV, HQ, qk_scale,
    D: tl.constexpr, PART: tl.constexpr, BITS: tl.constexpr, GW: tl.constexpr,
    G: tl.constexpr, SLOTS: tl.constexpr, INTERP: tl.constexpr,
):  # fmt: skip
    ROWS: tl.constexpr = 16
    PER: tl.constexpr = 8 // BITS
    GD: tl.constexpr = D // GW
    KB: tl.constexpr = GW // PER
    b = tl.program_id(0) // HKV
    kvh = tl.program_id(0) % HKV
    split = tl.program_id(1)
    r = tl.arange(0, ROWS)
    slot = r // G
    head = kvh * G + r % G
    row_ok = slot < SLOTS
    T = tl.load(seq_ptr + b)
    qoff = b.to(tl.int64) * sq_b + head.to(tl.int64) * sq_h
    n_sink = tl.minimum(T, NSINK)
    n_pages = (T - n_sink) // PART
    n_open = T - n_sink - n_pages * PART

    m_i = tl.full([ROWS], -float("inf"), tl.float32)
    l_i = tl.zeros([ROWS], tl.float32)
    acc = tl.zeros([ROWS, D], tl.float32)
    q_abs = T - 1 + tl.zeros([ROWS], tl.int32)
    first = row_ok & (slot == 0)  # the 16-bit tokens join slot 0 of split 0 / the last split
    if split == 0:
        m_i, l_i, acc = _attend16(
            q_ptr, qoff, first, q_abs, ks_ptr, vs_ptr,
            b.to(tl.int64) * sks_b + kvh * sks_h, sks_t, n_sink, 0,
            m_i, l_i, acc, qk_scale, D, 16, False, INTERP,
        )  # fmt: skip

    qc0, sq0, bq0, aq0 = _q_group(q_ptr, qoff, row_ok, 0, GW, qk_scale)
    qc1, sq1, bq1, aq1 = qc0, sq0, bq0, aq0
    qc2, sq2, bq2, aq2 = qc0, sq0, bq0, aq0
    qc3, sq3, bq3, aq3 = qc0, sq0, bq0, aq0
    if GD > 1:
        qc1, sq1, bq1, aq1 = _q_group(q_ptr, qoff, row_ok, 1, GW, qk_scale)
    if GD > 2:
        qc2, sq2, bq2, aq2 = _q_group(q_ptr, qoff, row_ok, 2, GW, qk_scale)
        qc3, sq3, bq3, aq3 = _q_group(q_ptr, qoff, row_ok, 3, GW, qk_scale)

    pps = tl.cdiv(tl.cdiv(n_pages, NSPLIT), SLOTS) * SLOTS
    p_lo = split * pps
    p_hi = tl.minimum(p_lo + pps, n_pages)
    tok = tl.arange(0, PART)
    dch = tl.arange(0, D)
    kbyte = tl.arange(0, KB)
    vbyte = tl.arange(0, PART // PER)
    zero8 = tl.zeros([ROWS, GW], tl.int8)
    for j0 in range(p_lo, p_hi, SLOTS):
        rpage = j0 + slot
        rok = row_ok & (rpage < p_hi)
        rpg = tl.load(bt_ptr + b * sbt_b + rpage, mask=rok, other=0).to(tl.int64)
        kmrow = rpg * skm_p + kvh * skm_h
        s = tl.zeros([ROWS, PART], tl.float32)
        for g in tl.static_range(GD):
            qg = _pick(g, qc0, qc1, qc2, qc3)
            dot = tl.zeros([ROWS, PART], tl.int32)
            for sl in tl.static_range(SLOTS):
                ok = j0 + sl < p_hi
                pg = tl.load(bt_ptr + b * sbt_b + j0 + sl, mask=ok, other=0).to(tl.int64)
                kptr = kc_ptr + pg * skc_p + kvh * skc_h + tok[:, None] * skc_t
                kb = tl.load(kptr + g * (PART // PER) + kbyte[None, :], mask=ok, other=0)
                kc = _unpack(kb, PART, KB, BITS)  # [tokens, GW]
                qs = tl.where((slot == sl)[:, None], qg, zero8)
                dot += tl.dot(qs, tl.trans(kc), out_dtype=tl.int32)
            moff = kmrow[:, None] + tok[None, :] * skm_t + g
            mk = tl.load(km_ptr + moff, mask=rok[:, None], other=0.0).to(tl.float32)
            sk = tl.load(kss_ptr + moff, mask=rok[:, None], other=0.0).to(tl.float32)
            sumk = tl.load(ksum_ptr + moff, mask=rok[:, None], other=0).to(tl.float32)
            s += (_pick(g, sq0, sq1, sq2, sq3)[:, None] * sk) * dot.to(tl.float32)
            s += _pick(g, bq0, bq1, bq2, bq3)[:, None] * (sk * sumk)
            s += _pick(g, aq0, aq1, aq2, aq3)[:, None] * mk
        s = tl.where(rok[:, None], s, -float("inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == -float("inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        pc, mp, sp, sump = _quant8_rows(p, None, False)
        zp = tl.zeros([ROWS, PART], tl.int8)
        pv = tl.zeros([ROWS, D], tl.int32)
        for sl in tl.static_range(SLOTS):
            ok = j0 + sl < p_hi
            pg = tl.load(bt_ptr + b * sbt_b + j0 + sl, mask=ok, other=0).to(tl.int64)
            vptr = vc_ptr + pg * svc_p + kvh * svc_h + dch[:, None] * svc_d
            vb = tl.load(vptr + vbyte[None, :], mask=ok, other=0)
            vc = _unpack(vb, D, PART // PER, BITS)  # [D, tokens]
            ps = tl.where((slot == sl)[:, None], pc, zp)
            pv += tl.dot(ps, tl.trans(vc), out_dtype=tl.int32)
        voff = (rpg * svm_p + kvh * svm_h)[:, None] + dch[None, :] * svm_d
        mv = tl.load(vm_ptr + voff, mask=rok[:, None], other=0.0).to(tl.float32)
        sv = tl.load(vss_ptr + voff, mask=rok[:, None], other=0.0).to(tl.float32)
        sumv = tl.load(vsum_ptr + voff, mask=rok[:, None], other=0).to(tl.float32)
        acc = acc * alpha[:, None] + (sp[:, None] * sv) * pv.to(tl.float32)
        acc += (128.0 * sp + mp)[:, None] * (sv * sumv)
        acc += (sp * sump + PART * mp)[:, None] * mv
        m_i = m_new

    if split == NSPLIT - 1:
        m_i, l_i, acc = _attend16(
            q_ptr, qoff, first, q_abs, ko_ptr, vo_ptr,
            b.to(tl.int64) * sko_b + kvh * sko_h, sko_t, n_open, n_sink + n_pages * PART,
            m_i, l_i, acc, qk_scale, D, 16, False, INTERP,
        )  # fmt: skip

    # partials [B, HQ, NSPLIT * SLOTS, D] and [.., 2]: slot s of split k is partial k * SLOTS + s
    part = (b.to(tl.int64) * HQ + head) * (NSPLIT * SLOTS) + split * SLOTS + slot
    tl.store(o_ptr + part[:, None] * D + dch[None, :], acc, mask=row_ok[:, None])
    tl.store(ml_ptr + part * 2, m_i, mask=row_ok)
    tl.store(ml_ptr + part * 2 + 1, l_i, mask=row_ok)


def slots_for(group: int, want: int) -> int:
    """Pages per iteration: as many as fit 16 rows of `group` heads, at most `want`."""
    return max(1, min(want, 16 // group)) if group <= 16 else 0


_ = triton  # imported for the decorator's module

"""The homomorphic attention kernel shared by prefill and decode (paper layout).

One program owns ROWS query rows (GR q heads x BLOCK_P positions, padded to the 16 rows a tensor
core product needs) of one kv head and a range of closed pages (split-K for decode). Per closed
page of PART tokens:

  scores = sum_g s_q s_k (q'.k)_g + s_k sum_k (128 s_q + m_q) + m_k (s_q sum_q + Z m_q)    (Eq. 1)

with q' = q_code - 128 (int8; tl.dot has no uint8) and (q'.k) an int8 x int8 -> int32 tensor-core
product per D-partition g. P = exp(scores - running max) is quantized to 8 bits per (row, page)
in registers and multiplied with V's codes the same way. Sinks and the 16-bit open page join the
same online softmax through 16-bit products. Q and P are quantized exactly as the reference does
(asymmetric, float32 min and scale, nearest).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _quant8_rows(x, mask, MASKED: tl.constexpr):
    """8-bit asymmetric codes of each row of x (float32, [R, W]); metadata in float32 like the
    reference's _int8 on float32 input. Returns (codes - 128 as int8, min, scale, code sum)."""
    if MASKED:
        lo = tl.min(tl.where(mask, x, float("inf")), axis=1)
        hi = tl.max(tl.where(mask, x, -float("inf")), axis=1)
        lo = tl.where(lo == float("inf"), 0.0, lo)
        hi = tl.where(hi == -float("inf"), 0.0, hi)
    else:
        lo = tl.min(x, axis=1)
        hi = tl.max(x, axis=1)
    s = (hi - lo) / 255.0
    for _ in tl.static_range(2):
        top = lo + tl.maximum(s * 255.0, 0.0)
        s = tl.where(top < hi, (s.to(tl.int32, bitcast=True) + 1).to(tl.float32, bitcast=True), s)
    inv = tl.where(s > 0, tl.div_rn(tl.full(s.shape, 1.0, tl.float32), s), 0.0)
    t = (x - lo[:, None]) * inv[:, None]
    c = tl.minimum(tl.floor(t + 0.5), 255.0).to(tl.int32)
    if MASKED:
        c = tl.where(mask, c, 0)
    return (c - 128).to(tl.int8), lo, s, tl.sum(c, axis=1).to(tl.float32)


@triton.jit
def _unpack(b, R: tl.constexpr, C: tl.constexpr, BITS: tl.constexpr):
    """uint8 [R, C] packed codes -> int8 [R, C * 8 // BITS], little-endian element order."""
    PER: tl.constexpr = 8 // BITS
    sh = (tl.arange(0, PER) * BITS).to(tl.uint8)
    x = (b[:, :, None] >> sh[None, None, :]) & ((1 << BITS) - 1)
    return tl.reshape(x, (R, C * PER)).to(tl.int8)


@triton.jit
def _int_dot(a, b, DOT16: tl.constexpr):
    """Exact integer product of int8 codes: int8 tensor cores, or fp16 ones (codes and every
    partial sum are integers below 2^24, exact in fp16 x fp16 -> fp32)."""
    if DOT16:
        return tl.dot(a.to(tl.float16), b.to(tl.float16), out_dtype=tl.float32)
    else:
        return tl.dot(a, b, out_dtype=tl.int32).to(tl.float32)


@triton.jit
def _pick(g: tl.constexpr, a0, a1, a2, a3):
    if g == 0:
        return a0
    elif g == 1:
        return a1
    elif g == 2:
        return a2
    else:
        return a3


@triton.jit
def _q_group(q_ptr, qoff, row_ok, g: tl.constexpr, GW: tl.constexpr, qk_scale):
    """Codes of Q's D-group g and its Eq. (1) factors, each times qk_scale (scores come out
    scaled for the exp2 softmax)."""
    cols = g * GW + tl.arange(0, GW)
    x = tl.load(q_ptr + qoff[:, None] + cols[None, :], mask=row_ok[:, None], other=0.0)
    c, m, s, sm = _quant8_rows(x.to(tl.float32), row_ok[:, None] & (cols[None, :] >= 0), True)
    return c, s * qk_scale, (128.0 * s + m) * qk_scale, (s * sm + GW * m) * qk_scale


@triton.jit
def _attend16(
    q_ptr, qoff, row_ok, q_abs,
    k_ptr, v_ptr, base, st, n_tok, tok0,
    m_i, l_i, acc, qk_scale,
    D: tl.constexpr, BLOCK16: tl.constexpr, CAUSAL: tl.constexpr, INTERP: tl.constexpr,
):  # fmt: skip
    """Online softmax over n_tok 16-bit tokens (sinks or the open page) at absolute tok0.."""
    dch = tl.arange(0, D)
    q = tl.load(q_ptr + qoff[:, None] + dch[None, :], mask=row_ok[:, None], other=0.0)
    for t0 in range(0, n_tok, BLOCK16):
        tok = t0 + tl.arange(0, BLOCK16)
        tmask = tok < n_tok
        offs = base + tok[:, None] * st + dch[None, :]
        k = tl.load(k_ptr + offs, mask=tmask[:, None], other=0.0)
        v = tl.load(v_ptr + offs, mask=tmask[:, None], other=0.0)
        if INTERP:  # the interpreter's 16-bit dot is unreliable (bf16); float32 is exact here
            s = tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32)), input_precision="ieee")
        else:
            s = tl.dot(q.to(k.dtype), tl.trans(k))
        s = s * qk_scale
        ok = tmask[None, :] & row_ok[:, None]  # rows outside the program never see these tokens
        if CAUSAL:
            ok = ok & ((tok0 + tok)[None, :] <= q_abs[:, None])
        s = tl.where(ok, s, -float("inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == -float("inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if INTERP:
            pv = tl.dot(p, v.to(tl.float32), input_precision="ieee")
        else:
            pv = tl.dot(p, v.to(tl.float32), input_precision="tf32")
        acc = acc * alpha[:, None] + pv
        m_i = m_new
    return m_i, l_i, acc


@triton.jit
def _seq_start(
    q_ptr, qoff, row_ok, pos, b, kvh, seq_ptr, M, NSINK, split,
    ks_ptr, vs_ptr, sks_b, sks_h, sks_t, qk_scale,
    D: tl.constexpr, PART: tl.constexpr, ROWS: tl.constexpr, BLOCK16: tl.constexpr,
    CAUSAL: tl.constexpr, INTERP: tl.constexpr,
):  # fmt: skip
    """A program's sequence geometry and its softmax state after the 16-bit sinks (split 0)."""
    T = tl.load(seq_ptr + b)
    q_abs = T - M + pos
    n_sink = tl.minimum(T, NSINK)
    n_pages = (T - n_sink) // PART
    m_i = tl.full([ROWS], -float("inf"), tl.float32)
    l_i = tl.zeros([ROWS], tl.float32)
    acc = tl.zeros([ROWS, D], tl.float32)
    if split == 0:
        m_i, l_i, acc = _attend16(
            q_ptr, qoff, row_ok, q_abs, ks_ptr, vs_ptr,
            b.to(tl.int64) * sks_b + kvh * sks_h, sks_t, n_sink, 0,
            m_i, l_i, acc, qk_scale, D, BLOCK16, CAUSAL, INTERP,
        )  # fmt: skip
    return T, q_abs, n_sink, n_pages, m_i, l_i, acc


@triton.jit
def _seq_finish(
    q_ptr, qoff, row_ok, q_abs, b, kvh, head, pos, split, part, NSPLIT, T, n_sink, n_pages,
    ko_ptr, vo_ptr, sko_b, sko_h, sko_t, o_ptr, so_b, so_h, so_m, so_s,
    ml_ptr, sml_b, sml_h, sml_s, m_i, l_i, acc, out_mask, first_copy, qk_scale,
    D: tl.constexpr, PART: tl.constexpr, BLOCK16: tl.constexpr, CAUSAL: tl.constexpr,
    SPLIT: tl.constexpr, INTERP: tl.constexpr,
):  # fmt: skip
    """The 16-bit open page (last split, rows row_ok), then the rows' output: partial `part`
    (acc, m, l) or the normalized output. out_mask [ROWS, D] picks the elements a row writes; first_copy
    [ROWS] the rows that write m and l."""
    if split == NSPLIT - 1:
        n_open = T - n_sink - n_pages * PART
        m_i, l_i, acc = _attend16(
            q_ptr, qoff, row_ok, q_abs, ko_ptr, vo_ptr,
            b.to(tl.int64) * sko_b + kvh * sko_h, sko_t, n_open, n_sink + n_pages * PART,
            m_i, l_i, acc, qk_scale, D, BLOCK16, CAUSAL, INTERP,
        )  # fmt: skip
    dch = tl.arange(0, D)
    ooff = b.to(tl.int64) * so_b + head.to(tl.int64) * so_h + pos.to(tl.int64) * so_m
    if SPLIT:
        ooff += part * so_s
        tl.store(o_ptr + ooff[:, None] + dch[None, :], acc, mask=out_mask)
        mloff = b.to(tl.int64) * sml_b + head.to(tl.int64) * sml_h + part * sml_s
        tl.store(ml_ptr + mloff, m_i, mask=first_copy)
        tl.store(ml_ptr + mloff + 1, l_i, mask=first_copy)
    else:
        out = acc / l_i[:, None]
        tl.store(
            o_ptr + ooff[:, None] + dch[None, :], out.to(o_ptr.dtype.element_ty), mask=out_mask
        )


@triton.jit
def _load_page(
    j, ok, b, kvh, bt_ptr, sbt_b, kc_ptr, skc_b, skc_p, skc_h, skc_t,
    km_ptr, kss_ptr, ksum_ptr, skm_b, skm_p, skm_h, skm_t,
    vc_ptr, svc_b, svc_p, svc_h, svc_d, vm_ptr, vss_ptr, vsum_ptr, svm_b, svm_p, svm_h, svm_d,
    D: tl.constexpr, PART: tl.constexpr, BITS: tl.constexpr, GW: tl.constexpr,
):  # fmt: skip
    """Raw codes and metadata of logical page j (zeros where not ok)."""
    PER: tl.constexpr = 8 // BITS
    GD: tl.constexpr = D // GW
    tok = tl.arange(0, PART)
    dch = tl.arange(0, D)
    pg = tl.load(bt_ptr + b * sbt_b + j, mask=ok, other=0).to(tl.int64)
    kptr = kc_ptr + b.to(tl.int64) * skc_b + pg * skc_p + kvh * skc_h + tok[:, None] * skc_t
    kptr += tl.arange(0, GW // PER)[None, :]
    kmoff = b.to(tl.int64) * skm_b + pg * skm_p + kvh * skm_h + tok * skm_t
    kb0 = tl.load(kptr, mask=ok, other=0)
    mk0 = tl.load(km_ptr + kmoff, mask=ok, other=0.0)
    sk0 = tl.load(kss_ptr + kmoff, mask=ok, other=0.0)
    uk0 = tl.load(ksum_ptr + kmoff, mask=ok, other=0)
    kb1, mk1, sk1, uk1 = kb0, mk0, sk0, uk0
    kb2, mk2, sk2, uk2 = kb0, mk0, sk0, uk0
    kb3, mk3, sk3, uk3 = kb0, mk0, sk0, uk0
    if GD > 1:
        kb1 = tl.load(kptr + (PART // PER), mask=ok, other=0)
        mk1 = tl.load(km_ptr + kmoff + 1, mask=ok, other=0.0)
        sk1 = tl.load(kss_ptr + kmoff + 1, mask=ok, other=0.0)
        uk1 = tl.load(ksum_ptr + kmoff + 1, mask=ok, other=0)
    if GD > 2:
        kb2 = tl.load(kptr + 2 * (PART // PER), mask=ok, other=0)
        mk2 = tl.load(km_ptr + kmoff + 2, mask=ok, other=0.0)
        sk2 = tl.load(kss_ptr + kmoff + 2, mask=ok, other=0.0)
        uk2 = tl.load(ksum_ptr + kmoff + 2, mask=ok, other=0)
        kb3 = tl.load(kptr + 3 * (PART // PER), mask=ok, other=0)
        mk3 = tl.load(km_ptr + kmoff + 3, mask=ok, other=0.0)
        sk3 = tl.load(kss_ptr + kmoff + 3, mask=ok, other=0.0)
        uk3 = tl.load(ksum_ptr + kmoff + 3, mask=ok, other=0)
    vptr = vc_ptr + b.to(tl.int64) * svc_b + pg * svc_p + kvh * svc_h + dch[:, None] * svc_d
    vb = tl.load(vptr + tl.arange(0, PART // PER)[None, :], mask=ok, other=0)
    vmoff = b.to(tl.int64) * svm_b + pg * svm_p + kvh * svm_h + dch * svm_d
    mv = tl.load(vm_ptr + vmoff, mask=ok, other=0.0)
    sv = tl.load(vss_ptr + vmoff, mask=ok, other=0.0)
    sumv = tl.load(vsum_ptr + vmoff, mask=ok, other=0)
    return (
        kb0,
        kb1,
        kb2,
        kb3,
        mk0,
        mk1,
        mk2,
        mk3,
        sk0,
        sk1,
        sk2,
        sk3,
        uk0,
        uk1,
        uk2,
        uk3,
        vb,
        mv,
        sv,
        sumv,
    )


@triton.jit(do_not_specialize=["NSPLIT", "sml_b", "sml_h"])
def hack_attn_kernel(
    q_ptr, sq_b, sq_h, sq_m,
    o_ptr, so_b, so_h, so_m, so_s,
    ml_ptr, sml_b, sml_h, sml_s,
    seq_ptr, bt_ptr, sbt_b,
    kc_ptr, skc_b, skc_p, skc_h, skc_t,
    km_ptr, kss_ptr, ksum_ptr, skm_b, skm_p, skm_h, skm_t,
    vc_ptr, svc_b, svc_p, svc_h, svc_d,
    vm_ptr, vss_ptr, vsum_ptr, svm_b, svm_p, svm_h, svm_d,
    ks_ptr, vs_ptr, sks_b, sks_h, sks_t,
    ko_ptr, vo_ptr, sko_b, sko_h, sko_t,
    M, NSINK, NSPLIT, NHG, G, qk_scale,
    D: tl.constexpr, PART: tl.constexpr, BITS: tl.constexpr, GW: tl.constexpr,
    GR: tl.constexpr, BLOCK_P: tl.constexpr, ROWS: tl.constexpr,
    CAUSAL: tl.constexpr, SPLIT: tl.constexpr, INTERP: tl.constexpr, BLOCK16: tl.constexpr,
    PREFETCH: tl.constexpr, DOT16: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    b = tl.program_id(1) // NHG
    hg = tl.program_id(1) % NHG
    split = tl.program_id(2)
    PER: tl.constexpr = 8 // BITS
    GD: tl.constexpr = D // GW
    kvh = (hg * GR) // G

    r = tl.arange(0, ROWS)
    hl = r // BLOCK_P
    pos = pid_m * BLOCK_P + r % BLOCK_P
    head = hg * GR + hl
    row_ok = (hl < GR) & (pos < M)
    qoff = b.to(tl.int64) * sq_b + head.to(tl.int64) * sq_h + pos.to(tl.int64) * sq_m
    T, q_abs, n_sink, n_pages, m_i, l_i, acc = _seq_start(
        q_ptr, qoff, row_ok, pos, b, kvh, seq_ptr, M, NSINK, split,
        ks_ptr, vs_ptr, sks_b, sks_h, sks_t, qk_scale, D, PART, ROWS, BLOCK16, CAUSAL, INTERP,
    )  # fmt: skip

    # Q codes and the per-(row, D-group) factors of Eq. (1), held for the whole page loop.
    qc0, sq0, bq0, aq0 = _q_group(q_ptr, qoff, row_ok, 0, GW, qk_scale)
    qc1, sq1, bq1, aq1 = qc0, sq0, bq0, aq0
    qc2, sq2, bq2, aq2 = qc0, sq0, bq0, aq0
    qc3, sq3, bq3, aq3 = qc0, sq0, bq0, aq0
    if GD > 1:
        qc1, sq1, bq1, aq1 = _q_group(q_ptr, qoff, row_ok, 1, GW, qk_scale)
    if GD > 2:
        qc2, sq2, bq2, aq2 = _q_group(q_ptr, qoff, row_ok, 2, GW, qk_scale)
        qc3, sq3, bq3, aq3 = _q_group(q_ptr, qoff, row_ok, 3, GW, qk_scale)

    pps = tl.cdiv(n_pages, NSPLIT)
    p_lo = split * pps
    p_hi = tl.minimum(p_lo + pps, n_pages)
    if CAUSAL:
        last_q = T - M + tl.minimum(pid_m * BLOCK_P + BLOCK_P, M) - 1
        p_hi = tl.minimum(p_hi, tl.cdiv(last_q + 1 - n_sink, PART))
    tok = tl.arange(0, PART)
    dch = tl.arange(0, D)
    # PREFETCH: software pipelining by hand, page j + 1's codes and metadata are in flight while
    # page j is computed (Triton's pipeliner skips loads that feed an unpack rather than a dot).
    # fmt: off
    if PREFETCH:
        kb0, kb1, kb2, kb3, mk0, mk1, mk2, mk3, sk0, sk1, sk2, sk3, uk0, uk1, uk2, uk3, vb, mv, sv, sumv = _load_page(
            p_lo, p_lo < p_hi, b, kvh, bt_ptr, sbt_b, kc_ptr, skc_b, skc_p, skc_h, skc_t,
            km_ptr, kss_ptr, ksum_ptr, skm_b, skm_p, skm_h, skm_t,
            vc_ptr, svc_b, svc_p, svc_h, svc_d, vm_ptr, vss_ptr, vsum_ptr, svm_b, svm_p, svm_h, svm_d,
            D, PART, BITS, GW)
    for j in range(p_lo, p_hi):
        if PREFETCH:
            c_kb0, c_kb1, c_kb2, c_kb3 = kb0, kb1, kb2, kb3
            c_mk0, c_mk1, c_mk2, c_mk3 = mk0, mk1, mk2, mk3
            c_sk0, c_sk1, c_sk2, c_sk3 = sk0, sk1, sk2, sk3
            c_uk0, c_uk1, c_uk2, c_uk3 = uk0, uk1, uk2, uk3
            c_vb, c_mv, c_sv, c_sumv = vb, mv, sv, sumv
            kb0, kb1, kb2, kb3, mk0, mk1, mk2, mk3, sk0, sk1, sk2, sk3, uk0, uk1, uk2, uk3, vb, mv, sv, sumv = _load_page(
                j + 1, j + 1 < p_hi, b, kvh, bt_ptr, sbt_b, kc_ptr, skc_b, skc_p, skc_h, skc_t,
                km_ptr, kss_ptr, ksum_ptr, skm_b, skm_p, skm_h, skm_t,
                vc_ptr, svc_b, svc_p, svc_h, svc_d, vm_ptr, vss_ptr, vsum_ptr, svm_b, svm_p, svm_h, svm_d,
                D, PART, BITS, GW)
        else:
            c_kb0, c_kb1, c_kb2, c_kb3, c_mk0, c_mk1, c_mk2, c_mk3, c_sk0, c_sk1, c_sk2, c_sk3, c_uk0, c_uk1, c_uk2, c_uk3, c_vb, c_mv, c_sv, c_sumv = _load_page(
                j, j < p_hi, b, kvh, bt_ptr, sbt_b, kc_ptr, skc_b, skc_p, skc_h, skc_t,
                km_ptr, kss_ptr, ksum_ptr, skm_b, skm_p, skm_h, skm_t,
                vc_ptr, svc_b, svc_p, svc_h, svc_d, vm_ptr, vss_ptr, vsum_ptr, svm_b, svm_p, svm_h, svm_d,
                D, PART, BITS, GW)
        # fmt: on
        s = tl.zeros([ROWS, PART], tl.float32)
        for g in tl.static_range(GD):
            kc = _unpack(_pick(g, c_kb0, c_kb1, c_kb2, c_kb3), PART, GW // PER, BITS)  # [tok, GW]
            dot = _int_dot(_pick(g, qc0, qc1, qc2, qc3), tl.trans(kc), DOT16)
            mk = _pick(g, c_mk0, c_mk1, c_mk2, c_mk3).to(tl.float32)
            sk = _pick(g, c_sk0, c_sk1, c_sk2, c_sk3).to(tl.float32)
            sumk = _pick(g, c_uk0, c_uk1, c_uk2, c_uk3).to(tl.float32)
            sq = _pick(g, sq0, sq1, sq2, sq3)
            s += (sq[:, None] * sk[None, :]) * dot
            s += _pick(g, bq0, bq1, bq2, bq3)[:, None] * (sk * sumk)[None, :]
            s += _pick(g, aq0, aq1, aq2, aq3)[:, None] * mk[None, :]
        if CAUSAL:
            s = tl.where((n_sink + j * PART + tok)[None, :] <= q_abs[:, None], s, -float("inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == -float("inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        pc, mp, sp, sump = _quant8_rows(p, None, False)
        vc = _unpack(c_vb, D, PART // PER, BITS)  # [D, tokens]
        pv = _int_dot(pc, tl.trans(vc), DOT16)
        sv_f = c_sv.to(tl.float32)
        acc = acc * alpha[:, None] + (sp[:, None] * sv_f[None, :]) * pv
        acc += (128.0 * sp + mp)[:, None] * (sv_f * c_sumv.to(tl.float32))[None, :]
        acc += (sp * sump + PART * mp)[:, None] * c_mv.to(tl.float32)[None, :]
        m_i = m_new

    _seq_finish(
        q_ptr, qoff, row_ok, q_abs, b, kvh, head, pos, split, split, NSPLIT, T, n_sink, n_pages,
        ko_ptr, vo_ptr, sko_b, sko_h, sko_t, o_ptr, so_b, so_h, so_m, so_s,
        ml_ptr, sml_b, sml_h, sml_s, m_i, l_i, acc, row_ok[:, None] & (dch >= 0)[None, :], row_ok,
        qk_scale, D, PART, BLOCK16, CAUSAL, SPLIT, INTERP,
    )  # fmt: skip


@triton.jit
def _merge_partials(
    o_ptr, mlrow, row, NSPLIT, dch, run_m, lsum, acc, D: tl.constexpr, BLOCK_S: tl.constexpr
):  # fmt: skip
    """Online merge of a row's NSPLIT partials (acc rows of o_ptr, (m, l) pairs at mlrow) into
    (run_m, lsum, acc) for channels dch, in blocks of BLOCK_S partials: a running max, earlier
    blocks rescaled, one pass."""
    sp = tl.arange(0, BLOCK_S)
    for s0 in range(0, NSPLIT, BLOCK_S):
        smask = s0 + sp < NSPLIT
        m = tl.load(mlrow + (s0 + sp) * 2, mask=smask, other=-float("inf"))
        lb = tl.load(mlrow + (s0 + sp) * 2 + 1, mask=smask, other=0.0)
        part = tl.load(
            o_ptr + (row * NSPLIT + s0 + sp[:, None]) * D + dch[None, :],
            mask=smask[:, None],
            other=0.0,
        )
        new_m = tl.maximum(run_m, tl.max(m, axis=0))
        alpha = tl.where(run_m == -float("inf"), 0.0, tl.exp2(run_m - new_m))
        w = tl.where(m == -float("inf"), 0.0, tl.exp2(m - new_m))
        acc = acc * alpha + tl.sum(part * w[:, None], axis=0)
        lsum = lsum * alpha + tl.sum(lb * w, axis=0)
        run_m = new_m
    return run_m, lsum, acc


@triton.jit(do_not_specialize=["NSPLIT"])
def combine_splits_kernel(
    o_ptr, ml_ptr, out_ptr, NSPLIT, D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr
):  # fmt: skip
    """out[row] = sum_s 2^(m_s - m) acc_s / sum_s 2^(m_s - m) l_s over a row's NSPLIT splits, for
    the channels of block program_id(1): blocks of BLOCK_S partials merged online (a running max,
    earlier blocks rescaled), one pass. One compiled variant serves every split count (no
    specialization on NSPLIT, a fixed block): nothing compiles when a longer context first needs
    more splits."""
    row = tl.program_id(0).to(tl.int64)
    dch = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    run_m, lsum, acc = _merge_partials(
        o_ptr, ml_ptr + row * NSPLIT * 2, row, NSPLIT, dch,
        tl.full([], -float("inf"), tl.float32), tl.zeros([], tl.float32),
        tl.zeros([BLOCK_D], tl.float32), D, BLOCK_S,
    )  # fmt: skip
    tl.store(out_ptr + row * D + dch, (acc / lsum).to(out_ptr.dtype.element_ty))

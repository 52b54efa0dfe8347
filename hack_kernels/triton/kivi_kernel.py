"""The homomorphic attention kernel of the kivi layout (prefill rows or decode split-K).

One program owns ROWS rows of one kv head: E copies (one per V channel group) of GR q heads x
BLOCK_P query positions, padded to the 16 rows a tensor core product needs, over a range of
closed pages (kivi_pages.py; split-K for decode). Per page of PART tokens, with K grouped per
channel over the page and V grouped per token along D:

  Q.K^T:  Q' = Q * s_k (K's scales folded into Q), Q' ~= s_q * c_q with c_q in [-127, 127]
          scores = s_q (c_q . k_codes) + Q . m_k
  P.V:    row copy e folds V's scales of channel group e: P' = P * s_v[:, e] ~= s_p * c_p,
          c_p in [0, 255];  out = s_p ((c_p - 128) . v_codes + 128 colsum(v_codes)) + P . m_v[:, e]
          and copy e keeps only the channels of group e when it is written out.

Spending rows on the E copies fills tensor-core rows that decode would pad anyway (4 GQA heads x
2 groups = 8 of 16 at d128, partition 64) and makes P.V one product per page instead of E.
The products run on int8 tensor cores (int32 accumulate); colsum is stored with the page. No
code is ever dequantized. Code tiles are read from planar packing: byte i of a row holds elements
i, i + n/4, i + n/2, i + 3n/4 (2-bit), so each byte is loaded once and one 32-bit shift-and-mask
gives four consecutive elements of a plane; a plane is a tensor-core operand as it is (K, one
product per D-plane) or planes are joined in registers (V, whose 16-token planes are below the
32 an int8 product needs). Decode runs two pages per iteration in separate row slots.
Sinks and the 16-bit open page join the same online softmax (attention_kernel._attend16).
"""

from __future__ import annotations

import triton
import triton.language as tl

from .attention_kernel import _pick, _seq_finish, _seq_start


@triton.jit
def _plane(packed, J: tl.constexpr, BITS: tl.constexpr, ASM: tl.constexpr):
    """int8 codes of plane J of planar-packed bytes: the elements J * NB .. J * NB + NB - 1."""
    if ASM:  # four codes per 32-bit shift-and-mask (the interpreter cannot run PTX)
        if BITS == 4:
            if J == 0:
                x = tl.inline_asm_elementwise(
                    "and.b32 $0, $1, 0x0F0F0F0F;", "=r,r", [packed], tl.int8, True, 4
                )
            else:
                x = tl.inline_asm_elementwise(
                    "shr.b32 $0, $1, 4; and.b32 $0, $0, 0x0F0F0F0F;", "=r,r", [packed], tl.int8,
                    True, 4,
                )  # fmt: skip
        elif J == 0:
            x = tl.inline_asm_elementwise(
                "and.b32 $0, $1, 0x03030303;", "=r,r", [packed], tl.int8, True, 4
            )
        elif J == 1:
            x = tl.inline_asm_elementwise(
                "shr.b32 $0, $1, 2; and.b32 $0, $0, 0x03030303;", "=r,r", [packed], tl.int8,
                True, 4,
            )  # fmt: skip
        elif J == 2:
            x = tl.inline_asm_elementwise(
                "shr.b32 $0, $1, 4; and.b32 $0, $0, 0x03030303;", "=r,r", [packed], tl.int8,
                True, 4,
            )  # fmt: skip
        else:
            x = tl.inline_asm_elementwise(
                "shr.b32 $0, $1, 6; and.b32 $0, $0, 0x03030303;", "=r,r", [packed], tl.int8,
                True, 4,
            )  # fmt: skip
        return x
    else:
        return ((packed >> (J * BITS)) & ((1 << BITS) - 1)).to(tl.int8)


@triton.jit
def _plane_tile(row_ptrs, R: tl.constexpr, N: tl.constexpr, BITS: tl.constexpr, ASM: tl.constexpr):
    """int8 codes [R, N] of R planar-packed rows, each byte loaded once; columns come out in
    _column_order (planes interleaved by joins, which stay in registers)."""
    PER: tl.constexpr = 8 // BITS
    NB: tl.constexpr = N // PER
    packed = tl.load(row_ptrs[:, None] + tl.arange(0, NB)[None, :])  # [R, NB]
    if PER == 2:
        x = tl.join(_plane(packed, 0, BITS, ASM), _plane(packed, 1, BITS, ASM))
    else:
        a = tl.join(_plane(packed, 0, BITS, ASM), _plane(packed, 2, BITS, ASM))
        b = tl.join(_plane(packed, 1, BITS, ASM), _plane(packed, 3, BITS, ASM))
        x = tl.join(tl.reshape(a, (R, 2 * NB)), tl.reshape(b, (R, 2 * NB)))
    return tl.reshape(x, (R, N))


@triton.jit
def _column_order(N: tl.constexpr, BITS: tl.constexpr):
    """Element held by each column of a _plane_tile: column 4i + 2k + l holds element
    i + NB (2k + l) (2 bits), column 2i + l element i + NB l (4 bits)."""
    return _element_of(tl.arange(0, N), N, BITS)


@triton.jit
def _element_of(col, N: tl.constexpr, BITS: tl.constexpr):
    """_column_order for given column indices."""
    PER: tl.constexpr = 8 // BITS
    NB: tl.constexpr = N // PER
    if PER == 2:
        return col // 2 + NB * (col % 2)
    else:
        return col // 4 + NB * (2 * ((col // 2) % 2) + col % 2)


@triton.jit
def _round_half_up(x, inv, ASM: tl.constexpr):
    """floor(x * inv + 1/2) as int32, each operation rounded on its own as in the reference (a
    fused multiply-add could flip a code at a tie)."""
    if ASM:
        return tl.inline_asm_elementwise(
            "{ .reg .f32 t; mul.rn.f32 t, $1, $2; add.rn.f32 t, t, 0f3F000000;"
            " cvt.rmi.s32.f32 $0, t; }",
            "=r,r,r", [x, inv], tl.int32, True, 1,
        )  # fmt: skip
    else:
        return tl.floor(x * inv + 0.5).to(tl.int32)


@triton.jit
def _scale_and_inverse(amax, TOP: tl.constexpr):
    """scale = amax / TOP and 1 / scale (0 where scale is 0), IEEE-rounded as torch does."""
    scale = tl.div_rn(amax, tl.full(amax.shape, TOP, tl.float32))
    safe = tl.where(scale > 0, scale, 1.0)
    inv = tl.where(scale > 0, tl.div_rn(tl.full(scale.shape, 1.0, tl.float32), safe), 0.0)
    return scale, inv


@triton.jit
def _qk_planes(
    q0, q1, q2, q3, k_rows, sk_ptr, mk_ptr, kstep, s_r,
    ROWS: tl.constexpr, NB: tl.constexpr, BITS: tl.constexpr, ASM: tl.constexpr,
):  # fmt: skip
    """Unscaled scores [ROWS, len(k_rows)] = s_q (c_q . K^T) + Q . m_k, one int8 product per
    D-plane: plane j of the packed K rows holds channels j*NB .. j*NB + NB - 1 in order, a
    tensor-core operand as it comes out of the shift, with no join. q_j: Q's channels of
    plane j; row r reads the K scales at sk_ptr (slot 0) or sk_ptr + kstep (other slots)."""
    PER: tl.constexpr = 8 // BITS
    ch = tl.arange(0, NB)
    packed = tl.load(k_rows[:, None] + ch[None, :])  # [R, NB]
    amax = tl.zeros([ROWS], tl.float32)
    for j in tl.static_range(PER):
        qj = _pick(j, q0, q1, q2, q3)
        skj = _rows_pick2(sk_ptr + j * NB + ch, kstep, s_r, ROWS)
        amax = tl.maximum(amax, tl.max(tl.abs(qj * skj), axis=1))
    scale, inv = _scale_and_inverse(amax, 127.0)
    qk = tl.zeros([ROWS, k_rows.shape[0]], tl.int32)
    qm = tl.zeros([ROWS], tl.float32)
    for j in tl.static_range(PER):
        qj = _pick(j, q0, q1, q2, q3)
        skj = _rows_pick2(sk_ptr + j * NB + ch, kstep, s_r, ROWS)
        mkj = _rows_pick2(mk_ptr + j * NB + ch, kstep, s_r, ROWS)
        c_q = _round_half_up(qj * skj, tl.broadcast_to(inv[:, None], qj.shape), ASM).to(tl.int8)
        qk += tl.dot(c_q, tl.trans(_plane(packed, j, BITS, ASM)), out_dtype=tl.int32)
        qm += tl.sum(qj * mkj, axis=1)
    return scale[:, None] * qk.to(tl.float32) + qm[:, None]


@triton.jit
def _rows_pick(ptrs, sel, N: tl.constexpr, ROWS: tl.constexpr):
    """float32 [ROWS, len(ptrs)]: row r gets the values at ptrs + sel[r], sel in 0..N-1. Loads
    N vectors and selects per row (N <= 2) instead of a per-element gather."""
    if N == 1:
        return tl.broadcast_to(tl.load(ptrs).to(tl.float32)[None, :], (ROWS, ptrs.shape[0]))
    elif N == 2:
        a = tl.load(ptrs).to(tl.float32)[None, :]
        b = tl.load(ptrs + 1).to(tl.float32)[None, :]
        return tl.where((sel == 0)[:, None], a, b)
    else:
        return tl.load(ptrs[None, :] + sel[:, None]).to(tl.float32)


@triton.jit
def _rows_pick2(ptrs, step, sel, ROWS: tl.constexpr):
    """float32 [ROWS, len(ptrs)]: rows with sel 0 read ptrs, the others ptrs + step."""
    a = tl.load(ptrs).to(tl.float32)[None, :]
    b = tl.load(ptrs + step).to(tl.float32)[None, :]
    return tl.where((sel == 0)[:, None], a, b)


@triton.jit
def _codes_no_zero_point(x, TOP: tl.constexpr, ASM: tl.constexpr):
    """Per row of x (float32 [R, W]): x ~= scale * code, scale = max|x| / TOP, int32 code
    rounded to nearest in [-TOP, TOP] (or [0, TOP] for x >= 0), bit-exact to
    reference.zero_point_free."""
    amax = tl.max(tl.abs(x), axis=1)
    scale, inv = _scale_and_inverse(amax, TOP)
    # |x| * inv <= TOP (1 + 2^-23), so floor(x * inv + 1/2) already lies in the reference's
    # clamp range [-TOP or 0, TOP]: no clamp needed
    code = _round_half_up(x, tl.broadcast_to(inv[:, None], x.shape), ASM)
    return code, scale


# split counts, the (m, l) strides that follow them (2 x splits) and block-table widths vary
# per batch: not specialized on, so they never compile a new variant on the hot path. The
# partials' strides (multiples of head_dim) keep their divisibility, so stores stay vectorized.
@triton.jit(do_not_specialize=["NSPLIT", "BT_COLS", "sml_b", "sml_h"])
def kivi_attn_kernel(
    q_ptr, sq_b, sq_h, sq_m,
    o_ptr, so_b, so_h, so_m, so_s,
    ml_ptr, sml_b, sml_h, sml_s,
    seq_ptr, bt_ptr, sbt_b,
    kc_ptr, skc_b, skc_p, skc_h, skc_t,
    km_ptr, kss_ptr, skm_b, skm_p, skm_h,
    vc_ptr, svc_b, svc_p, svc_h, svc_d,
    vm_ptr, vss_ptr, svm_b, svm_p, svm_h, svm_t,
    vcs_ptr, svs_b, svs_p, svs_h,
    ks_ptr, vs_ptr, sks_b, sks_h, sks_t,
    ko_ptr, vo_ptr, sko_b, sko_h, sko_t,
    M, NSINK, NSPLIT, NHG, G, BT_COLS, qk_scale,
    D: tl.constexpr, PART: tl.constexpr, BITS: tl.constexpr, E: tl.constexpr, W: tl.constexpr,
    GR: tl.constexpr, BLOCK_P: tl.constexpr, ROWS: tl.constexpr,
    CAUSAL: tl.constexpr, SPLIT: tl.constexpr, INTERP: tl.constexpr, BLOCK16: tl.constexpr,
    UNPACK: tl.constexpr, ASM: tl.constexpr, SLOTS: tl.constexpr,
):  # fmt: skip
    # UNPACK 1: K and V as plane tiles joined in registers; 2: K by D-planes, one product each
    # (no join; D / 4 >= 32 channels), V joined. ASM: planes by packed PTX (GPU only)
    PER: tl.constexpr = 8 // BITS
    NBK: tl.constexpr = D // PER
    pid_m = tl.program_id(0)
    b = tl.program_id(1) // NHG
    hg = tl.program_id(1) % NHG
    split = tl.program_id(2)
    kvh = (hg * GR) // G

    # rows: SLOTS page slots x E copies (V channel group e) x GR heads x BLOCK_P positions
    r = tl.arange(0, ROWS)
    s_r = r // (E * GR * BLOCK_P)
    e_r = (r // (GR * BLOCK_P)) % E
    hl = (r % (GR * BLOCK_P)) // BLOCK_P
    pos = pid_m * BLOCK_P + r % BLOCK_P
    head = hg * GR + hl
    row_ok = (s_r < SLOTS) & (hl < GR) & (pos < M)
    first_slot = row_ok & (s_r == 0)  # sinks and the open page join slot 0's softmax
    qoff = b.to(tl.int64) * sq_b + head.to(tl.int64) * sq_h + pos.to(tl.int64) * sq_m
    T, q_abs, n_sink, n_pages, m_i, l_i, acc = _seq_start(
        q_ptr, qoff, first_slot, pos, b, kvh, seq_ptr, M, NSINK, split,
        ks_ptr, vs_ptr, sks_b, sks_h, sks_t, qk_scale, D, PART, ROWS, BLOCK16, CAUSAL, INTERP,
    )  # fmt: skip

    tok = _column_order(PART, BITS)  # token of each score column
    dch = tl.arange(0, D)
    dk = _column_order(D, BITS)  # channel of each K-operand column
    q = tl.load(q_ptr + qoff[:, None] + dk[None, :], mask=row_ok[:, None], other=0.0)
    # Q's channels per D-plane (UNPACK 2)
    qrow = q_ptr + qoff[:, None] + tl.arange(0, NBK)[None, :]
    q0 = tl.load(qrow, mask=row_ok[:, None], other=0.0).to(tl.float32)
    q1, q2, q3 = q0, q0, q0
    if UNPACK == 2:
        q1 = tl.load(qrow + NBK, mask=row_ok[:, None], other=0.0).to(tl.float32)
        if PER == 4:
            q2 = tl.load(qrow + 2 * NBK, mask=row_ok[:, None], other=0.0).to(tl.float32)
            q3 = tl.load(qrow + 3 * NBK, mask=row_ok[:, None], other=0.0).to(tl.float32)

    pps = tl.cdiv(n_pages, NSPLIT)
    p_lo = split * pps
    p_hi = tl.minimum(p_lo + pps, n_pages)
    if CAUSAL:
        last_q = T - M + tl.minimum(pid_m * BLOCK_P + BLOCK_P, M) - 1
        p_hi = tl.minimum(p_hi, tl.cdiv(last_q + 1 - n_sink, PART))
    bk = b.to(tl.int64)
    if SLOTS == 1:
        # split k scores pages k, k + NSPLIT, ...: the first page's id is read before the
        # sequence length arrives (one dependent load fewer on the short path; measured no
        # faster on the H100, attention_notes.md version 22)
        j_hi = n_pages
        if CAUSAL:
            j_hi = tl.minimum(j_hi, p_hi)
        pg_next = tl.load(bt_ptr + b * sbt_b + split, mask=split < BT_COLS, other=0)
        for j in range(split, j_hi, NSPLIT):
            pg = pg_next.to(tl.int64)
            nxt = j + NSPLIT
            pg_next = tl.load(bt_ptr + b * sbt_b + nxt, mask=nxt < j_hi, other=0)

            # scores = s_q (c_q . k_codes) + Q . m_k, Q' = Q * s_k rounded per row
            k_rows = kc_ptr + bk * skc_b + pg * skc_p + kvh * skc_h + tok * skc_t
            if UNPACK == 2:
                kbase = bk * skm_b + pg * skm_p + kvh * skm_h
                s = _qk_planes(
                    q0, q1, q2, q3, k_rows, kss_ptr + kbase, km_ptr + kbase, 0, s_r,
                    ROWS, NBK, BITS, ASM,
                )  # fmt: skip
            else:
                k_codes = _plane_tile(k_rows, PART, D, BITS, ASM)  # [PART, D]
                kmeta = bk * skm_b + pg * skm_p + kvh * skm_h + dk
                s_k = tl.load(kss_ptr + kmeta).to(tl.float32)
                m_k = tl.load(km_ptr + kmeta).to(tl.float32)
                qf = q.to(tl.float32)
                c_q, s_q = _codes_no_zero_point(qf * s_k[None, :], 127.0, ASM)
                qk = tl.dot(c_q.to(tl.int8), tl.trans(k_codes), out_dtype=tl.int32)
                s = s_q[:, None] * qk.to(tl.float32) + tl.sum(qf * m_k[None, :], axis=1)[:, None]
            s = s * qk_scale
            if CAUSAL:
                s = tl.where((n_sink + j * PART + tok)[None, :] <= q_abs[:, None], s, -float("inf"))

            # online softmax
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            m_safe = tl.where(m_new == -float("inf"), 0.0, m_new)
            alpha = tl.exp2(m_i - m_safe)
            p = tl.exp2(s - m_safe[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)

            # out = s_p ((c_p - 128) . v_codes + 128 colsum) + P . m_v[:, e], row copy e
            v_rows = vc_ptr + bk * svc_b + pg * svc_p + kvh * svc_h + dch * svc_d
            v_codes = _plane_tile(v_rows, D, PART, BITS, ASM)  # [D, PART]
            colsum = tl.load(vcs_ptr + bk * svs_b + pg * svs_p + kvh * svs_h + dch).to(tl.float32)
            vmeta = bk * svm_b + pg * svm_p + kvh * svm_h + tok * svm_t
            s_v = _rows_pick(vss_ptr + vmeta, e_r, E, ROWS)  # [ROWS, PART]: group e_r
            m_v = _rows_pick(vm_ptr + vmeta, e_r, E, ROWS)
            c_p, s_p = _codes_no_zero_point(p * s_v, 255.0, ASM)
            pv = tl.dot((c_p - 128).to(tl.int8), tl.trans(v_codes), out_dtype=tl.int32)
            acc = acc * alpha[:, None] + s_p[:, None] * (
                pv.to(tl.float32) + 128.0 * colsum[None, :]
            )
            acc += tl.sum(p * m_v, axis=1)[:, None]
            m_i = m_new

    else:
        # SLOTS pages per iteration: row slot s scores page j0 + s. The K tiles of the pages are
        # stacked (stack row rho: page slot rho % SLOTS, token rho // SLOTS), Q' is folded per
        # row with its own page's scales, and each slot keeps its own softmax; a row's P is zero
        # on the other slots' columns, so one P.V product over the stack serves all slots.
        rho = tl.arange(0, SLOTS * PART)
        sig = rho % SLOTS
        tk = _element_of(rho // SLOTS, PART, BITS)
        for j0 in range(p_lo, p_hi, SLOTS):
            pg_rho = tl.load(bt_ptr + b * sbt_b + j0 + sig, mask=j0 + sig < p_hi, other=0)
            pg_rho = pg_rho.to(tl.int64)
            k_rows = kc_ptr + bk * skc_b + pg_rho * skc_p + kvh * skc_h + tk * skc_t
            # each row's page: slot 0 reads page pg0, slot 1 page pg1 (pg1 - pg0 apart)
            pg0 = tl.load(bt_ptr + b * sbt_b + j0).to(tl.int64)
            pg1 = tl.load(bt_ptr + b * sbt_b + j0 + 1, mask=j0 + 1 < p_hi, other=0).to(tl.int64)
            kbase = bk * skm_b + pg0 * skm_p + kvh * skm_h
            if UNPACK == 2:
                s = _qk_planes(
                    q0, q1, q2, q3, k_rows, kss_ptr + kbase, km_ptr + kbase,
                    (pg1 - pg0) * skm_p, s_r, ROWS, NBK, BITS, ASM,
                )  # fmt: skip
            else:
                k_codes = _plane_tile(k_rows, SLOTS * PART, D, BITS, ASM)
                s_k = _rows_pick2(kss_ptr + kbase + dk, (pg1 - pg0) * skm_p, s_r, ROWS)
                m_k = _rows_pick2(km_ptr + kbase + dk, (pg1 - pg0) * skm_p, s_r, ROWS)
                qf = q.to(tl.float32)
                c_q, s_q = _codes_no_zero_point(qf * s_k, 127.0, ASM)
                qk = tl.dot(c_q.to(tl.int8), tl.trans(k_codes), out_dtype=tl.int32)
                s = s_q[:, None] * qk.to(tl.float32) + tl.sum(qf * m_k, axis=1)[:, None]
            own = (sig[None, :] == s_r[:, None]) & ((j0 + s_r) < p_hi)[:, None]
            s = tl.where(own, s * qk_scale, -float("inf"))

            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            m_safe = tl.where(m_new == -float("inf"), 0.0, m_new)
            alpha = tl.exp2(m_i - m_safe)
            p = tl.exp2(s - m_safe[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)

            # V tiles of the slots, joined so that column 2t + s is token t of slot s (SLOTS 2)
            vbase = vc_ptr + bk * svc_b + kvh * svc_h + dch * svc_d
            v0 = _plane_tile(vbase + pg0 * svc_p, D, PART, BITS, ASM)
            v1 = _plane_tile(vbase + pg1 * svc_p, D, PART, BITS, ASM)
            v_codes = tl.reshape(tl.join(v0, v1), (D, SLOTS * PART))
            # the product covers both tiles whatever the slot, so both column sums enter
            csbase = vcs_ptr + bk * svs_b + kvh * svs_h + dch
            colsum = tl.load(csbase + pg0 * svs_p).to(tl.float32)
            colsum += tl.load(csbase + pg1 * svs_p).to(tl.float32)
            vmeta = bk * svm_b + kvh * svm_h + pg_rho * svm_p + tk * svm_t
            s_v = _rows_pick(vss_ptr + vmeta, e_r, E, ROWS)  # [ROWS, SLOTS * PART]
            m_v = _rows_pick(vm_ptr + vmeta, e_r, E, ROWS)
            c_p, s_p = _codes_no_zero_point(p * s_v, 255.0, ASM)
            pv = tl.dot((c_p - 128).to(tl.int8), tl.trans(v_codes), out_dtype=tl.int32)
            acc = acc * alpha[:, None]
            acc += s_p[:, None] * (pv.to(tl.float32) + 128.0 * colsum[None, :])
            acc += tl.sum(p * m_v, axis=1)[:, None]
            m_i = m_new

    # row copy e writes the channels of group e; copy 0 writes m and l
    # (slot s of split k is partial k * SLOTS + s)
    _seq_finish(
        q_ptr, qoff, first_slot, q_abs, b, kvh, head, pos, split, split * SLOTS + s_r, NSPLIT,
        T, n_sink, n_pages,
        ko_ptr, vo_ptr, sko_b, sko_h, sko_t, o_ptr, so_b, so_h, so_m, so_s,
        ml_ptr, sml_b, sml_h, sml_s, m_i, l_i, acc,
        row_ok[:, None] & ((dch // W)[None, :] == e_r[:, None]), row_ok & (e_r == 0),
        qk_scale, D, PART, BLOCK16, CAUSAL, SPLIT, INTERP,
    )  # fmt: skip


_ = triton  # imported for the decorator's module

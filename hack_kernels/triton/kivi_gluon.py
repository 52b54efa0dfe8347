"""Decode over closed kivi pages with explicit register layouts (Gluon; NVIDIA GPUs only).

kivi_kernel.py computes scores as [16 rows, tokens] tiles: the 16 rows of a tensor-core product
hold 4 GQA heads x 2 V channel groups, and the softmax and P rounding run over all of them. Here
one warp computes the transposed products, whose n = 8 side fits the columns exactly:

  S^T [tokens, 8] = K codes [tokens, D] . Q'^T [D, 8]     (mma m16n8k32, int8 -> int32)
  O^T [D, 8]      = V^T codes [D, tokens] . P'^T [tokens, 8]

Column n is (q head h = n // E, V channel group e = n % E): a lane's two columns are one head's
groups, whose V scales and mins sit side by side (one 32-bit load per token). Score tiles are
[64, 8] per page instead of [16, 128] per two pages, and every code operand comes straight from
the packed bytes in the register layout the tensor cores read:
- a row of n codes is planar-packed (byte i holds elements i, i + n/per, ...), so plane j of
  the bytes a lane loads holds elements j * n/per + those bytes: loaded in the right layout
  (bytes 4t..4t+3 and 16+4t.. of the A fragment), the planes joined along the row are the
  operand, after one shift and mask per 32-bit word and no data movement. K rows run along D,
  V rows (channels) along the page's tokens.
Only P' changes layout (C fragment -> B operand, 512 bytes a page through shared memory), and
Q' (folded once per head, then copied to the head's columns). The math is kivi_kernel's
(bit-exact rounding of Q' and P'); the 16-bit sinks and open page are attended by the split
merge (merge_16bit.py).
Supported shape class: 2- and 4-bit codes, head_dim 64 and 128, partition 64, G * D / 64 <= 8.
"""

from __future__ import annotations

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import mma_v2


@gluon.jit
def _plane(packed, J: gl.constexpr, BITS: gl.constexpr):
    """int8 codes of plane J of packed bytes, four per 32-bit shift-and-mask."""
    if BITS == 4:
        if J == 0:
            asm: gl.constexpr = "and.b32 $0, $1, 0x0F0F0F0F;"
        else:
            asm: gl.constexpr = "shr.b32 $0, $1, 4; and.b32 $0, $0, 0x0F0F0F0F;"
    elif J == 0:
        asm: gl.constexpr = "and.b32 $0, $1, 0x03030303;"
    elif J == 1:
        asm: gl.constexpr = "shr.b32 $0, $1, 2; and.b32 $0, $0, 0x03030303;"
    elif J == 2:
        asm: gl.constexpr = "shr.b32 $0, $1, 4; and.b32 $0, $0, 0x03030303;"
    else:
        asm: gl.constexpr = "shr.b32 $0, $1, 6; and.b32 $0, $0, 0x03030303;"
    return gl.inline_asm_elementwise(asm, "=r,r", [packed], dtype=gl.int8, is_pure=True, pack=4)


@gluon.jit
def _row_operand(packed, BITS: gl.constexpr, opA: gl.constexpr):
    """int8 codes [R, NB * per] as the A operand from planar-packed bytes [R, NB]: the planes
    joined along the row, so that column j * NB + i holds plane j of byte i."""
    R: gl.constexpr = packed.shape[0]
    NB: gl.constexpr = packed.shape[1]
    if BITS == 4:
        x = gl.permute(gl.join(_plane(packed, 0, 4), _plane(packed, 1, 4)), (0, 2, 1))
        x = gl.reshape(x, (R, 2 * NB))
    else:
        a = gl.join(_plane(packed, 0, 2), _plane(packed, 1, 2))
        b = gl.join(_plane(packed, 2, 2), _plane(packed, 3, 2))
        x = gl.permute(gl.join(a, b), (0, 3, 2, 1))  # [R, plane // 2, plane % 2, byte]
        x = gl.reshape(x, (R, 4 * NB))
    return gl.convert_layout(x, opA)


@gluon.jit
def _round_half_up(x, inv):
    """floor(x * inv + 1/2) as int32, each step rounded on its own as the reference does."""
    return gl.inline_asm_elementwise(
        "{ .reg .f32 t; mul.rn.f32 t, $1, $2; add.rn.f32 t, t, 0f3F000000;"
        " cvt.rmi.s32.f32 $0, t; }",
        "=r,r,r", [x, inv], dtype=gl.int32, is_pure=True, pack=1,
    )  # fmt: skip


@gluon.jit
def _scale_and_inverse(amax, TOP: gl.constexpr):
    """scale = amax / TOP and 1 / scale (0 where scale is 0), IEEE-rounded as torch does."""
    scale = gl.div_rn(amax, gl.full(amax.shape, TOP, gl.float32, amax.type.layout))
    safe = gl.where(scale > 0, scale, 1.0)
    one = gl.full(amax.shape, 1.0, gl.float32, amax.type.layout)
    inv = gl.where(scale > 0, gl.div_rn(one, safe), 0.0)
    return scale, inv


@gluon.jit
def _per_column(x, E: gl.constexpr, layout: gl.constexpr):
    """[heads] -> [heads * E] (column h * E + e holds x[h]) in `layout`."""
    if E == 2:
        x = gl.reshape(gl.join(x, x), (2 * x.shape[0],))
    return gl.convert_layout(x, layout)


@gluon.jit
def _attend_page(
    kb, vb, s_v, m_v, s_k, m_k, qf, m_i, l_i, acc, sixty_four, qk_scale,
    D: gl.constexpr, PART: gl.constexpr, COLS: gl.constexpr, E: gl.constexpr,
    BITS: gl.constexpr, opA: gl.constexpr, opB: gl.constexpr, mma: gl.constexpr,
):  # fmt: skip
    """One closed page into the online softmax (m_i, l_i) and O^T (acc) of the 8 columns, from
    its packed codes (kb, vb) and metadata (s_v, m_v per token; s_k, m_k per channel)."""
    # S^T = s_q (K codes . c_q^T) + m_k . Q, Q' = Q * s_k rounded per head to int8
    x = qf * s_k.to(gl.float32)[:, None]
    qm = gl.sum(qf * m_k.to(gl.float32)[:, None], axis=0)
    scale, inv = _scale_and_inverse(gl.max(gl.abs(x), axis=0), 127.0)
    c_q = _round_half_up(x, gl.broadcast(inv[None, :], x)[0]).to(gl.int8)  # [D, heads]
    if E == 2:
        c_q = gl.reshape(gl.join(c_q, c_q), (D, COLS))
    qk = mma_v2(
        _row_operand(kb, BITS, opA), gl.convert_layout(c_q, opB),
        gl.zeros([PART, COLS], gl.int32, mma),
    )  # fmt: skip
    s_q = _per_column(scale * qk_scale, E, gl.SliceLayout(0, mma))
    q_m = _per_column(qm * qk_scale, E, gl.SliceLayout(0, mma))
    s = qk.to(gl.float32) * s_q[None, :] + q_m[None, :]

    # online softmax per column
    m_new = gl.maximum(m_i, gl.max(s, axis=0))
    alpha = gl.exp2(m_i - m_new)
    p = gl.exp2(s - m_new[None, :])
    l_i = l_i * alpha + gl.sum(p, axis=0)

    # O^T += s_p (V^T codes . c_p^T) + m_v . P, P' = P * s_v[:, e] ~= s_p c_p, c_p in 0..255:
    # the product runs on c_p - 128 (int8) plus twice V^T codes . 64 (a constant operand),
    # which adds back 128 x the page's code sums without reading them
    xp = p * s_v.to(gl.float32)
    s_p, inv_p = _scale_and_inverse(gl.max(xp, axis=0), 255.0)
    c_p = _round_half_up(xp, gl.broadcast(inv_p[None, :], xp)[0]) - 128
    v_a = _row_operand(vb, BITS, opA)
    pv = mma_v2(v_a, sixty_four, gl.zeros([D, COLS], gl.int32, mma))
    pv = mma_v2(v_a, sixty_four, pv)
    pv = mma_v2(v_a, gl.convert_layout(c_p.to(gl.int8), opB), pv)
    pm = gl.sum(p * m_v.to(gl.float32), axis=0)
    acc = acc * alpha[None, :] + s_p[None, :] * pv.to(gl.float32)
    acc += pm[None, :]
    return m_new, l_i, acc


# split counts and block-table widths vary per batch: never specialized on (no compile on
# the hot path after warm-up)
@gluon.jit(do_not_specialize=["NPART", "NSPLIT", "sbt_b"])
def kivi_gluon_decode_kernel(
    q_ptr, sq_b, sq_h,
    part_ptr, ml_ptr, NPART,
    seq_ptr, bt_ptr, sbt_b,
    kc_ptr, skc_b, skc_p, skc_h,
    km_ptr, kss_ptr, skm_b, skm_p, skm_h,
    vc_ptr, svc_b, svc_p, svc_h,
    vm_ptr, vss_ptr, svm_b, svm_p, svm_h,
    NSINK, NSPLIT, KVH, qk_scale,
    D: gl.constexpr, PART: gl.constexpr, G: gl.constexpr, E: gl.constexpr,
    BITS: gl.constexpr, HOIST: gl.constexpr,
):  # fmt: skip
    NB: gl.constexpr = D * BITS // 8  # bytes of a K row; plane j holds channels j * NB ..
    NBV: gl.constexpr = PART * BITS // 8  # bytes of a V row (channel)
    COLS: gl.constexpr = 8
    W: gl.constexpr = D // E  # channels of a V group
    mma: gl.constexpr = gl.NVMMADistributedLayout(
        version=[2, 0], warps_per_cta=[1, 1], instr_shape=[16, 8]
    )
    opA: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma, k_width=4)
    opB: gl.constexpr = gl.DotOperandLayout(operand_index=1, parent=mma, k_width=4)
    # packed rows load in the layout _row_operand needs no data movement from: a lane holds
    # bytes 4t..4t+3 and 16+4t..16+4t+3 as an A fragment does (rows of 16 bytes: 4t..4t+3)
    if NB >= 32:
        kl: gl.constexpr = opA
    else:
        kl: gl.constexpr = gl.BlockedLayout([1, 4], [8, 4], [1, 1], [1, 0])
    if NBV >= 32:
        vl: gl.constexpr = opA
    else:
        vl: gl.constexpr = gl.BlockedLayout([1, 4], [8, 4], [1, 1], [1, 0])

    b = gl.program_id(0) // KVH
    kvh = gl.program_id(0) % KVH
    split = gl.program_id(1)
    bk = b.to(gl.int64)

    # Q' is folded and rounded once per head ([D, HP] over the warp, 16 channels a lane) and
    # then copied to both of a head's columns (n = h * E + e); padding heads read zeros
    HP: gl.constexpr = COLS // E
    fl: gl.constexpr = gl.BlockedLayout([D // 8, 1], [8, 4], [1, 1], [0, 1])
    ch_f = gl.arange(0, D, layout=gl.SliceLayout(1, fl))
    h_f = gl.arange(0, HP, layout=gl.SliceLayout(0, fl))
    qrow = q_ptr + bk * sq_b + (kvh * G + h_f).to(gl.int64) * sq_h
    qf = gl.load(qrow[None, :] + ch_f[:, None], mask=(h_f < G)[None, :], other=0.0)
    qf = qf.to(gl.float32)
    n_c = gl.arange(0, COLS, layout=gl.SliceLayout(0, mma))

    tok_a = gl.arange(0, PART, layout=gl.SliceLayout(1, kl))  # K rows: tokens
    byte_a = gl.arange(0, NB, layout=gl.SliceLayout(0, kl))
    tok_c = gl.arange(0, PART, layout=gl.SliceLayout(1, mma))
    e_c = n_c % E
    ch_v = gl.arange(0, D, layout=gl.SliceLayout(1, vl))
    byte_v = gl.arange(0, NBV, layout=gl.SliceLayout(0, vl))
    ch_c = gl.arange(0, D, layout=gl.SliceLayout(1, mma))  # output rows: channels

    T = gl.load(seq_ptr + b)
    n_sink = gl.minimum(T, NSINK)
    n_pages = (T - n_sink) // PART
    m_i = gl.full([COLS], -float("inf"), gl.float32, gl.SliceLayout(0, mma))
    l_i = gl.zeros([COLS], gl.float32, gl.SliceLayout(0, mma))
    acc = gl.zeros([D, COLS], gl.float32, mma)
    sixty_four = gl.full([PART, COLS], 64, gl.int8, opB)

    # split k takes pages k, k + NSPLIT, ...; the next page's id is read one page ahead, and
    # every load of a page is issued before its Q.K^T (V arrives while it computes).
    # HOIST keeps each lane's 64-bit row addresses in registers across pages (fewer
    # instructions a page, about 70 more registers: faster when programs are few, as at batch
    # 1; slower when occupancy matters)
    k_rows = kc_ptr + bk * skc_b + kvh * skc_h + tok_a[:, None] * NB + byte_a[None, :]
    v_rows = vc_ptr + bk * svc_b + kvh * svc_h + ch_v[:, None] * NBV + byte_v[None, :]
    vm_off = bk * svm_b + kvh * svm_h + tok_c[:, None] * E + e_c[None, :]
    km_off = bk * skm_b + kvh * skm_h + ch_f
    sv_rows, mv_rows = vss_ptr + vm_off, vm_ptr + vm_off
    sk_rows, mk_rows = kss_ptr + km_off, km_ptr + km_off
    pg_next = gl.load(bt_ptr + b * sbt_b + split, mask=split < n_pages, other=0)
    for j in range(split, n_pages, NSPLIT):
        pg = pg_next.to(gl.int64)
        pg_next = gl.load(bt_ptr + b * sbt_b + j + NSPLIT, mask=j + NSPLIT < n_pages, other=0)
        if HOIST:
            kb = gl.load(k_rows + pg * skc_p)
            vb = gl.load(v_rows + pg * svc_p)
            s_v = gl.load(sv_rows + pg * svm_p)
            m_v = gl.load(mv_rows + pg * svm_p)
            s_k = gl.load(sk_rows + pg * skm_p)
            m_k = gl.load(mk_rows + pg * skm_p)
        else:
            kb = gl.load(
                kc_ptr + bk * skc_b + pg * skc_p + kvh * skc_h
                + tok_a[:, None] * NB + byte_a[None, :]
            )  # fmt: skip
            vb = gl.load(
                vc_ptr + bk * svc_b + pg * svc_p + kvh * svc_h
                + ch_v[:, None] * NBV + byte_v[None, :]
            )  # fmt: skip
            vmeta = bk * svm_b + pg * svm_p + kvh * svm_h + tok_c[:, None] * E + e_c[None, :]
            kmeta = bk * skm_b + pg * skm_p + kvh * skm_h + ch_f
            s_v = gl.load(vss_ptr + vmeta)
            m_v = gl.load(vm_ptr + vmeta)
            s_k = gl.load(kss_ptr + kmeta)
            m_k = gl.load(km_ptr + kmeta)
        m_i, l_i, acc = _attend_page(
            kb, vb, s_v, m_v, s_k, m_k, qf, m_i, l_i, acc, sixty_four, qk_scale,
            D, PART, COLS, E, BITS, opA, opB, mma,
        )  # fmt: skip

    # column (h, e) writes head h's channels of group e; e == 0 writes m and l
    h_c = kvh * G + n_c // E
    prow = (bk * (KVH * G) + h_c.to(gl.int64)) * NPART + split
    keep = (n_c < G * E)[None, :] & ((ch_c // W)[:, None] == e_c[None, :])
    gl.store(part_ptr + prow[None, :] * D + ch_c[:, None], acc, mask=keep)
    first = (n_c < G * E) & (e_c == 0)
    gl.store(ml_ptr + prow * 2, m_i, mask=first)
    gl.store(ml_ptr + prow * 2 + 1, l_i, mask=first)

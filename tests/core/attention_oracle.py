"""A second, float64 numpy implementation of HACK attention, written from the paper's math."""

import numpy as np

from .oracle import np_unpack


def fake_quant8(x: np.ndarray, p: int) -> np.ndarray:
    """8-bit asymmetric round-to-nearest per group of p along the last axis, in float64."""
    n = x.shape[-1]
    out = np.empty_like(x)
    for s in range(0, n, p):
        g = x[..., s : s + p]
        lo, hi = g.min(-1, keepdims=True), g.max(-1, keepdims=True)
        sc = (hi - lo) / 255.0
        safe = np.where(sc > 0, sc, 1.0)
        out[..., s : s + p] = np.where(sc > 0, lo + sc * np.floor((g - lo) / safe + 0.5), g)
    return out


def fake_nozp8(x: np.ndarray, p: int | None, top: int, signed: bool) -> np.ndarray:
    """Zero-point-free 8-bit rounding, x ~= s * round(x / s) with s = max|x| / top, per group of
    p along the last axis (the whole axis if p is None); codes clipped to [-top or 0, top]."""
    n = x.shape[-1]
    p = p or n
    out = np.empty_like(x)
    for s0 in range(0, n, p):
        g = x[..., s0 : s0 + p]
        sc = np.abs(g).max(-1, keepdims=True) / top
        safe = np.where(sc > 0, sc, 1.0)
        out[..., s0 : s0 + p] = sc * np.clip(np.floor(g / safe + 0.5), -top if signed else 0, top)
    return out


def _codes_meta(qt):
    codes = (
        np_unpack(qt.codes, qt.bits).reshape(*qt.codes.shape[:-1], qt.partition).astype(np.float64)
    )
    return codes, qt.mins.double().numpy(), qt.scales.double().numpy()


def _flat(x, n):
    return x.reshape(*x.shape[:-2], x.shape[-2] * x.shape[-1])[..., :n]


def hack_attention_f64(q, kv, causal=True, quantize_activations=True):
    """q [B, Hq, M, D] (torch); kv a QuantizedKV. Returns float64 [B, Hq, M, D]."""
    cfg, p = kv.config, kv.config.partition
    fq = (lambda x: fake_quant8(x, p)) if quantize_activations else (lambda x: x)
    b, hq, m, d = q.shape
    h = kv.kv_heads
    grp = hq // h
    qf = q.double().numpy().reshape(b, h, grp * m, d)
    c = kv.num_closed
    kc, km, ks = _codes_meta(kv.k_q)
    vc, vm, vs = _codes_meta(kv.v_q)
    if cfg.layout == "paper":
        k_deq = _flat(km[..., None] + ks[..., None] * kc, d)  # [B, H, C, D]
        v_deq = np.swapaxes(_flat(vm[..., None] + vs[..., None] * vc, c), -1, -2)  # [B, H, C, D]
        s_closed = fq(qf) @ np.swapaxes(k_deq, -1, -2)
    else:
        codes = _flat(kc, c)  # [B, H, D, C] token-grouped
        s_closed = np.zeros((b, h, grp * m, c))
        for g0 in range(0, c, p):
            gi = g0 // p
            folded = qf * ks[..., gi][:, :, None, :]  # Q * s_k[:, g], symmetric int8 per row
            fold_q = fake_nozp8(folded, None, 127, True) if quantize_activations else folded
            s_closed[..., g0 : g0 + p] = fold_q @ codes[..., g0 : g0 + p] + (
                qf @ km[..., gi][..., None]
            )
    ks_ = kv.k_sink.double().numpy()
    ko = kv.k_open.double().numpy()
    scores = np.concatenate(
        [qf @ np.swapaxes(ks_, -1, -2), s_closed, qf @ np.swapaxes(ko, -1, -2)], -1
    )
    scores = scores / np.sqrt(d)
    t = kv.num_tokens
    if causal:
        pos = np.tile(np.arange(m), grp) + (t - m)
        scores = np.where(np.arange(t)[None, :] > pos[:, None], -np.inf, scores)
    scores = scores - scores.max(-1, keepdims=True)
    probs = np.exp(scores)
    probs /= probs.sum(-1, keepdims=True)
    ns = kv.num_sink
    pc = probs[..., ns : ns + c]
    out = (
        probs[..., :ns] @ kv.v_sink.double().numpy()
        + probs[..., ns + c :] @ kv.v_open.double().numpy()
    )
    if c:
        if cfg.layout == "paper":
            out = out + fq(pc) @ v_deq
        else:
            codes = _flat(vc, d)  # [B, H, C, D] channel-grouped
            for g0 in range(0, d, p):
                gi = g0 // p
                folded = pc * vs[..., gi][:, :, None, :]  # P * s_v[:, g], 0..255 per partition
                fold_p = fake_nozp8(folded, p, 255, False) if quantize_activations else folded
                out[..., g0 : g0 + p] += fold_p @ codes[..., g0 : g0 + p] + (
                    pc @ vm[..., gi][..., None]
                )
    return out.reshape(b, hq, m, d)

"""reference_attention: HACK's attention arithmetic in PyTorch, the CPU path and the GPU oracle.

Q and P are quantized to 8 bits per partition, Q @ K^T and P @ V run on integer codes with the
Eq. (1) corrections (homomorphic_matmul), softmax is float32. Sinks and the open group are 16-bit
and join the same softmax.
"""

from __future__ import annotations

import math

import torch

from . import layout
from .config import HackConfig
from .homomorphic import homomorphic_matmul
from .kv import QuantizedKV
from .quantize import QuantizedTensor, quantize_groups

ACT_BITS = 8  # Q and P


def _int8(x: torch.Tensor, dim: int, partition: int) -> QuantizedTensor:
    return quantize_groups(x, dim, ACT_BITS, partition, "nearest")


def zero_point_free(x: torch.Tensor, top: int, signed: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """8-bit codes of x along its last axis with no zero point: x ~= scale * code, scale =
    max|x| / top, code = floor(x / scale + 1/2) in [-top, top] (signed) or [0, top] (x >= 0).
    Float32, in the operation order of the kivi Triton kernel. Returns (code, scale [..., 1])."""
    x = x.float()
    scale = x.abs().amax(-1, keepdim=True) / float(top)
    inv = torch.where(scale > 0, 1.0 / scale, torch.zeros_like(scale))
    code = torch.floor(x * inv + 0.5).clamp(-float(top) if signed else 0.0, float(top))
    return code, scale


def _expand_groups(x: torch.Tensor, partition: int, length: int) -> torch.Tensor:
    """[..., G] per-group values -> [..., length] per-element values."""
    return x.repeat_interleave(partition, dim=-1)[..., :length]


def _scores_closed(q: torch.Tensor, kv: QuantizedKV) -> torch.Tensor:
    """Q [B, H, M, D] against the closed K codes -> [B, H, M, C]."""
    p, k_q = kv.config.partition, kv.k_q
    if kv.config.layout == "paper":
        return homomorphic_matmul(_int8(q, -1, p), k_q)
    # kivi: K grouped along tokens per channel. Fold K's scales into Q per token group g
    # (Q_g = Q * s_k[:, g]), round Q_g to symmetric int8 per row, multiply with the raw codes,
    # add Q @ m_k[:, g]. A zero-point-free Q needs no per-token code sums (kivi stores none).
    b, h, c, d = k_q.shape
    codes = k_q.unpacked_codes().float()  # [B, H, D, G, p]
    s_k, m_k = k_q.scales.float(), k_q.mins.float()  # [B, H, D, G]
    q_fold = q.unsqueeze(2) * s_k.transpose(-1, -2).unsqueeze(-2)  # [B, H, G, M, D]
    q_code, q_scale = zero_point_free(q_fold, 127, signed=True)  # per (group, row)
    part = q_scale * (q_code @ codes.permute(0, 1, 3, 2, 4))  # [B, H, G, M, p]
    scores = part.permute(0, 1, 3, 2, 4).flatten(-2)[..., :c]
    return scores + _expand_groups(q @ m_k, p, c)


def _output_closed(probs: torch.Tensor, kv: QuantizedKV) -> torch.Tensor:
    """P [B, H, M, C] against the closed V codes -> [B, H, M, D]."""
    p, v_q = kv.config.partition, kv.v_q
    if kv.config.layout == "paper":
        return homomorphic_matmul(_int8(probs, -1, p), v_q)
    # kivi: V grouped along head_dim per token. Fold V's scales into P per channel group e
    # (P_e = P * s_v[:, e] >= 0), round P_e to 8-bit codes 0..255 (no zero point) per (row, token
    # partition), multiply with the raw codes, add P @ m_v[:, e].
    b, h, c, d = v_q.shape
    g = layout.num_groups(c, p)
    codes = v_q.unpacked_codes().float()  # [B, H, C, E, p]
    s_v, m_v = v_q.scales.float(), v_q.mins.float()  # [B, H, C, E]
    p_fold = probs.unsqueeze(2) * s_v.permute(0, 1, 3, 2).unsqueeze(-2)  # [B, H, E, M, C]
    p_fold = torch.nn.functional.pad(p_fold, (0, g * p - c)).unflatten(-1, (g, p))
    p_code, p_scale = zero_point_free(
        p_fold, 255, signed=False
    )  # per (group, row, token partition)
    c_tok = torch.nn.functional.pad(codes, (0, 0, 0, 0, 0, g * p - c)).unflatten(2, (g, p))
    # [B, H, E, M, G, p] x [B, H, G, p, E, w] summed over (G, p) per channel group E
    part = torch.einsum("bhemgt,bhgtew->bhemw", p_code * p_scale, c_tok)
    out = part.permute(0, 1, 3, 2, 4).flatten(-2)[..., :d]
    return out + _expand_groups(probs @ m_v, p, d)


def reference_attention(
    q: torch.Tensor,
    qkv: QuantizedKV,
    causal: bool = True,
    config: HackConfig | None = None,
    sm_scale: float | None = None,
) -> torch.Tensor:
    """Attention of q [batch, q_heads, q_len, head_dim] over qkv; float32 [batch, q_heads, q_len, D].

    Queries are the last q_len positions of the sequence (prefill: all of it; decode: the newest).
    GQA: q head i attends kv head i // (q_heads // kv_heads). `config` defaults to qkv.config;
    if given it must match it.
    """
    if config is not None and config != qkv.config:
        raise ValueError(f"config {config} differs from the QuantizedKV's {qkv.config}")
    if q.dim() != 4:
        raise ValueError(f"q must be [batch, q_heads, q_len, head_dim], got rank {q.dim()}")
    b, hq, m, d = q.shape
    if b != qkv.batch or d != qkv.head_dim:
        raise ValueError(
            f"q {tuple(q.shape)} does not match KV batch {qkv.batch} and head_dim {qkv.head_dim}"
        )
    h = qkv.kv_heads
    if hq % h:
        raise ValueError(f"q_heads {hq} is not a multiple of kv_heads {h}")
    if m == 0:
        raise ValueError("q has no tokens")
    t = qkv.num_tokens
    if m > t:
        raise ValueError(f"q_len {m} exceeds the {t} tokens of the KV")
    group = hq // h
    qf = q.float().reshape(b, h, group * m, d)
    scale = sm_scale if sm_scale is not None else 1.0 / math.sqrt(d)

    parts = [qf @ qkv.k_sink.float().transpose(-1, -2)]
    if qkv.num_closed:
        parts.append(_scores_closed(qf, qkv))
    parts.append(qf @ qkv.k_open.float().transpose(-1, -2))
    scores = torch.cat(parts, -1) * scale  # [B, H, group*M, T]
    if causal:
        pos = torch.arange(m, device=q.device).repeat(group) + (t - m)
        mask = torch.arange(t, device=q.device)[None, :] > pos[:, None]
        scores = scores.masked_fill(mask, -torch.inf)
    probs = torch.softmax(scores, dim=-1)

    s, c = qkv.num_sink, qkv.num_closed
    out = probs[..., :s] @ qkv.v_sink.float()
    if c:
        out = out + _output_closed(probs[..., s : s + c].contiguous(), qkv)
    out = out + probs[..., s + c :] @ qkv.v_open.float()
    return out.reshape(b, hq, m, d)


def dequantize_kv(qkv: QuantizedKV) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V [B, H, T, D] float32 as HACK represents them (validation and baselines only)."""
    from .quantize import dequantize

    k_closed = dequantize(qkv.k_q)
    if qkv.config.layout == "paper":
        k_closed = k_closed.transpose(-1, -2)
    k = torch.cat([qkv.k_sink.float(), k_closed, qkv.k_open.float()], 2)
    v = torch.cat([qkv.v_sink.float(), dequantize(qkv.v_q), qkv.v_open.float()], 2)
    return k, v

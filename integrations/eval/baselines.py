"""Baseline KV codecs, implemented here at their published settings, as fake quantization:
each returns the K/V the baseline's attention would see (dequantize, then attend) and its bytes.

- KIVI-style 2-bit: K per channel and V per token in groups of 32, asymmetric min/scale in fp16,
  the newest 128 tokens (at least) kept in fp16.
- CacheGen-like: tokens in chunks of 10, the first (anchor) at 8 bits per token, the others as
  deltas from the anchor, quantized per channel with 4/3/2 bits for the first/middle/last third of
  layers; size is the codes' empirical entropy (what CacheGen's arithmetic coder approaches).
- KVQuant-like 3-bit: K per channel before RoPE (RoPE undone and redone here), V per token, 1% of
  values (largest magnitude) kept in fp16 (dense-and-sparse), the first token in fp16. Uniform
  levels: KVQuant's non-uniform (k-means) datatype is not implemented.
All inputs are [1, H, T, D] float tensors already rounded to fp16 (the 16-bit KV).
"""

from __future__ import annotations

import math

import torch

FP16 = 2  # bytes


def fake_quant(x: torch.Tensor, dim: int, group: int, bits: int) -> torch.Tensor:
    """Asymmetric min/scale quantization in groups of `group` along `dim` (last group may be short)."""
    moved = x.movedim(dim, -1)
    n = moved.shape[-1]
    pad = (-n) % group
    g = torch.nn.functional.pad(moved, (0, pad), value=float("nan")).unflatten(-1, (-1, group))
    lo = g.nan_to_num(float("inf")).amin(-1, keepdim=True)
    hi = g.nan_to_num(float("-inf")).amax(-1, keepdim=True)
    scale = ((hi - lo) / ((1 << bits) - 1)).clamp_min(1e-8)
    q = ((g - lo) / scale).round().clamp(0, (1 << bits) - 1)
    out = (lo + q * scale).flatten(-2)[..., :n]
    return out.movedim(-1, dim)


def kivi(k: torch.Tensor, v: torch.Tensor, bits: int = 2, group: int = 32, residual: int = 128):
    t = k.shape[2]
    nq = max(0, (t - residual) // group * group)
    if nq == 0:
        return k, v, k.numel() * 2 * FP16
    kq = torch.cat([fake_quant(k[:, :, :nq], 2, group, bits), k[:, :, nq:]], 2)
    vq = torch.cat([fake_quant(v[:, :, :nq], 3, group, bits), v[:, :, nq:]], 2)
    per_q = k[:, :, :nq].numel()
    nbytes = 2 * (per_q * bits / 8 + per_q / group * 2 * FP16) + 2 * k[:, :, nq:].numel() * FP16
    return kq, vq, nbytes


def _entropy_bytes(codes: torch.Tensor) -> float:
    counts = torch.bincount(codes.flatten().long()).double()
    prob = counts[counts > 0] / counts.sum()
    return float(-(prob * prob.log2()).sum()) * codes.numel() / 8


def _cachegen_one(x: torch.Tensor, bits: int, chunk: int = 10):
    b, h, t, d = x.shape
    pad = (-t) % chunk
    xs = torch.nn.functional.pad(x, (0, 0, 0, pad)).unflatten(2, (-1, chunk))  # [B,H,C,chunk,D]
    anchor = xs[:, :, :, :1]
    a_lo, a_hi = anchor.amin(-1, keepdim=True), anchor.amax(-1, keepdim=True)
    a_scale = ((a_hi - a_lo) / 255).clamp_min(1e-8)
    a_codes = ((anchor - a_lo) / a_scale).round().clamp(0, 255)
    anchor_hat = a_lo + a_codes * a_scale
    delta = xs[:, :, :, 1:] - anchor_hat
    bound = delta.abs().amax(dim=(2, 3), keepdim=True).clamp_min(1e-8)  # per channel
    levels = (1 << bits) - 1
    step = 2 * bound / levels
    d_codes = ((delta + bound) / step).round().clamp(0, levels)
    xs_hat = torch.cat([anchor_hat, anchor_hat + d_codes * step - bound], 3)
    out = xs_hat.flatten(2, 3)[:, :, :t]
    nbytes = _entropy_bytes(a_codes) + _entropy_bytes(d_codes[:, :, :, : max(0, t - 1)])
    nbytes += (a_lo.numel() * 2 + bound.numel()) * FP16
    return out, nbytes


def cachegen(layer: int, num_layers: int, k: torch.Tensor, v: torch.Tensor):
    bits = (4, 3, 2)[min(2, 3 * layer // num_layers)]
    kq, kb = _cachegen_one(k, bits)
    vq, vb = _cachegen_one(v, bits)
    return kq, vq, kb + vb


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, -1)
    return torch.cat([-x2, x1], -1)


def _dense_sparse(x: torch.Tensor, dim: int, bits: int, outlier_frac: float):
    """Quantize along `dim` with the whole tensor's `outlier_frac` largest |x| kept exact."""
    n_out = max(1, int(math.ceil(outlier_frac * x.numel())))
    thresh = x.abs().flatten().kthvalue(x.numel() - n_out).values
    outlier = x.abs() > thresh
    inner = x.masked_fill(outlier, float("nan"))
    # Range per vector along `dim` from the inliers only.
    lo = inner.nan_to_num(float("inf")).amin(dim, keepdim=True)
    hi = inner.nan_to_num(float("-inf")).amax(dim, keepdim=True)
    lo = torch.where(torch.isfinite(lo), lo, torch.zeros_like(lo))
    hi = torch.where(torch.isfinite(hi), hi, torch.zeros_like(hi))
    scale = ((hi - lo) / ((1 << bits) - 1)).clamp_min(1e-8)
    q = ((x - lo) / scale).round().clamp(0, (1 << bits) - 1)
    out = torch.where(outlier, x, lo + q * scale)
    nbytes = x.numel() * bits / 8 + 2 * lo.numel() * FP16 + int(outlier.sum()) * (FP16 + 4)
    return out, nbytes


def kvquant(k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, bits: int = 3):
    """cos/sin [1, T, D] of the model's RoPE at positions 0..T-1."""
    cos, sin = cos[:, None].to(k.dtype), sin[:, None].to(k.dtype)
    k_pre = k * cos - rotate_half(k) * sin  # undo RoPE (a rotation: exact up to rounding)
    kq_pre, kb = _dense_sparse(k_pre[:, :, 1:], 2, bits, 0.01)
    vq, vb = _dense_sparse(v[:, :, 1:], 3, bits, 0.01)
    kq_pre = torch.cat([k_pre[:, :, :1], kq_pre], 2)
    kq = kq_pre * cos + rotate_half(kq_pre) * sin
    vq = torch.cat([v[:, :, :1], vq], 2)
    return kq, vq, kb + vb + 2 * k[:, :, :1].numel() * FP16

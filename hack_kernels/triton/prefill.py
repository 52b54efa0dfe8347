"""prefill_attention: quantize K and V, then attend with HACK's arithmetic (or in 16-bit)."""

from __future__ import annotations

import torch

from ..config import HackConfig
from ..kv import QuantizedKV, _check_kv
from .kivi_launch import run_kivi_attention
from .kivi_pages import kivi_pages
from .launch import run_attention
from .quantize import quantize_kv_triton

MODES = ("hack", "fp16")


def _check_q(q: torch.Tensor, k: torch.Tensor) -> None:
    if q.dim() != 4:
        raise ValueError(f"q must be [batch, q_heads, q_len, head_dim], got rank {q.dim()}")
    if q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        raise ValueError(f"q {tuple(q.shape)} does not match k {tuple(k.shape)}")
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"q_heads {q.shape[1]} is not a multiple of kv_heads {k.shape[1]}")
    if q.shape[2] == 0 or q.shape[2] > k.shape[2]:
        raise ValueError(f"q_len {q.shape[2]} must be in 1..{k.shape[2]} (the KV's tokens)")
    if q.shape[3] not in (64, 128):
        raise ValueError(f"head_dim must be 64 or 128, got {q.shape[3]}")


def attend_quantized(
    q: torch.Tensor,
    qkv: QuantizedKV,
    causal: bool = True,
    sm_scale: float | None = None,
    out_dtype: torch.dtype | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """HACK attention of q [B, Hq, M, D] over a QuantizedKV with the Triton kernel of its layout;
    queries are the last M positions. Same math as reference_attention."""
    cfg = qkv.config
    if cfg.bits not in (2, 4):
        raise ValueError(f"the Triton kernel supports 2- and 4-bit codes, got {cfg.bits}")
    b, hq, m, d = q.shape
    if out is None:
        out = torch.empty((b, hq, m, d), dtype=out_dtype or q.dtype, device=q.device)
    elif out.shape != q.shape:
        raise ValueError(f"out {tuple(out.shape)} must have q's shape {tuple(q.shape)}")
    kq, vq = qkv.k_q, qkv.v_q
    p = cfg.partition
    seq = torch.full((b,), qkv.num_tokens, dtype=torch.int32, device=q.device)
    n_pages = qkv.num_closed // p
    table = torch.arange(max(n_pages, 1), dtype=torch.int32, device=q.device)
    ks, ko = qkv.k_sink, qkv.k_open
    if qkv.v_sink.stride() != ks.stride() or qkv.v_open.stride() != ko.stride():
        raise ValueError("k and v sinks / open tokens must share strides")
    sinks = (ks, qkv.v_sink, ks.stride(0), ks.stride(1), ks.stride(2))
    opens = (ko, qkv.v_open, ko.stride(0), ko.stride(1), ko.stride(2))
    if cfg.layout == "kivi":
        return run_kivi_attention(
            q, out, seq, table, 0, kivi_pages(kq, vq), sinks, opens,
            kv_heads=qkv.kv_heads, n_sink=qkv.num_sink, partition=p, bits=cfg.bits,
            causal=causal, sm_scale=sm_scale, decode=False,
        )  # fmt: skip
    kc, km = kq.codes, kq.mins  # [B, H, C, Gd, p/per], [B, H, C, Gd]
    vc, vm = vq.codes, vq.mins  # [B, H, D, C/p, p/per], [B, H, D, C/p]
    return run_attention(
        q, out, seq, table, 0,
        (kc, kc.stride(0), p * kc.stride(2), kc.stride(1), kc.stride(2)),
        (km, kq.scales, kq.sums, km.stride(0), p * km.stride(2), km.stride(1), km.stride(2)),
        (vc, vc.stride(0), vc.stride(3), vc.stride(1), vc.stride(2)),
        (vm, vq.scales, vq.sums, vm.stride(0), vm.stride(3), vm.stride(1), vm.stride(2)),
        sinks, opens,
        kv_heads=qkv.kv_heads, n_sink=qkv.num_sink, partition=p, bits=cfg.bits,
        causal=causal, sm_scale=sm_scale, decode=False,
    )  # fmt: skip


def prefill_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    config: HackConfig | None = None,
    causal: bool = True,
    mode: str = "fp16",
    sm_scale: float | None = None,
    out_dtype: torch.dtype | None = None,
    validate: bool = True,
    out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, QuantizedKV]:
    """Attention of q [B, Hq, S, D] over k, v [B, Hkv, S, D] plus the QuantizedKV to ship.

    mode "fp16" (default): attend over the 16-bit K and V with torch SDPA and only store the
    codes (the authors' artifact does the same); on the H100 it runs at 0.89-1.01x of SDPA alone
    against 0.10-0.11x for "hack" (benchmarks/results/attention_notes.md), and is exact.
    mode "hack": attend over the codes with HACK's arithmetic (equal to reference_attention of
    the returned QuantizedKV), in either layout. For "fp16" with causal=True, q and k must have the
    same length (SDPA aligns the causal mask to the top left).
    """
    config = config or HackConfig()
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if validate:
        _check_q(q, k)
    if mode == "fp16":
        if causal and q.shape[2] != k.shape[2]:
            raise ValueError("mode 'fp16' with causal=True needs q_len == kv_len; use mode 'hack'")
        if validate:
            _check_kv(k, v)  # before any GPU work is queued
        # SDPA, then quantize: a side stream for the quantize pass measured slower on the H100
        # (16K / 32K: 0.97 / 0.95x of SDPA against 1.02 / 0.99x; 4K: 0.34-1.00x, host-bound)
        out = torch.nn.functional.scaled_dot_product_attention(
            q, k.to(q.dtype), v.to(q.dtype), is_causal=causal, scale=sm_scale, enable_gqa=True
        )
        qkv = quantize_kv_triton(k, v, config, validate=False)
        return out.to(out_dtype or q.dtype), qkv
    qkv = quantize_kv_triton(k, v, config, validate=validate)
    return attend_quantized(q, qkv, causal, sm_scale, out_dtype, out), qkv

"""The "hack" attention function for transformers models, and enable_hack(model) to switch to it.

Prefill (the first chunk) attends over its own fresh K/V in full precision, as HACK's artifact does,
while the cache stores only codes. Every later chunk (decode) attends over the stored codes with
their sums, the 16-bit sinks and open group: reference_attention on the CPU, the Triton kernels of
hack_kernels.triton on CUDA when they exist. Without a HackCache (use_cache=False) it is plain SDPA.

Batches must be left-padded (what generate() does for decoder-only models); each row's padding is
read from the prefill attention mask and stripped from its QuantizedKV.
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from hack_kernels import QuantizedKV, dequantize_kv, reference_attention

from .transformers_cache import HackCacheError, active_layer

ATTN_NAME = "hack"


def left_padding(attention_mask: torch.Tensor | None, batch: int, kv_len: int) -> list[int]:
    """Leading padded key positions of each row, read from the prefill mask (None: no padding)."""
    if attention_mask is None:
        return [0] * batch
    last = attention_mask[:, 0, -1, :kv_len]  # what the last query may see: every real key
    allowed = last if last.dtype == torch.bool else last == 0
    allowed = allowed.expand(batch, kv_len)
    pads = []
    for row in allowed:
        n_pad = kv_len - int(row.sum())
        if n_pad and (bool(row[:n_pad].any()) or not bool(row[n_pad:].all())):
            raise HackCacheError("HackCache supports left padding only (padding_side='left')")
        pads.append(n_pad)
    return pads


def triton_supports(q: torch.Tensor, qkv: QuantizedKV) -> bool:
    """Whether hack_kernels.triton's kernels cover this call (CUDA, either layout, 2/4 bits)."""
    cfg = qkv.config
    return q.is_cuda and cfg.bits in (2, 4) and q.shape[-1] in (64, 128)


def attend_quantized(q: torch.Tensor, qkv: QuantizedKV, scaling: float) -> torch.Tensor:
    """q [1, Hq, M, D] over qkv, causal with q the newest M tokens; [1, Hq, M, D].

    The Triton kernel on CUDA where it covers the layout, else reference_attention (the same math).
    """
    if triton_supports(q, qkv):
        from hack_kernels.triton import attend_quantized as triton_attend

        return triton_attend(q, qkv, causal=True, sm_scale=scaling, out_dtype=torch.float32)
    return reference_attention(q, qkv, causal=True, sm_scale=scaling)


def float_attention(q: torch.Tensor, qkv: QuantizedKV, scaling: float) -> torch.Tensor:
    """Diagnostic: the stored K/V dequantized, then causal attention in float32."""
    k, v = dequantize_kv(qkv)  # [1, H, T, D]
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    m, t = q.shape[2], k.shape[2]
    allowed = torch.ones(m, t, dtype=torch.bool, device=q.device).tril(t - m)
    return torch.nn.functional.scaled_dot_product_attention(q.float(), k, v, allowed, scale=scaling)


def hack_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    layer = active_layer(module.layer_idx)
    if layer is None or layer.pending is not None:
        if layer is not None:
            layer.commit_prefill(left_padding(attention_mask, query.shape[0], key.shape[2]))
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    attend = float_attention if layer.float_attention else attend_quantized
    out = torch.cat([attend(query[b : b + 1], row, scale) for b, row in enumerate(layer.rows)])
    return out.to(query.dtype).transpose(1, 2).contiguous(), None


def register() -> None:
    """Make attn_implementation="hack" known to transformers (idempotent)."""
    AttentionInterface.register(ATTN_NAME, hack_attention_forward)
    AttentionMaskInterface.register(ATTN_NAME, sdpa_mask)


def enable_hack(model: torch.nn.Module) -> str:
    """Switch `model` to the hack attention function; returns the previous implementation."""
    register()
    previous = model.config._attn_implementation
    model.set_attn_implementation(ATTN_NAME)
    return previous

"""Capture each layer's real Q, K, V (post-RoPE, pre-attention) from a transformers forward pass."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

CAPTURE_NAME = "hack_capture"
_records: list | None = None


def _capturing_attention(module, query, key, value, attention_mask, **kwargs):
    if _records is not None:
        _records.append((query.detach().clone(), key.detach().clone(), value.detach().clone()))
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


AttentionInterface.register(CAPTURE_NAME, _capturing_attention)


@dataclass
class LayerQKV:
    q: torch.Tensor  # [batch, q_heads, tokens, head_dim]
    k: torch.Tensor  # [batch, kv_heads, tokens, head_dim]
    v: torch.Tensor


@torch.no_grad()
def capture_qkv(model, input_ids: torch.Tensor) -> list[LayerQKV]:
    """Run one forward pass and return every layer's Q, K and V in the model's dtype."""
    global _records
    previous = model.config._attn_implementation
    model.set_attn_implementation(CAPTURE_NAME)
    _records = []
    try:
        model(input_ids, use_cache=False)
        return [LayerQKV(*r) for r in _records]
    finally:
        _records = None
        model.set_attn_implementation(previous)

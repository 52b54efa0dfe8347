"""The model side of disaggregation: prefill to K/V, K/V to wire blocks, blocks to a decode cache."""

from __future__ import annotations

import time

import torch
from transformers import DynamicCache

from hack_kernels import HackConfig, quantize_kv
from hack_transport import wire

from ..transformers_cache import HackCache


def prefill(model, ids: list[int]) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], int]:
    """16-bit prefill of the prompt: per-layer K/V [1, H, T, D] float16 and the first new token."""
    if model.config._attn_implementation != "sdpa":
        model.set_attn_implementation("sdpa")
    cache = DynamicCache()
    with torch.no_grad():
        logits = model(torch.tensor([ids]), past_key_values=cache, use_cache=True).logits
    kv = [(layer.keys.half(), layer.values.half()) for layer in cache.layers]
    return kv, int(logits[0, -1].argmax())


def identity(model, name: str, config: HackConfig | None) -> wire.ModelIdentity:
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return wire.model_identity(
        name, cfg.num_hidden_layers, cfg.num_key_value_heads, head_dim, torch.float16, config
    )


def hack_blocks(
    kv, config: HackConfig, ident: wire.ModelIdentity, block_tokens: int
) -> list[wire.Block]:
    layers = [quantize_kv(k, v, config) for k, v in kv]
    return wire.split_kv(layers, block_tokens, ident)


def raw_blocks(kv, ident: wire.ModelIdentity, block_tokens: int) -> list[wire.Block]:
    return wire.split_raw([k for k, _ in kv], [v for _, v in kv], block_tokens, ident)


def cache_from_blocks(blocks: list[wire.Block]):
    """HackCache for hack blocks, DynamicCache (16-bit values) for raw16 blocks."""
    if blocks[0].config is not None:
        return HackCache.from_quantized(wire.join_blocks(blocks))
    blocks = sorted(blocks, key=lambda b: b.tokens[0])
    k = torch.cat([b.tensors["k"] for b in blocks], 3)  # [L, B, H, T, D]
    v = torch.cat([b.tensors["v"] for b in blocks], 3)
    cache = DynamicCache()
    for i in range(k.shape[0]):
        cache.update(k[i].float(), v[i].float(), i)
    return cache


def decode(model, tok, ids: list[int], first: int, cache, max_new: int) -> tuple[list[int], float]:
    """Greedy decode after a remote prefill: the cache holds `ids`, `first` is the prefill's token."""
    attn = "hack" if isinstance(cache, HackCache) else "sdpa"
    if attn == "hack":
        from ..transformers_attention import enable_hack

        enable_hack(model)
    elif model.config._attn_implementation != "sdpa":
        model.set_attn_implementation("sdpa")
    full = torch.tensor([ids + [first]])
    t0 = time.perf_counter()
    with torch.no_grad():
        out = model.generate(
            input_ids=full,
            attention_mask=torch.ones_like(full),
            past_key_values=cache,
            max_new_tokens=max(0, max_new - 1),
            do_sample=False,
            pad_token_id=tok.pad_token_id,
        )
    return [first] + out[0, full.shape[1] :].tolist(), time.perf_counter() - t0

"""decode_attention: split-K (FlashDecoding) HACK attention over a PagedHackCache."""

from __future__ import annotations

import torch

from .kivi_gluon_launch import (
    gluon_decode_available,
    gluon_decode_supports,
    run_kivi_gluon_decode,
)
from .kivi_launch import run_kivi_attention
from .launch import (
    COMBINE_SMALL_S,
    choose_splits,
    combine_splits,
    launch_params,
    run_attention,
)
from .paged_cache import PagedHackCache

# closed pages over the whole batch up to which kivi decode runs one page per program
SHORT_DECODE_PAGES = 512


def decode_attention(
    q: torch.Tensor,
    cache: PagedHackCache,
    block_tables: torch.Tensor | None = None,
    seq_lens: torch.Tensor | None = None,
    sm_scale: float | None = None,
    num_splits: int | None = None,
    max_pages: int | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention of one new query per sequence, q [B, Hq, 1, D], over the cache's slots 0..B-1.

    block_tables [B, pages] int32 and seq_lens [B] int32 (tokens per sequence, the new one
    included) default to the cache's own. max_pages (the longest sequence's closed pages) sizes
    the split-K grid; pass it to avoid reading seq_lens back to the host.
    """
    if q.dim() != 4 or q.shape[2] != 1:
        raise ValueError(f"q must be [batch, q_heads, 1, head_dim], got {tuple(q.shape)}")
    b, hq, _, d = q.shape
    h, p = cache.kv_heads, cache.config.partition
    if d != cache.head_dim or hq % h:
        raise ValueError(
            f"q {tuple(q.shape)} does not match the cache ({h} kv heads, d={cache.head_dim})"
        )
    block_tables = cache.block_tables[:b] if block_tables is None else block_tables
    seq_lens = cache.seq_lens[:b] if seq_lens is None else seq_lens
    if block_tables.dtype != torch.int32 or seq_lens.dtype != torch.int32:
        raise ValueError("block_tables and seq_lens must be int32")
    if block_tables.stride(1) != 1:
        block_tables = block_tables.contiguous()
    if max_pages is None:
        max_pages = max((cache.num_tokens(i) - cache.config.sink_tokens) // p for i in range(b))
    kivi = cache.config.layout == "kivi"
    params = launch_params("decode_kivi" if kivi else "decode", d, p)
    # few pages in all (batch 1 up to 4K on the H100): one page a program and a split, so the
    # latency of one page rather than of two bounds the launch (attention_notes.md, version 18)
    short = kivi and b * h * max_pages <= SHORT_DECODE_PAGES
    # the shape class it is written for: the Gluon kernel (one warp, n = 8 tensor-core
    # columns), where the tuned table enables it (for short contexts too if it says so)
    gluon = (
        kivi
        and (not short or bool(params.get("gluon", {}).get("short", False)))
        and bool(params.get("GLUON", False))
        and gluon_decode_supports(d, p, cache.config.bits, hq // h)
        and q.is_cuda
        and gluon_decode_available()
    )
    if gluon:
        params = {**params, **params.get("gluon", {})}
    min_pages = 1 if short else params.get("min_pages", 1)
    splits = num_splits or choose_splits(
        b, h, max_pages, params.get("waves", 4), min_pages, max_splits=params.get("max_splits", 64)
    )
    if out is None:
        out = torch.empty((b, hq, 1, d), dtype=q.dtype, device=q.device)
    elif out.shape != q.shape or not out.is_contiguous():  # any float dtype
        raise ValueError(f"out must be a contiguous tensor of q's shape {tuple(q.shape)}")
    c = cache
    sinks = (c.k_sink, c.v_sink, c.k_sink.stride(0), c.k_sink.stride(1), c.k_sink.stride(2))
    opens = (c.k_open, c.v_open, c.k_open.stride(0), c.k_open.stride(1), c.k_open.stride(2))
    if gluon:
        return run_kivi_gluon_decode(
            q, out, seq_lens, block_tables, c.pages, sinks, opens, kv_heads=h,
            n_sink=c.config.sink_tokens, partition=p, bits=c.config.bits, sm_scale=sm_scale,
            num_splits=splits,
            maxnreg=params.get("maxnreg"), hoist_below=int(params.get("hoist_below", 0)),
        )  # fmt: skip
    if kivi:
        return run_kivi_attention(
            q, out, seq_lens, block_tables, block_tables.stride(0), c.pages, sinks, opens,
            kv_heads=h, n_sink=c.config.sink_tokens, partition=p, bits=c.config.bits,
            causal=False, sm_scale=sm_scale, decode=True, num_splits=splits,
            slots=1 if short else None,
        )  # fmt: skip
    return run_attention(
        q, out, seq_lens, block_tables, block_tables.stride(0),
        (c.k_codes, 0, c.k_codes.stride(0), c.k_codes.stride(1), c.k_codes.stride(2)),
        (c.k_mins, c.k_scales, c.k_sums, 0, c.k_mins.stride(0), c.k_mins.stride(1), c.k_mins.stride(2)),
        (c.v_codes, 0, c.v_codes.stride(0), c.v_codes.stride(1), c.v_codes.stride(2)),
        (c.v_mins, c.v_scales, c.v_sums, 0, c.v_mins.stride(0), c.v_mins.stride(1), c.v_mins.stride(2)),
        sinks, opens,
        kv_heads=h, n_sink=c.config.sink_tokens, partition=p, bits=c.config.bits,
        causal=False, sm_scale=sm_scale, decode=True, num_splits=splits,
    )  # fmt: skip


def warmup_decode(cache: PagedHackCache, q_heads: int, dtype: torch.dtype | None = None) -> None:
    """Compile every kernel variant decode_attention launches for this cache and query dtype
    (the one-page path of few pages, the tuned path of many, the Gluon kernel's two address
    variants and its merge, and the Triton merge in its two block sizes, which serve every
    split count), so that no later request compiles. Call once at start-up, before CUDA-graph
    capture; it attends zero queries over slot 0 as it stands and discards the result."""
    q = torch.zeros(
        (1, q_heads, 1, cache.head_dim),
        dtype=dtype or cache.k_open.dtype,
        device=cache.k_open.device,
    )
    # max_pages only sizes the grid: 1 takes the short path, SHORT_DECODE_PAGES + 1 the other
    for max_pages in (1, SHORT_DECODE_PAGES + 1):
        decode_attention(q, cache, max_pages=max_pages)
    # the Gluon kernel's two variants, which decode_attention picks by grid size
    gluon = launch_params("decode_kivi", cache.head_dim, cache.config.partition).get("gluon", {})
    hoist_below = int(gluon.get("hoist_below", 0))
    if hoist_below:
        for splits in (1, hoist_below // cache.kv_heads + 1):
            decode_attention(q, cache, max_pages=SHORT_DECODE_PAGES + 1, num_splits=splits)
    # and both merge block sizes, whatever split counts the tuned parameters gave above
    for parts in (1, COMBINE_SMALL_S + 1):
        part = q.new_zeros((1, q_heads, parts, cache.head_dim), dtype=torch.float32)
        ml = q.new_zeros((1, q_heads, parts, 2), dtype=torch.float32)
        combine_splits(part, ml, torch.empty_like(q))

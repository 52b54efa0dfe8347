"""Launching kivi_attn_kernel over KiviPages (prefill rows or decode split-K)."""

from __future__ import annotations

import math

import torch
import triton

from .kivi_kernel import kivi_attn_kernel
from .kivi_pages import KiviPages
from .launch import (
    LAST_COMPILED,
    LOG2E,
    _nonempty,
    combine_splits,
    interpreting,
    launch_params,
    program_layout,
)


def _bstride(t: torch.Tensor, batch: int) -> int:
    """Batch stride of a page array: 0 when one set of pages serves every sequence (paged cache)."""
    return 0 if t.shape[0] == 1 and batch > 1 else t.stride(0)


def run_kivi_attention(
    q: torch.Tensor,
    out: torch.Tensor,
    seq_lens: torch.Tensor,
    block_tables: torch.Tensor,
    bt_batch_stride: int,
    pages: KiviPages,
    sinks: tuple,
    opens: tuple,
    *,
    kv_heads: int,
    n_sink: int,
    partition: int,
    bits: int,
    causal: bool,
    sm_scale: float | None,
    decode: bool,
    num_splits: int = 1,
    slots: int | None = None,
) -> torch.Tensor:
    """Attention of q [B, Hq, M, D] over `pages` (tensors [B or 1, pages, H, ...], physical page
    ids from block_tables) plus 16-bit sinks / open tokens given as (k, v, s_batch, s_head,
    s_token). Decode (M == 1) splits the pages into num_splits partials merged afterwards;
    slots (1 or 2 pages an iteration) overrides the tuned choice."""
    sinks, opens = (tuple(_nonempty(t) for t in grp) for grp in (sinks, opens))
    b, hq, m, d = q.shape
    if q.stride(3) != 1:
        q = q.contiguous()
    g = hq // kv_heads
    scale = (sm_scale if sm_scale is not None else 1.0 / math.sqrt(d)) * LOG2E
    for name, t in pages.tensors().items():
        if t.numel() and t.stride(-1) != 1:
            raise ValueError(f"page array {name} must be contiguous in its last axis")
    # no closed pages: the kernel reads none, but needs pointers with storage
    pages = KiviPages(**{
        n: t if t.numel() else t.new_empty((1,) * t.dim()) for n, t in pages.tensors().items()
    })  # fmt: skip
    kc, km, ks = pages.k_codes, pages.k_mins, pages.k_scales
    vc, vm, vs, vcs = pages.v_codes, pages.v_mins, pages.v_scales, pages.v_colsums
    page_args = (
        kc, _bstride(kc, b), kc.stride(1), kc.stride(2), kc.stride(3),
        km, ks, _bstride(km, b), km.stride(1), km.stride(2),
        vc, _bstride(vc, b), vc.stride(1), vc.stride(2), vc.stride(3),
        vm, vs, _bstride(vm, b), vm.stride(1), vm.stride(2), vm.stride(3),
        vcs, _bstride(vcs, b), vcs.stride(1), vcs.stride(2),
    )  # fmt: skip
    consts = dict(
        D=d, PART=partition, BITS=bits, E=triton.cdiv(d, partition), W=min(partition, d),
        INTERP=interpreting(), BLOCK16=16,
    )  # fmt: skip
    kind = "decode_kivi" if decode else "prefill_kivi"
    params = launch_params(kind, d, partition)
    # decode: SLOTS pages per iteration in separate row slots, each slot its own partial
    want = params.get("SLOTS", 1) if slots is None else slots
    slots = 2 if decode and want == 2 and g * consts["E"] <= 8 else 1
    params, grid, o_args, ml_args, shape, nhg, parts, part, ml = program_layout(
        q, out, kv_heads, kind, d, partition, causal, decode, num_splits * slots,
        copies=consts["E"] * slots,
    )  # fmt: skip
    grid = (grid[0], grid[1], num_splits if decode else 1)
    num_splits = num_splits if decode else 1
    launch = {k: v for k, v in params.items() if k in ("num_warps", "num_stages")}
    # code tiles (kivi_kernel: UNPACK); K by D-planes needs planes of >= 32 channels (the
    # smallest int8 product); packed-PTX plane extraction on the GPU, shifts in the interpreter
    unpack = 2 if int(params.get("UNPACK", 2)) >= 2 and d * bits // 8 >= 32 else 1
    launch["UNPACK"] = unpack
    launch["ASM"] = not consts["INTERP"] and bool(params.get("ASM", True))
    launch["SLOTS"] = slots
    launch["enable_fp_fusion"] = bool(params.get("FP_FUSION", True))
    if params.get("maxnreg") and not consts["INTERP"]:
        launch["maxnreg"] = int(params["maxnreg"])  # register cap: occupancy against spills
    compiled = kivi_attn_kernel[grid](
        q, q.stride(0), q.stride(1), q.stride(2),
        *o_args, *ml_args,
        seq_lens, block_tables, bt_batch_stride,
        *page_args, *sinks, *opens,
        m, n_sink, num_splits, nhg, g, block_tables.shape[-1], scale,
        **consts, **shape, **launch,
    )  # fmt: skip
    LAST_COMPILED[(kind, d, partition)] = compiled
    if decode:
        combine_splits(part, ml, out)
    return out

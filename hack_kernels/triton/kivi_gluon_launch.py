"""Launching kivi_gluon_decode_kernel: closed pages on one warp per program, then the split
merge, which also attends the 16-bit sinks and open page (merge_16bit.py)."""

from __future__ import annotations

import functools
import math

import torch

from .kivi_launch import _bstride
from .kivi_pages import KiviPages
from .launch import (
    COMBINE_BLOCK_D,
    COMBINE_BLOCK_S,
    COMBINE_SMALL_S,
    LAST_COMPILED,
    LOG2E,
    _nonempty,
    interpreting,
)
from .merge_16bit import combine_with_16bit_kernel


@functools.cache
def gluon_decode_available() -> bool:
    """Gluon kernels run on NVIDIA GPUs of compute capability 8.0 or newer (mma.sync int8);
    never under the CPU interpreter. Answered once per process: decode asks at every step."""
    if interpreting() or not torch.cuda.is_available():
        return False
    if torch.version.hip is not None or torch.cuda.get_device_capability() < (8, 0):
        return False
    try:
        from . import kivi_gluon  # noqa: F401
    except ImportError:  # a Triton without Gluon
        return False
    return True


def gluon_decode_supports(head_dim: int, partition: int, bits: int, group: int) -> bool:
    """The shape class kivi_gluon_decode_kernel is written for: partition 64 (V planes of 16 or
    32 tokens), n = 8 columns for G heads x head_dim / 64 channel groups."""
    return (
        head_dim in (64, 128) and partition == 64 and bits in (2, 4) and group * head_dim // 64 <= 8
    )


def run_kivi_gluon_decode(
    q: torch.Tensor,
    out: torch.Tensor,
    seq_lens: torch.Tensor,
    block_tables: torch.Tensor,
    pages: KiviPages,
    sinks: tuple,
    opens: tuple,
    *,
    kv_heads: int,
    n_sink: int,
    partition: int,
    bits: int,
    sm_scale: float | None,
    num_splits: int,
    maxnreg: int | None = None,
    hoist_below: int = 0,
) -> torch.Tensor:
    """Decode of q [B, Hq, 1, D] over the cache's kivi pages (physical page ids from
    block_tables [B, pages], lengths seq_lens [B]); sinks / opens = (k, v, s_batch, s_head,
    s_token) of the 16-bit tokens. num_splits partials of closed pages, merged by a kernel that
    first attends the 16-bit tokens itself (merge_16bit.py).
    Grids of at most hoist_below programs run the kernel's HOIST variant (row addresses kept in
    registers: fewer instructions, lower occupancy)."""
    from .kivi_gluon import kivi_gluon_decode_kernel

    b, hq, _, d = q.shape
    if q.stride(3) != 1:
        q = q.contiguous()
    g = hq // kv_heads
    e = d // partition
    scale = (sm_scale if sm_scale is not None else 1.0 / math.sqrt(d)) * LOG2E
    sinks, opens = (tuple(_nonempty(t) for t in grp) for grp in (sinks, opens))
    num_splits = nparts = max(num_splits, 1)  # an empty split writes an empty partial
    part = torch.empty((b, hq, nparts, d), dtype=torch.float32, device=q.device)
    ml = torch.empty((b, hq, nparts, 2), dtype=torch.float32, device=q.device)
    for name, t in pages.tensors().items():
        # a page's data per kv head contiguous: the kernel's offsets in it are constants
        if t.numel() and not t.is_contiguous() and not t[0, 0, 0].is_contiguous():
            raise ValueError(f"page array {name} must be contiguous within a page and head")
    kc, km, ks = pages.k_codes, pages.k_mins, pages.k_scales
    vc, vm, vs = pages.v_codes, pages.v_mins, pages.v_scales
    launch = {"num_warps": 1}
    if maxnreg:
        launch["maxnreg"] = int(maxnreg)
    hoist = b * kv_heads * num_splits <= hoist_below
    compiled = kivi_gluon_decode_kernel[(b * kv_heads, num_splits)](
        q, q.stride(0), q.stride(1), part, ml, nparts,
        seq_lens, block_tables, block_tables.stride(0),
        kc, _bstride(kc, b), kc.stride(1), kc.stride(2),
        km, ks, _bstride(km, b), km.stride(1), km.stride(2),
        vc, _bstride(vc, b), vc.stride(1), vc.stride(2),
        vm, vs, _bstride(vm, b), vm.stride(1), vm.stride(2),
        n_sink, num_splits, kv_heads, scale,
        D=d, PART=partition, G=g, E=e, BITS=bits, HOIST=hoist, **launch,
    )  # fmt: skip
    LAST_COMPILED[("decode_kivi_gluon", d, partition)] = compiled
    block_d = min(d, COMBINE_BLOCK_D)
    combine_with_16bit_kernel[(b * hq, d // block_d)](
        part, ml, out, nparts, q, q.stride(0), q.stride(1), seq_lens,
        *sinks, *opens, n_sink, hq, g, scale,
        D=d, PART=partition, BLOCK_D=block_d,
        BLOCK_S=COMBINE_SMALL_S if nparts <= COMBINE_SMALL_S else COMBINE_BLOCK_S, BLOCK16=16,
    )  # fmt: skip
    return out

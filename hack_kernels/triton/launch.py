"""Launching hack_attn_kernel: stride plumbing and tuned launch parameters per shape class."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch
import triton

from .attention_kernel import combine_splits_kernel, hack_attn_kernel
from .decode_kernel import hack_decode_slots_kernel, slots_for

LOG2E = 1.4426950408889634


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# Launch parameters per shape class (key: (kind, head_dim, partition)), from the sweep that
# benchmarks/attention.py runs on the H100 and saves to tuned_h100.json; a missing entry gets
# DEFAULTS. Parameters are runtime choices, so nothing compiles on the hot path after warm-up.
TUNED_FILE = Path(__file__).with_name("tuned_h100.json")


def _load_tuned() -> dict[tuple, dict]:
    if not TUNED_FILE.exists():
        return {}
    out = {}
    for key, val in json.loads(TUNED_FILE.read_text()).items():
        kind, d, p = key.split("|")
        out[(kind, int(d), int(p))] = val
    return out


TUNED: dict[tuple, dict] = _load_tuned()
# The last compiled attention kernel per shape class (registers, spills: for the benchmark's notes).
LAST_COMPILED: dict[tuple, object] = {}
DEFAULTS = {
    "prefill": {"BLOCK_P": 64, "num_warps": 4, "num_stages": 1, "PREFETCH": False, "DOT16": False},
    "decode": {"num_warps": 4, "num_stages": 1, "waves": 4, "PREFETCH": False, "DOT16": False},
    "quantize": {"BLOCK_R": 64, "num_warps": 4},
    "quantize_kivi": {"BLOCK_D": 64, "k_warps": 1, "BLOCK_T": 16, "v_warps": 2},
    "decode_kivi": {
        "num_warps": 2,
        "num_stages": 1,
        "waves": 32,
        "min_pages": 2,
        "UNPACK": 2,
        "SLOTS": 2,
    },  # fmt: skip
    "prefill_kivi": {"BLOCK_P": 32, "num_warps": 4, "num_stages": 1, "UNPACK": 2},
}


# tests flip these to cover every decode kernel under the interpreter
SLOTS_INTERP = 4
KIVI_UNPACK_INTERP = 2  # kivi_kernel's UNPACK: 1 joined plane tiles, 2 K by D-planes
KIVI_SLOTS_INTERP = 1


def _nonempty(t):
    """Empty tensors may have no storage; the kernel never reads them, but needs a pointer.
    torch.empty, not zeros: a fill is a kernel launch (about 1 us of GPU time in every decode
    call without sinks on the H100, device_decode_breakdown.py)."""
    if isinstance(t, torch.Tensor) and t.numel() == 0:
        return torch.empty(1, dtype=t.dtype, device=t.device)
    return t


# channels per program of the split-K merge: 32 gives batch 1 four programs per query row, which
# shortened the merge's tail (b1 4K 10.6 -> 9.7 us on the H100) and cost nothing at batch 16
# (device_decode_breakdown.py, attention_notes.md version 22)
COMBINE_BLOCK_D = 32
# partials a merge step reads: two sizes, so two compiled merges serve every split count (128:
# up to 64 splits of two slots in one step; 16 for the few splits of short contexts, where the
# merge's latency is much of the call's; b1 1K measured 7.4-7.7 us either way on the H100, within
# run-to-run noise: attention_notes.md version 25)
COMBINE_BLOCK_S = 128
COMBINE_SMALL_S = 16


def combine_splits(part: torch.Tensor, ml: torch.Tensor, out: torch.Tensor) -> None:
    """out [B, Hq, 1, D] from split-K partials part [B, Hq, S, D] and (m, l) in ml [B, Hq, S, 2]."""
    b, hq, parts, d = part.shape
    block_d = min(d, COMBINE_BLOCK_D)
    block_s = COMBINE_SMALL_S if parts <= COMBINE_SMALL_S else COMBINE_BLOCK_S
    combine_splits_kernel[(b * hq, d // block_d)](
        part, ml, out, parts, D=d, BLOCK_D=block_d, BLOCK_S=block_s
    )


def launch_params(kind: str, head_dim: int, partition: int) -> dict:
    if interpreting():
        small = {
            "prefill": {"BLOCK_P": 16, "PREFETCH": False, "DOT16": False},
            "decode": {
                "waves": 1,
                "PREFETCH": True,
                "DOT16": True,
                "SLOTS": SLOTS_INTERP,
            },  # fmt: skip
            "quantize": {"BLOCK_R": 64},
            "quantize_kivi": {"BLOCK_D": 32, "BLOCK_T": 16, "k_warps": 4, "v_warps": 4},
            "decode_kivi": {
                "waves": 1,
                "min_pages": 1,
                "UNPACK": KIVI_UNPACK_INTERP,
                "SLOTS": KIVI_SLOTS_INTERP,
            },  # fmt: skip
            "prefill_kivi": {"BLOCK_P": 16, "UNPACK": KIVI_UNPACK_INTERP},
        }
        return {"num_warps": 4, "num_stages": 1, **small[kind]}
    return {**DEFAULTS[kind], **TUNED.get((kind, head_dim, partition), {})}


def group_width(head_dim: int, partition: int) -> int:
    """Elements of one D-partition that hold data (a partition wider than head_dim is one short
    group)."""
    return min(partition, head_dim)


def run_attention(
    q: torch.Tensor,
    out: torch.Tensor,
    seq_lens: torch.Tensor,
    block_tables: torch.Tensor,
    bt_batch_stride: int,
    k_codes: tuple,
    k_meta: tuple,
    v_codes: tuple,
    v_meta: tuple,
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
) -> torch.Tensor:
    """k_codes = (tensor, s_batch, s_page, s_head, s_token); k_meta = (mins, scales, sums, s_batch,
    s_page, s_head, s_token); v_codes = (tensor, s_batch, s_page, s_head, s_channel); v_meta alike;
    sinks / opens = (k, v, s_batch, s_head, s_token)."""
    k_codes, k_meta, v_codes, v_meta, sinks, opens = (
        tuple(_nonempty(t) for t in grp) for grp in (k_codes, k_meta, v_codes, v_meta, sinks, opens)
    )
    b, hq, m, d = q.shape
    if q.stride(3) != 1:
        q = q.contiguous()
    g = hq // kv_heads
    scale = (sm_scale if sm_scale is not None else 1.0 / math.sqrt(d)) * LOG2E
    interp = interpreting()
    gw = group_width(d, partition)
    common = dict(D=d, PART=partition, BITS=bits, GW=gw, INTERP=interp, BLOCK16=16)
    params, grid, o_args, ml_args, shape, nhg, num_splits, part, ml = program_layout(
        q, out, kv_heads, "decode" if decode else "prefill", d, partition, causal, decode,
        num_splits, copies=1,
    )  # fmt: skip
    launch = {k: v for k, v in params.items() if k in ("num_warps", "num_stages")}
    slots = slots_for(g, int(params.get("SLOTS", 1))) if decode else 1
    if slots > 1:
        return _run_decode_slots(
            q, out, seq_lens, block_tables, bt_batch_stride, k_codes, k_meta, v_codes, v_meta,
            sinks, opens, kv_heads, n_sink, num_splits, scale, slots, common, launch,
        )  # fmt: skip
    launch["PREFETCH"] = bool(params.get("PREFETCH", False))
    launch["DOT16"] = bool(params.get("DOT16", False))
    compiled = hack_attn_kernel[grid](
        q, q.stride(0), q.stride(1), q.stride(2),
        *o_args, *ml_args,
        seq_lens, block_tables, bt_batch_stride,
        *k_codes, *k_meta, *v_codes, *v_meta, *sinks, *opens,
        m, n_sink, num_splits, nhg, g, scale,
        **common, **shape, **launch,
    )  # fmt: skip
    LAST_COMPILED[("decode" if decode else "prefill", d, partition)] = compiled
    if decode:
        combine_splits(part, ml, out)
    return out


def program_layout(
    q: torch.Tensor, out: torch.Tensor, kv_heads: int, kind: str, d: int, partition: int,
    causal: bool, decode: bool, num_splits: int, copies: int,
):  # fmt: skip
    """Grid, output arguments and row shape of an attention kernel: decode programs own a kv
    head's GQA group (split-K partials); prefill programs BLOCK_P positions of one q head.
    `copies` row copies per query row (the kivi kernel's V channel groups)."""
    b, hq, m, _ = q.shape
    g = hq // kv_heads
    params = launch_params(kind, d, partition)
    part = ml = None
    if decode:
        part = torch.empty((b, hq, num_splits, d), dtype=torch.float32, device=q.device)
        ml = torch.empty((b, hq, num_splits, 2), dtype=torch.float32, device=q.device)
        grid = (1, b * kv_heads, num_splits)
        o_args = (part, part.stride(0), part.stride(1), 0, part.stride(2))
        ml_args = (ml, ml.stride(0), ml.stride(1), ml.stride(2))
        rows = max(16, triton.next_power_of_2(g * copies))
        shape = dict(GR=g, BLOCK_P=1, ROWS=rows, CAUSAL=False, SPLIT=True)
        return params, grid, o_args, ml_args, shape, kv_heads, num_splits, part, ml
    bp = params.get("BLOCK_P", 64)
    grid = (triton.cdiv(m, bp), b * hq, 1)
    o_args = (out, out.stride(0), out.stride(1), out.stride(2), 0)
    ml_args = (out, 0, 0, 0)
    shape = dict(GR=1, BLOCK_P=bp, ROWS=max(16, bp * copies), CAUSAL=causal, SPLIT=False)
    return params, grid, o_args, ml_args, shape, hq, 1, part, ml


def _run_decode_slots(
    q, out, seq_lens, block_tables, bt_stride, k_codes, k_meta, v_codes, v_meta, sinks, opens,
    kv_heads, n_sink, num_splits, scale, slots, common, launch,
):  # fmt: skip
    b, hq, _, d = q.shape
    parts = num_splits * slots
    part = torch.empty((b, hq, parts, d), dtype=torch.float32, device=q.device)
    ml = torch.empty((b, hq, parts, 2), dtype=torch.float32, device=q.device)
    kc, _, kc_p, kc_h, kc_t = k_codes
    km, ks, ku, _, km_p, km_h, km_t = k_meta
    vc, _, vc_p, vc_h, vc_d = v_codes
    vm, vs, vu, _, vm_p, vm_h, vm_d = v_meta
    common = {k: v for k, v in common.items() if k in ("D", "PART", "BITS", "GW", "INTERP")}
    launch = {k: v for k, v in launch.items() if k in ("num_warps", "num_stages")}
    compiled = hack_decode_slots_kernel[(b * kv_heads, num_splits)](
        q, q.stride(0), q.stride(1), part, ml, seq_lens, block_tables, bt_stride,
        kc, kc_p, kc_h, kc_t, km, ks, ku, km_p, km_h, km_t,
        vc, vc_p, vc_h, vc_d, vm, vs, vu, vm_p, vm_h, vm_d,
        *sinks, *opens, n_sink, num_splits, kv_heads, hq, scale,
        G=hq // kv_heads, SLOTS=slots, **common, **launch,
    )  # fmt: skip
    LAST_COMPILED[("decode", d, common["PART"])] = compiled
    combine_splits(part, ml, out)
    return out


def choose_splits(
    batch: int,
    kv_heads: int,
    max_pages: int,
    waves: int = 4,
    min_pages: int = 1,
    sms: int = 132,
    max_splits: int = 64,
) -> int:
    """Split-K factor: about `waves` programs per multiprocessor, at least `min_pages` pages a
    split (each split pays Q quantization and a partial to merge), at most `max_splits`."""
    if max_pages <= 0:
        return 1
    want = triton.cdiv(waves * sms, batch * kv_heads)
    return int(max(1, min(want, max_pages // max(1, min_pages), max_splits)))

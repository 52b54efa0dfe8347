"""Shared by the kernel tests: the device they run on, the tolerance and the output check."""

from __future__ import annotations

import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = 1e-3  # relative error (norm) against reference_attention of the same quantization


def rel_written(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative error of a against b; fails if a holds NaN (the poison of an unwritten output)."""
    a, b = a.double().cpu(), b.double().cpu()
    assert torch.isfinite(a).all(), "unwritten (NaN-poisoned) or non-finite output"
    return float((a - b).norm() / b.norm())


def filled_cache(cfg, lens: list[int], kv_heads: int, head_dim: int, dtype, make_kv, gen):
    """A PagedHackCache holding one sequence per entry of `lens` (prefill loads), then 3 decode
    appends to all of them; returns it with the QuantizedKV of every sequence, appended alike.
    make_kv(gen, batch, heads, tokens, head_dim, dtype) -> (k, v)."""
    from hack_kernels import quantize_kv
    from hack_kernels.triton.paged_cache import PagedHackCache

    n = len(lens)
    cache = PagedHackCache(cfg, 16, n, kv_heads, head_dim, 8, dtype=dtype, device=DEVICE)
    qkvs = []
    for i, t in enumerate(lens):
        k, v = make_kv(gen, 1, kv_heads, t, head_dim, dtype)
        qkvs.append(quantize_kv(k, v, cfg))
        cache.load(i, qkvs[i].to(DEVICE))
    for _ in range(3):
        kn, vn = make_kv(gen, n, kv_heads, 1, head_dim, dtype)
        cache.append(kn.to(DEVICE), vn.to(DEVICE))
        for i in range(n):
            qkvs[i].append(kn[i : i + 1], vn[i : i + 1])
    return cache, qkvs


def assert_decode_matches(cache, qkvs, q: torch.Tensor) -> None:
    """decode_attention of q [n, Hq, 1, D] over the cache, with 1 and 3 splits, against
    reference_attention of each sequence's QuantizedKV (float32 output: no rounding)."""
    from hack_kernels import reference_attention
    from hack_kernels.triton.decode import decode_attention

    n, hq, _, d = q.shape
    for splits in (1, 3):
        out = torch.full((n, hq, 1, d), float("nan"), device=DEVICE)
        decode_attention(q.to(DEVICE), cache, num_splits=splits, out=out)
        for i in range(n):
            ref = reference_attention(q[i : i + 1], qkvs[i])
            assert rel_written(out[i : i + 1], ref) <= TOL, (i, splits)

"""The split-K merge (launch.combine_splits) against float64 math, and decode warm-up: after
warmup_decode, decode of any batch and length compiles nothing (GPU; the interpreter compiles
nothing anyway, so there only the warm-up call itself is checked)."""

from __future__ import annotations

import pytest
import torch

from hack_kernels import HackConfig, quantize_kv
from hack_kernels.triton import launch
from hack_kernels.triton.attention_kernel import combine_splits_kernel
from hack_kernels.triton.decode import decode_attention, warmup_decode
from hack_kernels.triton.kivi_kernel import kivi_attn_kernel
from hack_kernels.triton.merge_16bit import combine_with_16bit_kernel
from hack_kernels.triton.paged_cache import PagedHackCache

from .helpers import DEVICE


def merged_f64(part: torch.Tensor, ml: torch.Tensor) -> torch.Tensor:
    """sum_s 2^(m_s - max m) acc_s / sum_s 2^(m_s - max m) l_s, in float64."""
    part, ml = part.double(), ml.double()
    m, lsum = ml[..., 0], ml[..., 1]
    w = torch.exp2(m - m.amax(-1, keepdim=True))
    w = torch.where(torch.isinf(m), torch.zeros_like(w), w)
    return (part * w[..., None]).sum(-2) / (lsum * w).sum(-1)[..., None]


# split counts around the merge's blocks (launch.COMBINE_SMALL_S 16, COMBINE_BLOCK_S 128; 64 in
# one case): one block, one less, one more, several
@pytest.mark.parametrize("splits,block", [(1, 128), (16, 128), (17, 128), (127, 128), (128, 128),
                                          (129, 128), (130, 64), (300, 128)])  # fmt: skip
@pytest.mark.parametrize("d", [64, 128])
def test_merge_matches_float64(splits, block, d, monkeypatch):
    monkeypatch.setattr(launch, "COMBINE_BLOCK_S", block)
    gen = torch.Generator().manual_seed(splits * 7 + d)
    b, hq = 2, 3
    part = torch.randn(b, hq, splits, d, generator=gen)
    m = torch.randn(b, hq, splits, generator=gen) * 4
    lsum = torch.rand(b, hq, splits, generator=gen) * 10 + 0.1
    if splits > 1:  # splits that saw no page: m = -inf, l = 0, zeros (as the kernels write them)
        empty = torch.rand(b, hq, splits, generator=gen) < 0.3
        empty[..., 0] = False
        m[empty], lsum[empty] = -float("inf"), 0.0
        part[empty] = 0.0
    ml = torch.stack([m, lsum], -1)
    out = torch.full((b, hq, 1, d), float("nan"), device=DEVICE)
    launch.combine_splits(part.to(DEVICE).contiguous(), ml.to(DEVICE).contiguous(), out)
    want = merged_f64(part, ml)
    got = out[:, :, 0].double().cpu()
    assert torch.isfinite(got).all()
    assert float((got - want).norm() / want.norm()) <= 1e-6


def _cache(cfg: HackConfig, lens: list[int], h: int, d: int) -> PagedHackCache:
    pages = max(t // cfg.partition for t in lens) + 1
    cache = PagedHackCache(cfg, len(lens) * pages, len(lens), h, d, pages, device=DEVICE)
    gen = torch.Generator().manual_seed(sum(lens))
    for i, t in enumerate(lens):
        k = torch.randn(1, h, t, d, generator=gen).half()
        v = torch.randn(1, h, t, d, generator=gen).half()
        cache.load(i, quantize_kv(k, v, cfg).to(DEVICE))
    return cache


def test_warmup_decode_runs_and_leaves_the_cache_alone():
    cfg = HackConfig(layout="kivi", partition=32)
    cache = _cache(cfg, [70], 1, 64)
    before = [t.clone() for t in cache.pages.tensors().values()]
    warmup_decode(cache, 2, torch.float16)
    after = list(cache.pages.tensors().values())
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))


def _compiled() -> int:
    """Compiled variants of the decode kernels on this device (Triton's per-device cache),
    the Gluon one and its merge included."""
    from hack_kernels.triton.kivi_gluon import kivi_gluon_decode_kernel

    dev = torch.cuda.current_device()
    kernels = (
        kivi_attn_kernel,
        combine_splits_kernel,
        kivi_gluon_decode_kernel,
        combine_with_16bit_kernel,
    )
    return sum(len(k.device_caches[dev][0]) for k in kernels)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="compilation needs CUDA")
def test_nothing_compiles_after_warmup():
    cfg = HackConfig(layout="kivi")  # partition 64, the default
    h, d, hq = 8, 128, 32
    lens = [5000, 1, 64, 65, 700, 9000]  # short and long paths, ragged
    cache = _cache(cfg, lens, h, d)
    warmup_decode(cache, hq, torch.float16)
    n = _compiled()
    for b in range(1, len(lens) + 1):
        for max_pages in (None, 1):  # the tuned split count and the short path
            q = torch.randn(b, hq, 1, d, device=DEVICE).half()
            decode_attention(q, cache, max_pages=max_pages)
            decode_attention(q, cache, num_splits=b * 37 % 97 + 1)
    torch.cuda.synchronize()
    assert _compiled() == n

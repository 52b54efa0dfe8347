"""The kivi-layout Triton kernel (prefill rows and paged decode) and its decode pages.

Outputs are checked against reference_attention over the same QuantizedKV (relative error
<= 1e-3, NaN-poisoned outputs); page contents against a numpy decoding of the canonical codes
written here (planar bit order re-derived from its definition). Small shapes for the interpreter.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import hack_kernels.triton.decode as decode_module
from hack_kernels import HackConfig, layout, quantize_kv, reference_attention
from hack_kernels.triton import launch
from hack_kernels.triton.paged_cache import PagedHackCache, _batch_item
from hack_kernels.triton.prefill import attend_quantized, prefill_attention
from tests.core.oracle import np_unpack
from tests.kernels.helpers import (
    DEVICE,
    TOL,
    assert_decode_matches,
    filled_cache,
    rel_written,
)

pytestmark = pytest.mark.filterwarnings("ignore:divide by zero:RuntimeWarning")


def _kv(gen, b, h, t, d, dtype):
    # outlier channels in K, as real keys have (what the kivi layout is for)
    k = torch.randn(b, h, t, d, generator=gen) * (1 + 5 * (torch.rand(d, generator=gen) > 0.9))
    v = torch.randn(b, h, t, d, generator=gen)
    return k.to(dtype), v.to(dtype)


def np_planar_unpack(packed: np.ndarray, bits: int) -> np.ndarray:
    """Element e of a run of n lives in byte e % (n / per) at bit (e // (n / per)) * bits."""
    per, nb = 8 // bits, packed.shape[-1]
    out = np.empty(packed.shape[:-1] + (nb * per,), dtype=np.int64)
    for e in range(nb * per):
        out[..., e] = (packed[..., e % nb].astype(np.int64) >> ((e // nb) * bits)) & (
            (1 << bits) - 1
        )
    return out


def test_planar_packing_known_answer_and_round_trip():
    # 2-bit run of 8: byte i holds elements i, i+2, i+4, i+6
    codes = torch.tensor([[0, 1, 2, 3, 3, 2, 1, 0]])
    want = [0 | 2 << 2 | 3 << 4 | 1 << 6, 1 | 3 << 2 | 2 << 4 | 0 << 6]
    assert layout.pack_planar(codes, 2).tolist() == [want]
    gen = torch.Generator().manual_seed(1)
    for bits in (2, 4, 8):
        c = torch.randint(0, 1 << bits, (3, 5, 64), generator=gen)
        packed = layout.pack_planar(c, bits)
        assert packed.shape[-1] == 64 * bits // 8
        assert np.array_equal(np_planar_unpack(packed.numpy(), bits), c.numpy())
        assert torch.equal(layout.unpack_planar(packed, bits).long(), c)


PREFILL_CASES = [
    # (head_dim, partition, tokens, q_len, sinks, q_heads, kv_heads, dtype, causal, bits)
    (64, 64, 130, 130, 0, 4, 2, torch.float16, True, 2),
    (128, 64, 200, 1, 4, 8, 2, torch.float16, True, 2),
    (128, 32, 97, 5, 2, 2, 1, torch.bfloat16, True, 2),
    (64, 128, 300, 40, 0, 2, 2, torch.float16, True, 2),
    (64, 32, 33, 33, 1, 1, 1, torch.float16, False, 4),
    (64, 64, 1, 1, 0, 2, 1, torch.float16, True, 2),
    (128, 64, 63, 63, 0, 2, 1, torch.float16, True, 2),
]


@pytest.mark.parametrize("case", PREFILL_CASES)
def test_kivi_prefill_matches_reference(case, monkeypatch):
    monkeypatch.setattr(launch, "KIVI_UNPACK_INTERP", 1 + PREFILL_CASES.index(case) % 2)
    d, p, t, m, sinks, hq, hk, dtype, causal, bits = case
    gen = torch.Generator().manual_seed(d + p + t + m)
    cfg = HackConfig(bits=bits, partition=p, sink_tokens=sinks, layout="kivi")
    k, v = _kv(gen, 1, hk, t, d, dtype)
    q = torch.randn(1, hq, m, d, generator=gen).to(dtype)
    qkv = quantize_kv(k, v, cfg)
    ref = reference_attention(q, qkv, causal=causal)
    if m == t:  # prefill_attention quantizes K and V itself
        out = torch.full((1, hq, m, d), float("nan"), device=DEVICE)
        got, qkv_dev = prefill_attention(
            q.to(DEVICE), k.to(DEVICE), v.to(DEVICE), cfg, causal=causal, mode="hack", out=out
        )
        assert got is out and qkv_dev.num_closed == qkv.num_closed
    else:  # the last m positions attend over a longer prefix
        got = torch.full((1, hq, m, d), float("nan"), device=DEVICE)
        attend_quantized(q.to(DEVICE), qkv.to(DEVICE), causal=causal, out=got)
    assert rel_written(got, ref) <= TOL


def _check_pages(cache: PagedHackCache, slot: int, k_q, v_q) -> None:
    """The cache's pages of `slot` hold the closed tokens of k_q, v_q (batch 1), decoded
    independently."""
    pages, p, bits = cache._pages[slot], cache.config.partition, cache.config.bits
    c = v_q.shape[2]
    assert len(pages) == c // p
    if not pages:
        return
    h, d = cache.kv_heads, cache.head_dim
    pg = cache.pages
    # K: canonical [H, D, G, p] tokens per channel; pages [n, H, p, D/per] planar along D
    k_want = np_unpack(k_q.codes[0], bits).reshape(h, d, c)
    k_got = np_planar_unpack(pg.k_codes[0, pages].cpu().numpy(), bits)  # [n, H, p, D]
    assert np.array_equal(k_got.transpose(1, 3, 0, 2).reshape(h, d, c), k_want)
    # V: canonical [H, C, E, w] per token along D; pages [n, H, D, p/per] planar along tokens
    v_want = np_unpack(v_q.codes[0], bits).reshape(h, c, -1)[..., :d]
    v_got = np_planar_unpack(pg.v_codes[0, pages].cpu().numpy(), bits)  # [n, H, D, p]
    assert np.array_equal(v_got.transpose(1, 0, 3, 2).reshape(h, c, d), v_want)
    colsum = v_want.reshape(h, -1, p, d).sum(2).transpose(1, 0, 2)  # [n, H, D]
    assert np.array_equal(pg.v_colsums[0, pages].cpu().numpy().astype(np.int64), colsum)
    assert torch.equal(pg.k_scales[0, pages].cpu(), k_q.scales[0].permute(2, 0, 1))
    e = v_q.num_groups
    v_mins = v_q.mins[0].reshape(h, -1, p, e).transpose(0, 1)
    assert torch.equal(pg.v_mins[0, pages].cpu(), v_mins)


DECODE_CASES = [
    # (head_dim, partition, sinks, prompt lengths (ragged), q_heads, kv_heads, dtype, bits)
    (64, 32, 2, [1, 33, 70], 4, 2, torch.float16, 2),  # 33 + 2 appends closes a page at 32+2
    (128, 64, 0, [127, 5], 8, 2, torch.float16, 2),  # 127 -> 128 closes a page during append
    (64, 128, 0, [126, 129], 8, 2, torch.bfloat16, 2),
    (128, 32, 4, [3, 66], 1, 1, torch.float16, 4),  # fewer tokens than sinks; 4-bit
    (64, 32, 0, [200, 97], 4, 2, torch.float16, 2),  # 6 and 3 pages: 2 a split at 3 splits
]


@pytest.mark.parametrize("unpack,slots", [(1, 1), (1, 2), (2, 1), (2, 2)])
@pytest.mark.parametrize("case", DECODE_CASES)
def test_kivi_decode_matches_reference(case, unpack, slots, monkeypatch):
    # unpack 1: plane tiles joined in permuted column order; 2: K by D-planes where they hold
    # >= 32 channels; slots 2: two pages per iteration (G * E <= 8)
    monkeypatch.setattr(launch, "KIVI_UNPACK_INTERP", unpack)
    monkeypatch.setattr(launch, "KIVI_SLOTS_INTERP", slots)
    # these caches are small enough for the short-context path (one page a program): slots 1
    # takes it, slots 2 keeps the tuned two-page path
    monkeypatch.setattr(decode_module, "SHORT_DECODE_PAGES", 512 if slots == 1 else -1)
    # the split merge by whole rows (unpack 2) or by 32-channel blocks (unpack 1)
    monkeypatch.setattr(launch, "COMBINE_BLOCK_D", 128 if unpack == 2 else 32)
    d, p, sinks, lens, hq, hk, dtype, bits = case
    gen = torch.Generator().manual_seed(d * 7 + p + bits)
    cfg = HackConfig(bits=bits, partition=p, sink_tokens=sinks, layout="kivi")
    cache, qkvs = filled_cache(cfg, lens, hk, d, dtype, _kv, gen)
    for i in range(len(lens)):
        _check_pages(cache, i, qkvs[i].k_q, qkvs[i].v_q)
    assert_decode_matches(cache, qkvs, torch.randn(len(lens), hq, 1, d, generator=gen).to(dtype))


def test_kivi_stochastic_pages_match_quantize_kv():
    gen = torch.Generator().manual_seed(9)
    cfg = HackConfig(partition=32, rounding="stochastic", seed=3, layout="kivi")
    k, v = _kv(gen, 2, 1, 31, 64, torch.float16)
    cache = PagedHackCache(cfg, 4, 2, 1, 64, 2, device=DEVICE)
    for i in range(2):
        cache.load(i, quantize_kv(k[i : i + 1], v[i : i + 1], cfg).to(DEVICE))
    kn, vn = _kv(gen, 2, 1, 1, 64, torch.float16)
    cache.append(kn.to(DEVICE), vn.to(DEVICE))  # closes one page per slot (slot = batch index)
    whole = quantize_kv(torch.cat([k, kn], 2), torch.cat([v, vn], 2), cfg)
    for i in range(2):
        _check_pages(cache, i, _batch_item(whole.k_q, i), _batch_item(whole.v_q, i))

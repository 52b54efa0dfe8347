"""Triton HACK attention (prefill and paged decode) against reference_attention.

Same quantization on both sides: the kernels' output must be within 1e-3 relative error (norm)
of reference_attention over the same QuantizedKV. Outputs are poisoned with NaN first, so an
unwritten element fails. Under TRITON_INTERPRET=1 (CI) the shapes are small.
"""

from __future__ import annotations

import pytest
import torch

from hack_kernels import HackConfig, quantize_kv, reference_attention
from hack_kernels.triton import launch
from hack_kernels.triton.paged_cache import PagedHackCache
from hack_kernels.triton.prefill import prefill_attention
from tests.kernels.helpers import (
    DEVICE,
    TOL,
    assert_decode_matches,
    filled_cache,
    rel_written,
)

# the interpreter evaluates both sides of where(s > 0, 1 / s, 0)
pytestmark = pytest.mark.filterwarnings("ignore:divide by zero:RuntimeWarning")


def _kv(gen, b, h, t, d, dtype):
    k = (torch.randn(b, h, t, d, generator=gen) * 1.5 + 0.3).to(dtype)
    v = torch.randn(b, h, t, d, generator=gen).to(dtype)
    return k, v


PREFILL_CASES = [
    # (head_dim, partition, tokens, sinks, q_heads, kv_heads, dtype, causal)
    (64, 32, 75, 3, 4, 2, torch.float16, True),
    (128, 64, 129, 0, 2, 1, torch.float16, True),
    (64, 128, 127, 0, 2, 2, torch.bfloat16, True),
    (64, 64, 1, 0, 2, 1, torch.float16, True),
    (64, 32, 33, 4, 1, 1, torch.bfloat16, False),
]


@pytest.mark.parametrize("case", PREFILL_CASES)
def test_prefill_matches_reference(case):
    d, p, t, sinks, hq, hk, dtype, causal = case
    gen = torch.Generator().manual_seed(d + p + t)
    cfg = HackConfig(partition=p, sink_tokens=sinks, layout="paper")
    q = torch.randn(1, hq, t, d, generator=gen).to(dtype)
    k, v = _kv(gen, 1, hk, t, d, dtype)
    out = torch.full((1, hq, t, d), float("nan"), device=DEVICE)
    got, qkv = prefill_attention(
        q.to(DEVICE), k.to(DEVICE), v.to(DEVICE), cfg, causal=causal, mode="hack", out=out
    )
    assert got is out
    ref = reference_attention(q, quantize_kv(k, v, cfg), causal=causal)
    assert qkv.num_closed == quantize_kv(k, v, cfg).num_closed
    assert rel_written(got, ref) <= TOL


def test_prefill_fp16_mode_and_kivi_layout():
    gen = torch.Generator().manual_seed(5)
    q = torch.randn(1, 2, 40, 64, generator=gen).half()
    k, v = _kv(gen, 1, 1, 40, 64, torch.float16)
    out, qkv = prefill_attention(
        q.to(DEVICE), k.to(DEVICE), v.to(DEVICE), HackConfig(partition=32), mode="fp16"
    )
    kk = k.float().repeat_interleave(2, 1)
    vv = v.float().repeat_interleave(2, 1)
    s = (q.float() @ kk.transpose(-1, -2)) / 8.0
    s = s.masked_fill(torch.ones(40, 40, dtype=torch.bool).triu(1), -torch.inf)
    assert rel_written(out.float(), torch.softmax(s, -1) @ vv) <= 2e-3
    assert qkv.num_closed == 32
    cfg = HackConfig(partition=32, layout="kivi")
    out, qkv = prefill_attention(
        q.to(DEVICE), k.to(DEVICE), v.to(DEVICE), cfg, mode="hack", out_dtype=torch.float32
    )
    assert rel_written(out, reference_attention(q, quantize_kv(k, v, cfg))) <= TOL


@pytest.mark.parametrize("layout", ["kivi", "paper"])
def test_prefill_fp16_mode_ships_the_reference_codes(layout):
    """fp16 mode: the shipped QuantizedKV is the PyTorch path's bit for bit and the output is
    float64 attention."""
    gen = torch.Generator().manual_seed(11)
    t, d = 65, 64  # one partition and one open token
    cfg = HackConfig(partition=64, sink_tokens=1, layout=layout)
    q = torch.randn(2, 4, t, d, generator=gen).half()
    k, v = _kv(gen, 2, 2, t, d, torch.float16)
    out, qkv = prefill_attention(q.to(DEVICE), k.to(DEVICE), v.to(DEVICE), cfg, mode="fp16")
    want = quantize_kv(k, v, cfg)
    for got_t, want_t in zip(qkv.tensors(), want.tensors(), strict=True):
        assert torch.equal(got_t.cpu(), want_t), "shipped codes differ from quantize_kv"
    kk, vv = k.double().repeat_interleave(2, 1), v.double().repeat_interleave(2, 1)
    s = (q.double() @ kk.transpose(-1, -2)) / d**0.5
    s = s.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), -torch.inf)
    assert rel_written(out.double().cpu(), torch.softmax(s, -1) @ vv) <= 2e-3


def test_prefill_fp16_mode_rejects_nonfinite_kv():
    q = torch.zeros(1, 2, 8, 64, device=DEVICE, dtype=torch.float16)
    k = torch.zeros(1, 1, 8, 64, device=DEVICE, dtype=torch.float16)
    bad = k.clone()
    bad[0, 0, 3, 5] = float("inf")
    with pytest.raises(ValueError, match="finite"):
        prefill_attention(q, k, bad, HackConfig(partition=32), mode="fp16")


def test_prefill_bad_input():
    q = torch.zeros(1, 3, 4, 64)
    k = torch.zeros(1, 2, 4, 64)
    with pytest.raises(ValueError, match="multiple"):
        prefill_attention(q, k, k)
    with pytest.raises(ValueError, match="mode"):
        prefill_attention(q[:, :2], k, k, mode="int4")


DECODE_CASES = [
    # (head_dim, partition, sinks, prompt lengths (ragged), q_heads, kv_heads, dtype)
    (64, 32, 2, [1, 33, 70], 4, 2, torch.float16),  # 33 + 2 appends closes a page at 32+2
    (128, 64, 0, [127, 5], 2, 1, torch.float16),  # 127 -> 128 closes a page during append
    (64, 128, 0, [126, 129], 8, 2, torch.bfloat16),
    (128, 32, 4, [3], 1, 1, torch.float16),  # fewer tokens than sinks, then one page
]


@pytest.mark.parametrize("kernel", ["rows", "slots"])
@pytest.mark.parametrize("case", DECODE_CASES)
def test_decode_matches_reference(case, kernel, monkeypatch):
    # rows: hack_attn_kernel; slots: hack_decode_slots_kernel
    monkeypatch.setattr(launch, "SLOTS_INTERP", 4 if kernel == "slots" else 1)
    d, p, sinks, lens, hq, hk, dtype = case
    gen = torch.Generator().manual_seed(d * 7 + p)
    cfg = HackConfig(partition=p, sink_tokens=sinks, layout="paper")
    n = len(lens)
    cache, qkvs = filled_cache(cfg, lens, hk, d, dtype, _kv, gen)
    # closed pages are bit-identical to QuantizedKV.append's groups
    for i in range(n):
        pages = cache._pages[i]
        assert len(pages) == qkvs[i].num_closed // p
        if pages:
            kc = cache.k_codes[pages].transpose(0, 1).reshape(hk, -1, cache.k_codes.shape[-1])
            assert torch.equal(kc.cpu(), qkvs[i].k_q.codes[0].flatten(-2))
            vs = cache.v_scales[pages].permute(1, 2, 0).cpu()
            assert torch.equal(vs, qkvs[i].v_q.scales[0])
    assert_decode_matches(cache, qkvs, torch.randn(n, hq, 1, d, generator=gen).to(dtype))


def test_decode_stochastic_pages_match_quantize_kv():
    gen = torch.Generator().manual_seed(9)
    cfg = HackConfig(partition=32, rounding="stochastic", seed=3, layout="paper")
    k, v = _kv(gen, 2, 1, 31, 64, torch.float16)
    cache = PagedHackCache(cfg, 4, 2, 1, 64, 2, device=DEVICE)
    for i in range(2):
        cache.load(i, quantize_kv(k[i : i + 1], v[i : i + 1], cfg).to(DEVICE))
    kn, vn = _kv(gen, 2, 1, 1, 64, torch.float16)
    cache.append(kn.to(DEVICE), vn.to(DEVICE))  # closes one page per slot (slot = batch index)
    whole = quantize_kv(torch.cat([k, kn], 2), torch.cat([v, vn], 2), cfg)
    for i in range(2):
        assert torch.equal(cache.k_codes[cache._pages[i][0]].cpu(), whole.k_q.codes[i].flatten(-2))
        assert torch.equal(cache.v_codes[cache._pages[i][0]].cpu(), whole.v_q.codes[i][:, :, 0])


def test_paged_cache_bad_input():
    cfg = HackConfig(partition=32, layout="paper")
    with pytest.raises(ValueError, match="head_dim"):
        PagedHackCache(cfg.replace(layout="kivi"), 4, 1, 1, 96, 2, device=DEVICE)
    cache = PagedHackCache(cfg, 1, 1, 1, 64, 1, device=DEVICE)
    with pytest.raises(ValueError, match="append expects"):
        cache.append(torch.zeros(1, 2, 1, 64), torch.zeros(1, 2, 1, 64))
    k = torch.randn(1, 1, 64, 64).half()
    with pytest.raises(ValueError, match="pages"):
        cache.load(0, quantize_kv(k, k, cfg).to(DEVICE))

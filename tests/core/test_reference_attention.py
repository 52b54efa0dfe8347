import math

import pytest
import torch

from hack_kernels import HackConfig, dequantize_kv, quantize_kv, reference_attention

from .attention_oracle import hack_attention_f64
from .oracle import rel_err

CASES = [
    # batch, q_heads, kv_heads, tokens, q_len, head_dim, partition, sinks
    (1, 1, 1, 1, 1, 64, 64, 0),
    (2, 9, 3, 63, 63, 64, 64, 0),
    (1, 4, 2, 65, 65, 64, 64, 1),
    (2, 8, 2, 200, 1, 128, 64, 4),
    (1, 6, 3, 129, 5, 64, 128, 0),
    (1, 4, 1, 97, 97, 128, 32, 2),
    (1, 2, 2, 33, 1, 64, 32, 0),
]


def _inputs(b, hq, h, t, m, d, seed):
    g = torch.Generator().manual_seed(seed)
    # a realistic K: a few large outlier channels, as LLM keys have
    k = torch.randn(b, h, t, d, generator=g) * (1 + 4 * (torch.rand(d, generator=g) > 0.9))
    v = torch.randn(b, h, t, d, generator=g)
    q = torch.randn(b, hq, m, d, generator=g)
    return q.half(), k.half(), v.half()


@pytest.mark.parametrize("layout", ["paper", "kivi"])
@pytest.mark.parametrize("case", CASES)
def test_matches_float64_hack_math(layout, case):
    b, hq, h, t, m, d, p, sinks = case
    q, k, v = _inputs(b, hq, h, t, m, d, seed=sum(case))
    kv = quantize_kv(k, v, HackConfig(partition=p, layout=layout, sink_tokens=sinks))
    out = reference_attention(q, kv, causal=True)
    assert out.shape == (b, hq, m, d) and out.dtype == torch.float32
    want = hack_attention_f64(q, kv)
    assert rel_err(out, want) < 2e-3
    # against float64 attention over the dequantized K and V (Q and P unquantized): the only
    # difference left is the INT8 rounding of Q and P. In the kivi layout K's per-channel scales are
    # folded into Q before it is rounded to 8 bits, so outlier channels widen Q's range: looser.
    plain = hack_attention_f64(q, kv, quantize_activations=False)
    assert rel_err(out, plain) < (3e-2 if layout == "paper" else 6e-2)


def _sdpa64(q, k, v, causal):
    hq, h = q.shape[1], k.shape[1]
    k = k.double().repeat_interleave(hq // h, 1)
    v = v.double().repeat_interleave(hq // h, 1)
    m, t = q.shape[2], k.shape[2]
    mask = torch.ones(m, t, dtype=torch.bool).tril(t - m) if causal else None
    return torch.nn.functional.scaled_dot_product_attention(q.double(), k, v, attn_mask=mask)


@pytest.mark.parametrize("layout", ["paper", "kivi"])
@pytest.mark.parametrize("causal", [True, False])
def test_close_to_exact_attention_at_8_bits(layout, causal):
    # with 8-bit KV the whole HACK pipeline must land near exact float64 attention
    q, k, v = _inputs(1, 4, 2, 150, 20, 64, seed=5)
    kv = quantize_kv(k, v, HackConfig(bits=8, layout=layout))
    out = reference_attention(q, kv, causal=causal)
    bound = 2.5e-2 if layout == "paper" else 5e-2  # see test_matches_float64_hack_math
    assert rel_err(out, _sdpa64(q, k, v, causal)) < bound
    kd, vd = dequantize_kv(kv)
    assert rel_err(out, _sdpa64(q, kd, vd, causal)) < bound


def test_all_16bit_when_shorter_than_a_partition():
    q, k, v = _inputs(1, 2, 1, 40, 40, 64, seed=9)
    kv = quantize_kv(k, v)
    assert kv.num_closed == 0
    assert rel_err(reference_attention(q, kv), _sdpa64(q, k, v, True)) < 1e-6


def test_sm_scale_and_config_checks():
    q, k, v = _inputs(1, 2, 1, 70, 3, 64, seed=2)
    kv = quantize_kv(k, v)
    a = reference_attention(q, kv, sm_scale=0.5 / math.sqrt(64))
    b = reference_attention(q * 0.5, kv)
    assert rel_err(a, b) < 3e-2
    with pytest.raises(ValueError, match="differs"):
        reference_attention(q, kv, config=HackConfig(partition=32))


@pytest.mark.parametrize(
    "shape,match",
    [
        ((1, 3, 3, 64), "multiple of kv_heads"),
        ((1, 2, 3, 32), "head_dim"),
        ((2, 2, 3, 64), "batch"),
        ((2, 3, 64), "rank"),
        ((1, 2, 0, 64), "no tokens"),
        ((1, 2, 71, 64), "exceeds"),
    ],
)
def test_bad_queries(shape, match):
    _, k, v = _inputs(1, 2, 2, 70, 1, 64, seed=1)
    kv = quantize_kv(k, v)
    with pytest.raises(ValueError, match=match):
        reference_attention(torch.randn(shape), kv)

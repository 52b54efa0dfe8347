"""The hook's two CPU paths on awkward shapes: float_attention (diagnostic) against float64 math over
the dequantized codes, and reference_attention (HACK's integer arithmetic) close to it at 8 bits."""

import pytest
import torch

from hack_integrations.transformers_attention import float_attention
from hack_kernels import HackConfig, dequantize_kv, quantize_kv, reference_attention


@pytest.mark.parametrize(
    "tokens,m,layout", [(1, 1, "kivi"), (65, 1, "paper"), (131, 7, "kivi"), (64, 64, "paper")]
)
def test_float_attention_matches_float64(tokens, m, layout):
    g = torch.Generator().manual_seed(tokens + m)
    k, v = torch.randn(1, 3, tokens, 64, generator=g), torch.randn(1, 3, tokens, 64, generator=g)
    q = torch.randn(1, 9, m, 64, generator=g)
    qkv = quantize_kv(k, v, HackConfig(bits=8, partition=32, layout=layout, sink_tokens=2))
    got = float_attention(q, qkv, 0.125)
    kd, vd = (t.double().repeat_interleave(3, 1) for t in dequantize_kv(qkv))
    s = (q.double() @ kd.transpose(-1, -2)) * 0.125
    pos = torch.arange(m)[:, None] + tokens - m
    s = s.masked_fill(torch.arange(tokens)[None, :] > pos, float("-inf"))
    want = s.softmax(-1) @ vd
    assert torch.allclose(got.double(), want, atol=1e-5)
    hack = reference_attention(q, qkv, causal=True, sm_scale=0.125)
    assert (hack.double() - want).abs().max() < 3e-2 * want.abs().max()

"""inspect_layers on SmolLM2's real Q, K, V (the engine of `hack-kv inspect`)."""

import pytest
import torch

from hack_integrations.capture import capture_qkv
from hack_integrations.inspect_kv import attention_16bit, inspect_layers
from hack_kernels import HackConfig


@pytest.fixture(scope="module")
def layers(smollm):
    ids = smollm.tokenizer("def add(a, b):\n    return a + b\n" * 12, return_tensors="pt").input_ids
    return capture_qkv(smollm.model, ids[:, :90])


def test_captured_attention_is_the_models(layers, smollm):
    # the captured tensors reproduce the layer's attention; shapes follow the model config
    cfg = smollm.model.config
    q, k, v = layers[3].q, layers[3].k, layers[3].v
    assert q.shape == (1, cfg.num_attention_heads, 90, 64) and k.shape == (
        1,
        cfg.num_key_value_heads,
        90,
        64,
    )
    g = q.shape[1] // k.shape[1]
    want = torch.softmax(
        (q.double() @ k.double().repeat_interleave(g, 1).transpose(-1, -2)) / 8
        + torch.full((90, 90), -torch.inf).triu(1),
        -1,
    ) @ v.double().repeat_interleave(g, 1)
    assert torch.allclose(attention_16bit(q, k, v), want, atol=2e-3)


def test_more_bits_are_more_accurate(layers):
    errs = {
        b: sum(r.attn_rel_err for r in inspect_layers(layers, HackConfig(bits=b), progress=False))
        for b in (2, 4, 8)
    }
    assert errs[8] < errs[4] / 3 < errs[2] / 3
    eight = inspect_layers(layers, HackConfig(bits=8), progress=False)
    assert max(r.k_rel_err for r in eight) < 0.05 and max(r.attn_rel_err for r in eight) < 0.1

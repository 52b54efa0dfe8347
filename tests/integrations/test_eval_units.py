"""The accuracy harness's arithmetic against independent references (no model)."""

import math
import statistics

import numpy as np
import pytest
import torch

from hack_integrations.eval import baselines
from hack_integrations.eval.metrics import (
    edit_similarity,
    levenshtein,
    mean_se,
    ppl_se,
    token_metrics,
)


@pytest.mark.parametrize(
    "a,b,d",
    [
        ("kitten", "sitting", 3),
        ("", "abc", 3),
        ("flaw", "lawn", 2),
        ("same", "same", 0),
        ("a", "", 1),
    ],
)
def test_levenshtein_known_answers(a, b, d):
    assert levenshtein(a, b) == d
    assert edit_similarity(a, b) == pytest.approx(1 - d / max(len(a), len(b), 1))


def test_mean_se_matches_statistics():
    vals = [0.3, 1.7, 2.2, 0.05, 9.0]
    m, se = mean_se(vals)
    assert m == pytest.approx(statistics.mean(vals))
    assert se == pytest.approx(statistics.stdev(vals) / math.sqrt(len(vals)))
    p, pse = ppl_se([1.0, 2.0])
    assert p == pytest.approx(math.exp(1.5)) and pse == pytest.approx(math.exp(1.5) * 0.5)


def test_token_metrics_against_numpy():
    g = torch.Generator().manual_seed(3)
    ref, other = torch.randn(7, 50, generator=g) * 3, torch.randn(7, 50, generator=g) * 3
    tgt = torch.randint(0, 50, (7,), generator=g)
    out = token_metrics(ref, other, tgt)
    r, o = ref.double().numpy(), other.double().numpy()
    lr = r - np.log(np.exp(r).sum(-1, keepdims=True))
    lo = o - np.log(np.exp(o).sum(-1, keepdims=True))
    assert out["kl"] == pytest.approx((np.exp(lr) * (lr - lo)).sum(-1).mean(), rel=1e-9)
    assert out["nll"] == pytest.approx(-lo[np.arange(7), tgt.numpy()].mean(), rel=1e-9)
    assert out["top1"] == pytest.approx((r.argmax(-1) == o.argmax(-1)).mean())


@pytest.mark.parametrize("n,group,bits", [(1, 32, 2), (33, 32, 2), (95, 32, 3), (64, 64, 4)])
def test_fake_quant_error_within_half_step(n, group, bits):
    x = torch.randn(2, 3, n, 5, dtype=torch.float64) * 4
    y = baselines.fake_quant(x, 2, group, bits)
    xn = x.numpy()
    for start in range(0, n, group):
        part = xn[:, :, start : start + group]
        step = (part.max(2, keepdims=True) - part.min(2, keepdims=True)) / ((1 << bits) - 1)
        err = np.abs(y.numpy()[:, :, start : start + group] - part)
        assert (err <= step / 2 + 1e-9).all()
        assert all(
            len(np.unique(y.numpy()[0, 0, start : start + group, c])) <= 1 << bits for c in range(5)
        )


def test_kivi_keeps_newest_128_tokens_exact():
    k, v = torch.randn(1, 2, 300, 8), torch.randn(1, 2, 300, 8)
    kq, vq, nbytes = baselines.kivi(k, v)
    nq = (300 - 128) // 32 * 32
    assert torch.equal(kq[:, :, nq:], k[:, :, nq:]) and torch.equal(vq[:, :, nq:], v[:, :, nq:])
    assert not torch.equal(kq[:, :, :nq], k[:, :, :nq])
    assert nbytes < 2 * k.numel() * 2
    short_k, _, _ = baselines.kivi(k[:, :, :100], v[:, :, :100])
    assert torch.equal(short_k, k[:, :, :100])


def test_kvquant_undoes_and_redoes_rope_exactly_at_high_precision():
    t, d = 40, 16
    pos = torch.arange(t, dtype=torch.float64)[:, None]
    inv = 1.0 / (10000 ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    ang = torch.cat([pos * inv, pos * inv], -1)[None]
    cos, sin = ang.cos(), ang.sin()
    k_pre = torch.randn(1, 2, t, d, dtype=torch.float64)
    k = k_pre * cos[:, None] + baselines.rotate_half(k_pre) * sin[:, None]
    v = torch.randn(1, 2, t, d, dtype=torch.float64)
    kq, vq, _ = baselines.kvquant(k, v, cos, sin, bits=3)
    # Undo RoPE on the result: per channel over tokens, at most 8 levels plus the 1% outliers.
    back = kq * cos[:, None] - baselines.rotate_half(kq) * sin[:, None]
    assert torch.allclose(back[:, :, 0], k_pre[:, :, 0])  # first token (sink) exact
    err = (back - k_pre).abs()
    rng = k_pre.amax(2, keepdim=True) - k_pre.amin(2, keepdim=True)
    assert (err <= rng / 7 / 2 + 1e-9).all()


def test_cachegen_error_bounded_and_entropy_below_raw():
    x = torch.randn(1, 2, 57, 16).cumsum(2) * 0.1  # smooth along tokens, as KV is
    y, nbytes = baselines._cachegen_one(x, bits=3)
    assert y.shape == x.shape
    assert (y - x).abs().max() < 0.2 * x.abs().max()
    assert nbytes < x.numel() * 2 / 3


@pytest.mark.parametrize("residual", [0, 128])
def test_kivi_cache_appending_equals_quantizing_the_whole_sequence(residual):
    from hack_integrations.eval.methods import KiviCache

    k, v = torch.randn(1, 2, 301, 8), torch.randn(1, 2, 301, 8)
    cache = KiviCache(2, residual, [(k[:, :, :250], v[:, :, :250])])
    for start in (250, 251, 290):  # decode steps and a chunk
        stop = {250: 251, 251: 290, 290: 301}[start]
        cache.update(k[:, :, start:stop], v[:, :, start:stop], 0)
    want_k, want_v, _ = baselines.kivi(k, v, bits=2, residual=residual)
    assert torch.equal(cache.layers[0].keys, want_k) and torch.equal(cache.layers[0].values, want_v)

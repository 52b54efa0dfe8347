"""Triton quantize-and-pack against the PyTorch path (quantize_groups / quantize_kv).

Runs under TRITON_INTERPRET=1 on the CPU (CI) and natively on a GPU. Nearest rounding must be
bit-exact (codes, mins, scales, sums); stochastic rounding reads the same counter-based noise, so
it is bit-exact too, and its unbiasedness is checked over many seeds.
"""

from __future__ import annotations

import pytest
import torch

from hack_kernels import HackConfig, quantize_kv
from hack_kernels.quantize import dequantize, quantize_groups
from hack_kernels.triton.quantize import quantize_groups_triton, quantize_kv_triton

# the interpreter evaluates both sides of where(s > 0, 1 / s, 0)
pytestmark = pytest.mark.filterwarnings("ignore:divide by zero:RuntimeWarning")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FIELDS = ("codes", "mins", "scales", "sums")


def _same(a, b) -> None:
    for f in FIELDS:
        x, y = getattr(a, f), getattr(b, f)
        assert x.dtype == y.dtype and x.shape == y.shape, f
        assert torch.equal(x.cpu(), y.cpu()), f"{f}: {(x.cpu() != y.cpu()).sum()} differ"


def _awkward(shape, dtype, gen) -> torch.Tensor:
    """Random data with constant runs, exact zeros, negative zeros and wide ranges."""
    x = torch.randn(shape, generator=gen) * torch.exp(torch.randn(shape, generator=gen) * 2)
    flat = x.view(-1)
    flat[: flat.numel() // 7] = 1.5  # constant groups (max == min)
    flat[-5:] = -0.0
    flat[::11] = 0.0
    return x.clamp(-6e4, 6e4).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("partition", [32, 64, 128])
def test_nearest_bit_exact(dtype, bits, partition):
    gen = torch.Generator().manual_seed(bits * 1000 + partition)
    for n, dim, shape in (
        (partition - 1, -1, (3, partition - 1)),
        (partition + 1, 1, (2, partition + 1, 5)),
        (1, 0, (1, 4)),
        (2 * partition, 2, (2, 3, 2 * partition)),
    ):
        x = _awkward(shape, dtype, gen)
        _same(
            quantize_groups(x, dim, bits, partition),
            quantize_groups_triton(x.to(DEVICE), dim, bits, partition),
        )
        assert n == x.shape[dim]


def test_transposed_views_and_offsets():
    gen = torch.Generator().manual_seed(7)
    k = torch.randn(2, 3, 70, 64, generator=gen).half()
    for dim in (-1, -2):
        kt = k.transpose(-1, -2)  # non-contiguous input
        _same(quantize_groups(kt, dim, 2, 32), quantize_groups_triton(kt.to(DEVICE), dim, 2, 32))


@pytest.mark.parametrize("layout", ["paper", "kivi"])
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_quantize_kv_matches(layout, rounding):
    gen = torch.Generator().manual_seed(3)
    cfg = HackConfig(partition=32, layout=layout, rounding=rounding, sink_tokens=3, seed=5)
    k = torch.randn(1, 2, 3 + 64 + 7, 64, generator=gen).half()
    v = torch.randn(1, 2, 3 + 64 + 7, 64, generator=gen).half()
    a = quantize_kv(k, v, cfg)
    b = quantize_kv_triton(k.to(DEVICE), v.to(DEVICE), cfg)
    _same(a.k_q, b.k_q)
    _same(a.v_q, b.v_q)
    for f in ("k_sink", "v_sink", "k_open", "v_open"):
        assert torch.equal(getattr(a, f), getattr(b, f).cpu()), f


def test_stochastic_matches_torch_and_is_unbiased():
    gen = torch.Generator().manual_seed(11)
    x = (torch.randn(4, 64, generator=gen) * 2).half()
    total = torch.zeros(4, 64)
    seeds = 200
    for seed in range(seeds):
        b = quantize_groups_triton(x.to(DEVICE), -1, 2, 64, "stochastic", seed=seed)
        if seed < 3:
            _same(quantize_groups(x, -1, 2, 64, "stochastic", seed=seed), b)
        total += dequantize(b).cpu()
    mean = total / seeds
    # Per element the rounding noise has variance <= s^2 / 4; the mean of `seeds` draws is within
    # 5 standard errors of x (a true bias of s / 4 would be ~7 standard errors out).
    q = quantize_groups_triton(x.to(DEVICE), -1, 2, 64, "stochastic", seed=0)
    s = q.scales.float().cpu().repeat_interleave(64, -1)
    bound = 5 * s / 2 / seeds**0.5 + 1e-3
    assert ((mean - x.float()).abs() <= bound).all()
    # and nearest rounding is biased on the same data (the test can fail)
    near = dequantize(quantize_groups(x, -1, 2, 64)).float()
    assert ((near - x.float()).abs() > bound).any()

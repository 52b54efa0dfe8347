"""Triton quantize-and-pack against the PyTorch path (quantize_groups / quantize_kv).

Runs under TRITON_INTERPRET=1 on the CPU (CI) and natively on a GPU. Nearest rounding must be
bit-exact (codes, mins, scales, sums); stochastic rounding reads the same counter-based noise, so
it is bit-exact too, and its unbiasedness is checked over many seeds.
"""

from __future__ import annotations

import pytest
import torch

from hack_kernels import HackConfig, quantize_kv
from hack_kernels.kv import K_STREAM, V_STREAM
from hack_kernels.quantize import dequantize, quantize_groups
from hack_kernels.triton import quantize as quantize_module
from hack_kernels.triton.quantize import quantize_groups_triton, quantize_kv_triton
from hack_kernels.triton.quantize_kivi import quantize_kivi_triton

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


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize(("head_dim", "partition"), [(64, 32), (128, 64), (64, 128), (32, 32)])
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_kivi_fused_matches_pytorch(bits, head_dim, partition, rounding):
    """The kivi K and V kernels against quantize_groups (K along tokens, V along head_dim)."""
    gen = torch.Generator().manual_seed(bits * 7 + head_dim + partition)
    dtype = torch.bfloat16 if bits == 4 else torch.float16
    c = 2 * partition
    k = _awkward((2, 3, c + 5, head_dim), dtype, gen)[:, :, 5:]  # strided token slice
    v = _awkward((2, 3, c, head_dim), dtype, gen)
    args = dict(bits=bits, partition=partition, rounding=rounding, seed=11)
    kq, vq = quantize_kivi_triton(
        k.to(DEVICE), v.to(DEVICE), **args, streams=(K_STREAM, V_STREAM), token_start=5
    )
    off = {2: 5}
    _same(quantize_groups(k, -2, **args, stream=K_STREAM, axis_offsets=off), kq)
    _same(quantize_groups(v, -1, **args, stream=V_STREAM, axis_offsets=off), vq)
    assert (kq.dim, vq.dim, kq.shape) == (2, 3, tuple(k.shape))


def test_kivi_fused_rejects_partial_partition():
    k = torch.zeros(1, 1, 65, 64, dtype=torch.float16, device=DEVICE)
    with pytest.raises(ValueError, match="tokens 65"):
        quantize_kivi_triton(k, k, bits=2, partition=64)


def test_kivi_kernel_dispatch():
    """Eager calls below KIVI_EAGER_MIN_ROWS keep the generic kernel (host-bound there); graph
    capture and large inputs take the kivi kernels; shapes they cannot take never do."""
    big = quantize_module.KIVI_EAGER_MIN_ROWS
    assert not quantize_module.use_kivi_kernels(big - 1, 128, 64, capturing=False)
    assert quantize_module.use_kivi_kernels(big, 128, 64, capturing=False)
    assert quantize_module.use_kivi_kernels(64, 128, 64, capturing=True)
    assert not quantize_module.use_kivi_kernels(big, 96, 32, capturing=True)  # 3 groups a row


def test_quantize_kv_large_eager_takes_kivi_path(monkeypatch):
    """Through quantize_kv_triton with the threshold lowered: the kivi kernels run and give
    quantize_kv's result."""
    monkeypatch.setattr(quantize_module, "KIVI_EAGER_MIN_ROWS", 1)
    calls = []
    real = quantize_module.quantize_kivi_triton
    monkeypatch.setattr(
        quantize_module, "quantize_kivi_triton", lambda *a, **kw: calls.append(1) or real(*a, **kw)
    )
    gen = torch.Generator().manual_seed(4)
    cfg = HackConfig(partition=32, sink_tokens=2, layout="kivi")
    k, v = (torch.randn(1, 2, 2 + 64 + 3, 64, generator=gen).half() for _ in range(2))
    a, b = quantize_kv(k, v, cfg), quantize_kv_triton(k.to(DEVICE), v.to(DEVICE), cfg)
    assert calls == [1]
    _same(a.k_q, b.k_q)
    _same(a.v_q, b.v_q)

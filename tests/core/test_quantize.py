import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hack_kernels import HackConfig, dequantize, layout, quantize

from .oracle import np_dequantize, np_unpack

DTYPES = [torch.float16, torch.bfloat16, torch.float32]


@st.composite
def cases(draw):
    partition = draw(st.sampled_from([32, 64, 128]))
    bits = draw(st.sampled_from([2, 4, 8]))
    rank = draw(st.integers(1, 3))
    special = [1, partition - 1, partition, partition + 1, 2 * partition + 3]
    shape = [draw(st.sampled_from(special + [draw(st.integers(1, 40))])) for _ in range(rank)]
    # keep the tensors small
    while np.prod(shape) > 20000:
        shape[int(np.argmax(shape))] //= 2
    dim = draw(st.integers(-rank, rank - 1))
    dtype = draw(st.sampled_from(DTYPES))
    seed = draw(st.integers(0, 2**31 - 1))
    return shape, dim, dtype, bits, partition, seed


def _make(shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    scale = torch.exp(torch.randn(1, generator=g) * 2)
    return (torch.randn(shape, generator=g) * scale + torch.randn(1, generator=g)).to(dtype)


@settings(max_examples=60, deadline=None)
@given(cases())
def test_nearest_error_bound_and_metadata(case):
    shape, dim, dtype, bits, partition, seed = case
    x = _make(shape, dtype, seed)
    qt = quantize(x, dim, HackConfig(bits=bits, partition=partition, rounding="nearest"))
    n = x.shape[dim]
    g = -(-n // partition)
    assert qt.codes.shape[-2:] == (g, partition * bits // 8)
    assert qt.mins.shape[-1] == g and qt.sums.dtype == layout.sum_dtype(bits, partition)
    codes = np_unpack(qt.codes, bits)
    assert codes.max() <= (1 << bits) - 1
    xs = np.moveaxis(x.double().numpy(), dim, -1)
    deq = np.moveaxis(np_dequantize(qt), dim, -1)
    scales = np.repeat(qt.scales.double().numpy(), partition, -1)[..., :n]
    # nearest rounding errs at most half a (stored) scale; float32 arithmetic adds a hair
    mins = np.repeat(qt.mins.double().numpy(), partition, -1)[..., :n]
    slack = 3e-7 * (np.abs(xs) + np.abs(mins) + scales * ((1 << bits) - 1))
    assert np.all(np.abs(deq - xs) <= scales / 2 + slack)
    # every element lies in [min, min + scale * levels]
    assert np.all(xs >= mins) and np.all(xs <= mins + scales * ((1 << bits) - 1) + slack)
    # sums are the sums of the valid codes; padding codes are zero
    grouped = codes.reshape(*codes.shape[:-1], partition)
    np.testing.assert_array_equal(grouped.sum(-1), qt.sums.numpy().astype(np.int64))
    pad = g * partition - n
    if pad:
        assert np.all(grouped[..., -1, partition - pad :] == 0)
    # dequantize agrees with the independent float64 dequantization
    tol = 4e-7 * (np.abs(xs).max() + scales.max() * ((1 << bits) - 1))  # float32 rounding
    np.testing.assert_allclose(dequantize(qt).double().numpy(), np_dequantize(qt), rtol=0, atol=tol)


def test_bit_order_known_answer():
    x = torch.tensor([0.0, 1.0, 2.0, 3.0] * 8)
    qt = quantize(x, 0, HackConfig(partition=32))
    # codes 0,1,2,3 -> 0 | 1<<2 | 2<<4 | 3<<6 = 0xE4
    assert qt.codes.tolist() == [[0xE4] * 8]
    assert qt.sums.tolist() == [48]
    x4 = torch.tensor([1.0, 14.0] + [0.0, 15.0] * 15)  # min 0, max 15: scale 1
    q4 = quantize(x4, 0, HackConfig(bits=4, partition=32))
    assert q4.codes[0, 0].item() == 1 | 14 << 4


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_constant_groups_are_exact(dtype, bits):
    x = torch.full((3, 70), 0.3712, dtype=dtype)
    x[1] = -5.25
    qt = quantize(x, -1, HackConfig(bits=bits))
    out = dequantize(qt)
    assert torch.isfinite(out).all()
    assert torch.equal(out, x.float())


@pytest.mark.parametrize("bits", [2, 4])
def test_stochastic_rounding_is_unbiased(bits):
    g = torch.Generator().manual_seed(7)
    x = torch.randn(4, 65, generator=g)
    n = 400
    acc = torch.zeros_like(x, dtype=torch.float64)
    for seed in range(n):
        qt = quantize(x, -1, HackConfig(bits=bits, rounding="stochastic", seed=seed))
        acc += dequantize(qt).double()
    mean = acc / n
    scale = torch.repeat_interleave(qt.scales.double(), 64, -1)[..., :65]
    # per-element variance <= scale^2 / 4, so the mean over n seeds is within 5 sigma
    assert torch.all((mean - x.double()).abs() <= 5 * scale / (2 * n**0.5) + 1e-6)
    # and nearest rounding, by contrast, is biased on the same data
    near = dequantize(quantize(x, -1, HackConfig(bits=bits))).double()
    assert (near - x.double()).abs().mean() > 3 * (mean - x.double()).abs().mean()


def test_stochastic_codes_differ_by_seed_and_stay_within_one_step():
    x = torch.randn(2, 128)
    a = quantize(x, -1, HackConfig(rounding="stochastic", seed=1))
    b = quantize(x, -1, HackConfig(rounding="stochastic", seed=2))
    assert not torch.equal(a.codes, b.codes)
    err = (dequantize(a) - x).abs()
    assert torch.all(err <= torch.repeat_interleave(a.scales.float(), 64, -1) * (1 + 1e-5))


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_pack_unpack_round_trip(bits):
    codes = torch.randint(0, 1 << bits, (5, 3, 64), dtype=torch.uint8)
    packed = layout.pack_codes(codes, bits)
    assert packed.shape == (5, 3, 64 * bits // 8)
    assert torch.equal(layout.unpack_codes(packed, bits), codes)
    np.testing.assert_array_equal(np_unpack(packed, bits), codes.numpy())


@pytest.mark.parametrize(
    "bad,match",
    [
        (
            torch.tensor([1.0, float("nan"), 2.0, float("nan")]),
            "2 non-finite values \\(2 NaN, 0 Inf\\); first at index \\(1,\\)",
        ),
        (
            torch.tensor([[1.0, 2.0], [float("inf"), 0.0]]),
            "1 non-finite values \\(0 NaN, 1 Inf\\); first at index \\(1, 0\\)",
        ),
        (torch.zeros(0, 4), "empty"),
        (torch.tensor(1.0), "scalar"),
        (torch.arange(4), "floating-point"),
        (torch.tensor([7e4, 0.0]), None),
    ],
)
def test_bad_inputs(bad, match):
    if match is None:  # fp32 beyond the fp16 range is fine: fp32 inputs keep fp32 metadata
        assert torch.allclose(dequantize(quantize(bad, -1)), bad, rtol=0.5)
        return
    with pytest.raises(ValueError, match=match):
        quantize(bad, -1)


def test_dim_out_of_range():
    with pytest.raises(ValueError, match="out of range"):
        quantize(torch.randn(3, 4), 2)


def test_fp16_metadata_round_trip_of_bf16_beyond_fp16_range():
    # bf16 keeps bf16 metadata, so values beyond the fp16 range quantize fine
    x = torch.tensor([1e5, -2e5, 3.0, 4.0] * 16, dtype=torch.bfloat16)
    qt = quantize(x, 0, HackConfig(bits=8))
    assert qt.mins.dtype == torch.bfloat16
    assert torch.isfinite(dequantize(qt)).all()

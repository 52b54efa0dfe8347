import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hack_kernels import HackConfig, homomorphic_matmul, quantize

from .oracle import np_dequantize


@settings(max_examples=40, deadline=None)
@given(
    st.sampled_from([32, 64, 128]),
    st.sampled_from([2, 4, 8]),
    st.sampled_from([2, 4, 8]),
    st.integers(1, 3),
    st.integers(0, 2),
    st.integers(1, 9),
    st.integers(0, 2**31 - 1),
)
def test_equals_product_of_dequantized(partition, abits, bbits, m, kind, n, seed):
    k = [1, partition - 1, partition + 1, 2 * partition + 5][kind + (seed % 2)]
    g = torch.Generator().manual_seed(seed)
    batch = (2,) if seed % 3 == 0 else ()
    a = torch.randn(*batch, m, k, generator=g) + 0.5
    b = torch.randn(*batch, k, n, generator=g) * 3
    a_q = quantize(a, -1, HackConfig(bits=abits, partition=partition))
    b_q = quantize(
        b, -2, HackConfig(bits=bbits, partition=partition, rounding="stochastic", seed=seed)
    )
    da, db = np_dequantize(a_q), np_dequantize(b_q)
    want = np.matmul(da, db)  # float64, from the raw bytes
    got = homomorphic_matmul(a_q, b_q)
    assert got.shape == want.shape and got.dtype == torch.float32
    # float32 rounding of a dot product: a few eps times sum |a||b| (the correction terms add a few
    # more operations per partition than a plain dot, hence 32 eps)
    bound = 32 * np.finfo(np.float32).eps * np.matmul(np.abs(da), np.abs(db))
    assert np.all(np.abs(got.double().numpy() - want) <= bound)


def test_never_dequantizes(monkeypatch):
    import importlib

    hm = importlib.import_module("hack_kernels.homomorphic")
    qz = importlib.import_module("hack_kernels.quantize")

    def boom(*_a, **_k):
        raise AssertionError("dequantize called on the compute path")

    monkeypatch.setattr(qz, "dequantize", boom)
    a_q = quantize(torch.randn(3, 70), -1)
    b_q = quantize(torch.randn(70, 5), 0)
    assert not hasattr(hm, "dequantize")
    assert homomorphic_matmul(a_q, b_q).shape == (3, 5)


def test_operand_checks():
    a_q = quantize(torch.randn(3, 70), -1)
    with pytest.raises(ValueError, match="inner dimensions"):
        homomorphic_matmul(a_q, quantize(torch.randn(71, 5), 0))
    with pytest.raises(ValueError, match="partitions differ"):
        homomorphic_matmul(a_q, quantize(torch.randn(70, 5), 0, HackConfig(partition=32)))
    with pytest.raises(ValueError, match="last dimension"):
        homomorphic_matmul(quantize(torch.randn(70, 3), 0), quantize(torch.randn(70, 5), 0))
    with pytest.raises(ValueError, match="first matrix dimension"):
        homomorphic_matmul(a_q, quantize(torch.randn(5, 70), -1))

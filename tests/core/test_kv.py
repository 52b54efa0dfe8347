import pytest
import torch

from hack_kernels import HackConfig, dequantize_kv, quantize_kv

from .oracle import rel_err

LAYOUTS = ["paper", "kivi"]


def _kv(b, h, t, d, seed, dtype=torch.float16):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(b, h, t, d, generator=g).to(dtype),
        torch.randn(b, h, t, d, generator=g).to(dtype),
    )


def _same(a, b):
    for name in ("k_sink", "v_sink", "k_open", "v_open"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    for q in ("k_q", "v_q"):
        x, y = getattr(a, q), getattr(b, q)
        assert x.shape == y.shape, q
        for f in ("codes", "mins", "scales", "sums"):
            assert torch.equal(getattr(x, f), getattr(y, f)), (q, f)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
@pytest.mark.parametrize(
    "partition,sinks,t", [(32, 0, 1), (64, 4, 63), (64, 0, 65), (32, 3, 100), (128, 2, 129)]
)
def test_append_equals_whole(layout, rounding, partition, sinks, t):
    cfg = HackConfig(
        partition=partition, layout=layout, rounding=rounding, sink_tokens=sinks, seed=3
    )
    k, v = _kv(2, 3, t, 64, seed=t)
    whole = quantize_kv(k, v, cfg)
    split = max(1, t // 3)
    inc = quantize_kv(k[:, :, :split], v[:, :, :split], cfg)
    for i in range(split, t, 7):  # uneven chunks, then single tokens
        j = min(i + 7, t)
        inc.append(k[:, :, i:j], v[:, :, i:j])
    _same(whole, inc)
    assert inc.num_sink == min(sinks, t)
    assert inc.num_closed % partition == 0 and inc.num_open < partition
    assert inc.num_tokens == t


@pytest.mark.parametrize("layout", LAYOUTS)
def test_closed_groups_never_change(layout):
    cfg = HackConfig(partition=32, layout=layout, rounding="stochastic", sink_tokens=2)
    k, v = _kv(1, 2, 90, 64, seed=1)
    kv = quantize_kv(k, v, cfg)
    before = kv.v_q.codes.clone(), kv.k_q.codes.clone(), kv.num_closed
    kn, vn = _kv(1, 2, 40, 64, seed=2)
    for i in range(40):
        kv.append(kn[:, :, i : i + 1] * 10, vn[:, :, i : i + 1] * 10)  # wild new values
    # the old groups' bytes are a prefix of the new ones, bit for bit
    vc, kc, closed = before
    if layout == "paper":
        assert torch.equal(kv.k_q.codes[:, :, :closed], kc)
        assert torch.equal(kv.v_q.codes[..., : closed // 32, :], vc)
    else:
        assert torch.equal(kv.k_q.codes[..., : closed // 32, :], kc)
        assert torch.equal(kv.v_q.codes[:, :, :closed], vc)
    assert kv.num_closed == 128 and kv.num_tokens == 130


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("d", [64, 128])
def test_dequantized_kv_is_close_and_16bit_parts_exact(layout, d):
    cfg = HackConfig(layout=layout, sink_tokens=3)
    k, v = _kv(1, 2, 150, d, seed=d)
    kv = quantize_kv(k, v, cfg)
    kd, vd = dequantize_kv(kv)
    assert torch.equal(kd[:, :, :3], k[:, :, :3].float()) and torch.equal(
        vd[:, :, -kv.num_open :], v[:, :, -kv.num_open :].float()
    )
    assert rel_err(kd, k.float()) < 0.45 and rel_err(vd, v.float()) < 0.45  # 2-bit on Gaussians
    # bytes: about 2 bits + metadata per closed element
    closed_bytes = kv.k_q.nbytes + kv.v_q.nbytes
    assert closed_bytes / (2 * 2 * 2 * 128 * d) < 0.2


@pytest.mark.parametrize(
    "k,v,match",
    [
        (torch.randn(2, 3, 4), torch.randn(2, 3, 4), "rank"),
        (torch.randn(1, 2, 4, 8), torch.randn(1, 3, 4, 8), "differ"),
        (torch.randn(1, 2, 4, 0), torch.randn(1, 2, 4, 0), "empty"),
        (torch.full((1, 1, 4, 8), float("nan")), torch.randn(1, 1, 4, 8), "k has 32 non-finite"),
        (torch.randn(1, 1, 4, 8), torch.full((1, 1, 4, 8), float("inf")), "v has 32 non-finite"),
        (torch.randint(0, 3, (1, 1, 4, 8)), torch.randn(1, 1, 4, 8), "floating-point"),
    ],
)
def test_bad_kv(k, v, match):
    with pytest.raises(ValueError, match=match):
        quantize_kv(k, v)


def test_append_rejects_mismatched_heads():
    kv = quantize_kv(*_kv(1, 2, 10, 64, seed=0))
    with pytest.raises(ValueError, match="do not match"):
        kv.append(*_kv(1, 3, 1, 64, seed=1))

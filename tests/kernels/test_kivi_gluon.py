"""The Gluon decode kernel (kivi_gluon.py) and its split merge, which attends the 16-bit tokens
(merge_16bit.py).

On a GPU: decode through the Gluon path against reference_attention of the same quantization
(relative error <= 1e-3, NaN-poisoned outputs), ragged batches around page boundaries, GQA
groups 1, 2, 4 and 8, head_dim 64 and 128, 2 and 4 bits, sinks, fp16 and bf16. On the CPU, where Gluon cannot run (no interpreter):
the 16-bit partial against float64 attention under the interpreter.
"""

from __future__ import annotations

import math

import pytest
import torch

import hack_kernels.triton.decode as decode_module
from hack_kernels import HackConfig
from hack_kernels.triton import launch
from hack_kernels.triton.merge_16bit import combine_with_16bit_kernel
from tests.kernels.helpers import DEVICE, assert_decode_matches, filled_cache, rel_written

pytestmark = pytest.mark.filterwarnings("ignore:divide by zero:RuntimeWarning")


def _kv(gen, b, h, t, d, dtype):
    k = torch.randn(b, h, t, d, generator=gen) * (1 + 5 * (torch.rand(d, generator=gen) > 0.9))
    return k.to(dtype), torch.randn(b, h, t, d, generator=gen).to(dtype)


GLUON_CASES = [
    # (head_dim, bits, sinks, prompt lengths, q_heads, kv_heads, dtype); + 3 appends each
    (128, 2, 0, [1, 61, 62, 190], 8, 2, torch.float16),  # 61 + 3 closes a page during append
    (128, 2, 4, [3, 67, 129, 250], 8, 2, torch.bfloat16),  # fewer tokens than sinks; 64+4 +- 1
    (128, 2, 0, [300, 5], 4, 2, torch.float16),  # G = 2 (columns half padding)
    (128, 2, 2, [200, 100], 2, 2, torch.float16),  # G = 1
    (128, 4, 0, [1, 130, 253], 8, 2, torch.float16),  # 4-bit: K planes of 64 channels
    (64, 2, 0, [2, 64, 190], 8, 2, torch.float16),  # d64: one channel group, 16-channel planes
    (64, 4, 3, [70, 131], 16, 2, torch.bfloat16),  # d64 4-bit, G = 8 (every column a head)
]


@pytest.mark.skipif(DEVICE != "cuda", reason="Gluon kernels run on NVIDIA GPUs only")
@pytest.mark.parametrize("hoist", [False, True])
@pytest.mark.parametrize("case", GLUON_CASES)
def test_gluon_decode_matches_reference(case, hoist, monkeypatch):
    from hack_kernels.triton.kivi_gluon_launch import gluon_decode_available

    assert gluon_decode_available()
    monkeypatch.setattr(decode_module, "SHORT_DECODE_PAGES", -1)  # every batch the long path
    d, bits, sinks, lens, hq, hk, dtype = case
    key = ("decode_kivi", d, 64)
    conf = {**launch.TUNED.get(key, {}), "GLUON": True}
    conf["gluon"] = {**conf.get("gluon", {}), "hoist_below": 10**9 if hoist else 0}  # the variant
    monkeypatch.setitem(launch.TUNED, key, conf)
    launch.LAST_COMPILED.pop(("decode_kivi_gluon", d, 64), None)
    gen = torch.Generator().manual_seed(sum(lens) + hq + bits)
    cfg = HackConfig(bits=bits, partition=64, sink_tokens=sinks, layout="kivi")
    cache, qkvs = filled_cache(cfg, lens, hk, d, dtype, _kv, gen)
    assert_decode_matches(cache, qkvs, torch.randn(len(lens), hq, 1, d, generator=gen).to(dtype))
    assert ("decode_kivi_gluon", d, 64) in launch.LAST_COMPILED  # the Gluon path ran


def _partial64(q, k, v, scale):
    """float64 (acc, m, l) of q [G, D] over k, v [T, D] in the kernels' log2 domain."""
    s = (q.double() @ k.double().T) * scale * 1.4426950408889634
    m = s.amax(-1)
    p = torch.exp2(s - m[:, None])
    return p @ v.double(), m, p.sum(-1)


@pytest.mark.parametrize(
    "n_sink,n_open", [(0, 1), (4, 0), (3, 63), (0, 0), (2, 17), (0, 63), (0, 16)]
)
def test_16bit_part_merged_matches_float64(n_sink, n_open):
    # the sinks and open page attended by the merge itself (combine_with_16bit_kernel) and merged
    # with random partials of closed pages: against the float64 merge of the same partials and
    # a float64 16-bit one
    gen = torch.Generator().manual_seed(n_sink * 100 + n_open)
    b, kvh, g, d, part, closed = 2, 2, 3, 64, 64, 2
    hq = kvh * g
    ks = torch.randn(b, kvh, max(n_sink, 1), d, generator=gen).half()
    vs = torch.randn(b, kvh, max(n_sink, 1), d, generator=gen).half()
    ko = torch.randn(b, kvh, part, d, generator=gen).half()
    vo = torch.randn(b, kvh, part, d, generator=gen).half()
    q = torch.randn(b, hq, 1, d, generator=gen).half()
    seq = torch.full((b,), n_sink + closed * part + n_open, dtype=torch.int32)
    splits = 3  # closed-page partials: random, one of them empty
    acc_c = torch.randn(b, hq, splits, d, generator=gen)
    m_c = torch.randn(b, hq, splits, generator=gen) * 3
    l_c = torch.rand(b, hq, splits, generator=gen) + 0.5
    m_c[:, :, 1], l_c[:, :, 1], acc_c[:, :, 1] = -float("inf"), 0.0, 0.0
    nparts = splits
    part_t = torch.full((b, hq, nparts, d), float("nan"))
    ml = torch.full((b, hq, nparts, 2), float("nan"))
    part_t[:, :, :splits] = acc_c
    ml[:, :, :splits, 0], ml[:, :, :splits, 1] = m_c, l_c
    scale = 1 / math.sqrt(d)
    t = [x.to(DEVICE) for x in (q, part_t, ml, seq, ks, vs, ko, vo)]
    q_d, part_d, ml_d, seq_d, ks_d, vs_d, ko_d, vo_d = t
    sixteen = (
        ks_d, vs_d, ks_d.stride(0), ks_d.stride(1), ks_d.stride(2),
        ko_d, vo_d, ko_d.stride(0), ko_d.stride(1), ko_d.stride(2),
    )  # fmt: skip
    out = torch.full((b, hq, 1, d), float("nan"), device=DEVICE)
    combine_with_16bit_kernel[(b * hq, d // 32)](
        part_d, ml_d, out, nparts, q_d, q_d.stride(0), q_d.stride(1), seq_d, *sixteen,
        n_sink, hq, g, scale * 1.4426950408889634,
        D=d, PART=part, BLOCK_D=32, BLOCK_S=16, BLOCK16=16,
    )  # fmt: skip
    for i in range(b):
        for h in range(kvh):
            rows = slice(h * g, (h + 1) * g)
            accs, ms, ls = (
                [acc_c[i, rows].double()],
                [m_c[i, rows].double()],
                [l_c[i, rows].double()],
            )
            if n_sink + n_open:
                k = torch.cat([ks[i, h, :n_sink], ko[i, h, :n_open]])
                v = torch.cat([vs[i, h, :n_sink], vo[i, h, :n_open]])
                a16, m16, l16 = _partial64(q[i, rows, 0], k, v, scale)
                accs.append(a16[:, None]), ms.append(m16[:, None]), ls.append(l16[:, None])
            acc, m, lsum = torch.cat(accs, 1), torch.cat(ms, 1), torch.cat(ls, 1)
            w = torch.exp2(m - m.amax(-1, keepdim=True)).nan_to_num(0.0)
            want = (acc * w[..., None]).sum(1) / (lsum * w).sum(1)[:, None]
            assert rel_written(out[i, rows, 0], want) <= 1e-3, (i, h)


def test_gluon_launch_rejects_pages_not_contiguous_within_a_head():
    # the kernel's offsets within a page and head are constants: a strided page array would be
    # read wrongly, so the launcher refuses it, naming the array, before any kernel runs
    from hack_kernels.triton.kivi_gluon_launch import run_kivi_gluon_decode
    from hack_kernels.triton.kivi_pages import KiviPages

    b, pages, h, p, d = 1, 2, 2, 64, 128
    arrays = dict(
        k_codes=torch.zeros(b, pages, h, p, d // 4, dtype=torch.uint8),
        k_mins=torch.zeros(b, pages, h, d).half(),
        k_scales=torch.zeros(b, pages, h, d).half(),
        v_codes=torch.zeros(b, pages, h, d, p // 4, dtype=torch.uint8),
        v_mins=torch.zeros(b, pages, h, p, 2).half(),
        v_scales=torch.zeros(b, pages, h, p, 2).half(),
        v_colsums=torch.zeros(b, pages, h, d, dtype=torch.uint8),
    )
    # V codes with their two inner axes swapped: same shape, strided rows
    arrays["v_codes"] = torch.zeros(b, pages, h, p // 4, d, dtype=torch.uint8).transpose(-1, -2)
    q = torch.zeros(b, 2 * h, 1, d).half()
    empty = torch.zeros(b, h, 0, d).half()
    sixteen = (empty, empty, empty.stride(0), empty.stride(1), empty.stride(2))
    with pytest.raises(ValueError, match="v_codes"):
        run_kivi_gluon_decode(
            q, torch.empty_like(q), torch.ones(b, dtype=torch.int32),
            torch.zeros(b, pages, dtype=torch.int32), KiviPages(**arrays), sixteen, sixteen,
            kv_heads=h, n_sink=0, partition=p, bits=2, sm_scale=None, num_splits=1,
        )  # fmt: skip

"""GPU correctness at full shapes: Triton kernels against the PyTorch reference on the same device.

Writes a JSON of relative errors and mismatch counts; exits non-zero on any failure.
    python benchmarks/device_correctness.py --out correctness.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hack_kernels import HackConfig, quantize_kv, reference_attention  # noqa: E402
from hack_kernels.quantize import quantize_groups  # noqa: E402
from hack_kernels.triton import launch  # noqa: E402
from hack_kernels.triton.decode import decode_attention  # noqa: E402
from hack_kernels.triton.paged_cache import PagedHackCache  # noqa: E402
from hack_kernels.triton.prefill import prefill_attention  # noqa: E402
from hack_kernels.triton.quantize import quantize_groups_triton  # noqa: E402

TOL = 1e-3


def rel(a, b) -> float:
    a, b = a.double(), b.double()
    if not torch.isfinite(a).all():
        return float("inf")
    return float((a - b).norm() / b.norm())


def check_quantize(results):
    for dtype in (torch.float16, torch.bfloat16):
        for p in (32, 64, 128):
            x = (torch.randn(2, 8, 4096, 128, device="cuda") * 3).to(dtype)
            for dim in (-1, -2):
                a = quantize_groups(x, dim, 2, p)
                b = quantize_groups_triton(x, dim, 2, p)
                bad = {
                    f: int((getattr(a, f) != getattr(b, f)).sum())
                    for f in ("codes", "mins", "scales", "sums")
                }
                results.append({"check": "quantize_bit_exact", "dtype": str(dtype), "partition": p, "dim": dim,
                                "mismatches": bad, "ok": not any(bad.values())})  # fmt: skip


def check_prefill(results, layout="paper"):
    for d, p, s, sinks, dtype in ((128, 64, 2048, 4, torch.float16), (64, 32, 1000, 0, torch.bfloat16),
                                  (128, 128, 1500, 0, torch.float16)):  # fmt: skip
        cfg = HackConfig(partition=p, sink_tokens=sinks, layout=layout)
        q = torch.randn(1, 32, s, d, device="cuda").to(dtype)
        k = (torch.randn(1, 8, s, d, device="cuda") + 0.5).to(dtype)
        v = torch.randn(1, 8, s, d, device="cuda").to(dtype)
        out = torch.full(q.shape, float("nan"), device="cuda")
        prefill_attention(q, k, v, cfg, mode="hack", out=out)
        ref = reference_attention(q, quantize_kv(k, v, cfg))
        e = rel(out, ref)
        results.append({"check": "prefill", "layout": layout, "d": d, "partition": p, "seq": s, "dtype": str(dtype),
                        "rel_err": e, "ok": e <= TOL})  # fmt: skip


def check_decode(results):
    cases = [(128, 64, 4, [8191, 3000, 65, 1]), (64, 32, 0, [4096, 31, 700])]
    variants = (
        {"PREFETCH": False, "DOT16": False, "SLOTS": 1},
        {"PREFETCH": True, "DOT16": True, "SLOTS": 1},
        {"PREFETCH": False, "DOT16": False, "SLOTS": 4},
    )
    for variant in variants:
        for d, p, _, _ in cases:
            launch.TUNED[("decode", d, p)] = {**launch.DEFAULTS["decode"], **variant}
            launch.TUNED[("prefill", d, p)] = {
                **launch.DEFAULTS["prefill"],
                "DOT16": variant["DOT16"],
            }
        _check_decode_cases(results, cases, variant)
        check_prefill(results) if variant["DOT16"] else None
    launch.TUNED.clear()
    launch.TUNED.update(launch._load_tuned())
    _check_decode_cases(results, cases + [(128, 128, 0, [300, 129])], {}, "kivi")
    check_prefill(results, "kivi")


def _check_decode_cases(results, cases, variant, layout="paper"):
    for d, p, sinks, lens in cases:
        cfg = HackConfig(partition=p, sink_tokens=sinks, layout=layout)
        n = len(lens)
        cache = PagedHackCache(
            cfg, sum(lens) // p + 4 * n, n, 8, d, max(lens) // p + 2, device="cuda"
        )
        qkvs = []
        for i, t in enumerate(lens):
            k = (torch.randn(1, 8, t, d, device="cuda") + 0.5).half()
            v = torch.randn(1, 8, t, d, device="cuda").half()
            qkvs.append(quantize_kv(k, v, cfg))
            cache.load(i, qkvs[-1])
        for _ in range(p + 1):  # every slot closes at least one page
            kn = torch.randn(n, 8, 1, d, device="cuda").half()
            vn = torch.randn(n, 8, 1, d, device="cuda").half()
            cache.append(kn, vn)
            for i in range(n):
                qkvs[i].append(kn[i : i + 1], vn[i : i + 1])
        q = torch.randn(n, 32, 1, d, device="cuda").half()
        out = torch.full(q.shape, float("nan"), device="cuda")
        decode_attention(q, cache, out=out)
        errs = [rel(out[i : i + 1], reference_attention(q[i : i + 1], qkvs[i])) for i in range(n)]
        results.append({"check": "decode", "layout": layout, "d": d, "partition": p, "lens": lens, "rel_err": errs, **variant,
                        "ok": max(errs) <= TOL})  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    results: list[dict] = []
    for fn in (check_quantize, check_prefill, check_decode):
        try:
            fn(results)
        except Exception as e:  # noqa: BLE001 - record and go on to the other checks
            results.append({"check": fn.__name__, "error": f"{type(e).__name__}: {e}", "ok": False})
    Path(args.out).write_text(json.dumps(results, indent=1))
    for r in results:
        print(json.dumps(r))
    bad = [r for r in results if not r["ok"]]
    print(f"{len(results) - len(bad)}/{len(results)} correctness checks passed")
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()

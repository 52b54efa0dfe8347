"""Kivi quantize-and-pack kernels on the GPU: launch choices for K and V, checked and timed.

    python benchmarks/device_quantize_variants.py --out quantize_variants.json
Each choice is first checked bit for bit against the generic kernel (quantize_groups_triton,
itself tested against the PyTorch path), then K and V are timed apart on 64K tokens x 8 heads x
d128 next to a copy of the same bytes.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from triton.testing import do_bench_cudagraph

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hack_kernels.kv import K_STREAM, V_STREAM  # noqa: E402
from hack_kernels.triton import launch  # noqa: E402
from hack_kernels.triton.quantize import quantize_groups_triton  # noqa: E402
from hack_kernels.triton.quantize_kivi import (  # noqa: E402
    quantize_k_tokens,
    quantize_kivi_triton,
    quantize_v_rows,
)

FIELDS = ("codes", "mins", "scales", "sums")


def us(fn) -> float:
    return 1e3 * do_bench_cudagraph(fn, rep=100, return_mode="median")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--k", default="[[32, 2], [64, 4], [128, 4], [128, 8], [64, 2]]")
    ap.add_argument("--v", default="[[16, 2], [32, 4], [64, 4], [64, 8], [32, 2]]")
    args = ap.parse_args()
    k = torch.randn(1, 8, 65536, 128, device="cuda", dtype=torch.float16)
    v = torch.randn_like(k)
    small = [torch.randn(2, 3, 640, 128, device="cuda", dtype=torch.float16) * 3 for _ in (0, 1)]
    gk = quantize_groups_triton(small[0], -2, 2, 64, stream=K_STREAM)
    gv = quantize_groups_triton(small[1], -1, 2, 64, stream=V_STREAM)
    out = torch.empty_like(k)
    rows = [{"copy_one_tensor_us": us(lambda: out.copy_(k)),
             "generic_k_us": us(lambda: quantize_groups_triton(k, -2, 2, 64)),
             "generic_v_us": us(lambda: quantize_groups_triton(v, -1, 2, 64))}]  # fmt: skip
    print(json.dumps(rows[0]), flush=True)
    key = ("quantize_kivi", 128, 64)
    pairs = list(zip(json.loads(args.k), json.loads(args.v), strict=True))
    for (bd, kw), (bt, vw) in pairs:
        launch.TUNED[key] = {"BLOCK_D": bd, "k_warps": kw, "BLOCK_T": bt, "v_warps": vw}
        row = dict(launch.TUNED[key])
        try:
            fk, fv = quantize_kivi_triton(*small, 2, 64, streams=(K_STREAM, V_STREAM))
            row["exact"] = all(
                torch.equal(getattr(a, f), getattr(b, f)) for a, b in ((gk, fk), (gv, fv))
                for f in FIELDS
            )  # fmt: skip
            row["k_and_v_us"] = us(lambda: quantize_kivi_triton(k, v, 2, 64))
            row["k_us"] = us(lambda: quantize_k_tokens(k, 2, 64))
            row["v_us"] = us(lambda: quantize_v_rows(v, 2, 64))
        except Exception as e:  # noqa: BLE001 - record the failing choice, go on
            row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
        rows.append(row)
        print(json.dumps(row), flush=True)
    Path(args.out).write_text(json.dumps({"device": torch.cuda.get_device_name(), "rows": rows}))


if __name__ == "__main__":
    main()

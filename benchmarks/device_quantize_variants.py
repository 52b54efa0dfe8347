"""Quantize-and-pack variants on the GPU: strided-group kernel on/off x rows per program.

    python benchmarks/device_quantize_variants.py --out quantize_variants.json
K and V of 64K tokens x 8 heads x d128 in fp16, both layouts; bit-exactness against the PyTorch
path is checked for every variant before it is timed; bandwidth against a device copy.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from triton.testing import do_bench

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hack_kernels import HackConfig  # noqa: E402
from hack_kernels.kv import _quantize_closed  # noqa: E402
from hack_kernels.triton import launch  # noqa: E402
from hack_kernels.triton.quantize import quantize_kv_triton  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    k = torch.randn(1, 8, 65536, 128, device="cuda", dtype=torch.float16) * 2
    v = torch.randn_like(k)
    x = torch.empty(1 << 29, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    copy = 2 * x.numel() / (1e3 * do_bench(lambda: y.copy_(x), rep=100)) / 1e6
    rows = []
    for layout in ("kivi", "paper"):
        cfg = HackConfig(layout=layout)
        small = slice(0, 4096)
        want = _quantize_closed(k[:, :, small], v[:, :, small], cfg, 0)
        for cols in (True, False):
            for br in (32, 64, 128):
                launch.TUNED[("quantize", 0, 64)] = {"BLOCK_R": br, "num_warps": 4, "COLS": cols}
                got = quantize_kv_triton(k[:, :, small], v[:, :, small], cfg, validate=False)
                exact = all(
                    torch.equal(getattr(a, f), getattr(b, f))
                    for a, b in ((want[0], got.k_q), (want[1], got.v_q))
                    for f in ("codes", "mins", "scales", "sums")
                )
                us = 1e3 * do_bench(
                    lambda c=cfg: quantize_kv_triton(k, v, c, validate=False), rep=100
                )
                qkv = quantize_kv_triton(k, v, cfg, validate=False)
                moved = 2 * k.numel() * 2 + qkv.k_q.nbytes + qkv.v_q.nbytes
                tbps = moved / us / 1e6
                row = {"layout": layout, "cols_kernel": cols, "BLOCK_R": br, "bit_exact": exact,
                       "us": us, "tbps": tbps, "fraction_of_copy": tbps / copy}  # fmt: skip
                rows.append(row)
                print(json.dumps(row), flush=True)
    out = {"device": torch.cuda.get_device_name(), "copy_tbps": copy, "rows": rows}
    Path(args.out).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()

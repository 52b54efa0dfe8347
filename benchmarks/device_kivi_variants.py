"""Kivi decode kernel variants on the GPU: code-tile unpacking x warps, checked and timed.

    python benchmarks/device_kivi_variants.py --out variants.json
Each variant is first checked against reference_attention (ragged batch, small), then timed on
decode with 32 q / 8 kv heads (d128 as Llama-8B, or --head-dim 64) at the given shapes, next to
SDPA.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from triton.testing import do_bench_cudagraph

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hack_kernels import HackConfig, quantize_kv, reference_attention  # noqa: E402
from hack_kernels.triton import launch  # noqa: E402
from hack_kernels.triton.decode import decode_attention  # noqa: E402
from hack_kernels.triton.paged_cache import PagedHackCache  # noqa: E402
from hack_kernels.triton.quantize import quantize_kv_triton  # noqa: E402

SDPA = torch.nn.functional.scaled_dot_product_attention
CFG = HackConfig(layout="kivi")


def rel_err(cfg: HackConfig, d: int) -> float:
    lens = [3000, 65, 700]
    cache = PagedHackCache(cfg, 100, 3, 8, d, 64, device="cuda")
    qkvs = []
    for i, t in enumerate(lens):
        k = (torch.randn(1, 8, t, d, device="cuda") * 2).half()
        v = torch.randn(1, 8, t, d, device="cuda").half()
        qkvs.append(quantize_kv(k, v, cfg))
        cache.load(i, qkvs[-1])
    q = torch.randn(3, 32, 1, d, device="cuda").half()
    out = torch.full(q.shape, float("nan"), device="cuda")
    decode_attention(q, cache, out=out)
    errs = []
    for i in range(3):
        ref = reference_attention(q[i : i + 1], qkvs[i]).double()
        errs.append(float((out[i : i + 1].double() - ref).norm() / ref.norm()))
    return max(errs)


def case(batch: int, ctx: int, d: int):
    k = torch.randn(batch, 8, ctx, d, device="cuda", dtype=torch.float16)
    v = torch.randn_like(k)
    q = torch.randn(batch, 32, 1, d, device="cuda", dtype=torch.float16)
    qkv = quantize_kv_triton(k, v, CFG, validate=False)
    pages = ctx // CFG.partition
    cache = PagedHackCache(CFG, batch * pages, batch, 8, d, pages, device="cuda")
    for i in range(batch):
        cache.load(i, qkv, batch_index=i)
    sdpa = 1e3 * do_bench_cudagraph(lambda: SDPA(q, k, v, enable_gqa=True), rep=100)
    return q, cache, pages, sdpa


def _sass(compiled) -> str | None:
    try:
        return compiled.asm["sass"]
    except Exception:  # noqa: BLE001 - no disassembler on this machine
        return None


def _histogram(sass: str) -> dict[str, int]:
    """SASS opcode counts (whole kernel; the page loop dominates the dynamic count)."""
    counts: dict[str, int] = {}
    for line in sass.splitlines():
        line = line.strip()
        if not line.startswith("/*") or "*/" not in line:
            continue
        body = line.split("*/", 1)[1].strip()
        if not body or body.startswith("/*"):
            continue
        op = body.split()[0]
        if op.startswith("@"):
            op = body.split()[1]
        op = op.rstrip(";").split(".")[0]
        counts[op] = counts.get(op, 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: -kv[1])[:25])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--shapes", default="16x32768,1x32768,1x4096,1x1024", help="BATCHxCONTEXT,...")
    ap.add_argument(
        "--variants",
        default="[[2, 2, 32, 2, 2, 0]]",
        help="JSON list of [warps, unpack, waves, slots, min pages a split, register cap"
        " (, most splits)]",
    )
    ap.add_argument("--head-dim", type=int, default=128, choices=[64, 128])
    args = ap.parse_args()
    d = args.head_dim
    pairs = [tuple(int(x) for x in s.split("x")) for s in args.shapes.split(",")]
    shapes = {(b, c): case(b, c, d) for b, c in pairs}
    rows = []
    key = ("decode_kivi", d, 64)
    # a fused merge of the partials by the last program (atomic arrival counter) was measured
    # slower everywhere and removed: attention_h100_kivi_merge_variants.json
    variants = json.loads(args.variants)
    for warps, unpack, waves, slots, minp, maxnreg, *most in variants:
        conf = {"num_warps": warps, "num_stages": 1, "waves": waves, "min_pages": minp,
                "UNPACK": unpack, "SLOTS": slots, "maxnreg": maxnreg,
                "max_splits": most[0] if most else 64}  # fmt: skip
        if True:
            launch.TUNED[key] = conf
            row = {**conf}
            try:
                row["rel_err"] = rel_err(CFG, d)
                for (b, c), (q, cache, pages, sdpa) in shapes.items():
                    us = 1e3 * do_bench_cudagraph(
                        lambda q=q, cache=cache, pages=pages: decode_attention(
                            q, cache, max_pages=pages
                        ),
                        rep=100,
                    )
                    row[f"b{b}_{c}_us"] = us
                    row[f"b{b}_{c}_x_sdpa"] = sdpa / us
                ck = launch.LAST_COMPILED.get(key)
                row["n_regs"] = getattr(ck, "n_regs", None)
                row["n_spills"] = getattr(ck, "n_spills", None)
                sass = _sass(ck)
                if sass:
                    name = f"sass_w{warps}_u{unpack}_s{slots}_r{maxnreg}.txt"
                    (Path(args.out).parent / name).write_text(sass)
                    row["sass_opcodes"] = _histogram(sass)
            except Exception as e:  # noqa: BLE001 - record the failing variant, go on
                row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
            rows.append(row)
            print(json.dumps(row), flush=True)
    Path(args.out).write_text(json.dumps({"device": torch.cuda.get_device_name(), "rows": rows}))


if __name__ == "__main__":
    main()

"""Where a short decode call's time goes on the GPU: each kernel's duration against the call.

    python benchmarks/device_decode_breakdown.py --out breakdown.json [--shapes ...] [--combine 128,32]
For each shape, hack-kv's decode and torch SDPA are captured in a CUDA graph and replayed under
torch.profiler; the kernels' mean durations (CUPTI) are reported next to the call's median
(do_bench_cudagraph), so the difference is launch gaps and tails, not work. --combine times the
decode once per split-merge block width (launch.COMBINE_BLOCK_D), in rounds, interleaved.
--prefill 4096,16384 profiles eager prefill in fp16 mode (SDPA, then quantize-and-pack) the same
way, with the host's time per call beside the GPU's.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile
from triton.testing import do_bench, do_bench_cudagraph

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hack_kernels import HackConfig  # noqa: E402
from hack_kernels.triton import (
    launch,  # noqa: E402
    quantize,  # noqa: E402
)
from hack_kernels.triton.decode import decode_attention  # noqa: E402
from hack_kernels.triton.paged_cache import PagedHackCache  # noqa: E402
from hack_kernels.triton.prefill import prefill_attention  # noqa: E402
from hack_kernels.triton.quantize import quantize_kv_triton  # noqa: E402

SDPA = torch.nn.functional.scaled_dot_product_attention
MODELS = {"llama8b_d128": (32, 8, 128), "d64": (32, 8, 64)}
REPLAYS = 200


def kernel_times(fn, graph: bool = True, calls: int = REPLAYS) -> dict[str, float]:
    """Mean GPU microseconds per call of each kernel fn launches (CUPTI), replayed from a CUDA
    graph or called eagerly."""
    fn()
    torch.cuda.synchronize()
    run = fn
    if graph:
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            fn()
        run = g.replay
    for _ in range(20):
        run()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            run()
        torch.cuda.synchronize()
    total: dict[str, float] = defaultdict(float)
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            total[ev.name[:80]] += ev.device_time
    return {name: t / calls for name, t in sorted(total.items(), key=lambda kv: -kv[1])}


def measure(model: str, batch: int, ctx: int, cfg: HackConfig, widths: list[int]) -> dict:
    hq, hk, d = MODELS[model]
    k = torch.randn(batch, hk, ctx, d, device="cuda", dtype=torch.float16)
    v = torch.randn_like(k)
    q = torch.randn(batch, hq, 1, d, device="cuda", dtype=torch.float16)
    qkv = quantize_kv_triton(k, v, cfg, validate=False)
    pages = ctx // cfg.partition
    cache = PagedHackCache(cfg, batch * pages, batch, hk, d, pages, device="cuda")
    for i in range(batch):
        cache.load(i, qkv, batch_index=i)
    calls = {
        "hack": lambda: decode_attention(q, cache, max_pages=pages),
        "sdpa": lambda: SDPA(q, k, v, enable_gqa=True),
    }
    row = {"model": model, "batch": batch, "context": ctx}
    for name, fn in calls.items():
        row[f"{name}_call_us"] = 1e3 * do_bench_cudagraph(fn, rep=100)
        row[f"{name}_kernels_us"] = kernel_times(fn)
        row[f"{name}_kernel_sum_us"] = sum(row[f"{name}_kernels_us"].values())
    times: dict[int, list[float]] = {w: [] for w in widths}
    for _ in range(3):
        for w in widths:
            launch.COMBINE_BLOCK_D = w
            times[w].append(1e3 * do_bench_cudagraph(calls["hack"], rep=100))
    launch.COMBINE_BLOCK_D = widths[0]
    row["hack_call_us_by_combine_width"] = {w: sorted(t)[1] for w, t in times.items()}
    return row


def measure_prefill(seq: int, cfg: HackConfig) -> dict:
    """Eager fp16-mode prefill (Llama-8B shape): kernels' GPU time, host time per call, and the
    call's time against SDPA alone (do_bench, as benchmarks/attention.py)."""
    hq, hk, d = MODELS["llama8b_d128"]
    q = torch.randn(1, hq, seq, d, device="cuda", dtype=torch.float16)
    k = torch.randn(1, hk, seq, d, device="cuda", dtype=torch.float16)
    v = torch.randn_like(k)
    calls = {
        "fp16_mode": lambda: prefill_attention(q, k, v, cfg, mode="fp16", validate=False),
        "sdpa": lambda: SDPA(q, k, v, is_causal=True, enable_gqa=True),
        "quantize": lambda: quantize_kv_triton(k, v, cfg, validate=False),
        "quantize_kivi_kernels": lambda: quantize_kv_triton(k, v, cfg, validate=False),
    }
    row: dict = {"prefill": seq}
    for name, fn in calls.items():
        # the kivi quantize kernels, which eager calls this small do not take by default
        quantize.KIVI_EAGER_MIN_ROWS = 0 if name.endswith("kivi_kernels") else 1 << 20
        row[f"{name}_us"] = 1e3 * do_bench(fn, rep=200, return_mode="median")
        row[f"{name}_kernels_us"] = kernel_times(fn, graph=False, calls=20)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(20):
            fn()
        row[f"{name}_host_us"] = (time.perf_counter() - t0) / 20 * 1e6  # launches queue ahead
        torch.cuda.synchronize()
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--shapes", default="llama8b_d128:1x1024,llama8b_d128:1x4096,d64:1x4096")
    ap.add_argument("--combine", default="128", help="split-merge block widths to time")
    ap.add_argument("--prefill", default="", help="sequence lengths of fp16-mode prefill")
    args = ap.parse_args()
    widths = [int(w) for w in args.combine.split(",")]
    rows = []
    for seq in [int(x) for x in args.prefill.split(",") if x]:
        rows.append(measure_prefill(seq, HackConfig(layout="kivi")))
        print(json.dumps(rows[-1]), flush=True)
    for spec in [x for x in args.shapes.split(",") if x]:
        model, shape = spec.split(":")
        batch, ctx = (int(x) for x in shape.split("x"))
        rows.append(measure(model, batch, ctx, HackConfig(layout="kivi"), widths))
        print(json.dumps(rows[-1]), flush=True)
    Path(args.out).write_text(json.dumps({"device": torch.cuda.get_device_name(), "rows": rows}))


if __name__ == "__main__":
    main()

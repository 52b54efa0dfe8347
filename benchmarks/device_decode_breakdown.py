"""Where a short decode call's time goes on the GPU: each kernel's duration against the call.

    python benchmarks/device_decode_breakdown.py --out breakdown.json [--shapes ...] [--combine 128,32]
For each shape, hack-kv's decode and torch SDPA are captured in a CUDA graph and replayed under
torch.profiler; the kernels' mean durations (CUPTI) are reported next to the call's median
(do_bench_cudagraph), so the difference is launch gaps and tails, not work. --combine times the
decode once per split-merge block width (launch.COMBINE_BLOCK_D), in rounds, interleaved.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile
from triton.testing import do_bench_cudagraph

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hack_kernels import HackConfig  # noqa: E402
from hack_kernels.triton import launch  # noqa: E402
from hack_kernels.triton.decode import decode_attention  # noqa: E402
from hack_kernels.triton.paged_cache import PagedHackCache  # noqa: E402
from hack_kernels.triton.quantize import quantize_kv_triton  # noqa: E402

SDPA = torch.nn.functional.scaled_dot_product_attention
MODELS = {"llama8b_d128": (32, 8, 128), "d64": (32, 8, 64)}
REPLAYS = 200


def kernel_times(fn) -> dict[str, float]:
    """Mean GPU microseconds per call of each kernel fn launches (graph replays, CUPTI)."""
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    for _ in range(20):
        graph.replay()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(REPLAYS):
            graph.replay()
        torch.cuda.synchronize()
    total: dict[str, float] = defaultdict(float)
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            total[ev.name[:80]] += ev.device_time
    return {name: t / REPLAYS for name, t in sorted(total.items(), key=lambda kv: -kv[1])}


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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--shapes", default="llama8b_d128:1x1024,llama8b_d128:1x4096,d64:1x4096")
    ap.add_argument("--combine", default="128", help="split-merge block widths to time")
    args = ap.parse_args()
    widths = [int(w) for w in args.combine.split(",")]
    rows = []
    for spec in args.shapes.split(","):
        model, shape = spec.split(":")
        batch, ctx = (int(x) for x in shape.split("x"))
        rows.append(measure(model, batch, ctx, HackConfig(layout="kivi"), widths))
        print(json.dumps(rows[-1]), flush=True)
    Path(args.out).write_text(json.dumps({"device": torch.cuda.get_device_name(), "rows": rows}))


if __name__ == "__main__":
    main()

"""HACK attention on the GPU against torch SDPA (16-bit) and dequantize-then-SDPA.

Run on a CUDA machine (benchmarks/device_check.sh runs it on the H100):
    python benchmarks/attention.py --out results.json [--quick] [--commit HASH]

Measures, in one run: the device's copy bandwidth (the memory ceiling), quantize-and-pack
bandwidth, decode (paged, split-K) and prefill (causal, quantization included) for a
Llama-8B-like model (32 q / 8 kv heads, d128) and a d64 model (32 q / 8 kv heads), with ratios
against baselines timed in the same process. Times are medians of CUDA-graph replays
(triton.testing.do_bench_cudagraph), so launch gaps count the same for every contender.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
import sys
from pathlib import Path

import torch
import triton
from triton.testing import do_bench, do_bench_cudagraph

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hack_kernels import HackConfig, dequantize  # noqa: E402
from hack_kernels.triton import launch  # noqa: E402
from hack_kernels.triton.decode import decode_attention  # noqa: E402
from hack_kernels.triton.paged_cache import PagedHackCache  # noqa: E402
from hack_kernels.triton.prefill import attend_quantized, prefill_attention  # noqa: E402
from hack_kernels.triton.quantize import quantize_groups_triton, quantize_kv_triton  # noqa: E402

SDPA = torch.nn.functional.scaled_dot_product_attention
MODELS = {"llama8b_d128": (32, 8, 128), "d64": (32, 8, 64)}


def bench(fn, graph: bool = True) -> float:
    """Median microseconds."""
    if graph:
        try:
            return 1e3 * do_bench_cudagraph(fn, rep=100, return_mode="median")
        except Exception as e:  # noqa: BLE001 - fall back to eager timing, say so
            print(f"  (graph capture failed: {type(e).__name__}: {e}; eager timing)", flush=True)
    return 1e3 * do_bench(fn, warmup=25, rep=100, return_mode="median")


def bench_cold(fn) -> float:
    """Median microseconds of fn replayed from a CUDA graph with L2 flushed before every replay
    (do_bench writes a 256 MB buffer between calls and times only the call). Decode in a real
    model reads a layer's KV after every other layer's KV and weights went through L2, so this is
    the figure to trust where the compressed cache fits in the H100's 50 MB L2 and 16-bit K and V
    do not."""
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return 1e3 * do_bench(graph.replay, warmup=25, rep=100, return_mode="median")


def copy_bandwidth() -> float:
    x = torch.empty(1 << 29, dtype=torch.uint8, device="cuda").random_()
    y = torch.empty_like(x)
    us = bench(lambda: y.copy_(x), graph=False)
    return 2 * x.numel() / us / 1e6  # TB/s, bytes read + written


def dequant_sdpa_fn(q, qkv):
    """KIVI/KVQuant-style: materialize 16-bit K and V from the codes, then SDPA."""

    paper = qkv.config.layout == "paper"

    def fn():
        kc = dequantize(qkv.k_q, torch.float16)
        kc = kc.transpose(-1, -2) if paper else kc  # paper: K^T is what is quantized
        vc = dequantize(qkv.v_q, torch.float16)
        k = torch.cat([qkv.k_sink, kc, qkv.k_open], 2)
        v = torch.cat([qkv.v_sink, vc, qkv.v_open], 2)
        return SDPA(q, k, v, enable_gqa=True)

    return fn


def compressed_bytes(qkv) -> int:
    return qkv.nbytes


def build_cache(k, v, cfg):
    """QuantizedKV of the whole batch (Triton), then each sequence into its paged slot."""
    b, h, t, d = k.shape
    qkv = quantize_kv_triton(k, v, cfg, validate=False)
    pages = max(1, t // cfg.partition)
    cache = PagedHackCache(cfg, b * pages, b, h, d, pages, dtype=k.dtype, device="cuda")
    for i in range(b):
        cache.load(i, qkv, batch_index=i)
    return cache, qkv


def decode_case(model, batch, ctx, cfg, rows, tune):
    hq, hk, d = MODELS[model]
    torch.manual_seed(batch * 131 + ctx)
    k = torch.randn(batch, hk, ctx, d, device="cuda", dtype=torch.float16)
    v = torch.randn_like(k)
    q = torch.randn(batch, hq, 1, d, device="cuda", dtype=torch.float16)
    cache, qkv = build_cache(k, v, cfg)
    max_pages = (ctx - cfg.sink_tokens) // cfg.partition
    kivi = cfg.layout == "kivi"
    key = ("decode_kivi" if kivi else "decode", d, cfg.partition)
    if tune:
        best = None
        if kivi:  # (warps, waves, slots, unpack, min pages, most splits);
            # device_kivi_variants.py has the history (d64: 1 warp; both: 4 pages a split)
            grid = [(2, 32, 2, 2, 4, 64), (2, 32, 2, 2, 2, 64), (2, 16, 2, 2, 4, 64),
                    (2, 64, 2, 2, 4, 64), (4, 32, 2, 2, 4, 64), (2, 32, 1, 2, 4, 64),
                    (2, 32, 2, 1, 4, 64), (1, 64, 2, 1, 4, 256)]  # fmt: skip
            configs = [
                {"num_warps": nw, "num_stages": 1, "waves": wv, "min_pages": mp, "SLOTS": sl,
                 "UNPACK": up, "max_splits": ms}
                for nw, wv, sl, up, mp, ms in grid
            ]  # fmt: skip
        else:
            # measured on the H100 (notes): 8 warps, PREFETCH, DOT16 and the transposed
            # orientation (removed) were slower
            grid = [(4, 16, 1), (4, 16, 4), (4, 8, 1)]
            configs = [
                {"num_warps": nw, "num_stages": 1, "waves": waves, "PREFETCH": False,
                 "DOT16": False, "SLOTS": slots, "min_pages": 2}
                for nw, waves, slots in grid
            ]  # fmt: skip
        for conf in configs:
            launch.TUNED[key] = conf
            try:
                us = bench(lambda: decode_attention(q, cache, max_pages=max_pages))
            except Exception as e:  # noqa: BLE001 - e.g. out of shared memory or registers
                print(f"    {conf}: failed {type(e).__name__}: {str(e)[:120]}", flush=True)
                continue
            print(f"    {conf}: {us:.1f} us", flush=True)
            if best is None or us < best[0]:
                best = (us, dict(conf))
        launch.TUNED[key] = best[1]
        print(f"  tuned {key}: {best[1]} ({best[0]:.1f} us)", flush=True)
    t_hack = bench(lambda: decode_attention(q, cache, max_pages=max_pages))
    t_sdpa = bench(lambda: SDPA(q, k, v, enable_gqa=True))
    t_hack_cold = bench_cold(lambda: decode_attention(q, cache, max_pages=max_pages))
    t_sdpa_cold = bench_cold(lambda: SDPA(q, k, v, enable_gqa=True))
    t_deq = bench(dequant_sdpa_fn(q, qkv)) if batch * ctx <= 16 * 32768 else None
    cb = compressed_bytes(qkv)
    fb = 2 * k.numel() * 2
    ops = 2 * 2 * batch * hq * ctx * d
    row = {
        "kind": "decode", "layout": cfg.layout, "model": model, "batch": batch, "context": ctx,
        "hack_us": t_hack, "sdpa_us": t_sdpa, "dequant_sdpa_us": t_deq,
        "speedup_vs_sdpa": t_sdpa / t_hack,
        "hack_us_cold_l2": t_hack_cold, "sdpa_us_cold_l2": t_sdpa_cold,
        "speedup_vs_sdpa_cold_l2": t_sdpa_cold / t_hack_cold,
        "speedup_vs_dequant_sdpa": (t_deq / t_hack) if t_deq else None,
        "hack_tbps_compressed": cb / t_hack / 1e6, "sdpa_tbps": fb / t_sdpa / 1e6,
        "hack_tops": ops / t_hack / 1e6, "compressed_bytes": cb, "fp16_bytes": fb,
    }  # fmt: skip
    rows.append(row)
    deq = f"{t_deq:9.1f}" if t_deq else "      n/a"
    print(
        f"decode {cfg.layout:5s} {model:13s} b{batch:<3d} ctx{ctx:>7d}: hack {t_hack:9.1f} us  sdpa {t_sdpa:9.1f}"
        f"  deq+sdpa {deq}  x{row['speedup_vs_sdpa']:.2f}  {row['hack_tbps_compressed']:.2f} TB/s"
        f" (sdpa {row['sdpa_tbps']:.2f}); L2 flushed: hack {t_hack_cold:.1f} sdpa {t_sdpa_cold:.1f}"
        f" x{row['speedup_vs_sdpa_cold_l2']:.2f}",
        flush=True,
    )
    torch.cuda.empty_cache()


def prefill_case(model, s, cfg, rows, tune):
    hq, hk, d = MODELS[model]
    torch.manual_seed(s)
    q = torch.randn(1, hq, s, d, device="cuda", dtype=torch.float16)
    k = torch.randn(1, hk, s, d, device="cuda", dtype=torch.float16)
    v = torch.randn_like(k)
    qkv = quantize_kv_triton(k, v, cfg, validate=False)
    key = ("prefill_kivi" if cfg.layout == "kivi" else "prefill", d, cfg.partition)
    if tune:
        best = None
        # paper: 8 warps / DOT16 were slower (notes); kivi: rows = E copies x BLOCK_P, keep small
        sizes = (16, 32) if cfg.layout == "kivi" else (64, 128)
        for bp, nw, d16 in [(bp, 4, False) for bp in sizes]:
            launch.TUNED[key] = {
                "BLOCK_P": bp,
                "num_warps": nw,
                "num_stages": 1,
                "PREFETCH": False,
                "DOT16": d16,
            }
            try:
                us = bench(lambda: attend_quantized(q, qkv), graph=False)
            except Exception as e:  # noqa: BLE001 - e.g. out of shared memory
                print(f"  config {launch.TUNED[key]} failed: {type(e).__name__}", flush=True)
                continue
            print(f"    {launch.TUNED[key]}: {us:.1f} us", flush=True)
            if best is None or us < best[0]:
                best = (us, dict(launch.TUNED[key]))
        launch.TUNED[key] = best[1]
        print(f"  tuned {key}: {best[1]} ({best[0]:.1f} us)", flush=True)

    t_sdpa = bench(lambda: SDPA(q, k, v, is_causal=True, enable_gqa=True), graph=False)
    t_attn = bench(lambda: attend_quantized(q, qkv), graph=False)
    t_hack = bench(
        lambda: prefill_attention(q, k, v, cfg, mode="hack", validate=False), graph=False
    )
    t_fp16 = bench(
        lambda: prefill_attention(q, k, v, cfg, mode="fp16", validate=False), graph=False
    )
    t_quant = bench(lambda: quantize_kv_triton(k, v, cfg, validate=False), graph=False)
    flops = 2 * 2 * hq * s * s * d / 2  # causal: half of the score matrix
    row = {
        "kind": "prefill", "layout": cfg.layout, "model": model, "seq": s,
        "sdpa_us": t_sdpa, "hack_us": t_hack, "hack_attention_only_us": t_attn,
        "fp16_mode_us": t_fp16, "quantize_us": t_quant,
        "speedup_hack_vs_sdpa": t_sdpa / t_hack, "speedup_fp16_mode_vs_sdpa": t_sdpa / t_fp16,
        "hack_tops": flops / t_attn / 1e6, "sdpa_tflops": flops / t_sdpa / 1e6,
    }  # fmt: skip
    rows.append(row)
    print(
        f"prefill {cfg.layout:5s} {model:13s} S{s:>6d}: sdpa {t_sdpa:9.1f} us  hack {t_hack:9.1f} (attn {t_attn:.1f},"
        f" quant {t_quant:.1f})  fp16-mode {t_fp16:9.1f}  x{row['speedup_hack_vs_sdpa']:.2f}"
        f" / x{row['speedup_fp16_mode_vs_sdpa']:.2f}  {row['hack_tops']:.0f} TOP/s",
        flush=True,
    )
    torch.cuda.empty_cache()


def quantize_case(cfg, copy_tbps, rows, tune):
    k = torch.randn(1, 8, 65536, 128, device="cuda", dtype=torch.float16)
    v = torch.randn_like(k)
    kivi = cfg.layout == "kivi"
    key = ("quantize_kivi", 128, cfg.partition) if kivi else ("quantize", 0, cfg.partition)
    choices = [
        {"BLOCK_D": 64, "k_warps": 2, "BLOCK_T": 16, "v_warps": 2},
        {"BLOCK_D": 64, "k_warps": 1, "BLOCK_T": 16, "v_warps": 2},
        {"BLOCK_D": 128, "k_warps": 2, "BLOCK_T": 32, "v_warps": 2},
        {"BLOCK_D": 128, "k_warps": 4, "BLOCK_T": 16, "v_warps": 2},
    ] if kivi else [
        {"BLOCK_R": br, "num_warps": 4} for br in (32, 64, 128)
    ]  # fmt: skip
    best = None
    for choice in choices if tune else ():
        launch.TUNED[key] = choice
        us = bench(lambda: quantize_kv_triton(k, v, cfg, validate=False))
        print(f"    {choice}: {us:.1f} us", flush=True)
        if best is None or us < best[0]:
            best = (us, dict(choice))
    if best:
        launch.TUNED[key] = best[1]
        print(f"  tuned {key}: {best[1]} ({best[0]:.1f} us)", flush=True)
    us = bench(lambda: quantize_kv_triton(k, v, cfg, validate=False))
    args = dict(bits=cfg.bits, partition=cfg.partition)
    if cfg.layout == "paper":  # K^T along head_dim, V along tokens
        us_k = bench(lambda: quantize_groups_triton(k.transpose(-1, -2), -2, **args))
        us_v = bench(lambda: quantize_groups_triton(v, -2, **args))
    else:  # K along tokens, V along head_dim
        us_k = bench(lambda: quantize_groups_triton(k, -2, **args))
        us_v = bench(lambda: quantize_groups_triton(v, -1, **args))
    print(f"  generic kernel: K alone {us_k:.1f} us, V alone {us_v:.1f} us", flush=True)
    qkv = quantize_kv_triton(k, v, cfg, validate=False)
    moved = 2 * k.numel() * 2 + qkv.k_q.nbytes + qkv.v_q.nbytes
    tbps = moved / us / 1e6
    kk = torch.empty_like(k)
    us_copy = bench(lambda: (kk.copy_(k), kk.copy_(v)))
    copy_same = 2 * 2 * k.numel() * 2 / us_copy / 1e6
    rows.append({
        "kind": "quantize", "layout": cfg.layout, "tokens": 65536, "kv_heads": 8, "head_dim": 128, "us": us,
        "generic_k_only_us": us_k, "generic_v_only_us": us_v, "fused_kivi": kivi,
        "tbps_read_plus_written": tbps, "copy_tbps": copy_tbps, "copy_same_tensors_tbps": copy_same,
        "fraction_of_copy": tbps / copy_tbps,
    })  # fmt: skip
    print(
        f"quantize-and-pack ({cfg.layout}) K+V 64K tok x 8 heads x d128: {us:.1f} us, {tbps:.2f} TB/s"
        f" = {tbps / copy_tbps:.0%} of copy ({copy_tbps:.2f} TB/s; same-tensor copy {copy_same:.2f})",
        flush=True,
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--commit", default="unknown")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--tune-out", default=None)
    ap.add_argument("--skip-prefill", action="store_true")
    ap.add_argument("--quantize-only", action="store_true", help="copy and quantize-and-pack only")
    ap.add_argument(
        "--retune", action="store_true", help="sweep even where tuned_h100.json has an entry"
    )
    ap.add_argument("--layouts", default="kivi,paper", help="comma list; kivi is the default")
    ap.add_argument("--bits", type=int, default=2, choices=[2, 4])
    args = ap.parse_args()
    rows: list[dict] = []
    copy_tbps = copy_bandwidth()
    print(f"copy bandwidth {copy_tbps:.2f} TB/s (read + written)", flush=True)
    for lay in args.layouts.split(","):
        cfg = HackConfig(layout=lay, bits=args.bits)  # partition 64, nearest
        run_layout(cfg, args, rows, copy_tbps)
    meta_cfg = HackConfig(bits=args.bits).to_dict()
    write_results(args, rows, meta_cfg)


def run_layout(cfg: HackConfig, args, rows: list[dict], copy_tbps: float) -> None:
    qkey = (
        ("quantize_kivi", 128, cfg.partition)
        if cfg.layout == "kivi"
        else ("quantize", 0, cfg.partition)
    )
    quantize_case(cfg, copy_tbps, rows, tune=args.retune or qkey not in launch.TUNED)
    if args.quantize_only:
        return
    dkey = "decode_kivi" if cfg.layout == "kivi" else "decode"
    pkey = "prefill_kivi" if cfg.layout == "kivi" else "prefill"
    if args.quick:
        dec = [("llama8b_d128", 16, 32768), ("llama8b_d128", 1, 32768), ("llama8b_d128", 1, 4096)]
        pre = [("llama8b_d128", 16384)]
    else:
        dec = [("llama8b_d128", 1, c) for c in (1024, 4096, 16384, 32768, 131072)]
        dec += [("llama8b_d128", 16, c) for c in (1024, 4096, 16384, 32768)]
        dec += [("llama8b_d128", 64, c) for c in (1024, 4096, 8192)]
        dec += [("d64", 1, c) for c in (4096, 32768)] + [("d64", 16, c) for c in (4096, 32768)]
        pre = [("llama8b_d128", s) for s in (4096, 16384, 32768)] + [("d64", 16384)]
    # each model's decode is tuned on its batch 16, 32K case (run first), then reused
    tuned = set()
    first = [(m, 16, 32768) for m in dict.fromkeys(m for m, _, _ in dec) if (m, 16, 32768) in dec]
    for model, b, c in first + [x for x in dec if x not in first]:
        d = MODELS[model][2]
        known = (dkey, d, cfg.partition) in launch.TUNED and not args.retune
        decode_case(model, b, c, cfg, rows, tune=(dkey, d) not in tuned and not known)
        tuned.add((dkey, d))
    if not args.skip_prefill:
        for model, s in pre:
            d = MODELS[model][2]
            known = (pkey, d, cfg.partition) in launch.TUNED and not args.retune
            prefill_case(model, s, cfg, rows, tune=(pkey, d) not in tuned and not known)
            tuned.add((pkey, d))


def write_results(args, rows: list[dict], cfg: dict) -> None:
    for key, ck in launch.LAST_COMPILED.items():
        info = {a: getattr(ck, a, None) for a in ("n_regs", "n_spills")}
        info["shared"] = getattr(getattr(ck, "metadata", None), "shared", None)
        print(f"compiled {key}: {info}", flush=True)
    meta = {
        "device": torch.cuda.get_device_name(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": args.commit,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "python": platform.python_version(),
        "config": cfg,
        "layouts": args.layouts.split(","),
        "timing": "median of CUDA-graph replays (decode), do_bench median (prefill, quantize)",
        "tuned": {"|".join(map(str, k)): v for k, v in launch.TUNED.items()},
    }
    Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    if args.tune_out:
        Path(args.tune_out).write_text(json.dumps(meta["tuned"], indent=1))
    print(f"wrote {args.out}; sm_scale {1 / math.sqrt(128):.4f}")


if __name__ == "__main__":
    main()

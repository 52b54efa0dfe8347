"""The Triton kernels on real K and V: SmolLM2-135M layers against 16-bit attention.

CPU (TRITON_INTERPRET=1) or GPU. Captures Q, K, V of a forward pass over real text, then per layer:
prefill_attention (mode "hack") and decode_attention (last token, paged cache; with --decode-sinks
sinks and --decode-bits bits as well) against float64 attention over the 16-bit K and V (cosine
similarity, relative error), and against reference_attention of the same quantization.
    TRITON_INTERPRET=1 python benchmarks/attention_real_kv.py --out results.json
The GPU machine has no model: capture on the CPU with --save-capture FILE (safetensors), carry
the file over and run there with --capture FILE.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hack_kernels import HackConfig, quantize_kv, reference_attention  # noqa: E402
from hack_kernels.triton import PagedHackCache, decode_attention, prefill_attention  # noqa: E402

VARIANTS = [
    HackConfig(layout="paper"),
    HackConfig(layout="paper", sink_tokens=4),
    HackConfig(layout="kivi", sink_tokens=4),
    HackConfig(bits=4, layout="kivi", sink_tokens=4),
]


def attention16(q, k, v) -> torch.Tensor:
    """float64 causal attention over the 16-bit values (GQA), the unquantized baseline."""
    g = q.shape[1] // k.shape[1]
    k, v = k.double().repeat_interleave(g, 1), v.double().repeat_interleave(g, 1)
    s = q.double() @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    t = q.shape[2]
    s = s.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), -torch.inf)
    return torch.softmax(s, -1) @ v


def load_layers(args, wanted: list[int]) -> tuple[str, dict]:
    """(model name, {layer: (q, k, v)}) of the wanted layers, from the model or a --capture
    file (which holds the layers it was saved with)."""
    from safetensors.torch import load_file, save_file

    if args.capture:
        t = load_file(args.capture)
        return args.model_name, {i: (t[f"q.{i}"], t[f"k.{i}"], t[f"v.{i}"]) for i in wanted}
    from integrations.capture import capture_qkv
    from integrations.model import load_model

    lm = load_model()
    import pydoc_data.topics as topics

    text = topics.topics["assignment"] * 8  # enough tokens for --tokens up to about 2K
    ids = lm.tokenizer(text, return_tensors="pt").input_ids[:, : args.tokens]
    every = capture_qkv(lm.model, ids)
    layers = {i: (every[i].q, every[i].k, every[i].v) for i in wanted}
    if args.save_capture:
        tensors = {}
        for i, qkv in layers.items():
            for name, x in zip("qkv", qkv, strict=True):
                tensors[f"{name}.{i}"] = x.to(torch.float16).contiguous()
        save_file(tensors, args.save_capture)
    return lm.name, layers


def decode_case(q, k, v, cfg: HackConfig, dev: str) -> tuple[torch.Tensor, torch.Tensor]:
    """decode_attention of the last token's query over a paged cache of the first t-1 tokens
    plus the last one appended, and reference_attention over the same quantized KV."""
    t = q.shape[2]
    pages = t // cfg.partition + 2
    cache = PagedHackCache(cfg, pages, 1, k.shape[1], k.shape[3], pages, device=dev)
    qkv = quantize_kv(k[:, :, : t - 1], v[:, :, : t - 1], cfg)
    cache.load(0, qkv.to(dev))
    cache.append(k[:, :, t - 1 :].to(dev), v[:, :, t - 1 :].to(dev))
    qkv.append(k[:, :, t - 1 :], v[:, :, t - 1 :])
    out = torch.full_like(q[:, :, t - 1 :], float("nan"), dtype=torch.float32, device=dev)
    decode_attention(q[:, :, t - 1 :].to(dev), cache, out=out)
    return out.cpu(), reference_attention(q[:, :, t - 1 :], qkv)


def compare(a: torch.Tensor, b: torch.Tensor) -> dict:
    a, b = a.double().flatten(), b.double().flatten()
    return {
        "cosine": float(torch.nn.functional.cosine_similarity(a, b, dim=0)),
        "rel_err": float((a - b).norm() / b.norm()),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--tokens", type=int, default=200)
    ap.add_argument("--layers", default="0,10,20,29")
    ap.add_argument("--partition", type=int, default=64)
    ap.add_argument("--layout", default="kivi", choices=["kivi", "paper"])
    ap.add_argument("--save-capture", default=None, help="write the captured Q, K, V here")
    ap.add_argument("--capture", default=None, help="read Q, K, V from this file, no model")
    ap.add_argument("--model-name", default="SmolLM2-135M-Instruct", help="with --capture")
    ap.add_argument("--decode-sinks", type=int, default=4)
    ap.add_argument("--decode-bits", type=int, default=4)
    args = ap.parse_args()
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    wanted = [int(x) for x in args.layers.split(",")]
    model_name, layers = load_layers(args, wanted)
    cfg = HackConfig(partition=args.partition, layout=args.layout)
    extra = HackConfig(
        partition=args.partition, layout=args.layout, sink_tokens=args.decode_sinks,
        bits=args.decode_bits,
    )  # fmt: skip
    rows = []
    for li in wanted:
        q, k, v = (t.to(torch.float16) for t in layers[li])
        base = attention16(q, k, v)
        out, qkv = prefill_attention(
            q.to(dev), k.to(dev), v.to(dev), cfg, mode="hack", out_dtype=torch.float32
        )
        ref = reference_attention(q, quantize_kv(k, v, cfg))
        t = q.shape[2]
        dec, dec_ref = decode_case(q, k, v, cfg, dev)
        dec_x, dec_x_ref = decode_case(q, k, v, extra, dev)
        row = {
            "layer": li,
            "tokens": t,
            "prefill_vs_16bit": compare(out.cpu(), base),
            "prefill_vs_reference": compare(out.cpu(), ref),
            "reference_vs_16bit": compare(ref, base),
            "decode_last_token_vs_16bit": compare(dec, base[:, :, t - 1 :]),
            "decode_last_token_vs_reference": compare(dec, dec_ref),
            f"decode_{extra.bits}bit_sinks{extra.sink_tokens}_vs_16bit": compare(
                dec_x, base[:, :, t - 1 :]
            ),
            f"decode_{extra.bits}bit_sinks{extra.sink_tokens}_vs_reference": compare(
                dec_x, dec_x_ref
            ),
        }
        # the same layer under other configurations, PyTorch reference only (layout and sinks
        # matter far more than the kernel, which equals the reference to ~1e-4)
        row["reference_cosine_vs_16bit_by_config"] = {
            f"{c.layout}/{c.bits}bit/sinks{c.sink_tokens}": compare(
                reference_attention(q, quantize_kv(k, v, c)), base
            )["cosine"]
            for c in VARIANTS
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    meta = {
        "model": model_name,
        "config": cfg.to_dict(),
        "decode_extra_config": extra.to_dict(),
        "device": torch.cuda.get_device_name() if dev == "cuda" else "cpu",
        "torch": torch.__version__,
        "text": "pydoc topics: assignment",
        "capture": args.capture or "captured in this run",
    }
    Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()

"""The Triton kernels on real K and V: SmolLM2-135M layers against 16-bit attention.

CPU (TRITON_INTERPRET=1) or GPU. Captures Q, K, V of a forward pass over real text, then per layer:
prefill_attention (mode "hack") and decode_attention (last token, paged cache) against float64
attention over the 16-bit K and V (cosine similarity, relative error), and against
reference_attention of the same quantization.
    TRITON_INTERPRET=1 python benchmarks/attention_real_kv.py --out results.json
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
from integrations.capture import capture_qkv  # noqa: E402
from integrations.model import load_model  # noqa: E402

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
    args = ap.parse_args()
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    lm = load_model()
    import pydoc_data.topics as topics

    text = topics.topics["assignment"]
    ids = lm.tokenizer(text, return_tensors="pt").input_ids[:, : args.tokens]
    layers = capture_qkv(lm.model, ids)
    cfg = HackConfig(partition=args.partition, layout=args.layout)
    rows = []
    for li in (int(x) for x in args.layers.split(",")):
        rec = layers[li]
        q, k, v = (t.to(torch.float16) for t in (rec.q, rec.k, rec.v))
        base = attention16(q, k, v)
        out, qkv = prefill_attention(
            q.to(dev), k.to(dev), v.to(dev), cfg, mode="hack", out_dtype=torch.float32
        )
        ref = reference_attention(q, quantize_kv(k, v, cfg))
        # decode: the last token's query over a paged cache of the first t-1 tokens plus itself
        t = q.shape[2]
        cache = PagedHackCache(
            cfg,
            t // cfg.partition + 2,
            1,
            k.shape[1],
            k.shape[3],
            t // cfg.partition + 2,
            device=dev,
        )
        cache.load(0, quantize_kv(k[:, :, : t - 1], v[:, :, : t - 1], cfg).to(dev))
        cache.append(k[:, :, t - 1 :].to(dev), v[:, :, t - 1 :].to(dev))
        dec = decode_attention(q[:, :, t - 1 :].to(dev), cache).float().cpu()
        row = {
            "layer": li,
            "tokens": t,
            "prefill_vs_16bit": compare(out.cpu(), base),
            "prefill_vs_reference": compare(out.cpu(), ref),
            "reference_vs_16bit": compare(ref, base),
            "decode_last_token_vs_16bit": compare(dec, base[:, :, t - 1 :]),
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
        "model": lm.name,
        "config": cfg.to_dict(),
        "device": dev,
        "text": "pydoc topics: assignment",
    }
    Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()

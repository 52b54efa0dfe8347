"""Per-layer quality and size of HACK on a model's real K and V (the engine of `hack-kv inspect`)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from tqdm import tqdm

from hack_kernels import HackConfig, dequantize_kv, quantize_kv, reference_attention

from .capture import LayerQKV


@dataclass
class LayerReport:
    layer: int
    tokens: int
    bytes_ratio: float  # quantized bytes / 16-bit bytes
    k_rel_err: float
    v_rel_err: float
    attn_rel_err: float  # reference_attention vs float64 attention over the 16-bit K and V
    attn_cosine: float

    def to_dict(self) -> dict:
        return asdict(self)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def attention_16bit(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal GQA attention in float64 over 16-bit K and V: the baseline HACK is measured against."""
    g = q.shape[1] // k.shape[1]
    k64 = k.half().double().repeat_interleave(g, 1)
    v64 = v.half().double().repeat_interleave(g, 1)
    return torch.nn.functional.scaled_dot_product_attention(q.double(), k64, v64, is_causal=True)


def inspect_layers(
    layers: list[LayerQKV], config: HackConfig, progress: bool = True
) -> list[LayerReport]:
    reports = []
    for i, qkv in enumerate(
        tqdm(layers, desc=f"layers p{config.partition} {config.layout}", disable=not progress)
    ):
        kv = quantize_kv(qkv.k, qkv.v, config)
        kd, vd = dequantize_kv(kv)
        out = reference_attention(qkv.q, kv, causal=True)
        ref = attention_16bit(qkv.q, qkv.k, qkv.v)
        cos = torch.nn.functional.cosine_similarity(out.double().flatten(), ref.flatten(), dim=0)
        reports.append(
            LayerReport(
                layer=i,
                tokens=kv.num_tokens,
                bytes_ratio=kv.nbytes / kv.nbytes_16bit(),
                k_rel_err=_rel(kd, qkv.k.half()),
                v_rel_err=_rel(vd, qkv.v.half()),
                attn_rel_err=_rel(out, ref),
                attn_cosine=float(cos),
            )
        )
    return reports


def summarize(reports: list[LayerReport]) -> dict:
    n = len(reports)
    keys = ("bytes_ratio", "k_rel_err", "v_rel_err", "attn_rel_err", "attn_cosine")
    out = {k: sum(getattr(r, k) for r in reports) / n for k in keys}
    out["attn_rel_err_max"] = max(r.attn_rel_err for r in reports)
    return out

"""Per-token and per-sample metrics, and means with standard errors over samples."""

from __future__ import annotations

import math

import torch


def token_metrics(ref_logits: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor) -> dict:
    """[L, V] logits of the 16-bit run and of a method, [L] true next tokens -> per-sample means."""
    lp_ref = ref_logits.double().log_softmax(-1)
    lp = logits.double().log_softmax(-1)
    nll = -lp.gather(-1, targets[:, None]).squeeze(-1)
    kl = (lp_ref.exp() * (lp_ref - lp)).sum(-1).clamp_min(0)
    top1 = (lp.argmax(-1) == lp_ref.argmax(-1)).double()
    return {"nll": nll.mean().item(), "kl": kl.mean().item(), "top1": top1.mean().item()}


def levenshtein(a: str, b: str) -> int:
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def edit_similarity(a: str, b: str) -> float:
    """1 - Levenshtein distance / longer length (1.0 for two empty strings)."""
    longest = max(len(a), len(b))
    return 1.0 if longest == 0 else 1.0 - levenshtein(a, b) / longest


def mean_se(values: list[float]) -> tuple[float, float]:
    n = len(values)
    if n == 0:
        return float("nan"), float("nan")
    m = sum(values) / n
    if n == 1:
        return m, float("nan")
    var = sum((v - m) ** 2 for v in values) / (n - 1)
    return m, math.sqrt(var / n)


def ppl_se(nlls: list[float]) -> tuple[float, float]:
    """Perplexity exp(mean NLL) and its standard error by the delta method."""
    m, se = mean_se(nlls)
    return math.exp(m), math.exp(m) * se


def ratio_change_se(nlls: list[float], ref_nlls: list[float]) -> tuple[float, float]:
    """Relative perplexity change (ppl / ppl_16bit - 1) from paired per-sample NLL differences."""
    m, se = mean_se([a - b for a, b in zip(nlls, ref_nlls, strict=False)])
    return math.exp(m) - 1, math.exp(m) * se

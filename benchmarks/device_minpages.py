"""Device sweep: pages per split-K program for short decode contexts (one-off experiment)."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from attention import MODELS, SDPA, bench, build_cache  # noqa: E402

from hack_kernels import HackConfig  # noqa: E402
from hack_kernels.triton import launch  # noqa: E402
from hack_kernels.triton.decode import decode_attention  # noqa: E402

cfg = HackConfig(layout="paper")


def case(model: str, batch: int, ctx: int) -> None:
    hq, hk, d = MODELS[model]
    k = torch.randn(batch, hk, ctx, d, device="cuda", dtype=torch.float16)
    v = torch.randn_like(k)
    q = torch.randn(batch, hq, 1, d, device="cuda", dtype=torch.float16)
    cache, _ = build_cache(k, v, cfg)
    mp = ctx // cfg.partition
    key = ("decode", d, cfg.partition)
    base = dict(launch.TUNED[key])
    sd = bench(lambda: SDPA(q, k, v, enable_gqa=True))
    res = []
    for minp in (1, 2, 4, 8, 16):
        launch.TUNED[key] = {**base, "min_pages": minp}
        res.append((minp, round(bench(lambda: decode_attention(q, cache, max_pages=mp)), 1)))
    launch.TUNED[key] = base
    print(model, batch, ctx, "sdpa", round(sd, 1), res, flush=True)


for args in [("llama8b_d128", 1, 1024), ("llama8b_d128", 1, 4096), ("llama8b_d128", 16, 1024),
             ("llama8b_d128", 1, 32768), ("d64", 1, 4096)]:  # fmt: skip
    case(*args)

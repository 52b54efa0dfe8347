"""`hack-kv eval` end to end: load the model, build samples, run every method, write the results."""

from __future__ import annotations

import datetime
import platform
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from .data import DATA_DIR, gen_samples, score_samples
from .methods import FP16, Method, default_methods
from .report import summarize, write
from .runner import Records, generate, score

GEN_METHODS = (
    "16-bit",
    "HACK 2b p64 paper",
    "HACK 2b p64 kivi s4",
    "HACK 4b p64 kivi s4",
    "KIVI-style 2b g32 r128",
    "KIVI-style 4b g32 r128",
)


@dataclass(frozen=True)
class Sizes:
    n_score: int  # scoring samples per dataset (topics, GSM8K, HumanEval)
    context_len: int
    target_len: int
    n_gen_humaneval: int
    n_gen_gsm8k: int
    gen_tokens: int


FULL = Sizes(
    n_score=4, context_len=320, target_len=40, n_gen_humaneval=5, n_gen_gsm8k=1, gen_tokens=20
)
CI = Sizes(n_score=1, context_len=96, target_len=12, n_gen_humaneval=1, n_gen_gsm8k=0, gen_tokens=4)


def _commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _versions() -> dict:
    import torch
    import transformers

    return {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }


def run_eval(
    loaded,
    sizes: Sizes = FULL,
    methods: list[Method] | None = None,
    gen_methods: list[str] | None = None,
    out_dir: Path | None = None,
    data_dir: Path = DATA_DIR,
    progress: bool = True,
    with_plot: bool = True,
    stem: str = "accuracy",
) -> dict:
    """Run the evaluation on a loaded model; returns {"rows", "meta", "paths"}."""
    model, tok = loaded.model, loaded.tokenizer
    methods = methods or default_methods()
    if methods[0] != FP16:
        methods = [FP16, *[m for m in methods if m != FP16]]
    by_name = {m.name: m for m in methods}
    gen = [
        by_name[n]
        for n in (gen_methods if gen_methods is not None else GEN_METHODS)
        if n in by_name
    ]
    if gen and gen[0] != FP16:
        gen = [FP16, *[m for m in gen if m != FP16]]
    start = time.time()
    rec = Records()
    samples = score_samples(tok, sizes.n_score, sizes.context_len, sizes.target_len, data_dir)
    score(model, samples, methods, rec, progress)
    prompts = gen_samples(
        tok, sizes.n_gen_humaneval, sizes.n_gen_gsm8k, sizes.context_len, data_dir
    )
    if prompts and gen:
        generate(model, tok, prompts, gen, sizes.gen_tokens, rec, progress)
    model.set_attn_implementation("sdpa")
    rows = summarize(rec)
    meta = {
        "model": loaded.name,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": _commit(),
        "device": f"CPU ({platform.machine()})",
        **_versions(),
        "seconds": round(time.time() - start, 1),
        "sizes": asdict(sizes),
    }
    paths = (
        write(rows, meta, out_dir, stem=stem, with_plot=with_plot) if out_dir is not None else {}
    )
    return {"rows": rows, "meta": meta, "paths": paths}

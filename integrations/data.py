"""Where the shared real data lives (../shared/data beside the checkout, or $HACK_KV_DATA)."""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path


def shared_data_dir() -> Path:
    """The first existing of $HACK_KV_DATA, ../shared/data from the repo root and from the cwd."""
    candidates = []
    if os.environ.get("HACK_KV_DATA"):
        candidates.append(Path(os.environ["HACK_KV_DATA"]))
    repo = Path(__file__).resolve().parents[1]
    candidates += [repo.parent / "shared" / "data", Path.cwd().parent / "shared" / "data"]
    for c in candidates:
        if c.is_dir():
            return c
    raise FileNotFoundError(
        "shared data not found: set HACK_KV_DATA or place ../shared/data beside the checkout "
        f"(looked in {', '.join(str(c) for c in candidates)})"
    )


def humaneval_records() -> list[dict]:
    with gzip.open(shared_data_dir() / "HumanEval.jsonl.gz", "rt") as f:
        return [json.loads(line) for line in f]


def humaneval_text(limit_chars: int = 60_000) -> str:
    """HumanEval prompts joined, the default text of `hack-kv inspect`."""
    out, size = [], 0
    for rec in humaneval_records():
        out.append(rec["prompt"])
        size += len(rec["prompt"])
        if size >= limit_chars:
            break
    return "\n".join(out)

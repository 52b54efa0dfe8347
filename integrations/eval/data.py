"""Evaluation texts: CPython's pydoc_data/topics.py, GSM8K and HumanEval from ../shared/data.

A scoring sample is a context (its KV is quantized) and a target (scored token by token over it);
a generation sample is a prompt and, for HumanEval, the canonical solution.
"""

from __future__ import annotations

import gzip
import json
from dataclasses import dataclass
from pathlib import Path

DATA_DIR = Path(__file__).resolve().parents[2].parent / "shared" / "data"


@dataclass
class ScoreSample:
    dataset: str
    context: list[int]
    target: list[int]


@dataclass
class GenSample:
    dataset: str
    prompt: list[int]
    reference: str | None  # the canonical solution (HumanEval), else None


def _need(path: Path) -> Path:
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: the evaluation data lives in ../shared/data/")
    return path


def humaneval(data_dir: Path = DATA_DIR) -> list[dict]:
    with gzip.open(_need(data_dir / "HumanEval.jsonl.gz"), "rt") as f:
        return [json.loads(line) for line in f]


def gsm8k(data_dir: Path = DATA_DIR) -> list[dict]:
    with open(_need(data_dir / "gsm8k_test.jsonl")) as f:
        return [json.loads(line) for line in f]


def topics_text() -> str:
    import pydoc_data.topics

    return "".join(pydoc_data.topics.topics.values())


def _gsm_text(item: dict) -> str:
    return f"Question: {item['question']}\nAnswer: {item['answer']}\n\n"


def _fit(tok, parts: list[str], context_len: int) -> list[int]:
    """Tokens of the newest whole parts that fit in context_len (at least the last part)."""
    ids: list[int] = []
    for text in reversed(parts):
        more = tok(text, add_special_tokens=False).input_ids
        if ids and len(ids) + len(more) > context_len:
            break
        ids = more + ids
    return ids[-context_len:]


def _he_context(tok, problems: list[dict], i: int, shots: range, context_len: int) -> list[int]:
    """HumanEval problem i's prompt after whole problems (prompt + solution) as few-shot examples."""
    texts = [problems[j]["prompt"] + problems[j]["canonical_solution"] + "\n\n" for j in shots]
    return _fit(tok, texts + [problems[i]["prompt"]], context_len)


def _gsm_context(tok, items: list[dict], i: int, shots: range, context_len: int) -> list[int]:
    """GSM8K question i after solved questions as few-shot examples."""
    texts = [_gsm_text(items[j]) for j in shots]
    return _fit(tok, texts + [f"Question: {items[i]['question']}\nAnswer:"], context_len)


def score_samples(tok, n: int, context_len: int, target_len: int, data_dir: Path = DATA_DIR):
    """n samples from each dataset; contexts up to context_len tokens, targets of target_len."""
    out: list[ScoreSample] = []
    ids = tok(
        topics_text()[: 6 * (context_len + target_len) * (n + 1) * 4], add_special_tokens=False
    ).input_ids
    step = context_len + target_len
    for i in range(n):
        window = ids[i * step : (i + 1) * step]
        out.append(ScoreSample("topics", window[:context_len], window[context_len:]))
    items = gsm8k(data_dir)
    for i in range(n):
        context = _gsm_context(tok, items, i, range(100 + 8 * i, 108 + 8 * i), context_len)
        target = tok(" " + items[i]["answer"], add_special_tokens=False).input_ids[:target_len]
        out.append(ScoreSample("gsm8k", context, target))
    problems = humaneval(data_dir)
    for i in range(n):
        context = _he_context(tok, problems, i, range(80 + 4 * i, 84 + 4 * i), context_len)
        solution = problems[i]["canonical_solution"]
        target = tok(solution, add_special_tokens=False).input_ids[:target_len]
        out.append(ScoreSample("humaneval", context, target))
    return out


def gen_samples(tok, n_humaneval: int, n_gsm8k: int, context_len: int, data_dir: Path = DATA_DIR):
    """Greedy-generation prompts: HumanEval (one-shot) and GSM8K (few-shot)."""
    out: list[GenSample] = []
    problems = humaneval(data_dir)
    for i in range(n_humaneval):
        prompt = _he_context(tok, problems, i, range(120 + 2 * i, 122 + 2 * i), context_len)
        out.append(GenSample("humaneval", prompt, problems[i]["canonical_solution"]))
    items = gsm8k(data_dir)
    for i in range(n_gsm8k):
        prompt = _gsm_context(tok, items, i, range(300 + 8 * i, 308 + 8 * i), context_len)
        out.append(GenSample("gsm8k", prompt, None))
    return out

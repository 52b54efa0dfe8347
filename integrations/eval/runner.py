"""The evaluation loops: teacher-forced scoring and greedy generation, every method side by side.

Scoring: a 16-bit forward over the context captures its K/V; each method turns that K/V into its
cache, and the target is fed in one chunk over it. The target's own tokens join the cache as they
would in decode (HACK: 16-bit open group, groups closed and quantized once full), so the scored
predictions attend over the method's representation of the context.
Generation: the prompt's KV (all but the last token) is prefilled in 16-bit and converted by each
method, then generate() decodes greedily over it: the disaggregated flow.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from tqdm import tqdm
from transformers import DynamicCache

from ..transformers_attention import register
from .data import GenSample, ScoreSample
from .methods import KV, Method, build_cache, to_16bit
from .metrics import edit_similarity, token_metrics


@dataclass
class Records:
    score: dict[str, list[dict]] = field(default_factory=dict)  # method -> per-sample metrics
    gen: dict[str, list[dict]] = field(default_factory=dict)
    nbytes: dict[str, list[float]] = field(default_factory=dict)  # method -> bytes / 16-bit bytes
    bits: dict[str, int] = field(default_factory=dict)


def _set_attn(model, name: str) -> None:
    if model.config._attn_implementation != name:
        model.set_attn_implementation(name)


def capture_kv(model, ids: list[int]) -> KV:
    _set_attn(model, "sdpa")
    cache = DynamicCache()
    with torch.no_grad():
        model(torch.tensor([ids]), past_key_values=cache, use_cache=True)
    return [(layer.keys, layer.values) for layer in cache.layers]


def rope_for(model):
    rotary = model.model.rotary_emb
    head_dim = model.config.hidden_size // model.config.num_attention_heads
    head_dim = getattr(model.config, "head_dim", None) or head_dim

    def rope(t: int):
        x = torch.zeros(1, t, head_dim)
        return rotary(x, torch.arange(t)[None])

    return rope


def _continue(model, method: Method, kv16: KV, rope, feed: list[int]):
    cache, nbytes = build_cache(method, kv16, rope)
    _set_attn(model, method.attn)
    with torch.no_grad():
        logits = model(torch.tensor([feed]), past_key_values=cache, use_cache=True).logits[0]
    return logits.float(), nbytes


def score(
    model, samples: list[ScoreSample], methods: list[Method], rec: Records, progress: bool = True
):
    register()
    rope = rope_for(model)
    bar = tqdm(total=len(samples) * len(methods), desc="scoring", disable=not progress)
    for s in samples:
        kv16 = to_16bit(capture_kv(model, s.context))
        full16 = 2 * sum(k.numel() + v.numel() for k, v in kv16)
        targets = torch.tensor(s.target[1:])
        ref = None
        for m in methods:
            logits, nbytes = _continue(model, m, kv16, rope, s.target)
            logits = logits[:-1]
            if ref is None:
                ref = logits  # methods[0] is the 16-bit reference
            row = token_metrics(ref, logits, targets)
            row["dataset"] = s.dataset
            rec.score.setdefault(m.name, []).append(row)
            rec.nbytes.setdefault(m.name, []).append(nbytes / full16)
            rec.bits[m.name] = m.bits
            bar.update()
    bar.close()


def generate(
    model,
    tok,
    samples: list[GenSample],
    methods: list[Method],
    max_new: int,
    rec: Records,
    progress=True,
):
    register()
    rope = rope_for(model)
    bar = tqdm(total=len(samples) * len(methods), desc="generating", disable=not progress)
    for s in samples:
        kv16 = to_16bit(capture_kv(model, s.prompt[:-1]))
        ref_text = None
        for m in methods:
            cache, _ = build_cache(m, kv16, rope)
            _set_attn(model, m.attn)
            ids = torch.tensor([s.prompt])
            with torch.no_grad():
                out = model.generate(
                    input_ids=ids,
                    attention_mask=torch.ones_like(ids),
                    past_key_values=cache,
                    max_new_tokens=max_new,
                    do_sample=False,
                    pad_token_id=tok.pad_token_id,
                )
            text = tok.decode(out[0, len(s.prompt) :], skip_special_tokens=True)
            if ref_text is None:
                ref_text = text
            row = {
                "dataset": s.dataset,
                "exact": float(text == ref_text),
                "edit_vs_16": edit_similarity(text, ref_text),
            }
            if s.reference is not None:
                canon = tok.decode(tok(s.reference, add_special_tokens=False).input_ids[:max_new])
                row["edit_vs_canonical"] = edit_similarity(text, canon)
            rec.gen.setdefault(m.name, []).append(row)
            bar.update()
    bar.close()

"""HackCache + the "hack" attention function on the real SmolLM2-135M, checked against standard
float32 attention (a full forward with transformers' own SDPA over the same tokens)."""

import pydoc_data.topics

import pytest
import torch

from hack_integrations.transformers_cache import HackCache, HackCacheError
from hack_kernels import HackConfig

TEXT = "".join(pydoc_data.topics.topics.values())


def _prompt_ids(tok, start: int, n_tokens: int) -> torch.Tensor:
    ids = tok(TEXT[start : start + 8 * n_tokens], return_tensors="pt").input_ids[:, :n_tokens]
    assert ids.shape[1] == n_tokens
    return ids


def _generate(model, ids, cache, n_new, mask=None, **kw):
    out = model.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids) if mask is None else mask,
        past_key_values=cache,
        max_new_tokens=n_new,
        min_new_tokens=n_new,
        do_sample=False,
        output_logits=True,
        return_dict_in_generate=True,
        **kw,
    )
    return out.sequences, torch.stack(out.logits, 1).float()  # [B, n_new, vocab]


def _float_logits(model, seq, n_new):
    """Standard attention, one full forward over the same tokens: logits that predicted them."""
    with torch.no_grad():
        logits = model(seq).logits.float()
    return logits[:, -n_new - 1 : -1]


def _kl(ref_logits, logits):
    lp, lq = ref_logits.log_softmax(-1), logits.log_softmax(-1)
    return (lp.exp() * (lp - lq)).sum(-1)


def test_prefill_stores_codes_of_the_true_keys_and_decode_appends(hack_model):
    model, tok = hack_model.model, hack_model.tokenizer
    n_prompt, n_new, p = 71, 6, 32
    ids = _prompt_ids(tok, 1000, n_prompt)
    cache = HackCache(HackConfig(bits=2, partition=p, sink_tokens=3, layout="paper"))
    seq, _ = _generate(model, ids, cache, n_new)
    stored = n_prompt + n_new - 1  # the last generated token is never fed back
    assert cache.get_seq_length() == stored
    assert len(cache.layers) == model.config.num_hidden_layers
    # Standard-attention K of the same tokens, layer 5; closed groups must hold codes of them.
    from transformers import DynamicCache

    ref = DynamicCache()
    with torch.no_grad():
        model.set_attn_implementation("sdpa")
        model(seq[:, :stored], past_key_values=ref)
    k_true = ref.layers[5].keys.double()  # [1, 3, T, 64]
    row = cache.layers[5].rows[0]
    closed = ((stored - 3) // p) * p
    assert (row.num_sink, row.num_closed, row.num_open) == (3, closed, stored - 3 - closed)
    assert row.k_q.codes.dtype == torch.uint8
    # Paper layout: K^T grouped along head_dim per token; unpack codes independently of dequantize.
    codes = row.k_q.unpacked_codes().double()  # [1, 3, closed, 64 / p, p]
    vals = row.k_q.mins.double()[..., None] + row.k_q.scales.double()[..., None] * codes
    k_hat = vals.reshape(1, 3, closed, 64)
    err = (k_hat - k_true[:, :, 3 : 3 + closed]).abs()
    bound = row.k_q.scales.double().repeat_interleave(p, -1) / 2 + 1e-3
    assert bool((err <= bound).all())
    assert torch.allclose(row.k_sink.double(), k_true[:, :, :3], rtol=2e-3, atol=1e-3)
    # Prompt tokens in the open group are stored as computed; decode tokens' K went through
    # quantized attention in earlier layers, so only the prompt part is compared.
    in_prompt = n_prompt - 3 - closed
    assert torch.allclose(
        row.k_open[:, :, :in_prompt].double(),
        k_true[:, :, 3 + closed : n_prompt],
        rtol=2e-3,
        atol=1e-3,
    )


@pytest.mark.parametrize("layout", ["paper", "kivi"])
def test_decode_logits_track_float_attention(hack_model, layout):
    model, tok = hack_model.model, hack_model.tokenizer
    ids = _prompt_ids(tok, 5000, 97)
    n_new = 6
    kls = {}
    for bits in (8, 2):
        seq, logits = _generate(
            model, ids, HackCache(HackConfig(bits=bits, partition=32, layout=layout)), n_new
        )
        model.set_attn_implementation("sdpa")
        ref = _float_logits(model, seq, n_new)
        model.set_attn_implementation("hack")
        # Step 0 comes from prefill, which attends over the fresh full-precision K/V.
        assert (logits[:, 0] - ref[:, 0]).abs().max() < 1e-3
        kls[bits] = _kl(ref[:, 1:], logits[:, 1:]).mean().item()
        if bits == 8:
            assert kls[8] < 2e-3
            assert torch.equal(logits[:, 1:].argmax(-1), ref[:, 1:].argmax(-1))
    # 2-bit codes must visibly change the decode logits: the quantized path is in use.
    assert kls[2] > 5 * kls[8]


@pytest.mark.parametrize("bits", [2])
def test_batch_with_left_padding_equals_single_runs(hack_model, bits):
    model, tok = hack_model.model, hack_model.tokenizer
    cfg = HackConfig(bits=bits, partition=32, sink_tokens=1)
    lengths, n_new = (40, 75, 33), 5
    prompts = [_prompt_ids(tok, 3000 + 2000 * i, n)[0] for i, n in enumerate(lengths)]
    width = max(lengths)
    pad = tok.pad_token_id
    ids = torch.stack([torch.cat([torch.full((width - len(p),), pad), p]) for p in prompts])
    mask = torch.stack(
        [torch.cat([torch.zeros(width - len(p)), torch.ones(len(p))]) for p in prompts]
    ).long()
    cache = HackCache(cfg)
    seq, logits = _generate(model, ids, cache, n_new, mask=mask)
    for b, p in enumerate(prompts):
        assert cache.layers[0].pads[b] == width - len(p)
        assert cache.layers[0].rows[b].num_tokens == len(p) + n_new - 1
        single = HackCache(cfg)
        single_seq, single_logits = _generate(model, p[None], single, n_new)
        assert torch.equal(seq[b, width:], single_seq[0, len(p) :])
        # Padded SDPA differs from unpadded in the last float bits; the 8-bit rounding of Q and P
        # can flip on such noise (as it does against float attention), hence a KL bound.
        assert (logits[b, 0] - single_logits[0, 0]).abs().max() < 1e-3
        assert _kl(single_logits[0], logits[b]).max() < 5e-4
        # Stripped padding: the same groups hold the same codes (rare flips from float noise).
        mine, theirs = cache.layers[0].rows[b].k_q, single.layers[0].rows[0].k_q
        assert mine.shape == theirs.shape
        assert (mine.unpacked_codes() == theirs.unpacked_codes()).float().mean() > 0.99


def test_sampling_with_top_k_1_equals_greedy(hack_model):
    model, tok = hack_model.model, hack_model.tokenizer
    ids = _prompt_ids(tok, 9000, 50)
    cfg = HackConfig(bits=2, partition=32)
    greedy, _ = _generate(model, ids, HackCache(cfg), 5)
    torch.manual_seed(0)
    sampled = model.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        past_key_values=HackCache(cfg),
        max_new_tokens=5,
        min_new_tokens=5,
        do_sample=True,
        top_k=1,
        temperature=0.7,
    )
    assert torch.equal(sampled, greedy)
    torch.manual_seed(1)
    free = model.generate(
        input_ids=ids.repeat(2, 1),
        attention_mask=torch.ones_like(ids).repeat(2, 1),
        past_key_values=HackCache(cfg),
        max_new_tokens=5,
        do_sample=True,
        top_k=50,
    )
    assert free.shape[0] == 2 and free.shape[1] <= ids.shape[1] + 5


def test_hack_cache_without_hack_attention_is_refused(smollm):
    model, tok = smollm.model, smollm.tokenizer
    assert model.config._attn_implementation != "hack"
    ids = _prompt_ids(tok, 100, 20)
    with pytest.raises(HackCacheError, match="attn_implementation='hack'"):
        model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            past_key_values=HackCache(),
            max_new_tokens=3,
        )

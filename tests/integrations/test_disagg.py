"""Disaggregated prefill/decode: KV -> HACK frames -> (store | transport) -> cache -> generate.

In-process pieces first (bit-exact frame round trip, store round trip on a real `hack-kv serve`),
then the cross-process `hack-kv demo` checked against the same steps run in this process.
"""

import pydoc_data.topics
import subprocess

import pytest
import torch

from hack_integrations.cli.demo import _start_store, default_prompt, parse_rate, run_demo
from hack_integrations.disagg import kv as kvmod
from hack_integrations.disagg.ship import block_key, store_get, store_put
from hack_kernels import HackConfig, quantize_kv
from hack_transport import wire

CFG = HackConfig(bits=2, partition=32, layout="kivi", sink_tokens=4)


def _same_qkv(a, b):
    for name in ("k_sink", "v_sink", "k_open", "v_open"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    for side in ("k_q", "v_q"):
        x, y = getattr(a, side), getattr(b, side)
        for part in ("codes", "mins", "scales", "sums"):
            assert torch.equal(getattr(x, part), getattr(y, part)), (side, part)


@pytest.fixture(scope="module")
def prefilled(smollm):
    ids = smollm.tokenizer(pydoc_data.topics.topics["for"][:700]).input_ids
    kv, first = kvmod.prefill(smollm.model, ids)
    return ids, kv, first


def test_frames_round_trip_bit_exact_and_decode_the_same(smollm, prefilled):
    ids, kv, first = prefilled
    ident = kvmod.identity(smollm.model, "t", CFG)
    blocks = kvmod.hack_blocks(kv, CFG, ident, 64)
    assert len(blocks) > 1
    back = [wire.decode_frame(wire.encode_frame(b), expect_model=ident) for b in blocks]
    joined = wire.join_blocks(back)
    for (k, v), got in zip(kv, joined, strict=True):
        _same_qkv(got, quantize_kv(k, v, CFG))
    payload = sum(b.nbytes for b in blocks)
    assert payload < 0.3 * sum(b.nbytes_16bit() for b in blocks)
    from hack_integrations.transformers_cache import HackCache

    got, _ = kvmod.decode(
        smollm.model, smollm.tokenizer, ids, first, kvmod.cache_from_blocks(back), 4
    )
    want, _ = kvmod.decode(
        smollm.model, smollm.tokenizer, ids, first, HackCache.from_kv(kv, CFG), 4
    )
    assert got == want and len(got) == 4


def test_raw16_frames_decode_like_plain_generate(smollm, prefilled):
    ids, kv, first = prefilled
    ident = kvmod.identity(smollm.model, "t", None)
    blocks = [wire.decode_frame(wire.encode_frame(b)) for b in kvmod.raw_blocks(kv, ident, 64)]
    got, _ = kvmod.decode(
        smollm.model, smollm.tokenizer, ids, first, kvmod.cache_from_blocks(blocks), 4
    )
    smollm.model.set_attn_implementation("sdpa")
    x = torch.tensor([ids])
    plain = smollm.model.generate(
        input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=4, do_sample=False
    )
    assert got == plain[0, len(ids) :].tolist()


def test_store_round_trip_on_a_real_service(smollm, prefilled, tmp_path):
    ids, kv, _ = prefilled
    ident = kvmod.identity(smollm.model, "t", CFG)
    blocks = kvmod.hack_blocks(kv, CFG, ident, 64)
    proc, address = _start_store(tmp_path)
    try:
        nbytes, _ = store_put(address, blocks, ids, "t/hack", None)
        keys = [block_key(b, ids, "t/hack") for b in blocks]
        assert len(set(keys)) == len(blocks)
        got, got_bytes, _ = store_get(address, keys, ident)
        assert got_bytes == nbytes == sum(len(wire.encode_frame(b)) for b in blocks)
        for a, b in zip(wire.join_blocks(got), wire.join_blocks(blocks), strict=True):
            _same_qkv(a, b)
        with pytest.raises(wire.ModelMismatch):
            store_get(address, keys[:1], kvmod.identity(smollm.model, "t", CFG.replace(bits=4)))
    finally:
        # the service drains for up to its grace period (10 s); on a loaded 2-core CI box its
        # exit has once taken over 15 s (0.1 s alone), so give it room before killing it
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise


def test_parse_rate():
    assert (
        parse_rate("100MB/s") == 100e6 and parse_rate("1Gbit") == 125e6 and parse_rate(None) is None
    )
    with pytest.raises(Exception, match="not a rate"):
        parse_rate("fast")


@pytest.mark.timeout(600)
def test_demo_across_processes_matches_in_process_decode(smollm):
    result = run_demo(
        transport="store", max_new_tokens=3, bits=2, partition=64, layout="kivi", sinks=4
    )
    pre, dec = result["prefill"], result["decode"]
    hack, raw = pre["codecs"]["hack"], pre["codecs"]["raw16"]
    assert hack["wire_bytes"] < 0.4 * raw["wire_bytes"]
    assert dec["codecs"]["hack"]["fetched_bytes"] == hack["wire_bytes"]
    # The same steps in this process give the same tokens: nothing was lost on the way.
    ids = smollm.tokenizer(default_prompt()).input_ids
    assert pre["tokens"] == ids
    kv, first = kvmod.prefill(smollm.model, ids)
    assert pre["first"] == first
    cfg = HackConfig(bits=2, partition=64, layout="kivi", sink_tokens=4)
    from hack_integrations.transformers_cache import HackCache

    want, _ = kvmod.decode(
        smollm.model, smollm.tokenizer, ids, first, HackCache.from_kv(kv, cfg), 3
    )
    assert dec["codecs"]["hack"]["tokens"] == want

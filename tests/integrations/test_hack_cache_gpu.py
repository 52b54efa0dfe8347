"""On CUDA, the "hack" attention function runs hack_kernels.triton's kernel; its generations match
the same run through reference_attention. A tiny random Llama (the GGUF does not travel to the GPU
machine); skipped without CUDA."""

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (Triton kernels)")


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, head_dim=64, max_position_embeddings=1024,
    )  # fmt: skip
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).to("cuda", torch.float16).eval()


@pytest.mark.parametrize("layout,partition", [("kivi", 64), ("kivi", 128), ("paper", 64)])
def test_triton_path_matches_reference_path(monkeypatch, layout, partition):
    from hack_integrations import transformers_attention as ta
    from hack_integrations.transformers_cache import HackCache
    from hack_kernels import HackConfig

    model = _tiny_llama()
    ta.enable_hack(model)
    ids = torch.randint(0, 512, (2, 203), device="cuda")
    mask = torch.ones_like(ids)
    mask[1, :17] = 0  # left padding on row 1
    cfg = HackConfig(bits=2, partition=partition, sink_tokens=4, layout=layout)
    calls = []
    real = ta.triton_supports
    monkeypatch.setattr(ta, "triton_supports", lambda q, kv: calls.append(real(q, kv)) or calls[-1])

    def run():
        out = model.generate(
            input_ids=ids, attention_mask=mask, past_key_values=HackCache(cfg), max_new_tokens=6,
            do_sample=False, output_logits=True, return_dict_in_generate=True,
        )  # fmt: skip
        return out.sequences, torch.stack(out.logits, 1).float()

    seq_t, logits_t = run()
    assert calls and all(calls)  # every decode step went through the Triton kernel
    monkeypatch.setattr(ta, "triton_supports", lambda q, kv: False)
    seq_r, logits_r = run()
    assert torch.equal(seq_t, seq_r)
    assert (logits_t - logits_r).abs().max() < 2e-2 * logits_r.abs().max()

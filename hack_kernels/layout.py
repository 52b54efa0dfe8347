"""The quantized block layout: the single owner of how codes and metadata sit in memory.

Everything that stores, ships or computes on HACK codes (the PyTorch reference, the Triton
kernels, the wire format, the store) takes its dtypes, bit order and shapes from here.
docs/FORMAT.md is the prose form of this module.

Canonical form of a quantized tensor: the quantized axis is moved last and split into groups of
`partition` elements; every other axis is kept in order ("lead" axes).

    codes  uint8   [*lead, groups, partition * bits // 8]   packed, little-endian bit order
    mins   float16 [*lead, groups]                          group minimum (rounded down)
    scales float16 [*lead, groups]                          (max - min) / (2^bits - 1), rounded up
    sums   sum_dtype(bits, partition) [*lead, groups]       sum of the group's integer codes

Bit order: element j of a group lives in byte j // per_byte at bit offset (j % per_byte) * bits,
so for 2 bits byte = c0 | c1 << 2 | c2 << 4 | c3 << 6. The padding of a short last group is
code 0 and is not counted in its sum.
"""

from __future__ import annotations

import torch

CODE_DTYPE = torch.uint8
META_DTYPE = torch.float16
OPEN_DTYPE_DEFAULT = torch.float16
BIT_ORDER = "little"
# fp16 metadata bounds what can be quantized: |x| must fit in fp16.
META_MAX = 65504.0
# Per-partition integer dot products are computed exactly in float32 when every partial sum stays
# below 2^24; 255 * 255 * 128 = 8,323,200 does.
FLOAT32_EXACT_INT = 1 << 24


def codes_per_byte(bits: int) -> int:
    return 8 // bits


def packed_group_bytes(bits: int, partition: int) -> int:
    return partition * bits // 8


def sum_dtype(bits: int, partition: int) -> torch.dtype:
    """The narrowest dtype that holds a group's code sum: uint8 up to 255, else int16/int32."""
    top = partition * ((1 << bits) - 1)
    if top <= 255:
        return torch.uint8
    if top <= 32767:
        return torch.int16
    return torch.int32


def num_groups(length: int, partition: int) -> int:
    return -(-length // partition)


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes [..., n] (n a multiple of 8 // bits) into uint8 [..., n * bits // 8]."""
    per = codes_per_byte(bits)
    if per == 1:
        return codes.to(CODE_DTYPE)
    c = codes.to(torch.int32).reshape(*codes.shape[:-1], codes.shape[-1] // per, per)
    shifts = torch.arange(per, device=codes.device, dtype=torch.int32) * bits
    return (c << shifts).sum(-1).to(CODE_DTYPE)


def unpack_codes(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of pack_codes: uint8 [..., m] -> uint8 codes [..., m * 8 // bits]."""
    per = codes_per_byte(bits)
    if per == 1:
        return packed
    shifts = torch.arange(per, device=packed.device, dtype=torch.int32) * bits
    c = (packed.to(torch.int32).unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    return c.reshape(*packed.shape[:-1], packed.shape[-1] * per).to(CODE_DTYPE)


def group_lengths(length: int, partition: int, device: torch.device | None = None) -> torch.Tensor:
    """Valid elements in each group (all `partition` but a possibly shorter last one)."""
    g = num_groups(length, partition)
    n = torch.full((g,), partition, dtype=torch.int64, device=device)
    if g:
        n[-1] = length - (g - 1) * partition
    return n


# -- planar packing: the decode pages of the kivi layout ------------------------------------------
# The GPU decode kernel reads codes as tensor-core operands. With the canonical (interleaved) bit
# order, turning packed bytes into an operand tile means a reshape across registers; with planar
# packing, byte i of a run of n elements holds elements i, i + n/per, i + 2n/per, ... (element e
# in byte e % (n/per) at bit offset (e // (n/per)) * bits), so a tile is rebuilt by loading each
# byte `per` times with contiguous addresses and shifting: no reshape. Used only inside
# PagedHackCache pages (docs/FORMAT.md, "Decode pages"); the wire and the store keep the
# canonical order.


def pack_planar(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Planar-pack integer codes [..., n] (n a multiple of 8 // bits) into uint8 [..., n*bits/8]."""
    per = codes_per_byte(bits)
    if per == 1:
        return codes.to(CODE_DTYPE)
    c = codes.to(torch.int32).reshape(*codes.shape[:-1], per, codes.shape[-1] // per)
    shifts = (torch.arange(per, device=codes.device, dtype=torch.int32) * bits)[:, None]
    return (c << shifts).sum(-2).to(CODE_DTYPE)


def unpack_planar(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of pack_planar: uint8 [..., m] -> uint8 codes [..., m * 8 // bits]."""
    per = codes_per_byte(bits)
    if per == 1:
        return packed
    shifts = (torch.arange(per, device=packed.device, dtype=torch.int32) * bits)[:, None]
    c = (packed.to(torch.int32).unsqueeze(-2) >> shifts) & ((1 << bits) - 1)
    return c.reshape(*packed.shape[:-1], packed.shape[-1] * per).to(CODE_DTYPE)

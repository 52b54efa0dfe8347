"""The hack-kv wire format: one self-describing, checksummed frame per block of KV.

A frame is   prefix (20 bytes) | header (msgpack) | payload (raw tensor bytes, 8-byte aligned).
docs/WIRE.md is the specification; this module is its only implementation. Tensor dtypes and
canonical shapes come from hack_kernels (layout, QuantizedTensor); nothing here re-describes them.

A block is a token range of one or more layers of a request: a whole number of partitions (closed
groups) plus, in the first block, the 16-bit sinks and, in the last block, the 16-bit open group.
Blocks are what the transports send and what the KV store keeps.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import mmap
import struct
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import msgpack
import torch
import xxhash

from hack_kernels import layout
from hack_kernels.config import HackConfig
from hack_kernels.kv import QuantizedKV, cat_quantized, quantize_kv
from hack_kernels.quantize import QuantizedTensor, meta_dtype_for

MAGIC = b"HKVF"
MAJOR = 1
MINOR = 0
PREFIX = struct.Struct("<4sHHIQ")  # magic, major, minor, header length, xxh3-64 of the header
ALIGN = 8
CODEC_HACK = "hack"
CODEC_RAW16 = "raw16"
QUANT_PARTS = ("codes", "mins", "scales", "sums")
_DTYPES = {
    "uint8": torch.uint8,
    "int16": torch.int16,
    "int32": torch.int32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
}
_DTYPE_NAMES = {v: k for k, v in _DTYPES.items()}
_MAX_DIM = 1 << 40


class FrameError(ValueError):
    """A frame that cannot be accepted; `tensor` names the offending tensor (or "prefix"/"header")."""

    def __init__(self, message: str, tensor: str | None = None):
        self.tensor = tensor
        super().__init__(f"{tensor}: {message}" if tensor else message)


class VersionError(FrameError):
    pass


class ModelMismatch(FrameError):
    pass


class ChecksumError(FrameError):
    pass


class LimitError(FrameError):
    pass


class TruncatedFrame(FrameError):
    pass


@dataclass(frozen=True)
class Limits:
    """What a receiver accepts; every length is checked against these before anything is allocated."""

    max_header_bytes: int = 1 << 20
    max_payload_bytes: int = 8 << 30
    max_tensors: int = 64
    max_rank: int = 8
    max_layers: int = 1024


@dataclass(frozen=True)
class ModelIdentity:
    """A model's name plus a hash of everything that fixes its KV geometry and codec."""

    name: str
    geometry: str

    def to_wire(self) -> list:
        return [self.name, self.geometry]


def model_identity(
    name: str,
    num_layers: int,
    kv_heads: int,
    head_dim: int,
    dtype: torch.dtype = torch.float16,
    config: HackConfig | None = None,
) -> ModelIdentity:
    """Identity of a model's KV: two sides agree on it or refuse each other's frames.

    config None means the raw 16-bit codec."""
    fields = {
        "layers": num_layers,
        "kv_heads": kv_heads,
        "head_dim": head_dim,
        "dtype": _DTYPE_NAMES[dtype],
        "codec": _codec_dict(config),
    }
    digest = xxhash.xxh3_64_hexdigest(msgpack.packb(fields, use_bin_type=True))
    return ModelIdentity(name, digest)


def _codec_dict(config: HackConfig | None) -> dict:
    if config is None:
        return {"name": CODEC_RAW16}
    return {"name": CODEC_HACK, **config.to_dict(), "bit_order": layout.BIT_ORDER}


@dataclass
class Block:
    """One frame's content: tensors stacked over the block's layers (leading axis).

    hack codec: k_sink, v_sink, k_open, v_open [L, B, H, tokens, D] in the 16-bit dtype, and
    k.codes/k.mins/k.scales/k.sums (same for v): the canonical QuantizedTensor parts of each
    layer's closed tokens of the block, with a leading layer axis.
    raw16 codec: k, v [L, B, H, tokens, D].
    """

    model: ModelIdentity
    config: HackConfig | None
    dtype: torch.dtype
    batch: int
    head_dim: int
    layers: tuple[int, int]
    tokens: tuple[int, int]
    heads: tuple[int, int]
    sections: tuple[int, int, int]  # sink, closed, open tokens inside this block
    tensors: dict[str, torch.Tensor]
    tp: tuple[int, int] = (0, 1)
    extra: dict = field(default_factory=dict)
    # name -> (data_ptr, torch version counter, xxh3-64): computed once (first encode, or taken
    # from the verified header on decode) so a resend or a store write does not hash again.
    _checksums: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def checksum(self, name: str, data: memoryview | None = None) -> int:
        """xxh3-64 of tensor `name`'s bytes, cached; an in-place torch write (which bumps the
        tensor's version counter) or a different storage invalidates the cached value."""
        t = self.tensors[name]
        tag = (t.data_ptr(), t._version)
        hit = self._checksums.get(name)
        if hit is not None and hit[:2] == tag:
            return hit[2]
        value = xxhash.xxh3_64_intdigest(_bytes_view(t) if data is None else data)
        self._checksums[name] = (*tag, value)
        return value

    @property
    def codec(self) -> str:
        return CODEC_RAW16 if self.config is None else CODEC_HACK

    @property
    def num_layers(self) -> int:
        return self.layers[1] - self.layers[0]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    def nbytes_16bit(self) -> int:
        """Bytes of the same K and V held in 16-bit."""
        n_heads = self.heads[1] - self.heads[0]
        n_tok = self.tokens[1] - self.tokens[0]
        return 2 * 2 * self.num_layers * self.batch * n_heads * n_tok * self.head_dim

    def layer_kv(self) -> list[QuantizedKV]:
        """The block's own tokens of each layer as QuantizedKV (hack codec)."""
        if self.config is None:
            raise ValueError("a raw16 block holds no QuantizedKV; use raw_kv()")
        geo = _closed_geometry(self.config, self.dtype)
        n_heads = self.heads[1] - self.heads[0]
        out = []
        for i in range(self.num_layers):
            qs = {}
            for side in "kv":
                shape, dim = geo.logical(side, self.batch, n_heads, self.sections[1], self.head_dim)
                parts = {p: self.tensors[f"{side}.{p}"][i] for p in QUANT_PARTS}
                qs[side] = QuantizedTensor(
                    **parts,
                    shape=shape,
                    dim=dim,
                    bits=self.config.bits,
                    partition=self.config.partition,
                    dtype=self.dtype,
                )
            t = self.tensors
            out.append(
                QuantizedKV(
                    self.config,
                    t["k_sink"][i],
                    t["v_sink"][i],
                    qs["k"],
                    qs["v"],
                    t["k_open"][i],
                    t["v_open"][i],
                )
            )
        return out

    def to_device(self, device: torch.device | str) -> Block:
        """The block with its tensors on `device` (a received block to the decode GPU). The
        copies are issued together and waited for once: from a receiver's pinned buffers each is
        an asynchronous DMA, and the buffer may go back to its pool once this block is dropped."""
        device = torch.device(device)
        moved = {n: t.to(device, non_blocking=True) for n, t in self.tensors.items()}
        if device.type == "cuda":
            torch.cuda.current_stream(device).synchronize()
        return dataclasses.replace(self, tensors=moved)

    def raw_kv(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.config is not None:
            raise ValueError("a hack block holds quantized KV; use layer_kv()")
        return self.tensors["k"], self.tensors["v"]


# ---------------------------------------------------------------------------------------------
# Geometry, read from hack_kernels rather than re-described.


@dataclass(frozen=True)
class _Geometry:
    """For k_q and v_q: which logical axis is the token axis, which is head_dim, which is quantized."""

    axes: dict  # side -> (token_axis, head_dim_axis, quantized_dim)

    def logical(self, side: str, b: int, h: int, c: int, d: int) -> tuple[tuple[int, ...], int]:
        tok, hd, dim = self.axes[side]
        shape = [b, h, 0, 0]
        shape[tok], shape[hd] = c, d
        return tuple(shape), dim


@functools.lru_cache(maxsize=64)
def _closed_geometry(config: HackConfig, dtype: torch.dtype) -> _Geometry:
    # Quantize a one-token probe with hack_kernels itself: its closed part is empty, so the token
    # axis of k_q / v_q is the one of extent 0 and head_dim the one of extent 3.
    z = torch.zeros(1, 1, 1, 3, dtype=dtype)
    probe = quantize_kv(z, z, config.replace(sink_tokens=0))
    axes = {}
    for side, qt in (("k", probe.k_q), ("v", probe.v_q)):
        axes[side] = (qt.shape.index(0), qt.shape.index(3), qt.dim)
    return _Geometry(axes)


def _canonical(shape: Sequence[int], dim: int, config: HackConfig, dtype: torch.dtype) -> dict:
    """Expected (dtype, shape) of each canonical part of a QuantizedTensor of logical `shape`."""
    lead = [s for i, s in enumerate(shape) if i != dim]
    g = layout.num_groups(shape[dim], config.partition)
    meta = meta_dtype_for(dtype)
    return {
        "codes": (
            layout.CODE_DTYPE,
            (*lead, g, layout.packed_group_bytes(config.bits, config.partition)),
        ),
        "mins": (meta, (*lead, g)),
        "scales": (meta, (*lead, g)),
        "sums": (layout.sum_dtype(config.bits, config.partition), (*lead, g)),
    }


def expected_tensors(
    config: HackConfig | None,
    dtype: torch.dtype,
    n_layers: int,
    batch: int,
    heads: int,
    head_dim: int,
    sections: tuple[int, int, int],
) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    """Name -> (dtype, shape) of every tensor of a block, in payload order."""
    key = (config, dtype, n_layers, batch, heads, head_dim, tuple(sections))
    return dict(_expected(key))


@functools.lru_cache(maxsize=256)  # every frame of a transfer has one of a few geometries
def _expected(key: tuple) -> tuple[tuple[str, tuple[torch.dtype, tuple[int, ...]]], ...]:
    config, dtype, n_layers, batch, heads, head_dim, sections = key
    sink, closed, open_ = sections
    if config is None:
        shape = (n_layers, batch, heads, sum(sections), head_dim)
        return (("k", (dtype, shape)), ("v", (dtype, shape)))
    out = {}
    for name, n in (("k_sink", sink), ("v_sink", sink)):
        out[name] = (dtype, (n_layers, batch, heads, n, head_dim))
    geo = _closed_geometry(config, dtype)
    for side in "kv":
        shape, dim = geo.logical(side, batch, heads, closed, head_dim)
        for part, (dt, s) in _canonical(shape, dim, config, dtype).items():
            out[f"{side}.{part}"] = (dt, (n_layers, *s))
    for name in ("k_open", "v_open"):
        out[name] = (dtype, (n_layers, batch, heads, open_, head_dim))
    return tuple(out.items())


# ---------------------------------------------------------------------------------------------
# Splitting QuantizedKV into blocks and joining them back.


def _slice_tokens(qt: QuantizedTensor, token_axis: int, start: int, stop: int) -> dict:
    """Canonical parts of the closed tokens [start, stop) (relative to the closed part)."""
    if token_axis == qt.dim:  # tokens are the quantized axis: slice whole groups
        p = qt.partition
        g0, g1 = start // p, layout.num_groups(stop, p)
        codes = qt.codes
        return {
            "codes": codes.narrow(codes.dim() - 2, g0, g1 - g0),
            "mins": qt.mins.narrow(-1, g0, g1 - g0),
            "scales": qt.scales.narrow(-1, g0, g1 - g0),
            "sums": qt.sums.narrow(-1, g0, g1 - g0),
        }
    ax = token_axis if token_axis < qt.dim else token_axis - 1
    return {p: getattr(qt, p).narrow(ax, start, stop - start) for p in QUANT_PARTS}


def _stack(ts: list[torch.Tensor]) -> torch.Tensor:
    """Layers stacked on a new leading axis; one contiguous layer is a view (no copy), so a
    layer-wise, whole-prompt block encodes without copying."""
    if len(ts) == 1:
        return ts[0].unsqueeze(0).contiguous()
    return torch.stack(ts)


class LazyBlocks(Sequence):
    """A request's blocks, each built (its token range of every layer gathered into the block's
    stacked tensors) when first asked for, then kept: a sender's first frame waits for one
    block's gather instead of the whole request's (split_kv_lazy, split_raw_lazy). Slices are
    lazy too and share the built blocks."""

    def __init__(self, n: int, build: Callable[[int], Block], _built: dict | None = None,
                 _index: range | None = None):  # fmt: skip
        self._build, self._built = build, {} if _built is None else _built
        self._index = range(n) if _index is None else _index

    def __len__(self) -> int:
        return len(self._index)

    def __getitem__(self, i):  # noqa: ANN001, ANN204 (int or slice, as Sequence)
        if isinstance(i, slice):
            return LazyBlocks(0, self._build, self._built, self._index[i])
        j = self._index[i]
        block = self._built.get(j)
        if block is None:
            block = self._built[j] = self._build(j)
        return block


def split_kv(
    kvs: Sequence[QuantizedKV],
    block_tokens: int,
    model: ModelIdentity,
    *,
    layer_start: int = 0,
    heads: tuple[int, int] | None = None,
    tp: tuple[int, int] = (0, 1),
) -> list[Block]:
    """Cut one request's per-layer QuantizedKV into blocks of `block_tokens` closed tokens.

    block_tokens must be a multiple of the partition (so it maps onto vLLM's 16-token pages and
    LMCache's 256-token chunks when it is a multiple of those). Block boundaries are at
    sink_tokens + k * block_tokens; the first block also carries the sinks, the last the open group.
    """
    return list(
        split_kv_lazy(kvs, block_tokens, model, layer_start=layer_start, heads=heads, tp=tp)
    )


def split_kv_lazy(
    kvs: Sequence[QuantizedKV],
    block_tokens: int,
    model: ModelIdentity,
    *,
    layer_start: int = 0,
    heads: tuple[int, int] | None = None,
    tp: tuple[int, int] = (0, 1),
) -> LazyBlocks:
    """split_kv's blocks, each built when first asked for (the arguments are checked now)."""
    if not kvs:
        raise ValueError("split_kv needs at least one layer")
    first = kvs[0]
    cfg = first.config
    if block_tokens <= 0 or block_tokens % cfg.partition:
        raise ValueError(
            f"block_tokens {block_tokens} is not a positive multiple of partition {cfg.partition}"
        )
    for i, kv in enumerate(kvs):
        same = (
            kv.config,
            kv.num_sink,
            kv.num_closed,
            kv.num_open,
            kv.k_open.shape,
            kv.k_open.dtype,
        )
        if same != (
            cfg,
            first.num_sink,
            first.num_closed,
            first.num_open,
            first.k_open.shape,
            first.k_open.dtype,
        ):
            raise ValueError(
                f"layer {layer_start + i} differs in config, token counts, shape or dtype from layer {layer_start}"
            )
    h0, h1 = heads or (0, first.kv_heads)
    if not 0 <= h0 < h1 <= first.kv_heads:
        raise ValueError(f"head range {(h0, h1)} is outside 0..{first.kv_heads}")
    geo = _closed_geometry(cfg, first.k_open.dtype)
    n_sink, n_closed = first.num_sink, first.num_closed
    cuts = list(range(0, n_closed, block_tokens)) or [0]
    kvs = list(kvs)
    all_heads = (h0, h1) == (0, first.kv_heads)

    def build(j: int) -> Block:
        c0 = cuts[j]
        c1 = min(c0 + block_tokens, n_closed)
        is_first, is_last = j == 0, j == len(cuts) - 1
        sink = n_sink if is_first else 0
        open_ = first.num_open if is_last else 0
        t0 = 0 if is_first else n_sink + c0
        t1 = n_sink + c1 + open_
        tensors: dict[str, list[torch.Tensor]] = {}
        for kv in kvs:  # views only (narrow is the cheapest view): one copy, when stacked
            per = {"k_sink": kv.k_sink.narrow(2, 0, sink), "v_sink": kv.v_sink.narrow(2, 0, sink)}
            for side, qt in (("k", kv.k_q), ("v", kv.v_q)):
                for p, t in _slice_tokens(qt, geo.axes[side][0], c0, c1).items():
                    per[f"{side}.{p}"] = t
            per["k_open"] = kv.k_open.narrow(2, 0, open_)
            per["v_open"] = kv.v_open.narrow(2, 0, open_)
            for name, t in per.items():
                if not all_heads:
                    t = t.narrow(1, h0, h1 - h0)
                tensors.setdefault(name, []).append(t)
        return Block(
            model=model,
            config=cfg,
            dtype=first.k_open.dtype,
            batch=first.batch,
            head_dim=first.head_dim,
            layers=(layer_start, layer_start + len(kvs)),
            tokens=(t0, t1),
            heads=(h0, h1),
            sections=(sink, c1 - c0, open_),
            tensors={n: _stack(ts) for n, ts in tensors.items()},
            tp=tp,
        )

    return LazyBlocks(len(cuts), build)


def split_raw(
    ks: Sequence[torch.Tensor],
    vs: Sequence[torch.Tensor],
    block_tokens: int,
    model: ModelIdentity,
    *,
    layer_start: int = 0,
    tp: tuple[int, int] = (0, 1),
) -> list[Block]:
    """The 16-bit baseline: per-layer K and V [B, H, T, D] in blocks of `block_tokens` tokens."""
    return list(split_raw_lazy(ks, vs, block_tokens, model, layer_start=layer_start, tp=tp))


def split_raw_lazy(
    ks: Sequence[torch.Tensor],
    vs: Sequence[torch.Tensor],
    block_tokens: int,
    model: ModelIdentity,
    *,
    layer_start: int = 0,
    tp: tuple[int, int] = (0, 1),
) -> LazyBlocks:
    """split_raw's blocks, each built when first asked for (the arguments are checked now)."""
    ks, vs = list(ks), list(vs)
    k0 = ks[0] if ks else torch.empty(0)
    same = all(t.shape == k0.shape and t.dtype == k0.dtype for t in (*ks, *vs))
    if (
        not ks
        or len(ks) != len(vs)
        or not same
        or k0.dim() != 4
        or k0.dtype
        not in (
            torch.float16,
            torch.bfloat16,
        )
    ):
        shapes = sorted({(tuple(t.shape), str(t.dtype)) for t in (*ks, *vs)})
        raise ValueError(
            f"raw16 needs equal 16-bit K and V of [B, H, T, D] for every layer, got {shapes}"
        )
    if block_tokens <= 0:
        raise ValueError(f"block_tokens {block_tokens} is not positive")
    n = k0.shape[2]
    starts = list(range(0, n, block_tokens))

    def build(j: int) -> Block:
        t0 = starts[j]
        t1 = min(t0 + block_tokens, n)
        return Block(
            model=model,
            config=None,
            dtype=k0.dtype,
            batch=k0.shape[0],
            head_dim=k0.shape[3],
            layers=(layer_start, layer_start + len(ks)),
            tokens=(t0, t1),
            heads=(0, k0.shape[1]),
            sections=(0, t1 - t0, 0),
            tensors={
                "k": _stack([k[:, :, t0:t1] for k in ks]),
                "v": _stack([v[:, :, t0:t1] for v in vs]),
            },
            tp=tp,
        )

    return LazyBlocks(len(starts), build)


def join_blocks(blocks: Sequence[Block]) -> list[QuantizedKV]:
    """Reassemble per-layer QuantizedKV from one request's blocks (any order), bit-exactly."""
    if not blocks:
        raise ValueError("join_blocks needs at least one block")
    blocks = sorted(blocks, key=lambda b: b.tokens[0])
    b0 = blocks[0]
    if b0.config is None:
        raise ValueError(
            "join_blocks joins hack blocks; raw16 blocks join with torch.cat on axis 3"
        )
    for prev, nxt in zip(blocks, blocks[1:], strict=False):
        if prev.tokens[1] != nxt.tokens[0]:
            raise ValueError(f"blocks are not contiguous: {prev.tokens} then {nxt.tokens}")
        if prev.sections[2]:
            raise ValueError(f"block {prev.tokens} has an open group but is not the last")
        if nxt.sections[0]:
            raise ValueError(f"block {nxt.tokens} has sinks but is not the first")
    for b in blocks:
        if (b.model, b.config, b.layers, b.heads, b.dtype) != (
            b0.model,
            b0.config,
            b0.layers,
            b0.heads,
            b0.dtype,
        ):
            raise ValueError(
                f"block {b.tokens} belongs to another model, codec, layer or head range"
            )
    if b0.tokens[0] != 0:
        raise ValueError(f"the first block starts at token {b0.tokens[0]}, not 0")
    geo = _closed_geometry(b0.config, b0.dtype)
    per_block = [b.layer_kv() for b in blocks]
    out = []
    for i in range(b0.num_layers):
        parts = [layers[i] for layers in per_block]
        kq = cat_quantized([p.k_q for p in parts], geo.axes["k"][0])
        vq = cat_quantized([p.v_q for p in parts], geo.axes["v"][0])
        first, last = parts[0], parts[-1]
        out.append(
            QuantizedKV(b0.config, first.k_sink, first.v_sink, kq, vq, last.k_open, last.v_open)
        )
    return out


# ---------------------------------------------------------------------------------------------
# Encoding.


def _bytes_view(t: torch.Tensor) -> memoryview:
    """The tensor's bytes without a copy (CPU, contiguous)."""
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous()
    return memoryview(t.view(torch.uint8).reshape(-1).numpy())


def host_tensors(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors with GPU ones replaced by host copies: all of them in one page-locked buffer,
    copied by asynchronous DMAs and waited for once, instead of a synchronous, driver-staged
    copy each (benchmarks/device_pinned.py). CPU tensors are returned as they are."""
    gpu = {n: t.contiguous() for n, t in tensors.items() if t.device.type != "cpu"}
    if not gpu:
        return tensors
    sizes = {n: t.numel() * t.element_size() for n, t in gpu.items()}
    total = sum(n + _pad(n) for n in sizes.values())
    staging = torch.empty(total, dtype=torch.uint8, pin_memory=True)
    out, at = dict(tensors), 0
    for name, t in gpu.items():
        dst = staging[at : at + sizes[name]].view(t.dtype).view(t.shape)
        dst.copy_(t, non_blocking=True)
        out[name], at = dst, at + sizes[name] + _pad(sizes[name])
    for dev in {t.device for t in gpu.values()}:
        torch.cuda.current_stream(dev).synchronize()
    return out


def _pad(n: int) -> int:
    return -n % ALIGN


def encode_block(block: Block, *, extra: dict | None = None) -> list[memoryview | bytes]:
    """Encode a block as a list of buffers: prefix+header, then each tensor's bytes (no copies)
    and alignment padding. Send them in order, or b"".join them to store one frame."""
    expected = expected_tensors(
        block.config,
        block.dtype,
        block.num_layers,
        block.batch,
        block.heads[1] - block.heads[0],
        block.head_dim,
        block.sections,
    )
    if set(expected) != set(block.tensors):
        raise ValueError(
            f"block tensors {sorted(block.tensors)} differ from the codec's {sorted(expected)}"
        )
    for name, (dt, shape) in expected.items():
        t = block.tensors[name]
        if t.dtype != dt or tuple(t.shape) != shape:
            raise ValueError(
                f"{name}: got {t.dtype} {tuple(t.shape)}, the codec needs {dt} {shape}"
            )
    host = host_tensors(block.tensors)
    directory = []
    buffers: list[memoryview | bytes] = []
    offset = 0
    for name, (dt, shape) in expected.items():
        mv = _bytes_view(host[name])
        directory.append(
            [name, _DTYPE_NAMES[dt], list(shape), offset, mv.nbytes, block.checksum(name, mv)]
        )
        buffers.append(mv)
        offset += mv.nbytes
        if _pad(offset):
            buffers.append(bytes(_pad(offset)))
            offset += _pad(offset)
    header = {
        "model": block.model.to_wire(),
        "tp": list(block.tp),
        "layers": list(block.layers),
        "tokens": list(block.tokens),
        "heads": list(block.heads),
        "sections": list(block.sections),
        "batch": block.batch,
        "head_dim": block.head_dim,
        "dtype": _DTYPE_NAMES[block.dtype],
        "codec": _codec_dict(block.config),
        "tensors": directory,
        "payload": offset,
    }
    if extra or block.extra:
        header["extra"] = {**block.extra, **(extra or {})}
    hb = msgpack.packb(header, use_bin_type=True)
    return [pack_prefix(hb) + hb, *buffers]


def _header_checksum(fixed: bytes | memoryview, header: bytes | memoryview) -> int:
    """xxh3-64 over the prefix's first 12 bytes and the header: a flipped version byte is caught."""
    h = xxhash.xxh3_64(fixed)
    h.update(header)
    return h.intdigest()


def pack_prefix(header: bytes, major: int = MAJOR, minor: int = MINOR) -> bytes:
    fixed = PREFIX.pack(MAGIC, major, minor, len(header), 0)[:12]
    return fixed + _header_checksum(fixed, header).to_bytes(8, "little")


def encode_frame(block: Block, *, extra: dict | None = None) -> bytes:
    """One contiguous frame (what a store keeps); transports send encode_block's buffers instead."""
    return b"".join(encode_block(block, extra=extra))


# ---------------------------------------------------------------------------------------------
# Decoding: prefix, then header, then payload; each step validates before the next allocates.


@dataclass
class TensorEntry:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int
    length: int
    checksum: int


@dataclass
class FrameHeader:
    """A validated header: the payload it announces fits the limits and the codec's geometry."""

    minor: int
    model: ModelIdentity
    config: HackConfig | None
    dtype: torch.dtype
    batch: int
    head_dim: int
    layers: tuple[int, int]
    tokens: tuple[int, int]
    heads: tuple[int, int]
    sections: tuple[int, int, int]
    tp: tuple[int, int]
    entries: list[TensorEntry]
    payload_len: int
    extra: dict

    def parts(self) -> list[tuple[int, int]]:
        """(offset, length) of each tensor and padding run in payload order (how transports that
        send message by message lay out the payload)."""
        out = []
        for e, nxt in zip(self.entries, [*self.entries[1:], None], strict=True):
            out.append((e.offset, e.length))
            end = nxt.offset if nxt else self.payload_len
            if end > e.offset + e.length:
                out.append((e.offset + e.length, end - e.offset - e.length))
        return out


def parse_prefix(data: bytes | memoryview, limits: Limits = Limits()) -> tuple[int, int, bytes]:
    """(minor, header length, prefix) of a frame's first PREFIX.size bytes; pass the prefix on
    to parse_header, which checks it with the header."""
    if len(data) < PREFIX.size:
        raise TruncatedFrame(f"{len(data)} bytes, a prefix needs {PREFIX.size}", "prefix")
    magic, major, minor, hlen, _ = PREFIX.unpack_from(data)
    if magic != MAGIC:
        raise FrameError(
            f"bad magic {bytes(magic)!r}, expected {MAGIC!r}: not a hack-kv frame", "prefix"
        )
    if major != MAJOR:
        raise VersionError(
            f"unsupported major version {major} (this reader speaks {MAJOR}.x)", "prefix"
        )
    if hlen > limits.max_header_bytes:
        raise LimitError(
            f"header of {hlen} bytes exceeds the limit of {limits.max_header_bytes}", "header"
        )
    return minor, hlen, bytes(data[: PREFIX.size])


def _int(v: object, what: str, lo: int = 0, hi: int = _MAX_DIM) -> int:
    if type(v) is not int or not lo <= v <= hi:  # bool is not int here
        raise FrameError(f"{what} must be an integer in [{lo}, {hi}], got {v!r}", "header")
    return v


def _range(v: object, what: str) -> tuple[int, int]:
    if not isinstance(v, list) or len(v) != 2:
        raise FrameError(f"{what} must be [start, stop], got {v!r}", "header")
    a, b = _int(v[0], what), _int(v[1], what)
    if b < a:
        raise FrameError(f"{what} {v} is reversed", "header")
    return a, b


def _codec(d: object, dtype: torch.dtype) -> HackConfig | None:
    try:  # every frame of a transfer names the same codec: validate each distinct one once
        return _codec_cached(tuple(d.items()), dtype)
    except (TypeError, AttributeError):  # not a map, or an unhashable value: say what is wrong
        return _codec_checked(d, dtype)


@functools.lru_cache(maxsize=64)
def _codec_cached(items: tuple, dtype: torch.dtype) -> HackConfig | None:
    return _codec_checked(dict(items), dtype)


def _codec_checked(d: object, dtype: torch.dtype) -> HackConfig | None:
    if not isinstance(d, dict) or "name" not in d:
        raise FrameError(f"codec must be a map with a name, got {d!r}", "header")
    if d["name"] == CODEC_RAW16:
        return None
    if d["name"] != CODEC_HACK:
        raise FrameError(f"unknown codec {d['name']!r}", "header")
    if d.get("bit_order") != layout.BIT_ORDER:
        raise FrameError(f"unsupported bit order {d.get('bit_order')!r}", "header")
    known = set(HackConfig.__dataclass_fields__)
    try:
        return HackConfig(**{k: v for k, v in d.items() if k in known})
    except (TypeError, ValueError) as e:
        raise FrameError(f"bad codec: {e}", "header") from None


def parse_header(
    prefix: bytes,
    data: bytes | memoryview,
    limits: Limits = Limits(),
    expect_model: ModelIdentity | None = None,
) -> FrameHeader:
    """Check the header bytes against the prefix's checksum and validate every field and length."""
    if _header_checksum(prefix[:12], data) != int.from_bytes(prefix[12:20], "little"):
        raise ChecksumError("checksum mismatch", "header")
    minor = PREFIX.unpack_from(prefix)[2]
    try:
        h = msgpack.unpackb(data, raw=False, strict_map_key=True, use_list=True)
    except Exception as e:  # msgpack raises several types for malformed input
        raise FrameError(f"not valid msgpack: {e}", "header") from None
    if not isinstance(h, dict):
        raise FrameError("header is not a map", "header")
    missing = {
        "model",
        "tp",
        "layers",
        "tokens",
        "heads",
        "sections",
        "batch",
        "head_dim",
        "dtype",
        "codec",
        "tensors",
        "payload",
    } - set(h)
    if missing:
        raise FrameError(f"missing fields {sorted(missing)}", "header")
    m = h["model"]
    if not (isinstance(m, list) and len(m) == 2 and all(isinstance(x, str) for x in m)):
        raise FrameError(f"model must be [name, geometry hash], got {m!r}", "header")
    model = ModelIdentity(*m)
    if expect_model is not None and model != expect_model:
        raise ModelMismatch(
            f"frame is for model {model}, this receiver serves {expect_model}", "header"
        )
    if h["dtype"] not in ("float16", "bfloat16"):
        raise FrameError(f"KV dtype must be float16 or bfloat16, got {h['dtype']!r}", "header")
    dtype = _DTYPES[h["dtype"]]
    config = _codec(h["codec"], dtype)
    layers, tokens, heads = (
        _range(h["layers"], "layers"),
        _range(h["tokens"], "tokens"),
        _range(h["heads"], "heads"),
    )
    tp = _range(h["tp"], "tp")
    if not tp[0] < tp[1]:
        raise FrameError(f"tp rank {tp[0]} is not below tp size {tp[1]}", "header")
    if not isinstance(h["sections"], list) or len(h["sections"]) != 3:
        raise FrameError(f"sections must be [sink, closed, open], got {h['sections']!r}", "header")
    sections = tuple(_int(x, "sections") for x in h["sections"])
    n_layers = layers[1] - layers[0]
    if heads[0] == heads[1]:
        raise FrameError(f"empty head range {heads}", "header")
    if not 0 < n_layers <= limits.max_layers:
        raise LimitError(f"{n_layers} layers, limit {limits.max_layers}", "header")
    if sum(sections) != tokens[1] - tokens[0]:
        raise FrameError(f"sections {sections} do not add up to the token range {tokens}", "header")
    if config is not None:
        p = config.partition
        if sections[0] and tokens[0] != 0 or sections[0] > config.sink_tokens:
            raise FrameError(
                f"sinks {sections[0]} outside the first {config.sink_tokens} tokens", "header"
            )
        if sections[1] % p or sections[2] >= p:
            raise FrameError(
                f"closed {sections[1]} is not whole partitions of {p} or open {sections[2]} >= {p}",
                "header",
            )
    batch, head_dim = _int(h["batch"], "batch", 1), _int(h["head_dim"], "head_dim", 1)
    payload_len = _int(h["payload"], "payload", 0, 1 << 63)
    if payload_len > limits.max_payload_bytes:
        raise LimitError(
            f"payload of {payload_len} bytes exceeds the limit of {limits.max_payload_bytes}",
            "header",
        )
    expected = expected_tensors(
        config, dtype, n_layers, batch, heads[1] - heads[0], head_dim, sections
    )
    d = h["tensors"]
    if not isinstance(d, list) or len(d) > limits.max_tensors:
        raise LimitError(
            f"tensor directory must be a list of at most {limits.max_tensors}", "header"
        )
    entries, end = [], 0
    for row in d:
        if not (isinstance(row, list) and len(row) == 6 and isinstance(row[0], str)):
            raise FrameError(f"bad directory entry {row!r}", "header")
        name = row[0]
        if name not in expected:
            raise FrameError(f"unknown tensor {name!r} for codec {h['codec'].get('name')}", name)
        dt, shape = expected[name]
        if row[1] != _DTYPE_NAMES[dt]:
            raise FrameError(f"dtype {row[1]!r}, the codec needs {_DTYPE_NAMES[dt]}", name)
        if not isinstance(row[2], list) or len(row[2]) > limits.max_rank or tuple(row[2]) != shape:
            raise FrameError(f"shape {row[2]!r}, the header's geometry needs {list(shape)}", name)
        offset, length, checksum = row[3], row[4], row[5]
        if not (
            type(offset) is int
            and type(length) is int
            and type(checksum) is int
            and 0 <= offset <= _MAX_DIM
            and 0 <= length <= _MAX_DIM
            and 0 <= checksum < 1 << 64
        ):  # the common case without formatting three messages; the slow path says which
            _int(offset, f"{name} offset")
            _int(length, f"{name} length")
            _int(checksum, f"{name} checksum", 0, (1 << 64) - 1)
        need = math.prod(shape) * dt.itemsize
        if length != need:
            raise FrameError(f"length {length}, shape {list(shape)} of {row[1]} needs {need}", name)
        if offset < end or offset % ALIGN or offset + length > payload_len:
            raise FrameError(
                f"offset {offset} + {length} overlaps, is unaligned or exceeds the payload of {payload_len}",
                name,
            )
        end = offset + length
        entries.append(TensorEntry(name, dt, shape, offset, length, checksum))
    if [e.name for e in entries] != list(expected):
        raise FrameError(
            f"directory {[e.name for e in entries]} differs from the codec's {list(expected)}",
            "header",
        )
    return FrameHeader(
        minor=minor,
        model=model,
        config=config,
        dtype=dtype,
        batch=batch,
        head_dim=head_dim,
        layers=layers,
        tokens=tokens,
        heads=heads,
        sections=sections,
        tp=tp,
        entries=entries,
        payload_len=payload_len,
        extra=h.get("extra") if isinstance(h.get("extra"), dict) else {},
    )


def alloc_payload(n: int) -> memoryview:
    """A fresh, zeroed, writable buffer of n bytes for a frame's payload.

    Anonymous memory mapped with MAP_POPULATE: the kernel zeroes and maps every page in one call
    instead of one page fault per 4 KiB while the payload arrives, and there is no second
    zero-filling pass as with bytearray(n). Falls back to bytearray where that is unavailable."""
    populate = getattr(mmap, "MAP_POPULATE", 0)
    if n >= 1 << 16 and populate:
        try:
            m = mmap.mmap(-1, n, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | populate)
            return memoryview(m)
        except OSError:
            pass
    return memoryview(bytearray(n))


class PayloadVerifier:
    """Verifies a payload's tensors while it arrives: advance(n), once the first n bytes are in
    place, hashes up to byte n (a large tensor in a streaming xxh3 state, so its hash is done
    soon after its last byte) and checks every tensor and padding that now lies wholly inside
    them. block() checks the rest and returns the block; nothing is returned before every
    checksum passed. advance() calls must not overlap (one thread at a time, in order)."""

    def __init__(self, header: FrameHeader, payload: bytes | bytearray | memoryview):
        self.header = header
        self.mv = memoryview(payload).cast("B")
        if len(self.mv) != header.payload_len:
            raise TruncatedFrame(
                f"payload has {len(self.mv)} bytes, the header announces {header.payload_len}",
                "payload",
            )
        self._next = 0  # index of the first entry not yet verified
        self._state: xxhash.xxh3_64 | None = None  # partial hash of entry _next
        self._hashed = 0  # bytes of entry _next in _state

    @property
    def done(self) -> bool:
        return self._next == len(self.header.entries)

    def advance(self, filled: int) -> None:
        entries, mv = self.header.entries, self.mv
        while self._next < len(entries):
            e = entries[self._next]
            end = e.offset + e.length
            pad_end = min(end + _pad(e.length), self.header.payload_len)
            avail = min(filled, end) - e.offset - self._hashed
            if pad_end > filled:  # not all here yet: hash what is, if it is worth a call
                if avail >= 1 << 20:
                    self._state = self._state or xxhash.xxh3_64()
                    self._state.update(
                        mv[e.offset + self._hashed : e.offset + self._hashed + avail]
                    )
                    self._hashed += avail
                return
            rest = mv[e.offset + self._hashed : end]
            if self._state is None:
                digest = xxhash.xxh3_64_intdigest(rest)
            else:
                self._state.update(rest)
                digest = self._state.intdigest()
            self._state, self._hashed = None, 0
            if digest != e.checksum:
                raise ChecksumError("checksum mismatch", e.name)
            if any(mv[end:pad_end]):
                raise ChecksumError("non-zero alignment padding after the tensor", e.name)
            self._next += 1

    def block(self) -> Block:
        self.advance(self.header.payload_len)
        header = self.header
        typed = {}  # the payload as each dtype once; every tensor is a strided view of one
        if header.payload_len and not self.mv.readonly:
            whole = torch.frombuffer(self.mv, dtype=torch.uint8)
        elif header.payload_len:
            with warnings.catch_warnings():  # read-only buffers (bytes) are fine: not written
                warnings.simplefilter("ignore", UserWarning)
                whole = torch.frombuffer(self.mv, dtype=torch.uint8)
        tensors = {}
        for e in header.entries:
            if e.length == 0 and not header.payload_len:
                tensors[e.name] = torch.empty(e.shape, dtype=e.dtype)
                continue
            size = e.dtype.itemsize  # offsets are 8-aligned and lengths whole elements
            base = typed.get(e.dtype)
            if base is None:
                base = typed[e.dtype] = whole[: len(whole) // size * size].view(e.dtype)
            tensors[e.name] = base.as_strided(e.shape, _strides(e.shape), e.offset // size)
        block = Block(tensors=tensors, **{name: getattr(header, name) for name in _SHARED})
        for e in header.entries:  # verified above: a resend or store write reuses them
            t = tensors[e.name]
            block._checksums[e.name] = (t.data_ptr(), t._version, e.checksum)
        return block


@functools.lru_cache(maxsize=256)
def _strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    """Contiguous strides of `shape` (in elements)."""
    out, step = [], 1
    for n in reversed(shape):
        out.append(step)
        step *= max(n, 1)
    return tuple(reversed(out))


_SHARED = [f.name for f in dataclasses.fields(Block) if f.init and f.name != "tensors"]


def decode_payload(header: FrameHeader, payload: bytes | bytearray | memoryview) -> Block:
    """Verify every tensor's checksum and return the block; its tensors are views of `payload`."""
    return PayloadVerifier(header, payload).block()


def decode_frame(
    data: bytes | bytearray | memoryview,
    limits: Limits = Limits(),
    expect_model: ModelIdentity | None = None,
) -> Block:
    """Decode one contiguous frame (as stored); rejects trailing or missing bytes."""
    mv = memoryview(data).cast("B")
    _, hlen, prefix = parse_prefix(mv, limits)
    if len(mv) < PREFIX.size + hlen:
        raise TruncatedFrame(f"{len(mv)} bytes, the header ends at {PREFIX.size + hlen}", "header")
    header = parse_header(prefix, mv[PREFIX.size : PREFIX.size + hlen], limits, expect_model)
    start = PREFIX.size + hlen
    have = len(mv) - start
    if have < header.payload_len:
        cut = next((e.name for e in header.entries if e.offset + e.length > have), "payload")
        raise TruncatedFrame(
            f"payload has {have} bytes, the header announces {header.payload_len}", cut
        )
    if have > header.payload_len:
        raise FrameError(f"{have - header.payload_len} bytes after the payload", "payload")
    return decode_payload(header, mv[start:])

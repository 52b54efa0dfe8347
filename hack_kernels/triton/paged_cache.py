"""PagedHackCache: one layer's quantized KV for decode, in pages of `partition` tokens.

Kivi layout (the default): the page arrays of kivi_pages.py with a leading axis of 1
(`self.pages`), shared by all sequences through the block tables.
Paper layout. A page holds, for every kv head, one closed token-partition:
    k_codes [pages, H, p, Gd * p * bits / 8]   K grouped along head_dim, token-major
    k_mins / k_scales / k_sums [pages, H, p, Gd]
    v_codes [pages, H, D, p * bits / 8]        V grouped along tokens, channel-major
    v_mins / v_scales / v_sums [pages, H, D]
Per sequence slot: sinks [slots, H, S, D] and the open page [slots, H, p, D] in 16-bit, a block
table row (logical page -> physical page) and its length. append() writes a token into the open
page and, once it holds p tokens, quantizes it into a fresh page: closed pages are never touched
again. Page bookkeeping lives on the host (no device sync per step).
"""

from __future__ import annotations

import torch

from .. import layout
from ..config import HackConfig
from ..kv import K_STREAM, V_STREAM, QuantizedKV, open_dtype_for
from ..quantize import QuantizedTensor
from .kivi_pages import KiviPages, kivi_pages
from .quantize import quantize_groups_triton


def _batch_item(qt: QuantizedTensor, i: int) -> QuantizedTensor:
    """Sequence i of a batched quantized tensor, keeping a batch axis of 1."""
    sl = slice(i, i + 1)
    return QuantizedTensor(
        qt.codes[sl], qt.mins[sl], qt.scales[sl], qt.sums[sl],
        (1, *qt.shape[1:]), qt.dim, qt.bits, qt.partition, qt.dtype,
    )  # fmt: skip


class PagedHackCache:
    def __init__(
        self,
        config: HackConfig,
        num_pages: int,
        max_seqs: int,
        kv_heads: int,
        head_dim: int,
        max_pages_per_seq: int,
        dtype: torch.dtype = torch.float16,
        device: torch.device | str = "cuda",
    ) -> None:
        if config.bits not in (2, 4):
            raise ValueError(f"PagedHackCache supports 2- and 4-bit codes, got {config.bits}")
        if head_dim not in (64, 128):
            raise ValueError(f"head_dim must be 64 or 128, got {head_dim}")
        for name, val in (("num_pages", num_pages), ("max_seqs", max_seqs), ("kv_heads", kv_heads)):
            if val <= 0:
                raise ValueError(f"{name} must be positive, got {val}")
        self.config = config
        p, bits = config.partition, config.bits
        gd = layout.num_groups(head_dim, p)
        per = layout.codes_per_byte(bits)
        dt = open_dtype_for(dtype)
        self.dtype, self.kv_heads, self.head_dim = dt, kv_heads, head_dim
        h, d = kv_heads, head_dim
        sd = layout.sum_dtype(bits, p)
        kw = dict(device=device)
        if config.layout == "kivi":
            self._init_kivi_pages(num_pages, h, d, dt, sd, device)
        else:
            self._init_paper_pages(num_pages, h, d, gd, per, dt, sd, device)
        s = config.sink_tokens
        self.k_sink = torch.zeros((max_seqs, h, s, d), dtype=dt, **kw)
        self.v_sink = torch.zeros_like(self.k_sink)
        self.k_open = torch.zeros((max_seqs, h, p, d), dtype=dt, **kw)
        self.v_open = torch.zeros_like(self.k_open)
        self.block_tables = torch.zeros((max_seqs, max_pages_per_seq), dtype=torch.int32, **kw)
        self.seq_lens = torch.zeros((max_seqs,), dtype=torch.int32, **kw)
        self.max_pages_per_seq = max_pages_per_seq
        self._lens = [0] * max_seqs  # host mirror of seq_lens
        self._pages: list[list[int]] = [[] for _ in range(max_seqs)]
        self._free = list(range(num_pages - 1, -1, -1))

    def _init_kivi_pages(self, n, h, d, dt, sd, device) -> None:
        p, per = self.config.partition, layout.codes_per_byte(self.config.bits)
        e = layout.num_groups(d, p)
        kw = dict(device=device)
        self.pages = KiviPages(
            k_codes=torch.zeros((1, n, h, p, d // per), dtype=torch.uint8, **kw),
            k_mins=torch.zeros((1, n, h, d), dtype=dt, **kw),
            k_scales=torch.zeros((1, n, h, d), dtype=dt, **kw),
            v_codes=torch.zeros((1, n, h, d, p // per), dtype=torch.uint8, **kw),
            v_mins=torch.zeros((1, n, h, p, e), dtype=dt, **kw),
            v_scales=torch.zeros((1, n, h, p, e), dtype=dt, **kw),
            v_colsums=torch.zeros((1, n, h, d), dtype=sd, **kw),
        )

    def _init_paper_pages(self, num_pages, h, d, gd, per, dt, sd, device) -> None:
        p = self.config.partition
        kw = dict(device=device)
        self.k_codes = torch.zeros((num_pages, h, p, gd * p // per), dtype=torch.uint8, **kw)
        self.k_mins = torch.zeros((num_pages, h, p, gd), dtype=dt, **kw)
        self.k_scales = torch.zeros_like(self.k_mins)
        self.k_sums = torch.zeros((num_pages, h, p, gd), dtype=sd, **kw)
        self.v_codes = torch.zeros((num_pages, h, d, p // per), dtype=torch.uint8, **kw)
        self.v_mins = torch.zeros((num_pages, h, d), dtype=dt, **kw)
        self.v_scales = torch.zeros_like(self.v_mins)
        self.v_sums = torch.zeros((num_pages, h, d), dtype=sd, **kw)

    # -- host bookkeeping ------------------------------------------------------------------------
    def _alloc(self, slot: int, n: int) -> list[int]:
        if len(self._pages[slot]) + n > self.max_pages_per_seq:
            raise ValueError(f"slot {slot} would exceed {self.max_pages_per_seq} pages")
        if n > len(self._free):
            raise ValueError(f"out of pages: need {n}, {len(self._free)} free")
        ids = [self._free.pop() for _ in range(n)]
        first = len(self._pages[slot])
        self._pages[slot].extend(ids)
        dev = self.block_tables.device
        self.block_tables[slot, first : first + n] = torch.tensor(
            ids, dtype=torch.int32, device=dev
        )
        return ids

    def free(self, slot: int) -> None:
        """Release a sequence's pages and empty its slot."""
        self._free.extend(reversed(self._pages[slot]))
        self._pages[slot] = []
        self._lens[slot] = 0
        self.seq_lens[slot] = 0

    def num_tokens(self, slot: int) -> int:
        return self._lens[slot]

    def _counts(self, t: int) -> tuple[int, int, int]:
        s = min(t, self.config.sink_tokens)
        c = (t - s) // self.config.partition * self.config.partition
        return s, c, t - s - c

    # -- filling ---------------------------------------------------------------------------------
    def load(self, slot: int, qkv: QuantizedKV, batch_index: int = 0) -> None:
        """Put one sequence of a prefilled QuantizedKV (same config) into an empty slot."""
        if qkv.config != self.config:
            raise ValueError(
                f"QuantizedKV config {qkv.config} differs from the cache's {self.config}"
            )
        if qkv.kv_heads != self.kv_heads or qkv.head_dim != self.head_dim:
            raise ValueError("QuantizedKV heads / head_dim do not match the cache")
        if self._lens[slot]:
            raise ValueError(f"slot {slot} is in use")
        p, i = self.config.partition, batch_index
        s, c, o = qkv.num_sink, qkv.num_closed, qkv.num_open
        n = c // p
        ids = torch.tensor(self._alloc(slot, n), dtype=torch.long, device=self.k_open.device)
        kq, vq = qkv.k_q, qkv.v_q
        h = self.kv_heads
        if n and self.config.layout == "kivi":
            self._store_kivi(ids, kivi_pages(_batch_item(kq, i), _batch_item(vq, i)))
        elif n:
            kc = kq.codes[i].reshape(h, n, p, -1).transpose(0, 1)
            self.k_codes[ids] = kc.to(self.k_codes.device)
            for dst, src in (
                (self.k_mins, kq.mins),
                (self.k_scales, kq.scales),
                (self.k_sums, kq.sums),
            ):
                dst[ids] = src[i].reshape(h, n, p, -1).transpose(0, 1).to(dst.device, dst.dtype)
            self.v_codes[ids] = vq.codes[i].permute(2, 0, 1, 3).to(self.v_codes.device)
            for dst, src in (
                (self.v_mins, vq.mins),
                (self.v_scales, vq.scales),
                (self.v_sums, vq.sums),
            ):
                dst[ids] = src[i].permute(2, 0, 1).to(dst.device, dst.dtype)
        self.k_sink[slot, :, :s] = qkv.k_sink[i]
        self.v_sink[slot, :, :s] = qkv.v_sink[i]
        self.k_open[slot, :, :o] = qkv.k_open[i]
        self.v_open[slot, :, :o] = qkv.v_open[i]
        self._lens[slot] = s + c + o
        self.seq_lens[slot] = s + c + o

    def append(
        self, k_new: torch.Tensor, v_new: torch.Tensor, slots: list[int] | None = None
    ) -> None:
        """Add one token per sequence: k_new, v_new [n, H, 1, D] for `slots` (default 0..n-1)."""
        n = k_new.shape[0]
        slots = list(range(n)) if slots is None else list(slots)
        if k_new.shape != (n, self.kv_heads, 1, self.head_dim) or v_new.shape != k_new.shape:
            raise ValueError(
                f"append expects k_new, v_new [{n}, {self.kv_heads}, 1, {self.head_dim}], "
                f"got {tuple(k_new.shape)} and {tuple(v_new.shape)}"
            )
        if len(slots) != n:
            raise ValueError(f"{len(slots)} slots for {n} tokens")
        k_new, v_new = k_new.to(self.dtype)[:, :, 0], v_new.to(self.dtype)[:, :, 0]
        p = self.config.partition
        sink_rows, open_rows, open_pos, full = [], [], [], []
        for row, slot in enumerate(slots):
            t = self._lens[slot]
            if t < self.config.sink_tokens:
                sink_rows.append((row, slot, t))
            else:
                s, c, o = self._counts(t)
                open_rows.append(row)
                open_pos.append((slot, o))
                if o == p - 1:
                    full.append((slot, s + c))
            self._lens[slot] = t + 1
        dev = self.k_open.device
        for row, slot, t in sink_rows:
            self.k_sink[slot, :, t] = k_new[row]
            self.v_sink[slot, :, t] = v_new[row]
        if open_rows:
            rows = torch.tensor(open_rows, device=k_new.device)
            sl = torch.tensor([a for a, _ in open_pos], device=dev)
            po = torch.tensor([b for _, b in open_pos], device=dev)
            self.k_open[sl, :, po] = k_new[rows].to(dev)
            self.v_open[sl, :, po] = v_new[rows].to(dev)
        if full:
            self._close([s for s, _ in full], [start for _, start in full])
        self.seq_lens.copy_(torch.tensor(self._lens, dtype=torch.int32), non_blocking=True)

    def _store_kivi(self, ids: torch.Tensor, new: KiviPages) -> None:
        """Write pages new [1, n, ...] (or [n, 1, ...]: one page of n slots) at physical ids."""
        for name, dst in self.pages.tensors().items():
            src = getattr(new, name)
            dst[0, ids] = src.reshape(len(ids), *src.shape[2:]).to(dst.device, dst.dtype)

    def _close(self, slots: list[int], starts: list[int]) -> None:
        """Quantize the full open pages of `slots` (whose closed part starts at `starts`)."""
        cfg = self.config
        args = dict(bits=cfg.bits, partition=cfg.partition, rounding=cfg.rounding, seed=cfg.seed)
        ids = [self._alloc(slot, 1)[0] for slot in slots]
        if cfg.rounding == "stochastic":
            # the noise is a function of (slot, absolute token): one launch per sequence
            groups = [
                ([s], [i], {0: s, 3: st}, {0: s, 2: st})
                for s, i, st in zip(slots, ids, starts, strict=True)
            ]
        else:
            groups = [(slots, ids, None, None)]
        for sl, pid, koff, voff in groups:
            sl_t = torch.tensor(sl, device=self.k_open.device)
            idx = torch.tensor(pid, dtype=torch.long, device=self.k_open.device)
            k, v = self.k_open[sl_t], self.v_open[sl_t]  # [n, H, p, D]
            if cfg.layout == "kivi":
                # the noise offsets name (slot, absolute token) as in the paper branch below
                kq = quantize_groups_triton(k, -2, stream=K_STREAM, axis_offsets=voff, **args)
                vq = quantize_groups_triton(v, -1, stream=V_STREAM, axis_offsets=voff, **args)
                self._store_kivi(idx, kivi_pages(kq, vq))  # [n, 1, ...]: n slots, one page
                continue
            kq = quantize_groups_triton(
                k.transpose(-1, -2), -2, stream=K_STREAM, axis_offsets=koff, **args
            )
            vq = quantize_groups_triton(v, -2, stream=V_STREAM, axis_offsets=voff, **args)
            self.k_codes[idx] = kq.codes.flatten(-2)
            self.k_mins[idx], self.k_scales[idx], self.k_sums[idx] = kq.mins, kq.scales, kq.sums
            self.v_codes[idx] = vq.codes[..., 0, :]
            self.v_mins[idx], self.v_scales[idx] = vq.mins[..., 0], vq.scales[..., 0]
            self.v_sums[idx] = vq.sums[..., 0]

"""Independent helpers for the core tests: a numpy bit unpacker and float64 math."""

import numpy as np
import torch


def np_unpack(packed: torch.Tensor, bits: int) -> np.ndarray:
    """Second implementation of the bit order: element j of a group sits at bits (j % per)*bits."""
    raw = packed.cpu().numpy().astype(np.uint16)
    per = 8 // bits
    out = np.empty(raw.shape[:-1] + (raw.shape[-1] * per,), dtype=np.int64)
    for j in range(per):
        out[..., j::per] = (raw >> (j * bits)) & ((1 << bits) - 1)
    return out


def np_dequantize(qt) -> np.ndarray:
    """float64 values min + scale * code in the logical shape, from the raw stored bytes."""
    codes = np_unpack(qt.codes, qt.bits).reshape(*qt.codes.shape[:-1], qt.partition)
    vals = qt.mins.double().numpy()[..., None] + qt.scales.double().numpy()[..., None] * codes
    flat = vals.reshape(*vals.shape[:-2], -1)[..., : qt.length]
    return np.moveaxis(flat, -1, qt.dim)


def rel_err(a, b) -> float:
    a = torch.as_tensor(a, dtype=torch.float64)
    b = torch.as_tensor(b, dtype=torch.float64)
    return float((a - b).norm() / b.norm().clamp_min(1e-300))

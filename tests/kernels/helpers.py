"""Shared by the kernel tests: the device they run on, the tolerance and the output check."""

from __future__ import annotations

import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = 1e-3  # relative error (norm) against reference_attention of the same quantization


def rel_written(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative error of a against b; fails if a holds NaN (the poison of an unwritten output)."""
    a, b = a.double().cpu(), b.double().cpu()
    assert torch.isfinite(a).all(), "unwritten (NaN-poisoned) or non-finite output"
    return float((a - b).norm() / b.norm())

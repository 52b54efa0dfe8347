"""Host cost of the kivi quantize launches (eager calls, no CUDA graph), on the GPU:
    python3 benchmarks/host_profile_quantize.py
Prints microseconds of host time per call for the whole quantize_kv_triton and for single
launches with and without the enable_fp_fusion compile option."""

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import triton.language as tl  # noqa: E402

from hack_kernels import HackConfig  # noqa: E402
from hack_kernels.triton.quantize import quantize_kv_triton  # noqa: E402
from hack_kernels.triton.quantize_kivi import _quantize_v_kernel, quantize_k_tokens  # noqa: E402


def host_us(fn, n=200) -> float:
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    host = time.perf_counter() - t
    torch.cuda.synchronize()
    return 1e6 * host / n


k = torch.randn(1, 8, 256, 128, device="cuda", dtype=torch.float16)
v = torch.randn_like(k)
vc = torch.empty(1, 8, 256, 2, 16, dtype=torch.uint8, device="cuda")
vm = torch.empty(1, 8, 256, 2, dtype=torch.float16, device="cuda")
vsum = torch.empty(1, 8, 256, 2, dtype=torch.uint8, device="cuda")


def v_launch(**opts):
    _quantize_v_kernel[(16, 8)](
        v, v, vc, vm, vm, vsum, 8, 256, 128, v.stride(0), v.stride(1), v.stride(2),
        PART=64, BITS=2, BLOCK_T=16, E=2, EVEN=True, STOCHASTIC=False, INT=tl.int16, ASM=True,
        num_warps=2, **opts,
    )  # fmt: skip


print(f"quantize_kv_triton {host_us(lambda: quantize_kv_triton(k, v, HackConfig(), False)):.1f}")
print(f"quantize_k_tokens  {host_us(lambda: quantize_k_tokens(k, 2, 64)):.1f}")
print(f"V launch, fp fusion off {host_us(lambda: v_launch(enable_fp_fusion=False)):.1f}")
print(f"V launch, default      {host_us(lambda: v_launch()):.1f}")
print(f"torch.empty            {host_us(lambda: torch.empty(64, device='cuda')):.1f}")

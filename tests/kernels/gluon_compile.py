"""Compile kivi_gluon_decode_kernel for the H100 (sm_90) without a GPU; writes the cubin.

    python -m tests.kernels.gluon_compile OUT.cubin [HEAD_DIM BITS]
    python -m tests.kernels.gluon_compile --merges OUT_DIR   (the Triton kernels beside it)
Arguments are typed and aligned as a launch on the paged cache specializes them (pointers and
strides divisible by 16; split counts and block-table widths not specialized).
"""

from __future__ import annotations

import inspect
import sys
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.experimental.gluon._runtime import GluonASTSource

from hack_kernels.triton.kivi_gluon import kivi_gluon_decode_kernel as kernel

CONSTS = {"D": 128, "PART": 64, "G": 4, "E": 2, "BITS": 2, "HOIST": False}
PTRS = {"q_ptr": "*fp16", "part_ptr": "*fp32", "ml_ptr": "*fp32", "seq_ptr": "*i32",
        "bt_ptr": "*i32", "kc_ptr": "*u8", "km_ptr": "*fp16", "kss_ptr": "*fp16",
        "vc_ptr": "*u8", "vm_ptr": "*fp16", "vss_ptr": "*fp16"}  # fmt: skip
UNSPECIALIZED = {"NSINK", "NSPLIT", "KVH", "NPART", "sbt_b"}


def main(out: str, head_dim: int = 128, bits: int = 2) -> None:
    consts = {**CONSTS, "D": head_dim, "E": head_dim // 64, "BITS": bits}
    sig, aligned = {}, []
    for i, name in enumerate(inspect.signature(kernel.fn).parameters):
        if name in consts:
            sig[name] = "constexpr"
        elif name == "qk_scale":
            sig[name] = "fp32"
        else:
            sig[name] = PTRS.get(name, "i32")
            if name not in UNSPECIALIZED:
                aligned.append(i)
    src = GluonASTSource(
        fn=kernel, signature=sig, constexprs=consts,
        attrs={(i,): [["tt.divisibility", 16]] for i in aligned},
    )  # fmt: skip
    ck = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 1})
    Path(out).write_bytes(ck.asm["cubin"])


def compile_merges(out_dir: str) -> None:
    """The Triton kernels beside it (the split merges) for sm_90: the
    interpreter accepts code a GPU compile rejects (Python constants carried through loops)."""
    from triton.compiler import ASTSource

    from hack_kernels.triton.attention_kernel import combine_splits_kernel
    from hack_kernels.triton.merge_16bit import combine_with_16bit_kernel

    ptrs = {n: "*fp32" for n in ("o_ptr", "ml_ptr", "part_ptr")}
    ptrs |= {n: "*fp16" for n in ("out_ptr", "q_ptr", "ks_ptr", "vs_ptr", "ko_ptr", "vo_ptr")}
    ptrs["seq_ptr"] = "*i32"
    kernels = (
        (combine_splits_kernel, {"D": 128, "BLOCK_D": 32, "BLOCK_S": 16}),
        (combine_with_16bit_kernel, {"D": 128, "PART": 64, "BLOCK_D": 32, "BLOCK_S": 128,
                                     "BLOCK16": 16}),
    )  # fmt: skip
    for k, consts in kernels:
        sig = {}
        for name in inspect.signature(k.fn).parameters:
            sig[name] = "constexpr" if name in consts else ptrs.get(name, "i32")
        sig["qk_scale"] = "fp32" if "qk_scale" in sig else None
        sig = {n: t for n, t in sig.items() if t}
        ck = triton.compile(
            ASTSource(fn=k, signature=sig, constexprs=consts),
            target=GPUTarget("cuda", 90, 32),
            options={"num_warps": 4},
        )
        Path(out_dir, f"{k.fn.__name__}.cubin").write_bytes(ck.asm["cubin"])


if __name__ == "__main__":
    if sys.argv[1] == "--merges":
        compile_merges(sys.argv[2])
    else:
        main(sys.argv[1], *(int(a) for a in sys.argv[2:]))

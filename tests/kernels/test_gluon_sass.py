"""The Gluon decode kernel compiled for the H100 (sm_90) on the CPU, its machine code checked.

The interpreter cannot run Gluon, so CI checks what makes the kernel fast instead (its results are
checked on a GPU by test_kivi_gluon.py): it compiles; nothing spills to local memory; per page
the loop issues exactly the tensor-core products of the design (4 for Q.K^T per 16-token tile,
3 per V tile and token chunk) and reads codes as 32-bit words; and only P' and Q' change layout through shared memory (a K or V operand going through shared memory, the
cost the kernel exists to avoid, shows up as more shared-memory traffic).
"""

from __future__ import annotations

import collections
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import triton

BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
pytestmark = pytest.mark.skipif(
    not (BIN / "ptxas").exists() or not (BIN / "nvdisasm").exists(),
    reason="this Triton wheel ships no CUDA assembler",
)


def _compile(tmp_path: Path, head_dim: int, bits: int) -> tuple[str, str]:
    """SASS and resource usage of the kernel compiled for sm_90, in a child process without
    TRITON_INTERPRET (under it Gluon's own helpers are interpreter functions it cannot compile)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "cache")
    cubin = tmp_path / "k.cubin"
    subprocess.run(
        [sys.executable, "-m", "tests.kernels.gluon_compile", str(cubin), str(head_dim), str(bits)],
        env=env, cwd=Path(__file__).resolve().parents[2], check=True, timeout=300,
    )  # fmt: skip
    run = lambda *a: subprocess.run(a, capture_output=True, text=True, check=True).stdout  # noqa: E731
    return run(str(BIN / "nvdisasm"), "-c", str(cubin)), run(
        str(BIN / "cuobjdump"), "--dump-resource-usage", str(cubin)
    )


def _page_loop(sass: str) -> list[str]:
    """Instructions of the longest backward-branch loop (the page loop)."""
    ins, labels = [], {}
    for line in sass.splitlines():
        if m := re.match(r"\s*\.(L_x_\d+):", line):
            labels[m.group(1)] = len(ins)
        elif m := re.match(r"\s+/\*[0-9a-f]{4,}\*/\s+([^/].*?)\s*;", line):
            ins.append(re.sub(r"^@!?U?P\w+\s+", "", m.group(1)))
    best = (0, 0)
    for i, text in enumerate(ins):
        m = re.search(r"BRA\s+(?:\S+\s+)?`?\(?\.?(L_x_\d+)", text)
        if m and labels.get(m.group(1), i + 1) <= i:
            best = max(best, (i + 1 - labels[m.group(1)], labels[m.group(1)]))
    return ins[best[1] : best[1] + best[0]]


@pytest.mark.parametrize("head_dim,bits", [(128, 2), (128, 4), (64, 2)])
def test_gluon_decode_sass(tmp_path, head_dim, bits):
    sass, usage = _compile(tmp_path, head_dim, bits)
    assert "LOCAL:0" in usage and "STACK:0" in usage, usage  # no spills
    loop = _page_loop(sass)
    ops = collections.Counter(t.split()[0] for t in loop)
    # per 64-token page: Q.K^T 4 token tiles x D / 32 chunks; O^T D / 16 channel tiles x 2 token
    # chunks x 3 products
    assert ops["IMMA.16832.S8.S8.SAT"] == 4 * head_dim // 32 + head_dim // 16 * 2 * 3, ops
    assert not any(o.startswith("LDG") and (".U8" in o or ".S8" in o) for o in ops), ops
    smem = sum(n for o, n in ops.items() if o.startswith(("STS", "LDS")))
    # P' (C fragment -> B operand: 4 stores, 4 loads) and Q's codes, folded once per head and
    # copied to its columns (d128: 2 stores, 2 matrix loads; d64: 4 and 4)
    assert smem <= 16, ops
    assert len(loop) < 1300, len(loop)  # 1,133 at this commit (the Triton kernel: ~2,200 a page)


def test_merge_kernels_compile_for_sm90(tmp_path):
    # the kernels decode launches beside the Gluon one compile for the GPU, not only in the
    # interpreter (a Python float carried through a loop passes there and fails here)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "cache")
    subprocess.run(
        [sys.executable, "-m", "tests.kernels.gluon_compile", "--merges", str(tmp_path)],
        env=env, cwd=Path(__file__).resolve().parents[2], check=True, timeout=300,
    )  # fmt: skip
    names = ("combine_splits_kernel", "combine_with_16bit_kernel")
    assert all((tmp_path / f"{n}.cubin").stat().st_size > 0 for n in names)

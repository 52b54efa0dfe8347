"""One launch of each kivi quantize kernel on 64K tokens x 8 heads x d128, for a profiler:
    ncu --section SpeedOfLight --section WarpStateStats -k regex:quantize python3 \
        benchmarks/profile_quantize.py ['{"BLOCK_D": 64, "k_warps": 2, ...}']
"""

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hack_kernels.triton import launch  # noqa: E402
from hack_kernels.triton.quantize_kivi import quantize_k_tokens, quantize_v_rows  # noqa: E402

if len(sys.argv) > 1:
    launch.TUNED[("quantize_kivi", 128, 64)] = json.loads(sys.argv[1])

x = torch.randn(1, 8, 65536, 128, device="cuda", dtype=torch.float16)
for _ in range(2):  # the first launch compiles
    quantize_k_tokens(x, 2, 64)
    quantize_v_rows(x, 2, 64)
torch.cuda.synchronize()

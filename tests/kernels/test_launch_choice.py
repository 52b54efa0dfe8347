"""Split-K choice and the tuned launch table (no kernel runs here)."""

from __future__ import annotations

import json

import pytest

from hack_kernels.triton import launch


@pytest.mark.parametrize(
    "args,kw,want",
    [
        # about waves x 132 programs: ceil(32 * 132 / (16 * 8)) = 33, under 512 // 4 and 64
        ((16, 8, 512), dict(waves=32, min_pages=4), 33),
        # batch 1: 1056 wanted, capped by pages (512 // 4 = 128), then by max_splits
        ((1, 8, 512), dict(waves=64, min_pages=4, max_splits=256), 128),
        ((1, 8, 512), dict(waves=64, min_pages=4), 64),
        ((1, 8, 3), dict(waves=32, min_pages=4), 1),  # fewer pages than a split's minimum
        ((4, 2, 0), dict(waves=32, min_pages=1), 1),  # no closed page at all
        ((1, 1, 7), dict(waves=1, min_pages=1, sms=4), 4),
    ],
)
def test_choose_splits_known_answers(args, kw, want):
    assert launch.choose_splits(*args, **kw) == want


def test_tuned_table_names_known_kinds_and_launch_knobs():
    table = json.loads(launch.TUNED_FILE.read_text())
    knobs = {"num_warps", "num_stages", "waves", "min_pages", "max_splits", "SLOTS", "UNPACK",
             "BLOCK_P", "BLOCK_R", "BLOCK_D", "BLOCK_T", "k_warps", "v_warps", "PREFETCH",
             "DOT16", "maxnreg", "ASM", "FP_FUSION", "GLUON", "gluon"}  # fmt: skip
    for key, conf in table.items():
        kind, d, p = key.split("|")
        assert kind in launch.DEFAULTS, key
        assert int(d) in (0, 64, 128) and int(p) in (32, 64, 128), key
        assert set(conf) <= knobs, (key, set(conf) - knobs)
        if "num_warps" in conf:
            assert conf["num_warps"] in (1, 2, 4, 8), key

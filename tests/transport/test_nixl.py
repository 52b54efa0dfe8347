"""The transport tests for NIXL, in a child process: NIXL and grpc_tools (loaded by the stub
tests) abort when both are in one process, so the NIXL cases of test_transports.py run apart."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from hack_transport.transports import available_kinds

from .procenv import child_env

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.timeout(300)
@pytest.mark.skipif("nixl" not in available_kinds(), reason="nixl is not installed")
def test_nixl_transport_cases():
    env = child_env(HACK_KV_TEST_NIXL="1")
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
         str(REPO / "tests/transport/test_transports.py"), "-k", "nixl"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=280,
    )  # fmt: skip
    tail = proc.stdout[-3000:]
    assert proc.returncode == 0, tail
    summary = tail.strip().splitlines()[-1]  # e.g. "10 passed, 5 deselected in 23.0s"
    assert re.search(r"\d+ passed", summary) and not re.search(r"failed|\d+ error", summary), tail

"""UCX between two processes of one host: shared memory by default (ucx.py starts ucxx with
MM_ERROR_HANDLING=y), tcp when the environment says otherwise, and either way bit-exact
transfers and a flipped byte rejected by name. UCX itself reports the transport it used
(UCX_PROTO_INFO=used, printed by the receiver process when it exits)."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import xxhash

from hack_transport import wire
from hack_transport.transports import available_kinds, make_sender
from hack_transport.transports.base import TransferError

from .procenv import child_env

pytestmark = pytest.mark.timeout(120)
REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests/transport"))
from kvgen import layered  # noqa: E402
from peer import frames as raw_frames  # noqa: E402

from .test_transports import _flip  # noqa: E402

SHM = {"sysv/memory", "posix/memory"}


def proto_transports(ucx_output: str) -> dict[str, set[str]]:
    """{table title: transports in its rows} from UCX_PROTO_INFO tables, e.g.
    'intra-node cfg#1 | rendezvous data fetch into host memory from host' -> {'sysv/memory'}."""
    out: dict[str, set[str]] = {}
    title = None
    for line in ucx_output.splitlines():
        cells = [c.strip() for c in line.split("|")[1:-1]]
        if len(cells) == 2 and cells[0].startswith("ucp_context"):
            title = f"{cells[0].split(' ', 1)[1]} | {cells[1]}"
        elif title and len(cells) == 3 and re.match(r"\d", cells[0]) and cells[2]:
            out.setdefault(title, set()).add(cells[2])
    return out


def test_proto_transports_parses_ucx_tables():
    text = (
        "[1] [vm:1:0]   | ucp_context_0 intra-node cfg#1 | rendezvous data fetch into host |\n"
        "[1] [vm:1:0]   +------+-----+\n"
        "[1] [vm:1:0]   | 0             0 | no data fetch |             |\n"
        "[1] [vm:1:0]   | 16       1..inf | (?) fragmented copy-in copy-out | sysv/memory |\n"
        "[1] [vm:1:0]   | ucp_context_0 inter-node cfg#0 | stream message by ucp_stream_send* |\n"
        "[1] [vm:1:0]   | 1        1..inf | multi-frag stream zero-copy | tcp/lo |\n"
    )
    assert proto_transports(text) == {
        "intra-node cfg#1 | rendezvous data fetch into host": {"sysv/memory"},
        "inter-node cfg#0 | stream message by ucp_stream_send*": {"tcp/lo"},
    }


def _hack_request() -> tuple[wire.ModelIdentity, list[wire.Block]]:
    """Two layers of 1,024 + 7 tokens, 8 heads, d128: 256 KiB code tensors (UCX rendezvous)."""
    _, model, blocks = layered("shm", 1031)
    return model, blocks


def _digest(blocks: list) -> str:
    return xxhash.xxh3_64_hexdigest(b"".join(wire.encode_frame(b) for b in blocks))


@pytest.mark.parametrize("mm_error_handling", [None, "n"])
def test_ucx_across_processes(mm_error_handling):
    """None: the module's default, which must give shared memory; "n": the environment wins and
    UCX falls back to tcp. Both must deliver bit-exact and reject a flipped byte by name."""
    assert "ucx" in available_kinds(), "ucxx is a test dependency (setup.cfg [test])"
    _, blocks = _hack_request()
    raw = raw_frames(4)  # 4 MiB tensors: rendezvous in larger messages
    bad = [wire.encode_block(b) for b in blocks]
    bad[1] = _flip(bad[1], "v.scales")
    env = child_env(UCX_PROTO_INFO="used")
    env.pop("UCX_MM_ERROR_HANDLING", None)  # set by ucx.py in this process
    if mm_error_handling is not None:
        env["UCX_MM_ERROR_HANDLING"] = mm_error_handling
    peer = subprocess.Popen(
        [sys.executable, str(REPO / "tests/transport/peer.py"), "serve", "ucx", "3"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
    )  # fmt: skip
    try:
        port = next(int(ln.split()[1]) for ln in peer.stdout if ln.startswith("PORT "))

        async def go() -> TransferError:
            s = make_sender("ucx", "127.0.0.1", port, timeout=30)
            try:
                await s.send("hack", blocks)
                await s.send("raw", raw)
                with pytest.raises(TransferError) as e:
                    await s.send("bad", bad)
                return e.value
            finally:
                await s.close()

        err = asyncio.run(go())
        out, _ = peer.communicate(timeout=60)
    finally:
        peer.kill()
        peer.wait()
    assert err.tensor == "v.scales" and "v.scales" in str(err)
    assert f"COMMIT hack {_digest(blocks)}" in out
    assert f"COMMIT raw {_digest(raw)}" in out
    assert "COMMIT bad" not in out and "REJECT" in out and "v.scales" in out
    used = proto_transports(out)
    data = set().union(*(tls for t, tls in used.items() if "rendezvous" in t or "tag" in t))
    assert data, f"UCX printed no protocol table:\n{out[-3000:]}"
    if mm_error_handling is None:
        assert data & SHM and "tcp/lo" not in data, used
    else:
        assert "tcp/lo" in data and not data & SHM, used


def test_setting_stays_out_of_the_environment():
    """The shared-memory switch goes to ucxx's context only: NIXL's UCX reads the same
    environment, and with shared memory its receiver did not notice a killed sender."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("UCX_MM")}
    # The module starts ucxx with the option (whether UCX then uses shared memory is checked
    # across processes above); the environment keeps no trace of it.
    code = (
        "import os, hack_transport.transports.ucx as u, ucxx.core as c;"
        "print(os.environ.get('UCX_MM_ERROR_HANDLING'), c._ctx is not None)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], env=child_env(env),
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    assert out.stdout.split()[-2:] == ["None", "True"], out.stdout

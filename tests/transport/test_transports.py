"""Every transport against a real server on loopback: round trips and each failure of issue 4."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from hack_kernels import HackConfig, quantize_kv
from hack_transport import wire
from hack_transport.transports import available_kinds, make_receiver, make_sender
from hack_transport.transports.base import RetryPolicy, TransferError, TransferLimits, Unauthorized

from .procenv import child_env

pytestmark = pytest.mark.timeout(60)
# NIXL cannot share a process with grpc_tools (protoc), which other tests load: its cases run in
# a child pytest process (test_nixl.py) that sets HACK_KV_TEST_NIXL=1 and runs only them.
if os.environ.get("HACK_KV_TEST_NIXL") == "1":
    KINDS = ["nixl"]
else:
    KINDS = [k for k in available_kinds() if k != "nixl"]
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def request_kv():
    """Three layers of an awkward-length prompt: 2 sinks, 4 closed groups of 32, 9 open tokens."""
    cfg = HackConfig(partition=32, sink_tokens=2)
    g = torch.Generator().manual_seed(11)
    kvs = []
    for _ in range(3):
        k = torch.randn(1, 2, 2 + 4 * 32 + 9, 64, generator=g).half()
        kvs.append(quantize_kv(k, torch.randn(k.shape, generator=g).half(), cfg))
    model = wire.model_identity("m", 3, 2, 64, torch.float16, cfg)
    return kvs, model, wire.split_kv(kvs, 64, model)


def run(coro):
    return asyncio.run(coro)


async def _serve(kind, **kw):
    rcv = make_receiver(kind, **kw)
    host, port = await rcv.start()
    return rcv, port


@pytest.mark.parametrize("kind", KINDS)
def test_round_trip_is_bit_exact(kind, request_kv):
    kvs, model, blocks = request_kv

    async def go():
        rcv, port = await _serve(kind, expect_model=model)
        try:
            s = make_sender(kind, "127.0.0.1", port, timeout=20)
            res = await s.send("req-1", blocks)
            # Pre-encoded buffers and stored (joined) frames travel the same way.
            await s.send("req-2", [wire.encode_block(b) for b in blocks])
            await s.send("req-3", [[wire.encode_frame(b)] for b in blocks])
            return rcv, res
        finally:
            await rcv.close()

    rcv, res = run(go())
    assert res.frames == len(blocks)
    assert res.bytes == sum(len(wire.encode_frame(b)) for b in blocks)
    for key in ("req-1", "req-2", "req-3"):
        back = wire.join_blocks(rcv.received[key])
        for a, b in zip(kvs, back, strict=True):
            assert torch.equal(a.k_q.codes, b.k_q.codes) and torch.equal(a.v_q.scales, b.v_q.scales)
            assert torch.equal(a.k_open, b.k_open) and torch.equal(a.v_sink, b.v_sink)
    assert rcv.pending_bytes == 0


def _flip(frame_buffers, tensor):
    """Encoded buffers of a frame with one bit of `tensor`'s bytes flipped (a copy)."""
    header = wire.decode_frame(b"".join(frame_buffers))
    assert header is not None
    raw = bytearray(b"".join(frame_buffers))
    hlen = int.from_bytes(raw[8:12], "little")
    import msgpack

    h = msgpack.unpackb(raw[20 : 20 + hlen])
    entry = next(e for e in h["tensors"] if e[0] == tensor)
    raw[20 + hlen + entry[3] + entry[4] // 2] ^= 0x10
    return [bytes(raw)]


@pytest.mark.parametrize("kind", KINDS)
def test_flipped_byte_rejects_the_transfer_and_names_the_tensor(kind, request_kv):
    _, model, blocks = request_kv
    frames = [wire.encode_block(b) for b in blocks]
    frames[1] = _flip(frames[1], "v.scales")

    async def go():
        rcv, port = await _serve(kind, expect_model=model)
        try:
            with pytest.raises(TransferError) as e:
                await make_sender(kind, "127.0.0.1", port, timeout=20).send("bad", frames)
            return rcv, e.value
        finally:
            await rcv.close()

    rcv, err = run(go())
    assert err.tensor == "v.scales" and "v.scales" in str(err)
    assert rcv.received == {} and rcv.pending_bytes == 0


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(
    "problem,match",
    [("model", "model"), ("major", "major version 9"), ("oversized", "exceeds the limit")],
)
def test_bad_frames_get_clear_errors(kind, request_kv, problem, match):
    kvs, model, blocks = request_kv
    frame = wire.encode_frame(blocks[0])
    if problem == "model":
        other = wire.model_identity("m", 3, 2, 64, torch.float16, HackConfig(partition=64))
        frame = wire.encode_frame(wire.split_kv(kvs, 64, other)[0])
    elif problem == "major":
        hlen = int.from_bytes(frame[8:12], "little")
        header = frame[20 : 20 + hlen]
        frame = wire.pack_prefix(header, major=9) + header + frame[20 + hlen :]
    limits = TransferLimits(frame=wire.Limits(max_payload_bytes=1000))
    kw = {"limits": limits} if problem == "oversized" else {}

    async def go():
        rcv, port = await _serve(kind, expect_model=model, **kw)
        try:
            with pytest.raises(TransferError, match=match):
                await make_sender(kind, "127.0.0.1", port, timeout=20).send("x", [[frame]])
            return rcv
        finally:
            await rcv.close()

    rcv = run(go())
    assert rcv.received == {} and rcv.pending_bytes == 0


async def _send_half_frame(kind, port, frame):
    """Speak the session protocol, then vanish half-way through a frame's payload."""
    from hack_transport.transports.base import message_parts, send_msg

    parts = message_parts([frame])
    cut = [parts[0], parts[1], parts[2][: len(parts[2]) // 2]]
    if kind == "tcp":
        from hack_transport.transports.tcp import SocketChannel, TcpSender

        sock = await TcpSender("127.0.0.1", port)._connect()
        with sock:
            ch = SocketChannel(sock)
            await send_msg(ch, {"key": "t", "frames": 1, "token": None})
            await ch.send(cut)
    else:
        import ucxx

        from hack_transport.transports.ucx import UcxChannel

        ep = await ucxx.create_endpoint("127.0.0.1", port)
        ch = UcxChannel(ep)
        await send_msg(ch, {"key": "t", "frames": 1, "token": None})
        await ch.send(cut)
        await ep.close()


@pytest.mark.parametrize("kind", [k for k in KINDS if k in ("tcp", "ucx")])
def test_truncated_stream_commits_nothing(kind, request_kv):
    """The sender vanishes after half a frame: nothing committed, buffers released."""
    _, model, blocks = request_kv
    frame = wire.encode_frame(blocks[0])

    async def go():
        rcv, port = await _serve(kind, expect_model=model, idle_timeout=3.0)
        try:
            await _send_half_frame(kind, port, frame)
            # Aborted (the stream ended) or rejected (UCX delivered a short message whose
            # checksum then failed): either way nothing is committed.
            ok = await asyncio.to_thread(
                rcv.wait_until, lambda: rcv.aborted + len(rcv.rejected) == 1, 15
            )
            return rcv, ok
        finally:
            await rcv.close()

    rcv, ok = run(go())
    assert ok and rcv.received == {} and rcv.pending_bytes == 0


def test_grpc_truncated_stream_commits_nothing(request_kv):
    from hack_transport.transports import grpc_transport as gt

    _, model, blocks = request_kv
    frame = wire.encode_frame(blocks[0])
    real = gt._chunks

    def short(first, frames, size, whole=0):  # serialized by protobuf itself: peers interoperate
        first.data = frame[: len(frame) - 3]
        yield first.SerializeToString()

    async def go():
        rcv, port = await _serve("grpc", expect_model=model)
        gt._chunks = short
        try:
            with pytest.raises(TransferError, match="stream ended"):
                await make_sender("grpc", "127.0.0.1", port, timeout=10).send("t", [[frame]])
            return rcv
        finally:
            gt._chunks = real
            await rcv.close()

    rcv = run(go())
    assert rcv.received == {} and rcv.pending_bytes == 0


@pytest.mark.parametrize("kind", KINDS)
def test_connection_refused_retries_with_backoff(kind, request_kv):
    _, _, blocks = request_kv
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    policy = RetryPolicy(attempts=3, initial_delay=0.1, factor=2.0)
    sender = make_sender(kind, "127.0.0.1", port, retry=policy, timeout=30)
    t0 = time.perf_counter()
    with pytest.raises(TransferError, match="after 3 attempts"):
        sender.send_sync("x", blocks)
    assert time.perf_counter() - t0 >= 0.1 + 0.2  # two backoff sleeps


@pytest.mark.parametrize("token", [None, "wrong"])
def test_grpc_token_is_required(request_kv, token):
    _, model, blocks = request_kv

    async def go():
        rcv, port = await _serve("grpc", token="s3cret", expect_model=model)
        try:
            with pytest.raises(Unauthorized, match="token"):
                await make_sender("grpc", "127.0.0.1", port, token=token).send("x", blocks)
            await make_sender("grpc", "127.0.0.1", port, token="s3cret").send("y", blocks)
            return rcv
        finally:
            await rcv.close()

    rcv = run(go())
    assert list(rcv.received) == ["y"]


def test_grpc_tls_with_token(request_kv, tmp_path):
    _, model, blocks = request_kv
    key, crt = tmp_path / "k.pem", tmp_path / "c.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1", "-keyout", key, "-out", crt],
        check=True, capture_output=True,
    )  # fmt: skip

    async def go():
        rcv, port = await _serve(
            "grpc", token="t", tls=(key.read_bytes(), crt.read_bytes()), expect_model=model
        )
        try:
            s = make_sender(
                "grpc", "127.0.0.1", port, token="t", root_certificates=crt.read_bytes()
            )
            await s.send("tls", blocks)
            with pytest.raises(TransferError):  # plaintext client against the TLS port
                await make_sender("grpc", "127.0.0.1", port, token="t", timeout=5,
                                  retry=RetryPolicy(attempts=1)).send("plain", blocks)  # fmt: skip
            return rcv
        finally:
            await rcv.close()

    rcv = run(go())
    assert list(rcv.received) == ["tls"]


def _peer(*args):
    env = child_env()
    return subprocess.Popen(
        [sys.executable, str(REPO / "tests/transport/peer.py"), *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip


def _read_port(proc) -> int:
    """The peer prints PORT n once listening (libraries may log to stdout before)."""
    for line in proc.stdout:
        if line.startswith("PORT "):
            return int(line.split()[1])
    raise RuntimeError(f"peer exited: {proc.stderr.read()[-2000:]}")


@pytest.mark.timeout(90)
@pytest.mark.parametrize("kind", KINDS)
def test_receiver_killed_mid_transfer(kind):
    """The sender learns of it well within its timeout."""
    peer = _peer("receive", kind)
    try:
        port = _read_port(peer)
        sys.path.insert(0, str(REPO / "tests/transport"))
        from peer import frames

        sender = make_sender(kind, "127.0.0.1", port, bandwidth=8e6, timeout=30)

        async def go():
            task = asyncio.ensure_future(sender.send("k", frames(32)))  # about 4 s at 8 MB/s
            await asyncio.sleep(1.0)
            peer.kill()
            t0 = time.perf_counter()
            with pytest.raises(TransferError):
                await task
            return time.perf_counter() - t0

        assert run(go()) < 20
    finally:
        peer.kill()
        peer.wait()


@pytest.mark.timeout(90)
@pytest.mark.parametrize("kind", KINDS)
def test_sender_killed_mid_transfer(kind):
    """The receiver drops the partial transfer and frees its buffers."""

    async def go():
        rcv, port = await _serve(kind, idle_timeout=5.0)
        peer = _peer("send", kind, str(port), "32")
        try:
            ok = await asyncio.to_thread(rcv.wait_until, lambda: rcv.pending_bytes > 0, 30)
            assert ok, peer.stderr.read() if peer.poll() is not None else "no data arrived"
            peer.kill()
            ok = await asyncio.to_thread(
                rcv.wait_until, lambda: rcv.aborted + len(rcv.rejected) >= 1, 30
            )
            return rcv, ok
        finally:
            peer.kill()
            peer.wait()
            await rcv.close()

    rcv, ok = run(go())
    assert ok and rcv.received == {} and rcv.pending_bytes == 0


@pytest.mark.parametrize("kind", KINDS)
def test_frames_sharing_memory(kind, request_kv):
    """The same encoded buffers twice in one transfer (NIXL must register the memory once)."""
    _, model, blocks = request_kv
    enc = wire.encode_block(blocks[0])

    async def go():
        rcv, port = await _serve(kind, expect_model=model)
        try:
            await make_sender(kind, "127.0.0.1", port, timeout=20).send("twice", [enc, enc])
            return rcv
        finally:
            await rcv.close()

    rcv = run(go())
    a, b = rcv.received["twice"]
    for name, t in blocks[0].tensors.items():
        assert torch.equal(a.tensors[name], t) and torch.equal(b.tensors[name], t)

"""`hack-kv serve` in a real child process on loopback: concurrency, capacity, codes, auth, TLS."""

from __future__ import annotations

import os
import re
import subprocess
import threading
import time
import urllib.request

import grpc
import numpy as np
import pytest
import xxhash

from hack_transport.proto import hack_kv_store_pb2 as pb
from hack_transport.proto import hack_kv_store_pb2_grpc as pb_grpc
from hack_transport.store import (
    AuthError,
    CapacityError,
    ChunkKey,
    ChunkSpec,
    StoreUnavailableError,
)

pytestmark = pytest.mark.timeout(120)


def key(i: int) -> ChunkKey:
    return ChunkKey("svc@1", i.to_bytes(16, "little"))


def metric(server, name: str) -> float:
    text = (
        urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10)
        .read()
        .decode()
    )
    m = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    assert m, f"{name} not in /metrics"
    return float(m.group(1))


@pytest.mark.parametrize("shm", [True, False], ids=["shm", "stream"])
def test_concurrent_clients_bit_exact(start_server, tmp_path, shm):
    server = start_server(
        "--cpu", "64M", "--disk-dir", str(tmp_path / "d"), "--no-fsync", "--metrics-port", "0"
    )
    errors: list[str] = []

    def client_work(c: int) -> None:
        rng = np.random.default_rng(100 + c)
        with server.client(shm=shm) as client:
            sent = {}
            for j in range(200):
                k = key(c * 10_000 + j)
                v = rng.integers(0, 256, int(rng.integers(1, 40_000)), dtype=np.uint8).tobytes()
                client.put(k, v)
                sent[k] = v
                back = client.get(k)
                if back != v:
                    errors.append(f"client {c} put {j}: get differs")
            for k, v in sent.items():
                if client.get(k) != v:
                    errors.append(f"client {c}: {k} differs at the end")

    threads = [threading.Thread(target=client_work, args=(c,)) for c in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(100)
    assert errors == []
    with server.client() as client:
        s = client.stats()
    assert s["puts"] == 1600 and s["put_failures"] == 0 and s["misses"] == 0
    put, get = ("PutShm", "GetShm") if shm else ("Put", "Get")
    assert metric(server, f'hack_kv_store_requests_total{{code="OK",method="{put}"}}') == 1600
    assert metric(server, f'hack_kv_store_requests_total{{code="OK",method="{get}"}}') == 3200
    assert metric(server, f'hack_kv_store_latency_seconds_count{{method="{get}"}}') == 3200
    assert metric(server, "hack_kv_store_bytes_in_total") * 2 == metric(
        server, "hack_kv_store_bytes_out_total"
    )
    assert server.stop() == 0


def test_capacity_evicts_to_disk_and_gets_stay_exact(start_server, tmp_path):
    server = start_server(
        "--cpu",
        "1M",
        "--disk-dir",
        str(tmp_path / "d"),
        "--no-write-through",
        "--metrics-port",
        "0",
    )
    rng = np.random.default_rng(7)
    vals = {key(i): rng.integers(0, 256, 100_000, dtype=np.uint8).tobytes() for i in range(40)}
    with server.client() as client:
        for k, v in vals.items():
            client.put(k, v)
            cpu = client.stats()["tiers"][0]
            assert cpu["bytes"] <= 1 << 20
        s = {t["name"]: t for t in client.stats()["tiers"]}
        assert s["cpu"]["evictions"] >= 30 and s["disk"]["chunks"] >= 30
        for k, v in vals.items():
            assert client.get(k) == v
        assert {t["name"]: t for t in client.stats()["tiers"]}["disk"]["hits"] >= 30
    assert metric(server, 'hack_kv_store_evictions_total{tier="cpu"}') >= 30
    spec = ChunkSpec("svc@1", 256)
    tokens = np.arange(700)
    with server.client() as client:
        for _, _, k in spec.keys(tokens)[:2]:
            client.put(k, b"chunk")
        assert client.lookup(spec, tokens) == 512
        assert client.lookup(spec, tokens[:512]) == 512
        assert client.lookup(spec, tokens[:511]) == 256
        assert client.delete(spec.keys(tokens)[0][2]) and client.lookup(spec, tokens) == 0


def _put(stub, msgs, **kw):
    return stub.Put(iter(msgs), timeout=10, **kw)


def _code(fn) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as e:
        fn()
    return e.value.code(), e.value.details()


def test_malformed_requests_get_the_right_codes(start_server, tmp_path):
    server = start_server("--cpu", "8M", "--disk-dir", str(tmp_path / "d"), "--max-chunk", "1M")
    ch = grpc.insecure_channel(server.address)
    stub = pb_grpc.KVStoreStub(ch)
    good = pb.ChunkKey(model="svc@1", chunk_hash=bytes(16))
    data = b"0123456789"
    ok = dict(key=good, total_size=10, xxh3=xxhash.xxh3_64_intdigest(data))
    INVALID, EXHAUSTED = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED
    cases = [
        ([pb.PutRequest(total_size=10, data=data)], INVALID, "no key"),
        (
            [
                pb.PutRequest(
                    **{**ok, "key": pb.ChunkKey(model="m", chunk_hash=b"x" * 15)}, data=data
                )
            ],
            INVALID,
            "16 bytes",
        ),
        (
            [pb.PutRequest(**{**ok, "key": pb.ChunkKey(chunk_hash=bytes(16))}, data=data)],
            INVALID,
            "model",
        ),
        ([pb.PutRequest(**ok, data=data[:5])], INVALID, "ended after 5"),
        ([pb.PutRequest(**ok, data=data), pb.PutRequest(data=b"more")], INVALID, "more than"),
        ([pb.PutRequest(**{**ok, "xxh3": ok["xxh3"] ^ 1}, data=data)], INVALID, "checksum"),
        ([], INVALID, "empty"),
        ([pb.PutRequest(**{**ok, "total_size": 2 << 20})], EXHAUSTED, "exceeds"),
    ]
    for msgs, want, words in cases:
        code, details = _code(lambda m=msgs: _put(stub, m))
        assert code == want and words in details, (code, details)
    assert not stub.Exists(pb.KeysRequest(keys=[good]), timeout=10).present[
        0
    ]  # nothing half-stored
    assert (
        _code(lambda: list(stub.Get(pb.GetRequest(key=good), timeout=10)))[0]
        == grpc.StatusCode.NOT_FOUND
    )
    assert _code(lambda: list(stub.Get(pb.GetRequest(), timeout=10)))[0] == INVALID
    bad = pb.KeysRequest(keys=[pb.ChunkKey(model="m", chunk_hash=b"")])
    assert _code(lambda: stub.Exists(bad, timeout=10))[0] == INVALID
    assert _code(lambda: stub.Delete(bad, timeout=10))[0] == INVALID
    lk = pb.LookupRequest(model="m", tokens=[1, 2, 3], chunk_tokens=0)
    assert _code(lambda: stub.Lookup(lk, timeout=10))[0] == INVALID
    # the service is still up and works
    assert _put(stub, [pb.PutRequest(**ok, data=data)]).tier == "cpu"
    assert b"".join(m.data for m in stub.Get(pb.GetRequest(key=good), timeout=10)) == data
    ch.close()


def test_token_is_required_and_checked(start_server, tmp_path):
    server = start_server("--no-disk", "--token", "s3cret-token")
    with server.client() as anonymous, server.client(token="wrong") as wrong:
        for c in (anonymous, wrong):
            for call in (
                lambda c=c: c.put(key(1), b"v"),
                lambda c=c: c.get(key(1)),
                c.stats,
                lambda c=c: c.exists(key(1)),
            ):
                with pytest.raises(AuthError, match="UNAUTHENTICATED"):
                    call()
        assert anonymous.health() == "SERVING"  # health checks need no token
    with server.client(token="s3cret-token") as right:
        assert right.put(key(1), b"v") == "cpu" and right.get(key(1)) == b"v"


def _self_signed(tmp_path):
    cert, keyf = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1", "-keyout", str(keyf), "-out", str(cert)],
        check=True, capture_output=True,
    )  # fmt: skip
    return cert, keyf


def test_tls_with_token(start_server, tmp_path):
    cert, keyf = _self_signed(tmp_path)
    server = start_server(
        "--no-disk", "--token", "t", "--tls-cert", str(cert), "--tls-key", str(keyf)
    )
    with server.client(token="t", tls_ca=str(cert), tls_server_name="localhost") as c:
        assert c.put(key(2), b"secret kv") == "cpu" and c.get(key(2)) == b"secret kv"
    plain = type(c)(server.address, token="t", timeout=2, retries=1)
    with pytest.raises(StoreUnavailableError):
        plain.get(key(2))  # a plaintext client cannot talk to the TLS port
    plain.close()


NO_SHM = pytest.mark.skipif(not os.path.isdir("/dev/shm"), reason="no /dev/shm here")


@NO_SHM
def test_shared_memory_exchange_is_checked_and_falls_back(start_server, tmp_path):
    server = start_server("--no-disk")
    stub = pb_grpc.KVStoreStub(grpc.insecure_channel(server.address))
    good = pb.ChunkKey(model="svc@1", chunk_hash=bytes(16))
    shm_file = f"/dev/shm/hack-kv-{os.getpid()}-" + "ab" * 16 + ".buf"
    link = f"/dev/shm/hack-kv-{os.getpid()}-" + "cd" * 16 + ".buf"
    with open(shm_file, "wb") as f:
        f.write(b"abc")
    os.symlink(shm_file, link)
    try:
        data = b"abcdef"
        FAILED, INVALID = grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.INVALID_ARGUMENT
        for path in (
            str(tmp_path / "x.buf"),
            "/dev/shm/other.buf",
            "/dev/shm/hack-kv-" + "ab" * 16 + ".buf",  # no pid in the name
            "/dev/shm/../tmp/" + os.path.basename(shm_file),
            link,
        ):
            req = pb.ShmPutRequest(
                key=good, path=path, total_size=3, xxh3=xxhash.xxh3_64_intdigest(b"abc")
            )
            assert _code(lambda r=req: stub.PutShm(r, timeout=10))[0] == FAILED
        short = pb.ShmPutRequest(
            key=good, path=shm_file, total_size=6, xxh3=xxhash.xxh3_64_intdigest(data)
        )
        assert _code(lambda: stub.PutShm(short, timeout=10)) == (
            INVALID,
            "exchange file holds 3 bytes, 6 announced",
        )
        bad = pb.ShmPutRequest(key=good, path=shm_file, total_size=3, xxh3=1)
        assert "checksum" in _code(lambda: stub.PutShm(bad, timeout=10))[1]
        assert (
            _code(lambda: stub.GetShm(pb.ShmGetRequest(key=good, path=shm_file), timeout=10))[0]
            == grpc.StatusCode.NOT_FOUND
        )
    finally:
        os.unlink(link)
        os.unlink(shm_file)
    # a service without shared memory: the client streams instead, transparently
    plain = start_server("--no-disk", "--no-shm")
    with plain.client(shm=True) as c:
        assert c.put(key(5), b"x" * 3000) == "cpu" and c.get(key(5)) == b"x" * 3000
        assert c._use_shm is False  # it gave up on shared memory after the first refusal


@pytest.mark.parametrize("shm", [True, False], ids=["shm", "stream"])
def test_get_into_a_preallocated_buffer(start_server, shm):
    server = start_server("--no-disk")
    rng = np.random.default_rng(3)
    v = rng.integers(0, 256, 2_500_001, dtype=np.uint8).tobytes()  # several stream pieces
    with server.client(shm=shm) as c:
        c.put(key(9), v)
        buf = bytearray(3_000_000)
        assert c.get_into(key(9), buf) == len(v)
        assert bytes(buf[: len(v)]) == v
        assert c.get_into(key(10), buf) is None
        with pytest.raises(ValueError, match="the buffer only 1000"):
            c.get_into(key(9), bytearray(1000))
        with pytest.raises(ValueError, match="writable"):
            c.get_into(key(9), b"x" * 10)


def test_unreachable_service_fails_clearly_after_retries():
    import socket

    from hack_transport.store.client import StoreClient

    with socket.socket() as s:  # a port that nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    c = StoreClient(f"127.0.0.1:{port}", timeout=2, retries=2, backoff=0.05)
    t0 = time.monotonic()
    with pytest.raises(StoreUnavailableError, match="UNAVAILABLE"):
        c.put(key(1), b"v")
    assert time.monotonic() - t0 < 10
    c.close()


def test_bytes_of_puts_in_flight_are_bounded(start_server):
    server = start_server("--no-disk", "--max-inflight", "1M")
    v = np.random.default_rng(5).integers(0, 256, 800_000, dtype=np.uint8).tobytes()
    release = threading.Event()

    def slow_stream():
        yield pb.PutRequest(key=pb.ChunkKey(model="svc@1", chunk_hash=bytes(16)), total_size=len(v),
                            xxh3=xxhash.xxh3_64_intdigest(v), data=v[:1000])  # fmt: skip
        release.wait(20)
        yield pb.PutRequest(data=v[1000:])

    stub = pb_grpc.KVStoreStub(grpc.insecure_channel(server.address))
    slow = stub.Put.future(slow_stream(), timeout=30)
    with server.client(retries=0) as c:
        deadline = time.monotonic() + 10
        while True:  # the slow put holds 800 kB of the 1 MB budget once its first message is in
            try:
                c.put(key(2), v)
            except CapacityError as e:
                assert "server busy" in str(e) and "RESOURCE_EXHAUSTED" in str(e)
                break
            c.delete(key(2))
            assert time.monotonic() < deadline, "the budget never filled"
        release.set()
        assert slow.result().tier == "cpu"
        assert c.put(key(2), v) == "cpu" and c.get(key(2)) == v  # room again once it finished


def test_embedded_defaults_keep_chunks_under_the_cache_dir(start_server, tmp_path):
    cache = tmp_path / "xdg"
    server = start_server("--cpu", "1M", env={"XDG_CACHE_HOME": str(cache)})
    with server.client() as c:
        assert c.put(key(1), b"default tiers") == "cpu"
    assert server.stop() == 0
    assert len(list((cache / "hack-kv" / "store" / "chunks").glob("*/*.hkc"))) == 1
    again = start_server("--cpu", "1M", env={"XDG_CACHE_HOME": str(cache)})
    with again.client() as c:
        assert c.get(key(1)) == b"default tiers"


@pytest.mark.parametrize(
    "args,message",
    [
        (["--tls-cert", "/nonexistent.pem"], "TLS needs both a certificate and a key"),
        (["--cpu", "12X"], "not a byte size"),
    ],
)
def test_serve_refuses_bad_options_with_a_clear_message(args, message):
    import sys

    from .conftest import CLI

    r = subprocess.run(
        [sys.executable, "-c", CLI, "serve", "--no-disk", "--port", "0", *args],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr


@NO_SHM
def test_exchange_files_of_dead_clients_are_removed():
    import sys

    from hack_transport.store.shm import ExchangeFiles

    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    orphan = f"/dev/shm/hack-kv-{int(dead.stdout)}-" + "ef" * 16 + ".buf"
    mine = f"/dev/shm/hack-kv-{os.getpid()}-" + "01" * 16 + ".buf"
    for p in (orphan, mine):
        open(p, "wb").close()
    try:
        files = ExchangeFiles()
        assert not os.path.exists(orphan) and os.path.exists(mine)
        _, path = files.get()
        assert os.path.exists(path)
        files.close()
        assert not os.path.exists(path)
    finally:
        for p in (orphan, mine):
            if os.path.exists(p):
                os.unlink(p)

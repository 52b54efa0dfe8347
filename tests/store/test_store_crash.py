"""kill -9 during a stream of puts, SIGTERM with puts in flight: acked chunks survive, nothing half-written."""

from __future__ import annotations

import json
import re
import threading
import time
import urllib.request

import numpy as np
import pytest

from hack_transport.proto import hack_kv_store_pb2 as pb
from hack_transport.store import ChunkKey, StoreError
from hack_transport.store.pb import key_to_pb

pytestmark = pytest.mark.timeout(150)


def key(i: int) -> ChunkKey:
    return ChunkKey("crash@1", i.to_bytes(16, "little"))


def value(i: int) -> bytes:
    rng = np.random.default_rng(i)
    return rng.integers(0, 256, int(rng.integers(50_000, 400_000)), dtype=np.uint8).tobytes()


def test_kill9_during_puts_then_restart(start_server, tmp_path):
    disk = str(tmp_path / "disk")
    args = ("--cpu", "64M", "--disk-dir", disk, "--disk", "1G")
    server = start_server(*args)
    acked: list[int] = []
    tried: list[int] = []
    stop = threading.Event()

    def putter(t: int) -> None:
        with server.client(timeout=5, retries=0) as c:
            for j in range(10_000):
                if stop.is_set():
                    return
                i = t * 100_000 + j
                tried.append(i)
                try:
                    c.put(key(i), value(i))
                except StoreError:
                    return  # the server died under us: this one was never acknowledged
                acked.append(i)

    threads = [threading.Thread(target=putter, args=(t,)) for t in range(3)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 60
    while len(acked) < 60 and time.monotonic() < deadline:
        time.sleep(0.01)
    server.kill9()  # while the putters are mid-stream
    stop.set()
    for t in threads:
        t.join(30)
    assert len(acked) >= 60
    unacked = sorted(set(tried) - set(acked))

    again = start_server(*args)
    with again.client() as c:
        for i in acked:
            assert c.get(key(i)) == value(i), f"acknowledged chunk {i} lost or changed"
        for i in unacked:
            got = c.get(key(i))  # the client checks size and checksum too
            assert got is None or got == value(i)
        s = c.stats()
    assert s["corrupt_dropped"] == 0  # no half-written file was ever visible as a chunk
    assert list((tmp_path / "disk" / "tmp").iterdir()) == []
    print(
        f"kill -9 after {len(acked)} acked puts; {len(unacked)} in flight; all acked present and exact"
    )


def inflight_bytes(server) -> float:
    url = f"http://127.0.0.1:{server.metrics_port}/metrics"
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    return float(re.search(r"^hack_kv_store_inflight_put_bytes (\S+)$", text, re.M).group(1))


def test_sigterm_finishes_in_flight_puts_and_discards_stalled_ones(start_server, tmp_path):
    disk = str(tmp_path / "disk")
    server = start_server("--disk-dir", disk, "--grace", "2", "--metrics-port", "0")
    c = server.client()
    data = value(1)
    gate, late_gate = threading.Event(), threading.Event()

    def stream(k: ChunkKey, v: bytes, wait: threading.Event):
        import xxhash

        yield pb.PutRequest(
            key=key_to_pb(k), total_size=len(v), xxh3=xxhash.xxh3_64_intdigest(v), data=v[:1000]
        )
        wait.wait(20)
        yield pb.PutRequest(data=v[1000:])

    results: dict[str, object] = {}

    def run(name: str, k: ChunkKey, wait: threading.Event) -> None:
        try:
            results[name] = c._stub.Put(stream(k, data, wait), timeout=20).tier
        except Exception as e:
            results[name] = e

    finishing = threading.Thread(target=run, args=("finishing", key(1), gate))
    stalled = threading.Thread(target=run, args=("stalled", key(2), late_gate))
    finishing.start()
    stalled.start()
    deadline = time.monotonic() + 20
    while inflight_bytes(server) != 2 * len(data):  # both streams are open on the server
        assert time.monotonic() < deadline, "the two puts never reached the server"
        time.sleep(0.05)
    server.proc.terminate()
    time.sleep(0.5)
    gate.set()  # the first put completes inside the grace period
    finishing.join(20)
    stalled.join(20)  # the second is cancelled when the grace period ends
    late_gate.set()
    assert server.proc.wait(20) == 0
    events = [json.loads(line) for line in server.logs().splitlines() if line.startswith("{")]
    assert [e["msg"] for e in events if e["msg"] in ("serving", "draining", "stopped")] == [
        "serving",
        "draining",
        "stopped",
    ]
    assert results["finishing"] == "cpu"
    assert isinstance(results["stalled"], Exception)
    again = start_server("--disk-dir", disk)
    with again.client() as c2:
        assert c2.get(key(1)) == data
        assert c2.get(key(2)) is None
        assert c2.stats()["corrupt_dropped"] == 0
    c.close()

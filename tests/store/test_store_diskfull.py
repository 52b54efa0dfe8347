"""A disk that fills up: a clear RESOURCE_EXHAUSTED, nothing half-kept, the service keeps serving."""

from __future__ import annotations

import shutil
import subprocess

import numpy as np
import pytest

from hack_transport.store import CapacityError, ChunkKey

pytestmark = pytest.mark.timeout(90)


def key(i: int) -> ChunkKey:
    return ChunkKey("full@1", i.to_bytes(16, "little"))


def value(i: int) -> bytes:
    return np.random.default_rng(i).integers(0, 256, 300_000, dtype=np.uint8).tobytes()


def fill_until_refused(client) -> tuple[list[int], str]:
    stored = []
    for i in range(100):
        try:
            client.put(key(i), value(i))
        except CapacityError as e:
            return stored, str(e)
        stored.append(i)
    raise AssertionError("the disk never filled up")


def check_still_serving(client, stored: list[int], refused: int) -> None:
    assert client.health() == "SERVING"
    assert all(client.get(key(i)) == value(i) for i in stored)
    assert client.get(key(refused)) is None  # the refused put left nothing behind
    assert client.stats()["tiers"][-1]["chunks"] == len(stored)


def test_byte_quota_full(start_server, tmp_path):
    server = start_server("--disk-dir", str(tmp_path / "d"), "--disk", "2M", "--no-disk-evict")
    with server.client(retries=0) as c:
        stored, msg = fill_until_refused(c)
        assert "RESOURCE_EXHAUSTED" in msg and "disk tier full" in msg and "eviction is off" in msg
        assert len(stored) == 6  # 2 MiB / (300 kB + header)
        check_still_serving(c, stored, len(stored))
        assert list((tmp_path / "d" / "tmp").iterdir()) == []


def _can_mount_tmpfs(where) -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(
        ["unshare", "-rm", "sh", "-c", 'mount -t tmpfs -o size=1m tmpfs "$0"', str(where)],
        capture_output=True,
    )
    return probe.returncode == 0


def test_file_system_full_on_a_small_tmpfs(start_server, tmp_path):
    mnt = tmp_path / "tmpfs"
    mnt.mkdir()
    if not _can_mount_tmpfs(mnt):
        pytest.skip("cannot mount a tmpfs in a user+mount namespace here")
    # The server runs in its own mount namespace on a 2 MiB tmpfs; its quota (1 GiB) never binds.
    prefix = [
        "unshare",
        "-rm",
        "sh",
        "-c",
        'mount -t tmpfs -o size=2m tmpfs "$0" && exec "$@"',
        str(mnt),
    ]
    server = start_server("--disk-dir", str(mnt), "--disk", "1G", prefix=prefix)
    with server.client(retries=0) as c:
        stored, msg = fill_until_refused(c)
        assert "RESOURCE_EXHAUSTED" in msg and "file system" in msg and "No space left" in msg
        assert 4 <= len(stored) <= 6
        check_still_serving(c, stored, len(stored))

"""A started gRPC receiver keeps freed heap pages for the next message (keep_heap_pages): the
churn of ~1 MiB messages on a thread of its own no longer faults in fresh pages. Each case runs
in a child process, as the setting is process-wide."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from .procenv import child_env

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.timeout(120)

CHILD = """
import asyncio, resource, sys, threading
from hack_transport.transports.grpc_transport import GrpcReceiver

async def start():
    rcv = GrpcReceiver(tune_malloc=sys.argv[1] == "1")
    await rcv.start()
    await rcv.close()

asyncio.run(start())
src = b"x" * (1 << 20)

def churn():  # what grpc's threads do with received messages: fresh ~1 MiB bytes, freed soon
    keep = []
    for i in range(300):
        keep.append(src[: (1 << 20) - i % 7] + b"y")
        if len(keep) > 3:
            keep.pop(0)

for _ in range(2):  # the first round warms the thread's arena
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    t = threading.Thread(target=churn)
    t.start()
    t.join()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
"""


def _faults(tune: bool, **env: str) -> int:
    run_env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    run_env = child_env(run_env, **env)
    out = subprocess.run(
        [sys.executable, "-c", CHILD, "1" if tune else "0"],
        capture_output=True, text=True, env=run_env, timeout=100, check=True,
    )  # fmt: skip
    return int(out.stdout.split()[-1])


def test_receiver_keeps_heap_pages():
    untuned, tuned = _faults(False), _faults(True)
    # 300 messages of 1 MiB: about 1,250 page faults (4 KiB each, a page per ~1 MiB message
    # re-faulted after trimming) without the setting, a handful with it.
    assert untuned > 500, untuned
    assert tuned < untuned / 10, (tuned, untuned)


def test_environment_wins():
    """A malloc setting in the environment is left alone (here: one that keeps the faults)."""
    tunables = "glibc.malloc.mmap_threshold=131072:glibc.malloc.trim_threshold=131072"
    assert _faults(True, GLIBC_TUNABLES=tunables) > 500


HELD = """
import resource, sys
from hack_transport.transports.grpc_transport import keep_heap_pages

if sys.argv[1] != "none":
    keep_heap_pages(trim_threshold=int(sys.argv[1])) if sys.argv[1] != "default" else keep_heap_pages()
src = b"x" * (3 << 20)

def transfer():  # whole-frame messages kept until the commit: 32 of ~3 MiB, then all freed
    held = [src[: (3 << 20) - i] + b"y" for i in range(32)]
    del held

transfer()  # warms the heap
f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
transfer()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
"""


def _held_faults(setting: str) -> int:
    run_env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    run_env = child_env(run_env)
    out = subprocess.run(
        [sys.executable, "-c", HELD, setting],
        capture_output=True, text=True, env=run_env, timeout=100, check=True,
    )  # fmt: skip
    return int(out.stdout.split()[-1])


def test_a_whole_transfer_of_kept_messages_is_not_trimmed():
    """~100 MB of messages freed together at a commit stay in the heap for the next transfer
    (about 24,000 page faults a transfer otherwise, with 32 MiB as the trim threshold too)."""
    default, trim32, untuned = (
        _held_faults("default"),
        _held_faults(str(32 << 20)),
        _held_faults("none"),
    )
    assert untuned > 10_000 and trim32 > 10_000, (untuned, trim32)
    assert default < 1_000, default

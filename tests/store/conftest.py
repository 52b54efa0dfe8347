"""Helpers that start the real `hack-kv serve` in a child process on loopback."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

CLI = "from hack_integrations.cli import main; main()"


class ServerProcess:
    """One `hack-kv serve` child: port 0, ready file, logs kept for failure messages."""

    def __init__(
        self, workdir: Path, *args: str, prefix: list[str] | None = None, env: dict | None = None
    ) -> None:
        self.workdir = workdir
        self.ready = workdir / f"ready-{time.monotonic_ns()}.json"
        self.log = open(workdir / "server.log", "ab")
        cmd = [
            sys.executable,
            "-c",
            CLI,
            "serve",
            "--port",
            "0",
            "--ready-file",
            str(self.ready),
            *args,
        ]
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.proc = subprocess.Popen(
            (prefix or []) + cmd, stdout=self.log, stderr=self.log, env=env
        )
        deadline = time.monotonic() + 30
        while not self.ready.exists():
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.logs()}")
            if time.monotonic() > deadline:
                self.proc.kill()
                raise RuntimeError(f"server not ready in 30 s:\n{self.logs()}")
            time.sleep(0.05)
        info = json.loads(self.ready.read_text())
        self.port, self.metrics_port = info["port"], info["metrics_port"]
        self.address = f"127.0.0.1:{self.port}"

    def client(self, **kw):
        from hack_transport.store.client import StoreClient

        c = StoreClient(self.address, **kw)
        c.wait_ready(10)
        return c

    def logs(self) -> str:
        self.log.flush()
        return (self.workdir / "server.log").read_text(errors="replace")[-4000:]

    def kill9(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.log.close()
        return self.proc.returncode


@pytest.fixture
def start_server(tmp_path):
    """start_server(*cli_args) -> ServerProcess; every server is stopped at teardown."""
    started: list[ServerProcess] = []

    def start(
        *args: str, prefix: list[str] | None = None, env: dict | None = None
    ) -> ServerProcess:
        s = ServerProcess(tmp_path, *args, prefix=prefix, env=env)
        started.append(s)
        return s

    yield start
    for s in started:
        s.stop()

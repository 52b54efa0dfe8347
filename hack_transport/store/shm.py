"""Same-host value exchange through files in shared memory (/dev/shm).

gRPC over loopback moves a few MB at about 1 GB/s here; a tmpfs file moves them at memory speed.
The client creates one exchange file per thread (0600, random name) and names it in GetShm/PutShm;
the service opens it (only a file of that name pattern, directly in its shm directory, no symlinks)
and copies the value in or out with pwrite/pread. Sizes and checksums travel in the RPC.
"""

from __future__ import annotations

import os
import re
import stat
import threading
import uuid

from .errors import StoreError

SHM_DIR = "/dev/shm"
_NAME = re.compile(r"hack-kv-[0-9a-f]{32}\.buf")


class ShmUnavailable(StoreError):
    """The named exchange file cannot be used (the service answers FAILED_PRECONDITION)."""


def open_exchange(path: str, shm_dir: str) -> int:
    """Open a client's exchange file for reading and writing, after checking where it is."""
    if os.path.dirname(path) != shm_dir or not _NAME.fullmatch(os.path.basename(path)):
        raise ShmUnavailable(f"{path!r} is not an exchange file in {shm_dir}")
    try:
        fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW)
    except OSError as e:
        raise ShmUnavailable(f"cannot open {path}: {e.strerror}") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise ShmUnavailable(f"{path} is not a regular file")
    return fd


def write_all(fd: int, data: bytes | memoryview) -> None:
    mv, done = memoryview(data).cast("B"), 0
    while done < len(mv):
        done += os.pwrite(fd, mv[done:], done)


def read_exact(fd: int, n: int) -> bytes:
    """n bytes from the start of the file; raises ShmUnavailable if it holds fewer."""
    data = os.pread(fd, n, 0)
    if len(data) < n:  # pread of a regular tmpfs file returns short only at end of file
        parts, got = [data], len(data)
        while got < n:
            more = os.pread(fd, n - got, got)
            if not more:
                raise ShmUnavailable(f"exchange file holds {got} bytes, {n} announced")
            parts.append(more)
            got += len(more)
        data = b"".join(parts)
    return data


def read_into(fd: int, out: memoryview) -> memoryview:
    """Fill `out` from the start of the file; raises ShmUnavailable if it holds fewer bytes."""
    got = 0
    while got < len(out):
        n = os.preadv(fd, [out[got:]], got)
        if not n:
            raise ShmUnavailable(f"exchange file holds {got} bytes, {len(out)} announced")
        got += n
    return out


class ExchangeFiles:
    """One exchange file per calling thread, removed by close()."""

    def __init__(self, shm_dir: str = SHM_DIR) -> None:
        self.shm_dir = shm_dir
        self._local = threading.local()
        self._lock = threading.Lock()
        self._open: list[tuple[int, str]] = []

    def get(self) -> tuple[int, str]:
        """(fd, path) of this thread's exchange file, created on first use."""
        mine = getattr(self._local, "file", None)
        if mine is None:
            path = os.path.join(self.shm_dir, f"hack-kv-{uuid.uuid4().hex}.buf")
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
            mine = self._local.file = (fd, path)
            with self._lock:
                self._open.append(mine)
        return mine

    def close(self) -> None:
        with self._lock:
            files, self._open = self._open, []
        for fd, path in files:
            os.close(fd)
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
        self._local = threading.local()

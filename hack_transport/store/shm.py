"""Same-host value exchange through files in shared memory (/dev/shm).

gRPC over loopback moves a few MB at about 1 GB/s here; a tmpfs file moves them at memory speed.
The client creates one exchange file per thread (0600, random name) and names it in GetShm/PutShm;
the service opens it (only a file of that name pattern, directly in its shm directory, no symlinks)
and copies the value in or out with pwrite/pread. Sizes and checksums travel in the RPC.
A file keeps the size of the largest value its thread moved, until the client closes; files left
by a client that died (its pid is in the name) are removed by the next client that starts.
"""

from __future__ import annotations

import os
import re
import stat
import threading
import uuid

from .errors import StoreError

SHM_DIR = "/dev/shm"
_NAME = re.compile(r"hack-kv-(\d+)-[0-9a-f]{32}\.buf")


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


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def remove_orphans(shm_dir: str = SHM_DIR) -> int:
    """Delete exchange files whose creating process is gone; returns how many."""
    removed = 0
    try:
        names = os.listdir(shm_dir)
    except OSError:
        return 0
    for name in names:
        m = _NAME.fullmatch(name)
        if m and not _alive(int(m.group(1))):
            try:
                os.unlink(os.path.join(shm_dir, name))
                removed += 1
            except OSError:
                pass
    return removed


class ExchangeFiles:
    """One exchange file per calling thread, removed by close()."""

    def __init__(self, shm_dir: str = SHM_DIR) -> None:
        self.shm_dir = shm_dir
        self._local = threading.local()
        self._lock = threading.Lock()
        self._open: list[tuple[int, str]] = []
        remove_orphans(shm_dir)

    def get(self) -> tuple[int, str]:
        """(fd, path) of this thread's exchange file, created on first use."""
        mine = getattr(self._local, "file", None)
        if mine is None:
            path = os.path.join(self.shm_dir, f"hack-kv-{os.getpid()}-{uuid.uuid4().hex}.buf")
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

"""The disk tier: one checksummed file per chunk, written atomically, found again on restart.

A write goes to tmp/<name>.tmp, is fsynced, renamed over chunks/<aa>/<name>.hkc and the directory is
fsynced, so a crash leaves either the whole old state or the whole new file, never half a chunk.
Every read verifies the checksums; a corrupt file is deleted, counted and reported as a miss.
"""

from __future__ import annotations

import errno
import fcntl
import itertools
import logging
import os
import threading
from collections.abc import Callable
from pathlib import Path

from .diskfile import CorruptChunkError, FileHeader, encode_header, read_header, read_value
from .entry import Entry
from .errors import DiskFullError
from .keys import ChunkKey
from .lru import LruIndex, tier_stats

log = logging.getLogger("hack_kv.store.disk")

SUFFIX = ".hkc"
_FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class DiskTier:
    """Chunks under `root`, at most `capacity` bytes of files (headers included).

    evict=True drops least recently used chunks to make room; evict=False refuses new chunks once
    the quota is reached (DiskFullError). A full file system raises DiskFullError either way.
    `validator`, if given, is called on every value read and must raise on a bad one.
    """

    name = "disk"

    def __init__(
        self,
        root: str | os.PathLike,
        capacity: int,
        *,
        evict: bool = True,
        fsync: bool = True,
        validator: Callable[[bytes], None] | None = None,
    ) -> None:
        self.root = Path(root)
        self.chunks_dir = self.root / "chunks"
        self.tmp_dir = self.root / "tmp"
        self.evict = evict
        self.fsync = fsync
        self.validator = validator
        self.index = LruIndex(capacity)
        self._lock = threading.Lock()
        self._reserved = 0
        self._tmp_names = itertools.count()
        self.hits = 0
        self.evictions = 0
        self.corrupt_dropped = 0
        self.chunks_dir.mkdir(parents=True, exist_ok=True)
        self.tmp_dir.mkdir(parents=True, exist_ok=True)
        self._lock_fd = self._lock_dir()
        self._scan()

    @property
    def capacity(self) -> int:
        return self.index.capacity

    def path(self, key: ChunkKey) -> Path:
        d = key.digest()
        return self.chunks_dir / d[:2] / (d + SUFFIX)

    def _lock_dir(self) -> int:
        """One store per directory: a second would delete the first's files in flight."""
        fd = os.open(self.root / "LOCK", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
            os.close(fd)
            raise RuntimeError(
                f"disk tier {self.root} is in use by another store (pid {holder or '?'})"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        return fd

    def close(self) -> None:
        """Release the directory (the kernel also releases it when the process dies)."""
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    # -- restart -----------------------------------------------------------------------------

    def _scan(self) -> None:
        """Index the chunk files already on disk; drop leftovers of interrupted writes."""
        for tmp in self.tmp_dir.iterdir():
            tmp.unlink(missing_ok=True)
        found = []
        for path in self.chunks_dir.glob(f"*/*{SUFFIX}"):
            try:
                with open(path, "rb") as f:
                    header = read_header(f, str(path))
                st = path.stat()
                if st.st_size != header.file_bytes or path.name != header.key.digest() + SUFFIX:
                    raise CorruptChunkError(f"{path}: size or name does not match its header")
            except CorruptChunkError as e:
                self._drop_corrupt(path, e)
                continue
            except FileNotFoundError:
                continue
            found.append((st.st_mtime_ns, header))
        for _, header in sorted(found, key=lambda t: t[0]):
            self.index.add(header.key, header.file_bytes)
        if found:
            log.info(
                "disk tier found chunks", extra={"chunks": len(found), "bytes": self.index.used}
            )

    def _drop_corrupt(self, path: Path, err: Exception) -> None:
        self.corrupt_dropped += 1
        log.warning("dropped corrupt chunk file", extra={"path": str(path), "error": str(err)})
        path.unlink(missing_ok=True)

    # -- reads -------------------------------------------------------------------------------

    def __contains__(self, key: ChunkKey) -> bool:
        with self._lock:
            return key in self.index

    def touch_if_present(self, key: ChunkKey) -> bool:
        """Mark `key` recently used if it is here (memory just evicted its copy)."""
        with self._lock:
            if key in self.index:
                self.index.touch(key)
                return True
            return False

    def get(self, key: ChunkKey) -> Entry | None:
        """The verified value of `key` and its xxh3, or None (absent, or corrupt and now dropped)."""
        with self._lock:
            if key not in self.index:
                return None
            self.index.touch(key)
            self.index.pin(key)  # eviction skips it while we read
        path = self.path(key)
        try:
            with open(path, "rb") as f:
                header = read_header(f, str(path))
                if header.key != key:
                    raise CorruptChunkError(f"{path}: holds {header.key}, expected {key}")
                value = read_value(f, header, str(path))
            if self.validator is not None:
                try:
                    self.validator(value)
                except Exception as e:
                    raise CorruptChunkError(f"{path}: invalid frame ({e})") from e
        except CorruptChunkError as e:
            with self._lock:
                self.index.unpin(key)
                if key in self.index:
                    self.index.remove(key)
                self._drop_corrupt(path, e)
            return None
        except FileNotFoundError:
            with self._lock:
                self.index.unpin(key)
                if key in self.index:
                    self.index.remove(key)
            return None
        with self._lock:
            self.index.unpin(key)
            self.hits += 1
        return Entry(value, header.xxh3)

    # -- writes ------------------------------------------------------------------------------

    def _reserve(self, key: ChunkKey, nbytes: int) -> None:
        with self._lock:
            if nbytes > self.capacity:
                raise DiskFullError(
                    f"disk tier full: a chunk file of {nbytes} bytes exceeds the capacity of "
                    f"{self.capacity} bytes"
                )
            victims = self.index.victims(nbytes, self._reserved, keep=key) if self.evict else None
            if victims is None and self.capacity - self.index.used - self._reserved < nbytes:
                raise DiskFullError(
                    f"disk tier full: {self.index.used} bytes used and {self._reserved} reserved of "
                    f"{self.capacity}, {nbytes} more needed"
                    + ("" if self.evict else " (eviction is off)")
                )
            for victim in victims or []:
                self.index.remove(victim)
                self.evictions += 1
                self.path(victim).unlink(missing_ok=True)
            self._reserved += nbytes
            self.index.pin(key)  # no eviction of this key may unlink the file being renamed in

    def put(self, key: ChunkKey, value: bytes | memoryview, xxh3: int | None = None) -> None:
        """Store `value` durably; raises DiskFullError when there is no room (nothing is kept)."""
        head = encode_header(key, value, xxh3)
        nbytes = len(head) + len(value)
        self._reserve(key, nbytes)
        final = self.path(key)
        tmp = self.tmp_dir / f"{final.stem}.{os.getpid()}.{next(self._tmp_names)}.tmp"
        committed = False
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            try:
                with open(fd, "wb", closefd=True) as f:
                    f.write(head)
                    f.write(value)
                    f.flush()
                    if self.fsync:
                        os.fsync(f.fileno())
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise
            new_dir = not final.parent.exists()
            final.parent.mkdir(exist_ok=True)
            if new_dir and self.fsync:
                _fsync_dir(self.chunks_dir)
            os.replace(tmp, final)
            if self.fsync:
                _fsync_dir(final.parent)
            committed = True
        except OSError as e:
            tmp.unlink(missing_ok=True)
            if e.errno in _FULL_ERRNOS:
                raise DiskFullError(
                    f"disk tier full: file system under {self.root}: {e.strerror}"
                ) from e
            raise
        finally:
            with self._lock:
                self._reserved -= nbytes
                self.index.unpin(key)
                if committed:
                    self.index.add(key, nbytes)

    def delete(self, key: ChunkKey) -> bool:
        with self._lock:
            if key not in self.index:
                return False
            self.index.remove(key)
            self.path(key).unlink(missing_ok=True)
            return True

    def stats(self) -> dict:
        with self._lock:
            return tier_stats(self.name, self.index, self.hits, self.evictions)


__all__ = ["DiskTier", "FileHeader"]

"""StoreClient: the KV store service from another process, with the KVStore interface.

One channel per client (thread-safe, reused by every call), a deadline on every call, and retries
with exponential backoff when the service is unreachable. Puts are safe to retry: a key names its
content, and the service commits a value only whole.
"""

from __future__ import annotations

import ipaddress
import os
import random
import time
import weakref
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import grpc
import numpy as np
import xxhash

from ..proto import hack_kv_store_pb2 as pb
from ..proto import hack_kv_store_pb2_grpc as pb_grpc
from .errors import (
    AuthError,
    CapacityError,
    CorruptChunkError,
    InvalidRequestError,
    RemoteError,
    StoreError,
    StoreUnavailableError,
)
from .keys import ChunkKey, ChunkSpec, as_token_array
from .pb import key_to_pb, stats_from_pb
from .shm import SHM_DIR, ExchangeFiles, read_exact, read_into, write_all

_RETRY = {grpc.StatusCode.UNAVAILABLE}
_ERRORS = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidRequestError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: CapacityError,
    grpc.StatusCode.UNAUTHENTICATED: AuthError,
    grpc.StatusCode.UNAVAILABLE: StoreUnavailableError,
    grpc.StatusCode.DEADLINE_EXCEEDED: StoreUnavailableError,
}


def _is_loopback(address: str) -> bool:
    host = address.rsplit(":", 1)[0].strip("[]") if ":" in address else address
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _close_all(channel: grpc.Channel, shm: ExchangeFiles | None) -> None:
    channel.close()
    if shm is not None:
        shm.close()


def _as_store_error(e: grpc.RpcError) -> StoreError:
    code = e.code()
    err = _ERRORS.get(code, RemoteError)(f"{code.name}: {e.details()}")
    err.code = code
    return err


class StoreClient:
    """Put/Get/Exists/Lookup/Delete/Stats/Health against `hack-kv serve` at `address` (host:port)."""

    def __init__(
        self,
        address: str,
        *,
        token: str | None = None,
        tls_ca: str | None = None,
        tls_server_name: str | None = None,
        timeout: float = 30.0,
        retries: int = 3,
        backoff: float = 0.05,
        piece_bytes: int = 1 << 20,
        max_message_bytes: int = 16 << 20,
        shm: bool | None = None,
    ) -> None:
        """shm: exchange values through /dev/shm files (GetShm/PutShm) instead of the socket;
        None uses them when the address is loopback, and any refusal falls back to streaming."""
        options = [
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
        ]
        if tls_server_name:
            options.append(("grpc.ssl_target_name_override", tls_server_name))
        if tls_ca:
            creds = grpc.ssl_channel_credentials(root_certificates=Path(tls_ca).read_bytes())
            self._channel = grpc.secure_channel(address, creds, options=options)
        else:
            self._channel = grpc.insecure_channel(address, options=options)
        self._stub = pb_grpc.KVStoreStub(self._channel)
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff
        self.piece_bytes = piece_bytes
        if shm is None:
            shm = _is_loopback(address) and os.path.isdir(SHM_DIR)
        self._shm = ExchangeFiles() if shm else None  # closed by close(), never before
        self._use_shm = bool(shm)
        self._finalizer = weakref.finalize(self, _close_all, self._channel, self._shm)

    def _call(self, fn: Callable[[], object]) -> object:
        for attempt in range(self.retries + 1):
            try:
                return fn()
            except grpc.RpcError as e:
                if e.code() not in _RETRY or attempt == self.retries:
                    raise _as_store_error(e) from None
            time.sleep(self.backoff * (2**attempt) * (0.5 + random.random()))
        raise AssertionError("unreachable")

    # -- the KVStore interface ---------------------------------------------------------------

    def _shm_refused(self, e: StoreError) -> bool:
        """A shared-memory call the service cannot serve: stop trying them, stream instead."""
        if getattr(e, "code", None) in (
            grpc.StatusCode.FAILED_PRECONDITION,
            grpc.StatusCode.UNIMPLEMENTED,
        ):
            self._use_shm = False
            return True
        return False

    def put(self, key: ChunkKey, value: bytes | memoryview) -> str:
        """Store `value`; returns the tier that took it once the service has committed it."""
        mv = memoryview(value).cast("B")
        n, step, checksum = len(mv), self.piece_bytes, xxhash.xxh3_64_intdigest(mv)
        if self._use_shm:
            try:
                fd, path = self._shm.get()
                write_all(fd, mv)
                req = pb.ShmPutRequest(key=key_to_pb(key), path=path, total_size=n, xxh3=checksum)
                return self._call(
                    lambda: self._stub.PutShm(req, timeout=self.timeout, metadata=self._metadata)
                ).tier
            except StoreError as e:
                if not self._shm_refused(e):
                    raise
            except OSError:  # this host's /dev/shm is full or unwritable: stream from now on
                self._use_shm = False

        def pieces():
            yield pb.PutRequest(
                key=key_to_pb(key), total_size=n, xxh3=checksum, data=mv[:step].tobytes()
            )
            for i in range(step, n, step):
                yield pb.PutRequest(data=mv[i : i + step].tobytes())

        reply = self._call(
            lambda: self._stub.Put(pieces(), timeout=self.timeout, metadata=self._metadata)
        )
        return reply.tier

    def get(self, key: ChunkKey) -> bytes | None:
        """The value of `key` (size and checksum verified), or None if the service has none."""
        return self._get(key, None)

    def get_into(self, key: ChunkKey, out: bytearray | memoryview) -> int | None:
        """Copy the value of `key` into the writable buffer `out` (no new allocation, e.g. a
        pinned or preallocated KV buffer); returns its size, or None if the service has none."""
        mv = memoryview(out).cast("B")
        if mv.readonly:
            raise ValueError("get_into needs a writable buffer")
        return self._get(key, mv)

    def _get(self, key: ChunkKey, out: memoryview | None) -> bytes | int | None:
        def room(n: int) -> None:
            if out is not None and n > len(out):
                raise ValueError(f"chunk {key} has {n} bytes, the buffer only {len(out)}")

        def verified(view, n: int, total: int, want: int):
            if n != total or xxhash.xxh3_64_intdigest(view) != want:
                raise CorruptChunkError(
                    f"chunk {key} arrived with {n} of {total} bytes or a bad checksum"
                )
            return view if out is None else n

        def fetch_shm():
            fd, path = self._shm.get()
            req = pb.ShmGetRequest(key=key_to_pb(key), path=path)
            reply = self._stub.GetShm(req, timeout=self.timeout, metadata=self._metadata)
            n = reply.total_size
            room(n)
            view = read_exact(fd, n) if out is None else read_into(fd, out[:n])
            return verified(view, len(view), n, reply.xxh3)

        def fetch():
            parts, got, total, want = [], 0, None, None
            req = pb.GetRequest(key=key_to_pb(key))
            for msg in self._stub.Get(req, timeout=self.timeout, metadata=self._metadata):
                if total is None:
                    total, want = msg.total_size, msg.xxh3
                    room(total)
                data = msg.data
                if out is None:
                    parts.append(data)
                elif got + len(data) <= total:
                    out[got : got + len(data)] = data
                got += len(data)
            if out is not None:
                return verified(out[: min(got, total)], got, total, want)
            value = parts[0] if len(parts) == 1 else b"".join(parts)
            return verified(value, got, total, want)

        try:
            if self._use_shm:
                try:
                    return self._call(fetch_shm)
                except StoreError as e:
                    if not self._shm_refused(e):
                        raise
                except OSError:  # no usable /dev/shm on this host: stream from now on
                    self._use_shm = False
            return self._call(fetch)
        except StoreError as e:
            if getattr(e, "code", None) == grpc.StatusCode.NOT_FOUND:
                return None
            raise

    def exists_many(self, keys: Sequence[ChunkKey]) -> list[bool]:
        req = pb.KeysRequest(keys=[key_to_pb(k) for k in keys])
        reply = self._call(
            lambda: self._stub.Exists(req, timeout=self.timeout, metadata=self._metadata)
        )
        return list(reply.present)

    def exists(self, key: ChunkKey) -> bool:
        return self.exists_many([key])[0]

    def lookup(
        self,
        spec: ChunkSpec,
        tokens: Sequence[int] | np.ndarray,
        layer_groups: Iterable[int] = (0,),
    ) -> int:
        """How many leading tokens of `tokens` the service holds (every listed layer group)."""
        req = pb.LookupRequest(
            model=spec.model,
            tokens=as_token_array(tokens).tolist(),
            chunk_tokens=spec.chunk_tokens,
            layer_groups=list(layer_groups),
            tp_rank=spec.tp_rank,
        )
        return self._call(
            lambda: self._stub.Lookup(req, timeout=self.timeout, metadata=self._metadata)
        ).tokens

    def delete_many(self, keys: Sequence[ChunkKey]) -> int:
        req = pb.KeysRequest(keys=[key_to_pb(k) for k in keys])
        return self._call(
            lambda: self._stub.Delete(req, timeout=self.timeout, metadata=self._metadata)
        ).deleted

    def delete(self, key: ChunkKey) -> bool:
        return self.delete_many([key]) == 1

    def stats(self) -> dict:
        reply = self._call(
            lambda: self._stub.Stats(
                pb.StatsRequest(), timeout=self.timeout, metadata=self._metadata
            )
        )
        return stats_from_pb(reply)

    def health(self) -> str:
        reply = self._call(
            lambda: self._stub.Health(
                pb.HealthRequest(), timeout=self.timeout, metadata=self._metadata
            )
        )
        return pb.HealthReply.Status.Name(reply.status)

    def wait_ready(self, timeout: float = 10.0) -> None:
        """Block until the channel connects (raises StoreUnavailableError after `timeout`)."""
        try:
            grpc.channel_ready_future(self._channel).result(timeout=timeout)
        except grpc.FutureTimeoutError:
            raise StoreUnavailableError(f"store not reachable within {timeout} s") from None

    def close(self) -> None:
        self._finalizer()

    def __enter__(self) -> StoreClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

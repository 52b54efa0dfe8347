"""StoreClient: the KV store service from another process, with the KVStore interface.

One channel per client (thread-safe, reused by every call), a deadline on every call, and retries
with exponential backoff when the service is unreachable. Puts are safe to retry: a key names its
content, and the service commits a value only whole.
"""

from __future__ import annotations

import random
import time
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

_RETRY = {grpc.StatusCode.UNAVAILABLE}
_ERRORS = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidRequestError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: CapacityError,
    grpc.StatusCode.UNAUTHENTICATED: AuthError,
    grpc.StatusCode.UNAVAILABLE: StoreUnavailableError,
    grpc.StatusCode.DEADLINE_EXCEEDED: StoreUnavailableError,
}


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
    ) -> None:
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

    def put(self, key: ChunkKey, value: bytes | memoryview) -> str:
        """Store `value`; returns the tier that took it once the service has committed it."""
        mv = memoryview(value).cast("B")
        n, step, checksum = len(mv), self.piece_bytes, xxhash.xxh3_64_intdigest(mv)

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

        def fetch():
            parts = []
            total = want = None
            for msg in self._stub.Get(
                pb.GetRequest(key=key_to_pb(key)), timeout=self.timeout, metadata=self._metadata
            ):
                if total is None:
                    total, want = msg.total_size, msg.xxh3
                parts.append(msg.data)
            value = parts[0] if len(parts) == 1 else b"".join(parts)
            if len(value) != total or xxhash.xxh3_64_intdigest(value) != want:
                raise CorruptChunkError(
                    f"chunk {key} arrived with {len(value)} of {total} bytes or a bad checksum"
                )
            return value

        try:
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
        self._channel.close()

    def __enter__(self) -> StoreClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

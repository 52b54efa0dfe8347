"""The gRPC KV store service (`hack-kv serve`): KVStore behind Put/Get/Exists/Lookup/Delete/Stats/Health.

A Put counts as received only when its stream is complete, its size and xxh3 match what the first
message announced, and the store has committed it; a stream cut short commits nothing. On SIGTERM
the service stops taking puts (UNAVAILABLE), lets in-flight RPCs finish for `grace_s`, then exits.
"""

from __future__ import annotations

import contextlib
import functools
import hmac
import json
import logging
import os
import signal
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from dataclasses import asdict, dataclass
from pathlib import Path

import grpc
import xxhash

from ..proto import hack_kv_store_pb2 as pb
from ..proto import hack_kv_store_pb2_grpc as pb_grpc
from .entry import Entry
from .errors import (
    CapacityError,
    ChunkTooLargeError,
    InvalidKeyError,
    InvalidRequestError,
    StoreError,
)
from .keys import ChunkSpec
from .metrics import ServiceMetrics
from .pb import key_from_pb, require_key, stats_to_pb
from .shm import SHM_DIR, ShmUnavailable, open_exchange, read_exact, write_all
from .store import KVStore

log = logging.getLogger("hack_kv.store.service")

MAX_KEYS_PER_REQUEST = 1 << 16
MAX_LOOKUP_TOKENS = 1 << 22
MAX_CHUNK_TOKENS = 1 << 20
HEALTH_METHOD = "/hack_kv.store.v1.KVStore/Health"


def default_cache_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "hack-kv", "store")


@dataclass
class ServeConfig:
    """Everything `hack-kv serve` takes; the defaults need no other service."""

    host: str = "127.0.0.1"
    port: int = 50061
    cpu_bytes: int = 4 << 30
    disk_dir: str | None = None  # None: default_cache_dir(); "" disables the disk tier
    disk_bytes: int = 64 << 30
    gpu_bytes: int = 0
    write_through: bool = True
    disk_evict: bool = True
    fsync: bool = True
    verify_frames: bool = False
    max_chunk_bytes: int = 256 << 20
    piece_bytes: int = 1 << 20
    max_message_bytes: int = 16 << 20
    max_inflight_bytes: int = 2 << 30  # puts being received at once, whole values buffered
    workers: int = 8
    max_concurrent_rpcs: int = 64
    metrics_port: int | None = None
    metrics_host: str = "127.0.0.1"
    token: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    grace_s: float = 10.0
    ready_file: str | None = None
    log_level: str = "info"
    shm_dir: str | None = SHM_DIR  # same-host exchange files (GetShm/PutShm); None: off


class _Draining(StoreError):
    pass


class ByteBudget:
    """Bounds the bytes of puts being received at once (each buffers its whole value)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def hold(self, n: int):
        with self._lock:
            if self.used + n > self.limit:
                raise CapacityError(
                    f"server busy: {self.used} bytes of puts in flight, limit {self.limit}; retry later"
                )
            self.used += n
        try:
            yield
        finally:
            with self._lock:
                self.used -= n


def _frame_validator():
    from ..wire import decode_frame

    def validate(value: bytes) -> None:
        decode_frame(value)

    return validate


def _status_for(e: Exception) -> grpc.StatusCode:
    if isinstance(e, (ChunkTooLargeError, CapacityError)):
        return grpc.StatusCode.RESOURCE_EXHAUSTED
    if isinstance(e, (InvalidKeyError, InvalidRequestError, ValueError)):
        return grpc.StatusCode.INVALID_ARGUMENT
    if isinstance(e, _Draining):
        return grpc.StatusCode.UNAVAILABLE
    return grpc.StatusCode.INTERNAL


class StoreServicer(pb_grpc.KVStoreServicer):
    def __init__(self, store: KVStore, config: ServeConfig, metrics: ServiceMetrics) -> None:
        self.store = store
        self.config = config
        self.metrics = metrics
        self.draining = False
        self.inflight = ByteBudget(config.max_inflight_bytes)
        metrics.track_inflight(lambda: self.inflight.used)
        self._validate = _frame_validator() if config.verify_frames else None

    @contextlib.contextmanager
    def _rpc(self, method: str, context: grpc.ServicerContext):
        """Time and count one RPC; turn store errors into status codes that say what went wrong."""
        t0 = time.perf_counter()
        code = grpc.StatusCode.OK
        try:
            yield
        except (StoreError, ValueError) as e:
            code = _status_for(e)
            log.info(
                "request refused", extra={"method": method, "code": code.name, "error": str(e)}
            )
            context.abort(code, str(e))
        except Exception as e:
            code = context.code() or grpc.StatusCode.INTERNAL  # abort() from inside the handler
            if code == grpc.StatusCode.INTERNAL:
                log.exception("request failed", extra={"method": method})
            raise e
        finally:
            self.metrics.requests.labels(method, code.name).inc()
            self.metrics.latency.labels(method).observe(time.perf_counter() - t0)

    def Put(self, request_iterator: Iterator[pb.PutRequest], context) -> pb.PutReply:
        with self._rpc("Put", context), contextlib.ExitStack() as held:
            if self.draining:
                raise _Draining("the store is shutting down; put refused")
            key, total, want, pieces, got = None, 0, 0, [], 0
            for msg in request_iterator:
                if key is None:
                    key = require_key(msg)
                    total, want = msg.total_size, msg.xxh3
                    if total > self.store.max_chunk_bytes:
                        raise ChunkTooLargeError(
                            f"chunk of {total} bytes exceeds the store's limit of {self.store.max_chunk_bytes}"
                        )
                    held.enter_context(self.inflight.hold(total))
                data = msg.data
                got += len(data)
                if got > total:
                    raise InvalidRequestError(
                        f"Put stream carries more than the announced {total} bytes"
                    )
                if data:
                    pieces.append(data)
            if key is None:
                raise InvalidRequestError("empty Put stream")
            if got != total:
                raise InvalidRequestError(
                    f"Put stream ended after {got} of the announced {total} bytes"
                )
            value = pieces[0] if len(pieces) == 1 else b"".join(pieces)
            if xxhash.xxh3_64_intdigest(value) != want:
                raise InvalidRequestError("value does not match its xxh3 checksum; nothing stored")
            if self._validate is not None:
                self._validate(value)
            tier = self.store.put(key, value, want)
            self.metrics.bytes_in.inc(total)
            return pb.PutReply(tier=tier)

    def Get(self, request: pb.GetRequest, context) -> Iterator[pb.GetReply]:
        with self._rpc("Get", context):
            entry = self._entry(request, context)
            n, step = len(entry.value), self.config.piece_bytes
            mv = memoryview(entry.value)
            yield pb.GetReply(total_size=n, xxh3=entry.xxh3, data=mv[:step].tobytes())
            for i in range(step, n, step):
                yield pb.GetReply(data=mv[i : i + step].tobytes())
            self.metrics.bytes_out.inc(n)

    def _entry(self, request, context) -> Entry:
        key = require_key(request)
        entry = self.store.get_entry(key)
        if entry is None:
            context.abort(grpc.StatusCode.NOT_FOUND, f"no chunk {key}")
        return entry

    def _exchange(self, path: str, context) -> int:
        if not self.config.shm_dir:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, "shared-memory exchange is off")
        try:
            return open_exchange(path, self.config.shm_dir)
        except ShmUnavailable as e:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(e))

    def GetShm(self, request: pb.ShmGetRequest, context) -> pb.ShmGetReply:
        with self._rpc("GetShm", context):
            entry = self._entry(request, context)
            fd = self._exchange(request.path, context)
            try:
                write_all(fd, entry.value)
            except OSError as e:
                raise CapacityError(f"cannot write the exchange file: {e.strerror}") from None
            finally:
                os.close(fd)
            self.metrics.bytes_out.inc(len(entry.value))
            return pb.ShmGetReply(total_size=len(entry.value), xxh3=entry.xxh3)

    def PutShm(self, request: pb.ShmPutRequest, context) -> pb.PutReply:
        with self._rpc("PutShm", context):
            if self.draining:
                raise _Draining("the store is shutting down; put refused")
            key, total = require_key(request), request.total_size
            if total > self.store.max_chunk_bytes:
                raise ChunkTooLargeError(
                    f"chunk of {total} bytes exceeds the store's limit of {self.store.max_chunk_bytes}"
                )
            with self.inflight.hold(total):
                fd = self._exchange(request.path, context)
                try:
                    value = read_exact(fd, total)
                except ShmUnavailable as e:
                    raise InvalidRequestError(str(e)) from None
                finally:
                    os.close(fd)
                if xxhash.xxh3_64_intdigest(value) != request.xxh3:
                    raise InvalidRequestError(
                        "value does not match its xxh3 checksum; nothing stored"
                    )
                if self._validate is not None:
                    self._validate(value)
                tier = self.store.put(key, value, request.xxh3)
            self.metrics.bytes_in.inc(total)
            return pb.PutReply(tier=tier)

    def _keys(self, request: pb.KeysRequest):
        if len(request.keys) > MAX_KEYS_PER_REQUEST:
            raise InvalidRequestError(
                f"{len(request.keys)} keys in one request, limit {MAX_KEYS_PER_REQUEST}"
            )
        return [key_from_pb(k) for k in request.keys]

    def Exists(self, request: pb.KeysRequest, context) -> pb.ExistsReply:
        with self._rpc("Exists", context):
            return pb.ExistsReply(present=[self.store.exists(k) for k in self._keys(request)])

    def Delete(self, request: pb.KeysRequest, context) -> pb.DeleteReply:
        with self._rpc("Delete", context):
            return pb.DeleteReply(deleted=sum(self.store.delete(k) for k in self._keys(request)))

    def Lookup(self, request: pb.LookupRequest, context) -> pb.LookupReply:
        with self._rpc("Lookup", context):
            if len(request.tokens) > MAX_LOOKUP_TOKENS:
                raise InvalidRequestError(
                    f"{len(request.tokens)} tokens, limit {MAX_LOOKUP_TOKENS}"
                )
            if not 0 < request.chunk_tokens <= MAX_CHUNK_TOKENS:
                raise InvalidRequestError(
                    f"chunk_tokens must be in 1..{MAX_CHUNK_TOKENS}, got {request.chunk_tokens}"
                )
            spec = ChunkSpec(request.model, request.chunk_tokens, request.tp_rank)
            groups = list(request.layer_groups) or [0]
            return pb.LookupReply(tokens=self.store.lookup(spec, list(request.tokens), groups))

    def Stats(self, request: pb.StatsRequest, context) -> pb.StatsReply:
        with self._rpc("Stats", context):
            return stats_to_pb(self.store.stats())

    def Health(self, request: pb.HealthRequest, context) -> pb.HealthReply:
        status = pb.HealthReply.DRAINING if self.draining else pb.HealthReply.SERVING
        return pb.HealthReply(status=status, version=_version())


@functools.lru_cache(maxsize=1)
def _version() -> str:
    """The installed hack-kv version (looked up once: importlib.metadata is slow)."""
    try:
        from importlib.metadata import version

        return version("hack-kv")
    except Exception:
        return "unknown"


class TokenAuth(grpc.ServerInterceptor):
    """Refuses every RPC but Health whose `authorization` metadata is not `Bearer <token>`."""

    def __init__(self, token: str) -> None:
        self._want = f"Bearer {token}".encode()

    def intercept_service(self, continuation, details):
        handler = continuation(details)
        if handler is None or details.method == HEALTH_METHOD:
            return handler
        got = dict(details.invocation_metadata or ()).get("authorization", "")
        if hmac.compare_digest(str(got).encode(), self._want):
            return handler
        return _deny(handler)


def _deny(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    def abort(_request, context):
        context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong token")

    def abort_stream(_request, context):
        abort(_request, context)
        yield  # pragma: no cover - a generator, as the streaming handler types need

    kw = dict(
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(abort_stream, **kw)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(abort, **kw)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(abort_stream, **kw)
    return grpc.unary_unary_rpc_method_handler(abort, **kw)


def build_store(config: ServeConfig) -> KVStore:
    disk_dir = default_cache_dir() if config.disk_dir is None else config.disk_dir
    return KVStore(
        config.cpu_bytes,
        disk_dir or None,
        config.disk_bytes,
        gpu_capacity=config.gpu_bytes,
        write_through=config.write_through and bool(disk_dir),
        disk_evict=config.disk_evict,
        fsync=config.fsync,
        max_chunk_bytes=config.max_chunk_bytes,
        validator=_frame_validator() if config.verify_frames else None,
    )


def build_server(config: ServeConfig, store: KVStore) -> tuple[grpc.Server, int, StoreServicer]:
    """A started-but-not-running server bound to config.host:config.port (0: any free port)."""
    metrics = ServiceMetrics(store)
    servicer = StoreServicer(store, config, metrics)
    options = [
        ("grpc.max_receive_message_length", config.max_message_bytes),
        ("grpc.max_send_message_length", config.max_message_bytes),
        ("grpc.so_reuseport", 0),
    ]
    server = grpc.server(
        futures.ThreadPoolExecutor(config.workers, thread_name_prefix="hack-kv-store"),
        interceptors=[TokenAuth(config.token)] if config.token else None,
        options=options,
        maximum_concurrent_rpcs=config.max_concurrent_rpcs,
    )
    pb_grpc.add_KVStoreServicer_to_server(servicer, server)
    address = f"{config.host}:{config.port}"
    if config.tls_cert or config.tls_key:
        if not (config.tls_cert and config.tls_key):
            raise ValueError("TLS needs both a certificate and a key")
        creds = grpc.ssl_server_credentials(
            [(Path(config.tls_key).read_bytes(), Path(config.tls_cert).read_bytes())]
        )
        port = server.add_secure_port(address, creds)
    else:
        port = server.add_insecure_port(address)
    if not port:
        raise OSError(f"could not bind {address}")
    return server, port, servicer


def _write_ready(path: str, info: dict) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(info, f)
    os.replace(tmp, path)


def serve(config: ServeConfig) -> None:
    """Run the service until SIGTERM or SIGINT, then drain and stop."""
    from .logs import setup_json_logging

    setup_json_logging(config.log_level)
    store = build_store(config)
    server, port, servicer = build_server(config, store)
    metrics_port = None
    if config.metrics_port is not None:
        metrics_port = servicer.metrics.serve_http(config.metrics_port, config.metrics_host)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    server.start()
    info = {"port": port, "metrics_port": metrics_port, "pid": os.getpid()}
    shown = {k: v for k, v in asdict(config).items() if k != "token"}
    log.info("serving", extra={**info, "config": shown, "tls": bool(config.tls_cert)})
    if config.host not in ("127.0.0.1", "::1", "localhost") and not config.token:
        log.warning(
            "serving beyond loopback without a token: anyone who reaches the port can read and write",
            extra={"host": config.host},
        )
    if config.ready_file:
        _write_ready(config.ready_file, info)
    stop.wait()
    servicer.draining = True
    log.info("draining", extra={"grace_s": config.grace_s})
    server.stop(config.grace_s).wait()
    store.close()
    log.info("stopped", extra={"stats": store.stats()})

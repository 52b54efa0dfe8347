"""Transports for hack-kv frames behind one interface (base.KVSender / base.KVReceiver).

make_receiver / make_sender build one by name; the modules import their libraries lazily, so a
missing optional one (ucxx) only matters when it is asked for.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys

from .base import KVReceiver, KVSender, TransferError, Unauthorized

KINDS = {
    "tcp": ("tcp", "TcpReceiver", "TcpSender"),
    "grpc": ("grpc_transport", "GrpcReceiver", "GrpcSender"),
    "ucx": ("ucx", "UcxReceiver", "UcxSender"),
    "nixl": ("nixl_transport", "NixlReceiver", "NixlSender"),
}
_NEEDS = {"ucx": "ucxx", "grpc": "grpc", "nixl": "nixl"}


def available_kinds() -> list[str]:
    return [k for k in KINDS if importlib.util.find_spec(_NEEDS.get(k, "socket")) is not None]


def _classes(kind: str) -> tuple[type, type]:
    if kind not in KINDS:
        raise ValueError(f"unknown transport {kind!r}; choose from {sorted(KINDS)}")
    if kind == "nixl":
        # nixl bundles its own UCX (and protobuf): a NIXL agent created in a process that has
        # already loaded ucxx or grpc_tools aborts the whole process. Refuse instead.
        nixl_mod = sys.modules.get(f"{__name__}.nixl_transport")
        started = nixl_mod is not None and nixl_mod.started()
        clash = [m for m in ("ucxx", "grpc_tools._protoc_compiler") if m in sys.modules]
        if started:  # NIXL's UCX came first: ucxx after it is fine
            clash = [m for m in clash if m != "ucxx"]
        if clash:
            raise RuntimeError(
                f"NIXL cannot start in a process that loaded {clash}: create NIXL transports first "
                "(nixl_transport.load_ucx_first()) or use a separate process"
            )
    mod, rcv, snd = KINDS[kind]
    m = importlib.import_module(f"{__name__}.{mod}")
    return getattr(m, rcv), getattr(m, snd)


def make_receiver(kind: str, **kw: object) -> KVReceiver:
    return _classes(kind)[0](**kw)


def make_sender(kind: str, host: str, port: int, **kw: object) -> KVSender:
    return _classes(kind)[1](host, port, **kw)


__all__ = [
    "KINDS",
    "KVReceiver",
    "KVSender",
    "TransferError",
    "Unauthorized",
    "available_kinds",
    "make_receiver",
    "make_sender",
]

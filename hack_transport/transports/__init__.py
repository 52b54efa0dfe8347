"""Transports for hack-kv frames behind one interface (base.KVSender / base.KVReceiver).

make_receiver / make_sender build one by name; the modules import their libraries lazily, so a
missing optional one (ucxx) only matters when it is asked for.
"""

from __future__ import annotations

import importlib
import importlib.util

from .base import KVReceiver, KVSender, TransferError, Unauthorized

KINDS = {
    "tcp": ("tcp", "TcpReceiver", "TcpSender"),
    "grpc": ("grpc_transport", "GrpcReceiver", "GrpcSender"),
    "ucx": ("ucx", "UcxReceiver", "UcxSender"),
}
_NEEDS = {"ucx": "ucxx", "grpc": "grpc"}


def available_kinds() -> list[str]:
    return [k for k in KINDS if importlib.util.find_spec(_NEEDS.get(k, "socket")) is not None]


def _classes(kind: str) -> tuple[type, type]:
    if kind not in KINDS:
        raise ValueError(f"unknown transport {kind!r}; choose from {sorted(KINDS)}")
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

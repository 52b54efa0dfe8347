"""The transfer benchmark behind `hack-kv bench transfer`: KV of real geometry over each transport
on loopback, 16-bit raw against HACK 2-bit, beside a raw-socket send of the same bytes.

Receivers run in a child process (`python -m hack_transport.transfer_bench serve KIND`), so the
sender and the receiver each have a core, as prefill and decode would. Every figure is a median
over repeats; ratios compare numbers measured in the same run.
"""

from __future__ import annotations

import asyncio
import datetime
import functools
import importlib.metadata
import json
import os
import platform
import signal
import socket
import statistics
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from hack_kernels import HackConfig, quantize_kv

from . import wire
from .bufpool import PayloadPool
from .link import EmulatedLink
from .transports import make_receiver, make_sender
from .transports.tcp import tune

# (layers, kv heads, head_dim) of the published configs.
GEOMETRY = {"llama-8b": (32, 8, 128), "mistral-7b": (32, 8, 128), "smollm2": (30, 3, 64)}
BLOCK_TOKENS = 256  # an LMCache chunk; a multiple of every partition
RAW = "raw-socket"


@dataclass
class Row:
    """One median measurement; raw-socket rows are paired with the transport measured beside them."""

    workload: str
    tokens: int
    codec: str
    transport: str
    bandwidth_gbit: float | None
    wire_bytes: int
    bytes_16bit: int
    bytes_ratio: float
    seconds: float
    payload_gbps: float  # GB/s of bytes on the wire
    equiv_gbps: float  # GB/s of 16-bit KV delivered
    encode_s: float  # CPU: split into blocks + checksums + headers, every frame
    decode_s: float  # CPU: header checks + checksums, every frame
    vs_raw_socket: float | None = None
    paired_with: str | None = None
    # The part of encode/decode on the transfer's critical path: the sender encodes frame i + 1
    # while frame i drains and the receiver verifies while later bytes arrive, so what is left
    # is encoding the first frame (split + encode, CPU) and the receiver's tail (last payload
    # byte to ack, as the receiver measured it; median over repeats).
    sender_head_s: float | None = None
    receiver_tail_s: float | None = None
    exposed_s: float | None = None
    load_1min: float | None = None  # the box's load average when the pair was measured


def _row(name, tokens, pl, who, bw, secs, raw_s, paired, tail=None) -> Row:
    head = pl.head_s if who != RAW else None
    return Row(
        workload=name,
        tokens=tokens,
        codec=pl.codec,
        transport=who,
        bandwidth_gbit=bw / 1e9 if bw else None,
        wire_bytes=pl.wire_bytes,
        bytes_16bit=pl.bytes_16bit,
        bytes_ratio=pl.wire_bytes / pl.bytes_16bit,
        seconds=secs,
        payload_gbps=pl.wire_bytes / secs / 1e9,
        equiv_gbps=pl.bytes_16bit / secs / 1e9,
        encode_s=pl.encode_s,
        decode_s=pl.decode_s,
        vs_raw_socket=raw_s / secs,
        paired_with=paired,
        sender_head_s=head,
        receiver_tail_s=tail,
        exposed_s=head + tail if head is not None and tail is not None else None,
        load_1min=_load()[0],
    )


def _load() -> list[float]:
    """1, 5 and 15-minute load averages (other jobs share this box)."""
    return [round(x, 2) for x in os.getloadavg()]


def parse_bandwidth(text: str) -> float | None:
    """'10gbit' / '40Gbps' / '500mbit' / 'none' -> bits per second."""
    t = text.strip().lower().replace("bps", "bit")
    if t in ("", "none", "0"):
        return None
    for unit, mult in (("gbit", 1e9), ("mbit", 1e6), ("g", 1e9), ("m", 1e6)):
        if t.endswith(unit):
            return float(t[: -len(unit)]) * mult
    return float(t)


# ---------------------------------------------------------------------------------------------
# Workloads: K and V of real geometry.


def synthetic_kv(
    layers: int, heads: int, head_dim: int, tokens: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """One layer of random fp16 K and V; every layer reuses it (sizes do not depend on values)."""
    g = torch.Generator().manual_seed(0)
    k = (torch.randn(1, heads, tokens, head_dim, generator=g) * 2).half()
    v = torch.randn(1, heads, tokens, head_dim, generator=g).half()
    return k, v


@dataclass
class Workload:
    """A named K/V source: load() returns per-layer fp16 K and V [1, heads, tokens, head_dim]."""

    name: str
    tokens: int
    load: Callable[[], tuple[list[torch.Tensor], list[torch.Tensor]]]


def synthetic_workload(name: str, tokens: int) -> Workload:
    if name not in GEOMETRY:
        raise ValueError(f"unknown geometry {name!r}; known: {sorted(GEOMETRY)}")
    layers, heads, d = GEOMETRY[name]

    def load():
        k, v = synthetic_kv(layers, heads, d, tokens)
        return [k] * layers, [v] * layers

    return Workload(name, tokens, load)


@dataclass
class Payload:
    codec: str
    frames: list[list[wire.Buffer]]  # encoded, ready to send
    wire_bytes: int
    bytes_16bit: int
    encode_s: float
    decode_s: float
    head_s: float  # CPU to the first frame's buffers: split + encode of frame 0


def _cpu_time(fn: Callable[[], object], repeat: int) -> tuple[object, float]:
    times, out = [], None
    for _ in range(repeat):
        t0 = time.thread_time()
        out = fn()
        times.append(time.thread_time() - t0)
    return out, statistics.median(times)


def _encode(split: Callable[[], list[wire.Block]]) -> list[list[wire.Buffer]]:
    return [wire.encode_block(b) for b in split()]


def _first(split_fn: Callable, *args: object) -> wire.Block:
    return split_fn(*args)[0]


def _encode_one(first: Callable[[], wire.Block]) -> list[wire.Buffer]:
    return wire.encode_block(first())


def _decode(stored: list[bytes], model: wire.ModelIdentity) -> list[wire.Block]:
    return [wire.decode_frame(f, expect_model=model) for f in stored]


def _per_layer(split_fn: Callable, kvs: Sequence, model: wire.ModelIdentity, block_tokens: int):
    """One frame (or more) per layer: what a layer-wise connector (vLLM save_kv_layer) sends."""
    return [
        b for i, kv in enumerate(kvs) for b in split_fn([kv], block_tokens, model, layer_start=i)
    ]


def _per_layer_raw(ks, vs, block_tokens, model):
    return [
        b
        for i, (k, v) in enumerate(zip(ks, vs, strict=True))
        for b in wire.split_raw([k], [v], block_tokens, model, layer_start=i)
    ]


def build_payloads(
    name: str,
    ks: Sequence[torch.Tensor],
    vs: Sequence[torch.Tensor],
    partitions: Sequence[int],
    repeat: int,
    block_tokens: int = BLOCK_TOKENS,
    layerwise: bool = False,
) -> list[Payload]:
    """Encode the same K and V as raw16 and as HACK at each partition; time encode and decode."""
    layers, (_, heads, _, head_dim) = len(ks), ks[0].shape
    n16 = 2 * 2 * layers * ks[0].numel()
    out = []
    for p in [None, *partitions]:
        cfg = None if p is None else HackConfig(partition=p)
        model = wire.model_identity(name, layers, heads, head_dim, torch.float16, cfg)
        if cfg is None:
            if layerwise:
                split = functools.partial(_per_layer_raw, ks, vs, block_tokens, model)
                first = functools.partial(
                    _first, _per_layer_raw, ks[:1], vs[:1], block_tokens, model
                )
            else:  # lazily: the first frame waits for its own block's gather only
                split = functools.partial(wire.split_raw_lazy, ks, vs, block_tokens, model)
                first = functools.partial(_first, split)
        else:
            # Quantization is the prefill's job, not the wire's: done once, outside the timing.
            uniq: dict[int, object] = {}
            for k, v in zip(ks, vs, strict=True):
                if id(k) not in uniq:  # synthetic workloads repeat one layer
                    uniq[id(k)] = quantize_kv(k, v, cfg)
            kvs = [uniq[id(k)] for k in ks]
            if layerwise:
                split = functools.partial(_per_layer, wire.split_kv, kvs, model, block_tokens)
                # A layer-wise sender builds layer 0's block as soon as that layer is done.
                first = functools.partial(_first, wire.split_kv, kvs[:1], block_tokens, model)
            else:
                split = functools.partial(wire.split_kv_lazy, kvs, block_tokens, model)
                first = functools.partial(_first, split)
        frames, enc_s = _cpu_time(functools.partial(_encode, split), repeat)
        _, head_s = _cpu_time(functools.partial(_encode_one, first), repeat)
        stored = [b"".join(f) for f in frames]
        _, dec_s = _cpu_time(functools.partial(_decode, stored, model), repeat)
        del stored
        wire_bytes = sum(memoryview(x).nbytes for f in frames for x in f)
        codec = "raw16" if p is None else f"hack-p{p}"
        out.append(Payload(codec, frames, wire_bytes, n16, enc_s, dec_s, head_s))
    return out


# ---------------------------------------------------------------------------------------------
# Receivers (child process) and the raw-socket baseline.


def _raw_serve(receive: Callable[[socket.socket, list[int]], list | None] | None = None) -> None:
    """The baseline receiver: the same bytes into the same kind of memory as the transports'
    receivers (`receive`, by default a buffer per frame from a PayloadPool, all kept until after
    the acknowledgement, then back to the pool), with no parsing and no checksums."""
    receive = receive or _receive_per_frame
    lsock = socket.create_server(("127.0.0.1", 0))
    print(f"PORT {lsock.getsockname()[1]}", flush=True)
    while True:
        conn, _ = lsock.accept()
        tune(conn)
        conn.setblocking(True)
        with conn:
            head = bytearray(4)
            if not _recv_exact(conn, memoryview(head)):
                continue
            sizes = bytearray(8 * int.from_bytes(head, "little"))
            if not _recv_exact(conn, memoryview(sizes)):
                continue
            kept = receive(conn, [n for (n,) in struct.iter_unpack("<Q", sizes)])
            if kept is not None:
                conn.sendall(b"\1")
            del kept


_RAW_POOL = PayloadPool()


def _receive_per_frame(
    conn: socket.socket, sizes: list[int], alloc: Callable[[int], memoryview] = _RAW_POOL.acquire
) -> list | None:
    kept = []
    for n in sizes:
        kept.append(alloc(n))
        if not _recv_exact(conn, kept[-1]):
            return None
    return kept


def _recv_exact(conn: socket.socket, mv: memoryview) -> bool:
    mv, got = memoryview(mv).cast("B"), 0
    while got < len(mv):
        k = conn.recv_into(mv[got:])
        if k == 0:
            return False
        got += k
    return True


def _serve(kind: str) -> None:
    if kind == RAW:
        return _raw_serve()

    async def main() -> None:
        rcv = make_receiver(kind, commit=lambda key, blocks: None)
        _, port = await rcv.start()
        print(f"PORT {port}", flush=True)
        await asyncio.Event().wait()

    asyncio.run(main())


def raw_socket_send(port: int, frames: list[list[wire.Buffer]], bandwidth: float | None) -> float:
    """Blocking sendall of the same buffers, after the frame count and sizes; returns seconds to
    the ack (and, under a bandwidth limit, to the emulated link's last byte, as the transports)."""
    bufs = [memoryview(x).cast("B") for f in frames for x in f]
    sizes = [sum(memoryview(x).nbytes for x in f) for f in frames]
    link = EmulatedLink(bandwidth / 8) if bandwidth else None  # the transports' link model
    t0 = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port)) as s:
        tune(s)
        s.setblocking(True)
        s.sendall(struct.pack(f"<I{len(sizes)}Q", len(sizes), *sizes))
        for b in bufs:  # buffer by buffer, as the transports' throttled channel sends them
            if link is not None:
                link.take_blocking(len(b))
            s.sendall(b)
        if s.recv(1) != b"\1":
            raise ConnectionError("raw-socket receiver did not acknowledge")
    if link is not None:
        link.drain_blocking()
    return time.perf_counter() - t0


class ReceiverProcess:
    def __init__(self, kind: str):
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "hack_transport.transfer_bench", "serve", kind],
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        for line in self.proc.stdout:  # libraries may log to stdout first
            if line.startswith("PORT "):
                self.port = int(line.split()[1])
                break
        else:
            self.close()
            raise RuntimeError(f"{kind} receiver did not start")

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()

    def pause(self) -> None:
        """Stop the process while the raw socket is measured: an idle ucxx receiver keeps a core
        busy (its progress loop spins once a connection has been made), which would slow the
        baseline beside it on a 2-core machine."""
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        self.proc.send_signal(signal.SIGCONT)


# ---------------------------------------------------------------------------------------------


_LOOP = asyncio.new_event_loop()  # one loop for every sender, so UCX keeps its endpoints
_SENDERS: dict[tuple, object] = {}


def send_once(kind: str, port: int, frames: list, bandwidth: float | None) -> float:
    """Seconds from the first byte to the receiver's acknowledgement of the whole transfer."""
    return send_timed(kind, port, frames, bandwidth)[0]


def send_timed(
    kind: str, port: int, frames: list, bandwidth: float | None
) -> tuple[float, float | None]:
    """(seconds to the acknowledgement, the receiver's tail: last payload byte to ack)."""
    if kind == RAW:
        return raw_socket_send(port, frames, bandwidth), None
    key = (kind, port, bandwidth)
    if key not in _SENDERS:
        bw = bandwidth / 8 if bandwidth else None
        _SENDERS[key] = make_sender(kind, "127.0.0.1", port, bandwidth=bw, timeout=600)
    res = _LOOP.run_until_complete(_SENDERS[key].send(f"bench-{time.monotonic_ns()}", frames))
    return res.seconds, res.receiver_tail_s


def close_senders() -> None:
    for s in _SENDERS.values():
        _LOOP.run_until_complete(s.close())
    _SENDERS.clear()


def run_benchmark(
    workloads: Sequence[Workload],
    transports: Sequence[str],
    partitions: Sequence[int] = (32, 64, 128),
    bandwidths: Sequence[float | None] = (None,),
    repeat: int = 3,
    progress: bool = True,
    block_tokens: int = BLOCK_TOKENS,
    layerwise: bool = False,
) -> dict:
    """Every workload x codec x transport (raw socket included) x bandwidth, `repeat` times."""
    from tqdm import tqdm

    load0 = _load()
    kinds = [t for t in transports if t != RAW]
    if "nixl" in kinds:  # NIXL's UCX must load before ucxx's in this (sender) process
        from .transports.nixl_transport import load_ucx_first

        load_ucx_first()
    rows: list[Row] = []
    raw_srv = ReceiverProcess(RAW)
    try:
        send_once(RAW, raw_srv.port, [[b"\0" * 64]], None)
        for wl in workloads:
            ks, vs = wl.load()
            name, tokens = wl.name, ks[0].shape[2]
            bt = block_tokens or -(-tokens // 128) * 128  # 0: the whole prompt in one block
            payloads = build_payloads(name, ks, vs, partitions, repeat, bt, layerwise)
            del ks, vs
            jobs = [
                (kind, pl, bw)
                for kind in kinds
                for bw in bandwidths
                for pl in payloads
                if bw is None or pl.codec in ("raw16", "hack-p64")
                if bw is None or kind != "nixl"  # the receiver pulls: no sender-side pacing
            ]
            bar = tqdm(jobs, desc=f"{name} {tokens} tokens", disable=not progress, unit="run")
            srv, srv_kind = None, None
            try:
                for kind, pl, bw in bar:
                    # One transport's receiver at a time: idle UCX/NIXL receivers poll and
                    # would take CPU from the others on this 2-core machine.
                    if kind != srv_kind:
                        if srv is not None:  # the previous transport's sender and receiver go:
                            close_senders()  # a kept gRPC channel would retry its dead peer
                            srv.close()
                        srv, srv_kind = ReceiverProcess(kind), kind
                        send_once(kind, srv.port, _tiny_frames(), None)  # warm-up
                    bar.set_postfix_str(f"{pl.codec} {kind} {bw / 1e9 if bw else 'max'}")
                    # The raw socket runs back to back with the transport, on the same bytes.
                    times = {RAW: [], kind: []}
                    tails = []
                    for _ in range(repeat):
                        srv.pause()
                        try:
                            times[RAW].append(send_once(RAW, raw_srv.port, pl.frames, bw))
                        finally:
                            srv.resume()
                        secs, tail = send_timed(kind, srv.port, pl.frames, bw)
                        times[kind].append(secs)
                        if tail is not None:
                            tails.append(tail)
                    raw_s, secs = statistics.median(times[RAW]), statistics.median(times[kind])
                    tail = statistics.median(tails) if tails else None
                    rows.append(_row(name, tokens, pl, RAW, bw, raw_s, raw_s, paired=kind))
                    rows.append(_row(name, tokens, pl, kind, bw, secs, raw_s, kind, tail))
            finally:
                close_senders()
                if srv is not None:
                    srv.close()
            del payloads
    finally:
        raw_srv.close()
    meta = {**_meta(), "block_tokens": block_tokens or "whole prompt", "layerwise": layerwise}
    meta["load_average"] = {"start": load0, "end": _load()}
    return {"meta": meta, "rows": [asdict(r) for r in rows], "summary": summarize(rows)}


def _tiny_frames() -> list:
    k = torch.zeros(1, 1, 16, 8, dtype=torch.float16)
    model = wire.model_identity("warmup", 1, 1, 8, torch.float16, None)
    return [wire.encode_block(b) for b in wire.split_raw([k], [k], 16, model)]


def summarize(rows: list[Row]) -> dict:
    """The issue's targets, from the rows of this run."""
    out: dict = {"bytes_ratio": {}, "vs_raw_socket": {}, "encode_decode_fraction_40gbit": {}}
    for r in rows:
        if r.codec.startswith("hack") and r.transport == RAW and r.bandwidth_gbit is None:
            out["bytes_ratio"][f"{r.workload}@{r.tokens} {r.codec}"] = round(r.bytes_ratio, 5)
        if r.transport != RAW and r.bandwidth_gbit is None:
            key = f"{r.transport} {r.workload}@{r.tokens} {r.codec}"
            out["vs_raw_socket"][key] = round(r.vs_raw_socket, 3)
        if r.codec in ("hack-p64", "raw16") and r.bandwidth_gbit == 40 and r.transport != RAW:
            key = f"{r.transport} {r.workload}@{r.tokens} {r.codec}"
            out["encode_decode_fraction_40gbit"][key] = _overhead(r)
    by_transport: dict[str, list[float]] = {}
    for key, v in out["vs_raw_socket"].items():
        by_transport.setdefault(key.split()[0], []).append(v)
    out["vs_raw_socket_median"] = {
        k: round(statistics.median(v), 3) for k, v in by_transport.items()
    }
    return out


def _overhead(r: Row) -> dict:
    """Encode + decode against the transfer time at 40 Gbit/s: the total CPU they cost, and the
    exposed part (sender head + receiver tail) that the transfer actually waits for."""
    ideal = r.wire_bytes * 8 / 40e9  # what an ideal 40 Gbit/s link needs for these bytes
    total = r.encode_s + r.decode_s
    out = {
        "ideal_40gbit_s": round(ideal, 6),
        "measured_transfer_s": round(r.seconds, 6),
        "total_cpu_s": round(total, 6),
        "total_cpu_vs_ideal": round(total / ideal, 4),
        "total_cpu_vs_measured": round(total / r.seconds, 4),
    }
    if r.exposed_s is not None:
        out |= {
            "exposed_s": round(r.exposed_s, 6),
            "exposed_vs_ideal": round(r.exposed_s / ideal, 4),
            "exposed_vs_measured": round(r.exposed_s / r.seconds, 4),
        }
    out["under_10pct_of_ideal"] = [
        k for k in ("total_cpu", "exposed") if k + "_vs_ideal" in out and out[k + "_vs_ideal"] < 0.1
    ]
    return out


def _meta() -> dict:
    def version(dist: str) -> str | None:
        # From the installed metadata: importing ucxx here would break a later NIXL agent.
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            return None

    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            cwd=Path(__file__).parent,
        ).stdout.strip()
    except OSError:
        commit = None
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": commit,
        "host": platform.node(),
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "versions": {
            d: version(d)
            for d in ("torch", "grpcio", "ucxx-cu12", "nixl-cu12", "msgpack", "xxhash")
        },
        "device": "CPU loopback (receiver in a child process)",
    }


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    first = (rows[0]["workload"], rows[0]["tokens"])
    sel, seen = [], set()
    for r in rows:  # the first raw-socket row of each pair set is enough for the picture
        key = (r["workload"], r["tokens"], r["codec"], r["transport"], r["bandwidth_gbit"])
        if (r["workload"], r["tokens"]) == first and key not in seen:
            seen.add(key)
            sel.append(r)
    codecs = sorted(
        {r["codec"] for r in sel}, key=lambda c: int(c[6:]) if c.startswith("hack-p") else 0
    )
    kinds = list(dict.fromkeys(r["transport"] for r in sel))
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    ax = axes[0]
    width = 0.8 / len(codecs)
    for i, c in enumerate(codecs):
        vals = [
            next(
                (
                    r["equiv_gbps"]
                    for r in sel
                    if r["codec"] == c and r["transport"] == k and r["bandwidth_gbit"] is None
                ),
                0,
            )
            for k in kinds
        ]
        ax.bar([j + i * width for j in range(len(kinds))], vals, width, label=c)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(kinds))], kinds)
    ax.set_ylabel("16-bit-equivalent GB/s")
    ax.set_title(f"{first[0]}, {first[1]} tokens, loopback, no limit")
    ax.legend()
    ax = axes[1]
    bws = sorted({r["bandwidth_gbit"] for r in sel if r["bandwidth_gbit"]})
    for c in ("raw16", "hack-p64"):
        for k in kinds:
            pts = [
                (b, r["seconds"])
                for b in bws
                for r in sel
                if r["codec"] == c and r["transport"] == k and r["bandwidth_gbit"] == b
            ]
            if pts:
                ax.plot(
                    *zip(*pts, strict=True),
                    marker="o",
                    ls="-" if c == "hack-p64" else "--",
                    label=f"{c} {k}",
                )
    ax.set_xlabel("emulated link (Gbit/s)")
    ax.set_ylabel("seconds per request")
    ax.set_title("transfer time over an emulated link")
    if bws:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def markdown(result: dict) -> str:
    """A readable table of the rows (medians) with the run's metadata."""
    m = result["meta"]
    lines = [
        f"# KV transfer benchmark ({m['date']}, commit {m['commit']})",
        "",
        f"{m['device']}; {m['cpus']} CPUs, {m['platform']}, Python {m['python']}; "
        f"versions {m['versions']}; blocks of {m['block_tokens']} tokens"
        f"{', one frame per layer' if m.get('layerwise') else ', all layers in each frame'}.",
        "",
        "| workload | codec | transport | link | bytes % of 16-bit | s/request | GB/s | "
        "16-bit-eq GB/s | vs raw socket | encode s (CPU) | decode s (CPU) | exposed s "
        "(head + tail) | load |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in result["rows"]:
        link = f"{r['bandwidth_gbit']:g} Gbit/s" if r["bandwidth_gbit"] else "unlimited"
        who = r["transport"]
        if who == RAW and r.get("paired_with"):
            who = f"raw-socket (beside {r['paired_with']})"
        lines.append(
            f"| {r['workload']}@{r['tokens']} | {r['codec']} | {who} | {link} | "
            f"{100 * r['bytes_ratio']:.2f} | {r['seconds']:.4f} | {r['payload_gbps']:.3f} | "
            f"{r['equiv_gbps']:.3f} | {r['vs_raw_socket']:.2f} | {r['encode_s']:.4f} | "
            f"{r['decode_s']:.4f} | {_exposed(r)} | {r.get('load_1min', '')} |"
        )
    lines += [
        "",
        f"Load average (1, 5, 15 min) at the start and end: {m.get('load_average')}.",
        "",
        "Summary:",
        "",
        "```",
        json.dumps(result["summary"], indent=1),
        "```",
        "",
    ]
    return "\n".join(lines)


def _exposed(r: dict) -> str:
    if r.get("exposed_s") is None:
        return "-" if r.get("sender_head_s") is None else f"{r['sender_head_s']:.4f} + ?"
    return f"{r['exposed_s']:.4f} ({r['sender_head_s']:.4f} + {r['receiver_tail_s']:.4f})"


def write_results(result: dict, out_dir: Path, stem: str = "transfer") -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    js, png = out_dir / f"{stem}.json", out_dir / f"{stem}.png"
    js.write_text(json.dumps(result, indent=1))
    (out_dir / f"{stem}.md").write_text(markdown(result))
    plot(result, png)
    return js, png


if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] == "serve":
    _serve(sys.argv[2])

"""Quick paired A/B loop for one transport (transfer_notes.md, 2026-11-22 evening 2).

Llama-8B 4K HACK frames, one per layer: per codec, N requests, each the raw socket (the
transport's receiver stopped) and then the transport, as the benchmark pairs them. Prints the
median ms a request, the ratio, and the receiver's and sender's CPU per request (/proc).

    TAG=new python transfer_pair_loop.py grpc 20 [32 64 128]
Run each variant from its own tree (PYTHONPATH=<git archive of a commit>), alternating.
STREAMS=n sends gRPC over n streams instead of the default.
"""

import os
import statistics
import sys
import time

from hack_transport import transfer_bench as tb
from hack_transport.transports import make_sender


def cpu_s(pid: int) -> float:
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


kind, n = sys.argv[1], int(sys.argv[2])
parts = [int(p) for p in sys.argv[3:]] or [32, 64, 128]
ks, vs = tb.synthetic_workload("llama-8b", 4096).load()
pls = [p for p in tb.build_payloads("llama-8b", ks, vs, parts, 1, 4096, True) if p.codec != "raw16"]
raw, srv = tb.ReceiverProcess("raw-socket"), tb.ReceiverProcess(kind)
try:
    if os.environ.get("STREAMS"):
        streams = int(os.environ["STREAMS"])
        sender = make_sender(kind, "127.0.0.1", srv.port, timeout=600, streams=streams)
        tb._SENDERS[(kind, srv.port, None)] = sender
    tb.send_once(kind, srv.port, tb._tiny_frames(), None)
    tb.send_once("raw-socket", raw.port, [[b"\0" * 64]], None)
    for pl in pls:
        for _ in range(2):  # warm-up
            tb.send_once(kind, srv.port, pl.frames, None)
        t: dict[str, list[float]] = {"raw": [], kind: []}
        rcpu = scpu = 0.0
        for _ in range(n):
            srv.pause()
            t["raw"].append(tb.send_once("raw-socket", raw.port, pl.frames, None))
            srv.resume()
            c0, s0 = cpu_s(srv.proc.pid), time.process_time()
            t[kind].append(tb.send_once(kind, srv.port, pl.frames, None))
            rcpu += cpu_s(srv.proc.pid) - c0
            scpu += time.process_time() - s0
        mr, mk = statistics.median(t["raw"]), statistics.median(t[kind])
        print(
            f"{os.environ.get('TAG', '')} {pl.codec} {kind} {mk * 1e3:.1f} ms "
            f"[{min(t[kind]) * 1e3:.1f}-{max(t[kind]) * 1e3:.1f}] raw {mr * 1e3:.1f} "
            f"ratio {mr / mk:.2f} rcpu {rcpu / n * 1e3:.0f} scpu {scpu / n * 1e3:.0f} "
            f"load {os.getloadavg()[0]:.2f}",
            flush=True,
        )
finally:
    tb.close_senders()
    srv.close()
    raw.close()

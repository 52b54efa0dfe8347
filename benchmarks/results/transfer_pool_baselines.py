"""The raw-socket baseline with pooled receive buffers (what `hack-kv bench transfer` now uses,
like the transports' receivers) beside the previous one (a fresh MAP_POPULATE mapping per frame),
and each transport against both, in one run: Llama-8B 4K, one frame per layer, unlimited link.

    .venv/bin/python benchmarks/results/transfer_pool_baselines.py [REPEATS] > transfer_pool_baselines.json
"""

import functools
import json
import os
import statistics
import subprocess
import sys

from hack_transport import transfer_bench as tb
from hack_transport import wire


def fresh_receive(conn, sizes):
    return tb._receive_per_frame(conn, sizes, alloc=wire.alloc_payload)


if len(sys.argv) > 1 and sys.argv[1] == "fresh":
    tb._raw_serve(fresh_receive)
    sys.exit()


def cpu(pid: int) -> float:
    f = open(f"/proc/{pid}/stat").read().split(")")[1].split()
    return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")


repeats = int(sys.argv[1]) if len(sys.argv) > 1 else 9
out = {"meta": {**tb._meta(), "load_start": tb._load(), "repeats": repeats}, "rows": []}
ks, vs = tb.synthetic_workload("llama-8b", 4096).load()
pls = tb.build_payloads("llama-8b", ks, vs, [32, 64, 128], 1, 4096, True)
pooled = tb.ReceiverProcess(tb.RAW)
fresh = subprocess.Popen([sys.executable, __file__, "fresh"], stdout=subprocess.PIPE, text=True)
fresh_port = int(fresh.stdout.readline().split()[1])
send = functools.partial(tb.send_once, bandwidth=None)
send(tb.RAW, pooled.port, [[b"\0" * 64]])
for kind in ("tcp", "ucx", "grpc"):
    srv = tb.ReceiverProcess(kind)
    send(kind, srv.port, tb._tiny_frames())
    for pl in pls:
        secs = {"raw_fresh": [], "raw_pooled": [], kind: []}
        rcv_cpu = {k: [] for k in secs}
        for _ in range(repeats):
            srv.pause()  # an idle ucxx receiver spins: keep it off the raw sockets' cores
            try:
                for name, port, pid in (
                    ("raw_fresh", fresh_port, fresh.pid),
                    ("raw_pooled", pooled.port, pooled.proc.pid),
                ):
                    c0 = cpu(pid)
                    secs[name].append(send(tb.RAW, port, pl.frames))
                    rcv_cpu[name].append(cpu(pid) - c0)
            finally:
                srv.resume()
            c0 = cpu(srv.proc.pid)
            secs[kind].append(send(kind, srv.port, pl.frames))
            rcv_cpu[kind].append(cpu(srv.proc.pid) - c0)
        med = {k: statistics.median(v) for k, v in secs.items()}
        row = {
            "transport": kind,
            "codec": pl.codec,
            "wire_bytes": pl.wire_bytes,
            "seconds": {k: round(v, 5) for k, v in med.items()},
            "receiver_cpu_s_mean": {k: round(statistics.mean(v), 4) for k, v in rcv_cpu.items()},
            "vs_raw_pooled": round(med["raw_pooled"] / med[kind], 3),
            "vs_raw_fresh": round(med["raw_fresh"] / med[kind], 3),
            "load_1min": tb._load()[0],
        }
        out["rows"].append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
    tb.close_senders()
    srv.close()
pooled.close()
fresh.kill()
out["meta"]["load_end"] = tb._load()
print(json.dumps(out, indent=1))

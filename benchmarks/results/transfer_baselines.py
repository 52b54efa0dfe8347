"""Old raw-socket baseline (one bytearray(total) for the whole transfer, zero-filled before the
first byte) against the new one (a wire.alloc_payload buffer per frame), side by side."""

import json
import os
import socket
import statistics
import struct
import subprocess
import sys

from hack_transport import transfer_bench as tb
from hack_transport.transports.tcp import tune


def old_serve():
    lsock = socket.create_server(("127.0.0.1", 0))
    print(f"PORT {lsock.getsockname()[1]}", flush=True)
    while True:
        conn, _ = lsock.accept()
        tune(conn)
        conn.setblocking(True)
        with conn:
            head = bytearray(4)
            if not tb._recv_exact(conn, memoryview(head)):
                continue
            sizes = bytearray(8 * int.from_bytes(head, "little"))
            if not tb._recv_exact(conn, memoryview(sizes)):
                continue
            total = sum(n for (n,) in struct.iter_unpack("<Q", sizes))
            buf = bytearray(total)  # the previous baseline: one zero-filled buffer up front
            if tb._recv_exact(conn, memoryview(buf)):
                conn.sendall(b"\1")
            del buf


if len(sys.argv) > 1 and sys.argv[1] == "old":
    old_serve()
    sys.exit()
out = {"load_start": os.getloadavg()}
wl = tb.synthetic_workload("llama-8b", 4096)
ks, vs = wl.load()
pls = tb.build_payloads("llama-8b", ks, vs, [64], 1, 4096, True)
old = subprocess.Popen([sys.executable, __file__, "old"], stdout=subprocess.PIPE, text=True)
old_port = int(old.stdout.readline().split()[1])
new = tb.ReceiverProcess("raw-socket")
for pl in pls:
    t = {"old": [], "new": []}
    for _ in range(7):
        t["old"].append(tb.raw_socket_send(old_port, pl.frames, None))
        t["new"].append(tb.raw_socket_send(new.port, pl.frames, None))
    m = {k: statistics.median(v) for k, v in t.items()}
    out[pl.codec] = {
        "old_s": m["old"],
        "new_s": m["new"],
        "old_gbps": pl.wire_bytes / m["old"] / 1e9,
        "new_gbps": pl.wire_bytes / m["new"] / 1e9,
    }
old.kill()
new.close()
out["load_end"] = os.getloadavg()
print(json.dumps(out, indent=1))

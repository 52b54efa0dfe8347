"""Old raw-socket baseline (one bytearray(total) for the whole transfer, zero-filled before the
first byte) against the new one (a wire.alloc_payload buffer per frame), side by side."""

import json
import os
import socket
import statistics
import subprocess
import sys

from hack_transport import transfer_bench as tb


def old_receive(conn: socket.socket, sizes: list[int]) -> list | None:
    buf = bytearray(sum(sizes))  # the previous baseline: one zero-filled buffer up front
    return [buf] if tb._recv_exact(conn, memoryview(buf)) else None


if len(sys.argv) > 1 and sys.argv[1] == "old":
    tb._raw_serve(old_receive)
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

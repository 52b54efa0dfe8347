"""A transport peer in its own process, for tests that kill it mid-transfer.

python peer.py receive KIND       -> prints the port, serves until killed
python peer.py send KIND PORT MB  -> sends one throttled transfer of about MB megabytes
python peer.py serve KIND N       -> prints the port, then per transfer COMMIT key xxh3 (of its
                                     frames) or REJECT tensor; exits cleanly after N transfers
"""

from __future__ import annotations

import asyncio
import sys
import time

import torch

from hack_transport import wire
from hack_transport.transports import make_receiver, make_sender


def frames(mb: int) -> list:
    k = torch.zeros(1, 1, mb << 18, 1, dtype=torch.float16)  # mb MiB of raw16 K and V
    model = wire.model_identity("peer", 1, 1, 1, torch.float16, None)
    return wire.split_raw([k], [k], 1 << 16, model)


async def receive(kind: str) -> None:
    # A slow commit keeps the receiver from acknowledging for a while, so it can be killed before
    # the ack even where the payload moves faster than the throttled sender (NIXL pulls).
    rcv = make_receiver(kind, idle_timeout=5.0, commit=lambda key, blocks: time.sleep(10))
    _, port = await rcv.start()
    print(f"PORT {port}", flush=True)
    await asyncio.Event().wait()


async def serve(kind: str, count: int) -> None:
    import xxhash

    def commit(key: str, blocks: list) -> None:
        digest = xxhash.xxh3_64_hexdigest(b"".join(wire.encode_frame(b) for b in blocks))
        print(f"COMMIT {key} {digest}", flush=True)
        committed.append(key)

    committed: list[str] = []
    rcv = make_receiver(kind, commit=commit)
    _, port = await rcv.start()
    print(f"PORT {port}", flush=True)
    while len(committed) + len(rcv.rejected) + rcv.aborted < count:
        await asyncio.sleep(0.05)
    for why in rcv.rejected:
        print(f"REJECT {why}", flush=True)
    await rcv.close()  # a clean exit: UCX prints what UCX_PROTO_INFO asks for


async def send(kind: str, port: int, mb: int) -> None:
    s = make_sender(kind, "127.0.0.1", port, bandwidth=8e6, timeout=120)
    print("sending", flush=True)
    await s.send("doomed", frames(mb))


if __name__ == "__main__":
    if sys.argv[1] == "receive":
        asyncio.run(receive(sys.argv[2]))
    elif sys.argv[1] == "serve":
        asyncio.run(serve(sys.argv[2], int(sys.argv[3])))
    else:
        asyncio.run(send(sys.argv[2], int(sys.argv[3]), int(sys.argv[4])))

"""The two worker processes of `hack-kv demo`: `python -m hack_integrations.disagg.worker ROLE`.

Each loads the model, prints {"event": "ready", ...} as one JSON line on stdout, reads its job as
one JSON line on stdin, does it and prints {"event": "done", ...}. Progress goes to stderr.
prefill: prompt -> 16-bit prefill -> HACK quantize -> frames -> store (or transport);
         the same prompt's 16-bit KV is shipped too (raw16 codec), for the comparison.
decode:  frames -> verified blocks -> cache -> greedy generation, for both codecs.
"""

from __future__ import annotations

import asyncio
import json
import sys
import threading
import time

import torch

from hack_kernels import HackConfig
from hack_transport import wire

from . import kv as kvmod
from .ship import STORE, block_key, store_get, store_put

CODECS = ("hack", "raw16")


def _emit(event: str, **fields) -> None:
    print(json.dumps({"event": event, **fields}), flush=True)


def _job() -> dict:
    line = sys.stdin.readline()
    if not line:
        raise SystemExit("no job on stdin")
    return json.loads(line)


def _load(model: str | None):
    from ..model import load_model

    torch.set_num_threads(int(_ARGS.get("threads", 1)))
    t0 = time.perf_counter()
    loaded = load_model(model)
    return loaded, time.perf_counter() - t0


def _config(job: dict) -> HackConfig:
    return HackConfig(
        bits=job["bits"], partition=job["partition"], layout=job["layout"], sink_tokens=job["sinks"]
    )


def _model_key(job: dict, codec: str) -> str:
    return f"{job['model_name']}/{codec}/" + (
        f"{job['bits']}b-p{job['partition']}-{job['layout']}-s{job['sinks']}"
        if codec == "hack"
        else "16"
    )


def run_prefill(loaded) -> None:
    job = _job()
    model, tok = loaded.model, loaded.tokenizer
    ids = tok(job["prompt"]).input_ids
    cfg = _config(job)
    t0 = time.perf_counter()
    kv, first = kvmod.prefill(model, ids)
    t_prefill = time.perf_counter() - t0
    out = {"tokens": ids, "first": first, "prefill_s": t_prefill, "codecs": {}}
    for codec in CODECS:
        t0 = time.perf_counter()
        ident = kvmod.identity(model, job["model_name"], cfg if codec == "hack" else None)
        if codec == "hack":
            blocks = kvmod.hack_blocks(kv, cfg, ident, job["block_tokens"])
        else:
            blocks = kvmod.raw_blocks(kv, ident, job["block_tokens"])
        t_quant = time.perf_counter() - t0
        info = {
            "quantize_s": t_quant,
            "payload_bytes": sum(b.nbytes for b in blocks),
            "kv16_bytes": sum(b.nbytes_16bit() for b in blocks),
        }
        if job["transport"] == STORE:
            nbytes, secs = store_put(
                job["store"], blocks, ids, _model_key(job, codec), job["bandwidth"]
            )
            info["keys"] = [
                block_key(b, ids, _model_key(job, codec)).chunk_hash.hex() for b in blocks
            ]
        else:
            from hack_transport.transports import make_sender

            sender = make_sender(
                job["transport"], "127.0.0.1", job["receiver_port"], bandwidth=job["bandwidth"]
            )
            res = sender.send_sync(f"demo/{codec}", blocks)
            nbytes, secs = res.bytes, res.seconds
        info.update(wire_bytes=nbytes, send_s=secs)
        out["codecs"][codec] = info
    _emit("done", **out)


class _Receiver:
    """A transport receiver served on its own event loop thread."""

    def __init__(self, kind: str):
        from hack_transport.transports import make_receiver

        self.receiver = make_receiver(kind)
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, daemon=True).start()
        fut = asyncio.run_coroutine_threadsafe(self.receiver.start("127.0.0.1", 0), self.loop)
        self.port = fut.result(30)[1]

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self.receiver.close(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)


def run_decode(loaded, receiver: _Receiver | None) -> None:
    job = _job()
    model, tok = loaded.model, loaded.tokenizer
    cfg = _config(job)
    pre = job["prefill"]
    ids, first = pre["tokens"], pre["first"]
    out = {"codecs": {}}
    for codec in CODECS:
        ident = kvmod.identity(model, job["model_name"], cfg if codec == "hack" else None)
        t0 = time.perf_counter()
        if receiver is None:
            from hack_transport.store.keys import ChunkKey

            keys = [
                ChunkKey(_model_key(job, codec), bytes.fromhex(h), 0, 0)
                for h in pre["codecs"][codec]["keys"]
            ]
            blocks, nbytes, _ = store_get(job["store"], keys, ident)
        else:
            blocks = receiver.receiver.wait_for(f"demo/{codec}", 60)
            nbytes = sum(b.nbytes for b in blocks)
            for b in blocks:
                if b.model != ident:
                    raise wire.ModelMismatch(f"frames of {b.model}, expected {ident}")
        t_fetch = time.perf_counter() - t0
        cache = kvmod.cache_from_blocks(blocks)
        tokens, t_decode = kvmod.decode(model, tok, ids, first, cache, job["max_new_tokens"])
        out["codecs"][codec] = {
            "fetch_s": t_fetch,
            "fetched_bytes": nbytes,
            "decode_s": t_decode,
            "tokens": tokens,
            "text": tok.decode(tokens, skip_special_tokens=True),
        }
    _emit("done", **out)


_ARGS: dict = {}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in ("prefill", "decode"):
        raise SystemExit(
            "usage: python -m hack_integrations.disagg.worker prefill|decode [MODEL] [TRANSPORT] [THREADS]"
        )
    role = argv[0]
    model = argv[1] if len(argv) > 1 and argv[1] != "-" else None
    transport = argv[2] if len(argv) > 2 else STORE
    _ARGS["threads"] = argv[3] if len(argv) > 3 else 1
    loaded, load_s = _load(model)
    receiver = None
    if role == "decode" and transport != STORE:
        receiver = _Receiver(transport)
    _emit("ready", load_s=load_s, name=loaded.name, port=receiver.port if receiver else None)
    if role == "prefill":
        run_prefill(loaded)
    else:
        run_decode(loaded, receiver)
        if receiver is not None:
            receiver.close()


if __name__ == "__main__":
    main()

"""GPU KV through the wire format, pinned against pageable host memory (run on a CUDA machine).

    python benchmarks/device_pinned.py --out pinned.json --commit C [--tokens 4096] [--repeat 7]

A Llama-8B request (32 layers, 8 kv heads, d128) quantized on the GPU at partition 64, one
block per layer, goes GPU -> frame -> GPU without a network, each step timed both ways in the
same run (medians of --repeat, steps interleaved):
- sender: encode every block (checksums included, their cache cleared), the GPU tensors staged
  through one pinned buffer per block (wire.host_tensors) against the previous path, a
  synchronous `.cpu()` per tensor;
- receiver: frames assembled into a pool's buffers (the copy a transport makes), then every
  block moved to the GPU with Block.to_device, from a pinned pool against a pageable one.
Prints each step's milliseconds, GB/s of frame bytes and the ratio against its baseline.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hack_kernels import HackConfig, quantize_kv  # noqa: E402
from hack_transport import wire  # noqa: E402
from hack_transport.bufpool import PayloadPool  # noqa: E402
from hack_transport.transports.assembler import FrameAssembler  # noqa: E402
from hack_transport.transports.base import TransferLimits  # noqa: E402

LAYERS, KV_HEADS, HEAD_DIM = 32, 8, 128


def gpu_blocks(tokens: int) -> tuple[wire.ModelIdentity, list[wire.Block]]:
    cfg = HackConfig(partition=64)
    g = torch.Generator(device="cuda").manual_seed(0)
    model = wire.model_identity("llama-8b", LAYERS, KV_HEADS, HEAD_DIM, torch.float16, cfg)
    blocks = []
    for layer in range(LAYERS):
        k, v = (
            torch.randn(1, KV_HEADS, tokens, HEAD_DIM, generator=g, device="cuda").half()
            for _ in range(2)
        )
        blocks += wire.split_kv([quantize_kv(k, v, cfg)], tokens, model, layer_start=layer)
    return model, blocks


def encode_pinned(blocks: list[wire.Block]) -> list[list]:
    for b in blocks:
        b._checksums.clear()  # hash every time, as the baseline does
    return [wire.encode_block(b) for b in blocks]


def encode_per_tensor_cpu(blocks: list[wire.Block]) -> list[list]:
    """The path before pinned staging: one synchronous copy to pageable memory per tensor."""
    out = []
    for b in blocks:
        host = dataclasses.replace(b, tensors={n: t.cpu() for n, t in b.tensors.items()})
        out.append(wire.encode_block(host))
    return out


def assemble(frames: list[bytes], model: wire.ModelIdentity, pool: PayloadPool) -> list:
    asm = FrameAssembler(TransferLimits(), model, alloc=pool.acquire, keep_views=False)
    for f in frames:
        asm.feed(f)
    return asm.blocks


def to_gpu(blocks: list[wire.Block]) -> list[wire.Block]:
    return [b.to_device("cuda") for b in blocks]


def timed(fn, *args) -> tuple[float, object]:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = fn(*args)
    torch.cuda.synchronize()
    return time.perf_counter() - t0, out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--commit", default="unknown")
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--repeat", type=int, default=7)
    a = ap.parse_args()

    model, blocks = gpu_blocks(a.tokens)
    frames = [wire.encode_frame(b) for b in blocks]
    nbytes = sum(len(f) for f in frames)
    for b, f in zip(blocks, frames, strict=True):  # both paths send the same bytes
        assert b"".join(bytes(x) for x in encode_per_tensor_cpu([b])[0]) == f
    pools = {"pinned": PayloadPool(pinned=True), "pageable": PayloadPool(pinned=False)}
    times: dict[str, list[float]] = {}

    def note(step: str, secs: float) -> None:
        times.setdefault(step, []).append(secs)

    for _ in range(a.repeat + 1):  # the first round warms the pools and allocators
        note("encode, per-tensor .cpu()", timed(encode_per_tensor_cpu, blocks)[0])
        note("encode, pinned staging", timed(encode_pinned, blocks)[0])
        for kind, pool in pools.items():
            secs, got = timed(assemble, frames, model, pool)
            note(f"assemble into {kind} buffers", secs)
            secs, back = timed(to_gpu, got)
            note(f"to GPU from {kind} buffers", secs)
            del got, back
    for b, ref in zip(to_gpu(assemble(frames, model, pools["pinned"])), blocks, strict=True):
        assert all(torch.equal(b.tensors[n], t) for n, t in ref.tensors.items())

    med = {k: statistics.median(v[1:]) for k, v in times.items()}
    pairs = [
        ("encode, pinned staging", "encode, per-tensor .cpu()"),
        ("to GPU from pinned buffers", "to GPU from pageable buffers"),
        ("assemble into pinned buffers", "assemble into pageable buffers"),
    ]
    rows = []
    for new, base in pairs:
        for step in (base, new):
            rows.append(
                {
                    "step": step,
                    "ms": round(med[step] * 1e3, 3),
                    "gb_s": round(nbytes / med[step] / 1e9, 2),
                    "runs_ms": [round(s * 1e3, 3) for s in times[step][1:]],
                    "speedup_vs_baseline": round(med[base] / med[step], 2) if step == new else 1.0,
                }
            )
    end_new = sum(med[s] for s in (pairs[0][0], pairs[2][0], pairs[1][0]))
    end_old = sum(med[s] for s in (pairs[0][1], pairs[2][1], pairs[1][1]))
    result = {
        "meta": {
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "commit": a.commit,
            "device": torch.cuda.get_device_name(),
            "host": platform.node(),
            "python": platform.python_version(),
            "versions": {"torch": torch.__version__, "cuda": torch.version.cuda},
            "workload": f"llama-8b geometry, {a.tokens} tokens, p64, {LAYERS} layer blocks",
            "frame_bytes": nbytes,
            "repeat": a.repeat,
        },
        "rows": rows,
        "gpu_to_gpu_ms": {"pinned": round(end_new * 1e3, 3), "pageable": round(end_old * 1e3, 3)},
        "gpu_to_gpu_speedup": round(end_old / end_new, 2),
    }
    Path(a.out).write_text(json.dumps(result, indent=1))
    print(f"{result['meta']['device']}: {nbytes / 1e6:.1f} MB of frames")
    for r in rows:
        print(
            f"{r['step']:34s} {r['ms']:9.2f} ms {r['gb_s']:7.2f} GB/s x{r['speedup_vs_baseline']}"
        )
    print(f"GPU -> frames -> GPU: {end_old * 1e3:.1f} -> {end_new * 1e3:.1f} ms", end=" ")
    print(f"(x{result['gpu_to_gpu_speedup']})")


if __name__ == "__main__":
    main()

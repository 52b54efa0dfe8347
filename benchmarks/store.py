"""KV store service on loopback: put/get latency and throughput, HACK 2-bit chunks against 16-bit.

    python benchmarks/store.py [--quick] [--out benchmarks/results/store.json]

One 256-token chunk of an 8B model (32 layers, 8 kv heads, head_dim 128), as the wire frames the
store keeps: HACK 2-bit (partition 64) and the raw 16-bit codec, both built by hack_transport.wire
from the same random K and V. Each is put and got through a real `hack-kv serve` child process on
loopback, by one client (latency) and by several (aggregate get rate), with the value in the gRPC
stream or through a /dev/shm exchange file (the same-host path), in three store setups:
memory only, write-through to disk with fsync (the default; a put is acknowledged once durable),
and gets served from the disk tier (CPU tier of 0 bytes; checksums verified on every read).
Ratios compare HACK with 16-bit measured in the same run. Target: HACK get p99 < 5 ms.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hack_kernels.config import HackConfig  # noqa: E402
from hack_kernels.kv import quantize_kv  # noqa: E402
from hack_transport import wire  # noqa: E402
from hack_transport.store import ChunkSpec, StoreClient  # noqa: E402

LAYERS, KV_HEADS, HEAD_DIM, CHUNK = 32, 8, 128, 256
TARGET_GET_P99_MS = 5.0
# stream: the value travels in the gRPC stream over the loopback socket; shm: through a /dev/shm
# exchange file named in the RPC (what StoreClient picks on the same host).
TRANSPORTS = ("stream", "shm")
SETUPS = {
    "memory": ["--no-disk", "--cpu", "2G"],
    "write_through": ["--cpu", "2G", "--disk", "4G"],
    "disk_reads": ["--cpu", "0", "--disk", "4G"],
}
# Where CUDA is present: values held in the GPU tier (copied to the host on every get).
GPU_SETUP = {"gpu_tier": ["--no-disk", "--cpu", "2G", "--gpu", "2G"]}


def make_frames() -> dict[str, bytes]:
    """One 256-token chunk of all 32 layers: a HACK frame and a raw 16-bit frame of the same KV."""
    g = torch.Generator().manual_seed(0)
    shape = (1, KV_HEADS, CHUNK, HEAD_DIM)
    ks = [torch.randn(shape, generator=g).half() for _ in range(LAYERS)]
    vs = [torch.randn(shape, generator=g).half() for _ in range(LAYERS)]
    cfg = HackConfig(bits=2, partition=64)
    kvs = [quantize_kv(k, v, cfg) for k, v in zip(ks, vs, strict=True)]
    hack_id = wire.model_identity("llama-8b", LAYERS, KV_HEADS, HEAD_DIM, torch.float16, cfg)
    raw_id = wire.model_identity("llama-8b", LAYERS, KV_HEADS, HEAD_DIM, torch.float16)
    (hack,) = wire.split_kv(kvs, CHUNK, hack_id)
    (raw,) = wire.split_raw(ks, vs, CHUNK, raw_id)
    return {"hack": wire.encode_frame(hack), "raw16": wire.encode_frame(raw)}


class Server:
    def __init__(self, workdir: Path, args: list[str]) -> None:
        ready = workdir / f"ready-{time.monotonic_ns()}.json"
        cli = "from hack_integrations.cli import main; main()"
        cmd = [sys.executable, "-c", cli, "serve", "--port", "0", "--ready-file", str(ready)]
        cmd += ["--disk-dir", str(workdir / "disk"), "--log-level", "warning", *args]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 60
        while not ready.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.proc.kill()
                raise RuntimeError(
                    f"server did not start: {self.proc.stderr.read().decode()[-2000:]}"
                )
            time.sleep(0.05)
        self.address = f"127.0.0.1:{json.loads(ready.read_text())['port']}"

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(60)


def percentiles(seconds: list[float]) -> dict:
    ms = np.asarray(seconds) * 1e3
    return {
        "p50_ms": float(np.percentile(ms, 50)),
        "p99_ms": float(np.percentile(ms, 99)),
        "mean_ms": float(ms.mean()),
        "max_ms": float(ms.max()),
        "n": len(ms),
    }


def interleave(counts: dict[str, int], rounds: int = 5) -> list[tuple[str, int]]:
    """(codec, i) for every operation, in `rounds` rounds of one block per codec: each codec sees
    the same machine load over time, and no single 16-bit op sits between two HACK ops."""
    out = []
    for r in range(rounds):
        for codec, n in counts.items():
            out += [(codec, i) for i in range(r * n // rounds, (r + 1) * n // rounds)]
    return out


def timed(fn, *args) -> tuple[float, object]:
    """(seconds, result) of fn(*args)."""
    t = time.perf_counter()
    out = fn(*args)
    return time.perf_counter() - t, out


def run_setup(
    address: str, frames: dict[str, bytes], reps: dict, clients: int, shm: bool, bar
) -> dict:
    """Both codecs against one server, their operations interleaved; returns results per codec."""
    rng = np.random.default_rng(0)
    keys = {
        codec: [
            ChunkSpec(f"llama-8b+{codec}", CHUNK).keys(rng.integers(0, 128_000, CHUNK))[0][2]
            for _ in range(n_put)
        ]
        for codec, (n_put, _) in reps.items()
    }
    times = {codec: {"put": [], "get": [], "get_into": []} for codec in reps}
    bufs = {codec: bytearray(len(f)) for codec, f in frames.items()}  # preallocated destinations
    with StoreClient(address, timeout=60, shm=shm) as c:
        c.wait_ready(30)
        for codec, f in frames.items():  # warm the channel and the server's code paths
            c.put(keys[codec][0], f)
            assert c.get(keys[codec][0]) == f
        for codec, i in interleave({codec: n_put for codec, (n_put, _) in reps.items()}):
            times[codec]["put"].append(timed(c.put, keys[codec][i], frames[codec])[0])
            bar.update()
        n_gets = {codec: n_get for codec, (_, n_get) in reps.items()}
        for codec, i in interleave(n_gets):
            k = keys[codec][i % len(keys[codec])]
            seconds, got = timed(c.get, k)
            times[codec]["get"].append(seconds)
            if got != frames[codec]:
                raise AssertionError(f"{codec}: get returned different bytes")
            times[codec]["get_into"].append(timed(c.get_into, k, bufs[codec])[0])
            if bufs[codec] != frames[codec]:
                raise AssertionError(f"{codec}: get_into filled different bytes")
            bar.update(2)
    out = {}
    for codec, (_, n_get) in reps.items():
        n = len(frames[codec])
        per = max(n_get // clients, 1)

        def getter(j: int, codec: str = codec, per: int = per) -> None:
            with StoreClient(address, timeout=60, shm=shm) as cc:
                for i in range(per):
                    cc.get(keys[codec][(i + j) % len(keys[codec])])

        # aggregate get rate: `clients` clients, each on its own channel, getting in parallel
        threads = [threading.Thread(target=getter, args=(j,)) for j in range(clients)]
        t0 = time.perf_counter()
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        par_wall = time.perf_counter() - t0
        t = times[codec]
        out[codec] = {
            "chunk_bytes": n,
            "put": percentiles(t["put"]),
            "get": percentiles(t["get"]),
            "get_into": percentiles(t["get_into"]),
            "put_MBps": n * len(t["put"]) / sum(t["put"]) / 1e6,
            "get_MBps": n * len(t["get"]) / sum(t["get"]) / 1e6,
            "put_chunks_per_s": len(t["put"]) / sum(t["put"]),
            "get_chunks_per_s": len(t["get"]) / sum(t["get"]),
            f"get_MBps_{clients}_clients": n * per * clients / par_wall / 1e6,
            f"get_chunks_per_s_{clients}_clients": per * clients / par_wall,
        }
    return out


def versions() -> dict:
    import grpc
    import xxhash

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "grpcio": grpc.__version__,
        "xxhash": xxhash.VERSION,
    }


def commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        )
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(18, 4.8), sharey=True)
    setups = list(result["setups"])
    x = np.arange(len(setups))
    for ax, op in zip(axes, ("get", "get_into", "put"), strict=True):
        for j, (codec, color) in enumerate((("hack", "tab:blue"), ("raw16", "tab:gray"))):
            p50 = [result["setups"][s][codec][op]["p50_ms"] for s in setups]
            p99 = [result["setups"][s][codec][op]["p99_ms"] for s in setups]
            label = "HACK 2-bit" if codec == "hack" else "16-bit"
            ax.bar(x + (j - 0.5) * 0.38, p50, 0.38, color=color, label=f"{label} p50")
            ax.scatter(x + (j - 0.5) * 0.38, p99, color="black", marker="_", s=300, zorder=3)
        if op.startswith("get"):
            ax.axhline(TARGET_GET_P99_MS, color="tab:red", ls="--", lw=1, label="target p99 (5 ms)")
        ax.set_xticks(x, [s.replace("/", "\n") for s in setups], fontsize=8)
        ax.set_yscale("log")
        ax.set_title(f"{op} (bar p50, tick p99)")
        ax.set_ylabel("ms")
        ax.legend(fontsize=8)
    fig.suptitle(
        f"hack-kv serve, one 256-token chunk of Llama-8B geometry (32 layers, 8 kv heads, d128); "
        f"{result['machine']}, {result['date']}, commit {result['commit']}",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer repetitions")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "store.json"))
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--machine", default=None, help="how to describe the machine in the results")
    ap.add_argument("--commit", default=None, help="commit to record (default: git rev-parse)")
    args = ap.parse_args()
    setups = {**SETUPS, **(GPU_SETUP if torch.cuda.is_available() else {})}
    frames = make_frames()
    n_hack, n_raw = len(frames["hack"]), len(frames["raw16"])
    bytes_16 = 2 * 2 * LAYERS * KV_HEADS * CHUNK * HEAD_DIM
    print(
        f"HACK frame {n_hack} B, 16-bit frame {n_raw} B ({n_hack / n_raw:.2%}); 16-bit KV {bytes_16} B"
    )
    reps = (
        {"hack": (30, 200), "raw16": (10, 60)}
        if not args.quick
        else {"hack": (10, 40), "raw16": (4, 12)}
    )
    total = len(setups) * len(TRANSPORTS) * sum(p + 2 * g for p, g in reps.values())
    result = {
        "benchmark": "store",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": args.commit or commit(),
        "load_average_at_start": os.getloadavg(),
        "machine": args.machine or f"{platform.machine()}, {os.cpu_count()} CPUs, loopback",
        "versions": versions(),
        "geometry": {
            "layers": LAYERS,
            "kv_heads": KV_HEADS,
            "head_dim": HEAD_DIM,
            "chunk_tokens": CHUNK,
        },
        "codec": {"bits": 2, "partition": 64},
        "frame_bytes": {
            "hack": n_hack,
            "raw16": n_raw,
            "kv_16bit": bytes_16,
            "hack_over_raw16": n_hack / n_raw,
        },
        "target_get_p99_ms": TARGET_GET_P99_MS,
        "setups": {},
    }
    with (
        tempfile.TemporaryDirectory(prefix="hack-kv-bench-") as tmp,
        tqdm(total=total, unit="op") as bar,
    ):
        for setup, flags in setups.items():
            for transport in TRANSPORTS:
                name = f"{setup}/{transport}"
                work = Path(tmp) / f"{setup}-{transport}"
                work.mkdir()
                server = Server(work, flags)
                try:
                    bar.set_description(name)
                    result["setups"][name] = run_setup(
                        server.address, frames, reps, args.clients, transport == "shm", bar
                    )
                finally:
                    server.stop()
                h, r16 = result["setups"][name]["hack"], result["setups"][name]["raw16"]
                result["setups"][name]["hack_vs_raw16"] = {
                    "get_p50_speedup": r16["get"]["p50_ms"] / h["get"]["p50_ms"],
                    "get_p99_speedup": r16["get"]["p99_ms"] / h["get"]["p99_ms"],
                    "get_into_p50_speedup": r16["get_into"]["p50_ms"] / h["get_into"]["p50_ms"],
                    "put_p50_speedup": r16["put"]["p50_ms"] / h["put"]["p50_ms"],
                    "get_16bit_equivalent_MBps": bytes_16 * h["get_chunks_per_s"] / 1e6,
                }
    result["target_met"] = {
        s: result["setups"][s]["hack"]["get"]["p99_ms"] < TARGET_GET_P99_MS
        for s in result["setups"]
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    plot(result, out.with_suffix(".png"))
    for s, v in result["setups"].items():
        h, r16 = v["hack"], v["raw16"]
        print(
            f"{s:22s} get p50/p99 HACK {h['get']['p50_ms']:.2f}/{h['get']['p99_ms']:.2f} ms, "
            f"16-bit {r16['get']['p50_ms']:.2f}/{r16['get']['p99_ms']:.2f} ms; "
            f"get_into HACK {h['get_into']['p50_ms']:.2f}/{h['get_into']['p99_ms']:.2f} ms, "
            f"16-bit {r16['get_into']['p50_ms']:.2f}/{r16['get_into']['p99_ms']:.2f} ms; "
            f"put p50 HACK {h['put']['p50_ms']:.2f} ms, 16-bit {r16['put']['p50_ms']:.2f} ms; "
            f"get x{v['hack_vs_raw16']['get_p50_speedup']:.1f}"
        )
    print(f"wrote {out} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()

"""`hack-kv demo`: disaggregated inference across processes on the embedded SmolLM2-135M.

A prefill worker process runs the prompt, quantizes its KV with HACK and ships the frames; a decode
worker process fetches them and generates. The KV travels through the KV store service the demo
starts itself (`hack-kv serve`, gRPC: --transport store) or directly over a transport (tcp, grpc,
ucx). The same prompt's KV also travels in 16-bit, and decode runs on it too, for comparison.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import typer

from . import app


def default_prompt() -> str:
    """A real text that ships with Python: the language reference on function definitions."""
    import pydoc_data.topics

    text = pydoc_data.topics.topics["function"][:1400]
    return text + "\n\nIn short, a Python function definition"


def parse_rate(text: str | None) -> float | None:
    """'100MB/s', '1Gbit', '250mbps', '5e6' (bytes/s) -> bytes per second; None or '0' -> None."""
    if text is None:
        return None
    t = text.strip().lower().replace("/s", "").replace("ps", "")
    units = {
        "gbit": 1e9 / 8,
        "mbit": 1e6 / 8,
        "kbit": 1e3 / 8,
        "gb": 1e9,
        "mb": 1e6,
        "kb": 1e3,
        "b": 1.0,
    }
    for unit, scale in units.items():
        if t.endswith(unit):
            t, mult = t[: -len(unit)], scale
            break
    else:
        mult = 1.0
    try:
        rate = float(t) * mult
    except ValueError:
        raise typer.BadParameter(f"not a rate: {text!r} (examples: 100MB/s, 1Gbit, 5e6)") from None
    if rate < 0:
        raise typer.BadParameter("bandwidth must not be negative")
    return rate or None


class _Worker:
    def __init__(self, role: str, model: str | None, transport: str, threads: int, log: Path):
        self.role = role
        self.log = open(log, "w")  # noqa: SIM115 (closed in close())
        cmd = [
            sys.executable,
            "-m",
            "hack_integrations.disagg.worker",
            role,
            model or "-",
            transport,
            str(threads),
        ]
        env = {
            **os.environ,
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "TQDM_DISABLE": "1",
        }
        self.proc = subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True, env=env
        )

    def read(self, timeout: float = 300) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait(10)
            tail = Path(self.log.name).read_text()[-2000:]
            raise RuntimeError(f"the {self.role} worker exited ({self.proc.returncode}):\n{tail}")
        return json.loads(line)

    def send(self, job: dict) -> None:
        self.proc.stdin.write(json.dumps(job) + "\n")
        self.proc.stdin.flush()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.log.close()


def _start_store(tmp: Path) -> tuple[subprocess.Popen, str]:
    ready = tmp / "store.json"
    cmd = [
        sys.executable,
        "-m",
        "hack_integrations.cli",
        "serve",
        "--port",
        "0",
        "--no-disk",
        "--cpu",
        "1GiB",
        "--ready-file",
        str(ready),
        "--log-level",
        "warning",
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=open(tmp / "store.log", "w"))  # noqa: SIM115
    end = time.monotonic() + 60
    while not ready.exists():
        if proc.poll() is not None or time.monotonic() > end:
            proc.kill()
            raise RuntimeError(
                f"hack-kv serve did not start: {(tmp / 'store.log').read_text()[-2000:]}"
            )
        time.sleep(0.1)
    time.sleep(0.05)
    return proc, f"127.0.0.1:{json.loads(ready.read_text())['port']}"


def run_demo(
    transport: str = "store",
    bandwidth: float | None = None,
    partition: int = 64,
    bits: int = 2,
    layout: str = "kivi",
    sinks: int = 4,
    prompt: str | None = None,
    max_new_tokens: int = 32,
    model: str | None = None,
    block_tokens: int = 256,
    threads: int = 1,
) -> dict:
    """Run the two workers (and the store); returns everything measured."""
    from hack_kernels import HackConfig

    HackConfig(bits=bits, partition=partition, layout=layout, sink_tokens=sinks)  # validate early
    block_tokens = max(partition, block_tokens // partition * partition)
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="hack-kv-demo-") as tmpdir:
        tmp = Path(tmpdir)
        store, address = (None, None)
        workers: list[_Worker] = []
        try:
            if transport == "store":
                store, address = _start_store(tmp)
            decode = _Worker("decode", model, transport, threads, tmp / "decode.log")
            prefill = _Worker("prefill", model, transport, threads, tmp / "prefill.log")
            workers = [decode, prefill]
            d_ready, p_ready = decode.read(), prefill.read()
            job = {
                "prompt": prompt or default_prompt(),
                "bits": bits,
                "partition": partition,
                "layout": layout,
                "sinks": sinks,
                "block_tokens": block_tokens,
                "transport": transport,
                "store": address,
                "bandwidth": bandwidth,
                "receiver_port": d_ready.get("port"),
                "model_name": p_ready["name"],
                "max_new_tokens": max_new_tokens,
            }
            prefill.send(job)
            pre = prefill.read()
            decode.send({**job, "prefill": pre})
            dec = decode.read()
        finally:
            for w in workers:
                w.close()
            if store is not None:
                store.terminate()
                try:
                    store.wait(15)
                except subprocess.TimeoutExpired:
                    store.kill()
    return {
        "job": job,
        "load_s": max(d_ready["load_s"], p_ready["load_s"]),
        "prefill": pre,
        "decode": dec,
        "total_s": time.perf_counter() - t_start,
    }


def _print(result: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    con = Console()
    job, pre, dec = result["job"], result["prefill"], result["decode"]
    hack, raw = pre["codecs"]["hack"], pre["codecs"]["raw16"]
    dh, dr = dec["codecs"]["hack"], dec["codecs"]["raw16"]
    via = (
        "KV store (hack-kv serve, gRPC)"
        if job["transport"] == "store"
        else f"{job['transport']} transport"
    )
    con.print(
        f"[bold]prompt[/]: {len(pre['tokens'])} tokens; KV via {via}"
        + (f", link limited to {job['bandwidth'] / 1e6:.1f} MB/s" if job["bandwidth"] else "")
    )
    con.print(
        f"[bold]HACK {job['bits']}-bit p{job['partition']} {job['layout']} sinks {job['sinks']}[/]:\n{dh['text']}\n"
    )
    con.print(f"[bold]16-bit KV[/]:\n{dr['text']}\n")
    same = dh["tokens"] == dr["tokens"]
    common = next(
        (i for i, (a, b) in enumerate(zip(dh["tokens"], dr["tokens"], strict=False)) if a != b),
        min(len(dh["tokens"]), len(dr["tokens"])),
    )
    con.print(
        f"generations agree: {'yes' if same else 'no'} ({common} of {len(dr['tokens'])} tokens identical before the first difference)"
    )
    t = Table(title="bytes and times")
    t.add_column("")
    t.add_column("HACK", justify="right")
    t.add_column("16-bit", justify="right")
    t.add_row("KV in 16-bit", f"{hack['kv16_bytes']:,}", f"{raw['kv16_bytes']:,}")
    t.add_row(
        "bytes on the wire",
        f"{hack['wire_bytes']:,} ({hack['wire_bytes'] / raw['wire_bytes']:.1%})",
        f"{raw['wire_bytes']:,}",
    )
    t.add_row("prefill s", f"{pre['prefill_s']:.2f}", f"{pre['prefill_s']:.2f}")
    t.add_row("quantize + frame s", f"{hack['quantize_s']:.3f}", f"{raw['quantize_s']:.3f}")
    t.add_row(
        "transfer s (send + fetch)",
        f"{hack['send_s'] + dh['fetch_s']:.3f}",
        f"{raw['send_s'] + dr['fetch_s']:.3f}",
    )
    t.add_row("decode s", f"{dh['decode_s']:.2f}", f"{dr['decode_s']:.2f}")
    con.print(t)
    con.print(
        f"model load {result['load_s']:.1f} s (both workers in parallel); total {result['total_s']:.1f} s"
    )


@app.command()
def demo(
    transport: str = typer.Option(
        "store", help="store (the KV store service over gRPC), or direct: tcp, grpc, ucx"
    ),
    bandwidth_limit: str = typer.Option(
        None, help="Emulate a link of this rate, e.g. 100MB/s or 1Gbit"
    ),
    partition: int = typer.Option(64, help="Elements per quantization group: 32, 64 or 128"),
    bits: int = typer.Option(2, help="K/V code bits: 2, 4 or 8"),
    layout: str = typer.Option("kivi", help="kivi (K per channel, V per token) or paper"),
    sinks: int = typer.Option(4, min=0, help="Leading tokens kept in 16-bit"),
    prompt_file: Path = typer.Option(
        None, exists=True, dir_okay=False, help="Prompt text (default: a CPython doc page)"
    ),
    max_new_tokens: int = typer.Option(32, min=1, help="Tokens to generate"),
    model: str = typer.Option(
        None, help="Local checkpoint dir or .gguf; default: embedded SmolLM2-135M"
    ),
    json_out: Path = typer.Option(None, "--json", help="Also write the measurements as JSON here"),
    threads: int = typer.Option(1, min=1, help="torch threads per worker"),
) -> None:
    """Prefill and decode in two processes, KV shipped as HACK frames, compared with 16-bit KV."""
    from hack_transport.transports import KINDS

    if transport != "store" and transport not in KINDS:
        raise typer.BadParameter(f"transport must be store or one of {sorted(KINDS)}")
    prompt = prompt_file.read_text(encoding="utf-8", errors="replace") if prompt_file else None
    try:
        result = run_demo(
            transport,
            parse_rate(bandwidth_limit),
            partition,
            bits,
            layout,
            sinks,
            prompt,
            max_new_tokens,
            model,
            threads=threads,
        )
    except ValueError as e:
        raise typer.BadParameter(str(e)) from e
    except RuntimeError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(1) from e
    _print(result)
    if json_out:
        json_out.write_text(json.dumps(result, indent=1))

"""`hack-kv bench transfer`: KV transfer throughput per transport, 16-bit against HACK 2-bit."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from . import app

bench_app = typer.Typer(help="Benchmarks.", no_args_is_help=True)
app.add_typer(bench_app, name="bench")


def _smollm2(tokens: int):
    """K and V of every layer of the embedded SmolLM2-135M run over real text (GPL-3 licence)."""
    import torch

    from ..model import load_model

    lm = load_model()
    path = Path("/usr/share/common-licenses/GPL-3")
    text = path.read_text() if path.exists() else open(__file__).read() * 20
    ids = lm.tokenizer(text, return_tensors="pt").input_ids[:, :tokens]
    with torch.no_grad():
        cache = lm.model(ids, use_cache=True).past_key_values
    ks = [layer.keys.half().contiguous() for layer in cache.layers]
    vs = [layer.values.half().contiguous() for layer in cache.layers]
    return ks, vs


@bench_app.command("transfer")
def transfer(
    workload: list[str] = typer.Option(
        ["llama-8b:4096", "mistral-7b:8192", "smollm2:2048"],
        help="NAME:TOKENS; NAME is llama-8b, mistral-7b (published geometry, random values) or "
        "smollm2 (K and V captured from the embedded model)",
    ),
    transport: list[str] = typer.Option(
        [],
        help="Transports besides the raw socket (default: every installed one of tcp, grpc, ucx, nixl)",
    ),
    partition: list[int] = typer.Option(
        [32, 64, 128], help="HACK partitions to compare with 16-bit"
    ),
    bandwidth_limit: list[str] = typer.Option(
        ["none", "10gbit", "40gbit", "50gbit"],
        help="Token-bucket link emulation, e.g. 10gbit; none = unlimited",
    ),
    repeat: int = typer.Option(3, min=1, help="Repeats per measurement (median)"),
    block_tokens: int = typer.Option(
        256, min=0, help="Tokens per block (a multiple of 128; 0 = the whole prompt in one block)"
    ),
    layerwise: bool = typer.Option(
        False, help="One frame per layer instead of all layers per frame"
    ),
    out: Path = typer.Option(
        Path("benchmarks/results"), help="Directory for transfer.json and transfer.png"
    ),
    stem: str = typer.Option("transfer", help="File name stem of the results"),
) -> None:
    """Send KV of real geometry over each transport on loopback and report rates and ratios."""
    from hack_transport import transfer_bench as tb
    from hack_transport.transports import available_kinds

    loads = []
    for w in workload:
        name, _, tok = w.partition(":")
        tokens = int(tok or 4096)
        if name == "smollm2":
            loads.append(tb.Workload(name, tokens, lambda t=tokens: _smollm2(t)))
        else:
            loads.append(tb.synthetic_workload(name, tokens))
    transport = transport or available_kinds()
    missing = [t for t in transport if t not in available_kinds()]
    if missing:
        raise typer.BadParameter(
            f"not installed: {missing} (`pip install hack-kv[ucx]` / `[nixl]`)"
        )
    bws = list(dict.fromkeys(tb.parse_bandwidth(b) for b in bandwidth_limit))
    if block_tokens % 128:
        raise typer.BadParameter("--block-tokens must be a multiple of 128 (every partition)")
    result = tb.run_benchmark(
        loads, transport, partition, bws, repeat, block_tokens=block_tokens, layerwise=layerwise
    )
    js, png = tb.write_results(result, out, stem)
    _print(result)
    Console().print(f"wrote {js} and {png}")


def _print(result: dict) -> None:
    table = Table(title="KV transfer on loopback (median; vs raw = raw-socket time / this time)")
    for col in (
        "workload",
        "codec",
        "transport",
        "link",
        "bytes %",
        "s/request",
        "GB/s",
        "16-bit eq GB/s",
        "vs raw",
        "enc s",
        "dec s",
    ):
        table.add_column(
            col, justify="right" if col not in ("workload", "codec", "transport") else "left"
        )
    for r in result["rows"]:
        table.add_row(
            f"{r['workload']}@{r['tokens']}",
            r["codec"],
            r["transport"],
            f"{r['bandwidth_gbit']:g}G" if r["bandwidth_gbit"] else "-",
            f"{100 * r['bytes_ratio']:.2f}",
            f"{r['seconds']:.3f}",
            f"{r['payload_gbps']:.2f}",
            f"{r['equiv_gbps']:.2f}",
            f"{r['vs_raw_socket']:.2f}",
            f"{r['encode_s']:.3f}",
            f"{r['decode_s']:.3f}",
        )
    console = Console()
    console.print(table)
    console.print(result["summary"])

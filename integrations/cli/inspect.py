"""`hack-kv inspect`: HACK's bytes and errors, layer by layer, on a real model's K and V."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from . import app


def _load_text(text_file: Path | None) -> str:
    if text_file is not None:
        return text_file.read_text(encoding="utf-8", errors="replace")
    from ..data import humaneval_text

    return humaneval_text()


@app.command()
def inspect(
    model: str = typer.Option(
        None, help="Local checkpoint dir or .gguf; default: embedded SmolLM2-135M"
    ),
    text_file: Path = typer.Option(
        None, exists=True, dir_okay=False, help="Text to run (default: HumanEval prompts)"
    ),
    max_tokens: int = typer.Option(1024, min=1, help="Tokens of text to run"),
    bits: int = typer.Option(2, help="K/V code bits: 2, 4 or 8"),
    partition: int = typer.Option(64, help="Elements per quantization group: 32, 64 or 128"),
    layout: str = typer.Option("paper", help="paper or kivi"),
    rounding: str = typer.Option("nearest", help="nearest or stochastic"),
    sink_tokens: int = typer.Option(0, min=0, help="Leading tokens kept in 16-bit"),
    sweep: bool = typer.Option(False, help="Also summarize partitions 32/64/128 x both layouts"),
    json_out: Path = typer.Option(None, "--json", help="Write the per-layer results as JSON here"),
) -> None:
    """Capture each layer's real K and V and print HACK's bytes ratio and errors per layer."""
    from hack_kernels import HackConfig

    from ..capture import capture_qkv
    from ..inspect_kv import inspect_layers, summarize
    from ..model import ModelNotFound, load_model

    console = Console()
    try:
        config = HackConfig(
            bits=bits,
            partition=partition,
            layout=layout,
            rounding=rounding,
            sink_tokens=sink_tokens,
        )
    except ValueError as e:
        raise typer.BadParameter(str(e)) from e
    try:
        loaded = load_model(model)
    except ModelNotFound as e:
        console.print(f"[red]error:[/red] {e}")
        raise typer.Exit(2) from e
    ids = loaded.tokenizer(_load_text(text_file), return_tensors="pt").input_ids[:, :max_tokens]
    console.print(f"model {loaded.name}: {ids.shape[1]} tokens of real text")
    layers = capture_qkv(loaded.model, ids)

    reports = inspect_layers(layers, config)
    table = Table(
        title=f"HACK on {loaded.name}: {bits}-bit, partition {partition}, {layout} layout"
    )
    for col in ("layer", "bytes / 16-bit", "K rel err", "V rel err", "attn rel err", "attn cosine"):
        table.add_column(col, justify="right")
    for r in reports:
        table.add_row(
            str(r.layer),
            f"{r.bytes_ratio:.4f}",
            f"{r.k_rel_err:.4f}",
            f"{r.v_rel_err:.4f}",
            f"{r.attn_rel_err:.4f}",
            f"{r.attn_cosine:.5f}",
        )
    s = summarize(reports)
    table.add_row(
        "mean",
        f"{s['bytes_ratio']:.4f}",
        f"{s['k_rel_err']:.4f}",
        f"{s['v_rel_err']:.4f}",
        f"{s['attn_rel_err']:.4f}",
        f"{s['attn_cosine']:.5f}",
        style="bold",
    )
    console.print(table)

    result = {
        "model": loaded.name,
        "tokens": int(ids.shape[1]),
        "config": config.to_dict(),
        "layers": [r.to_dict() for r in reports],
        "summary": s,
    }
    if sweep:
        rows = []
        for lay in ("paper", "kivi"):
            for p in (32, 64, 128):
                cfg = config.replace(partition=p, layout=lay)
                rows.append(
                    {"layout": lay, "partition": p, **summarize(inspect_layers(layers, cfg))}
                )
        sweep_table = Table(title="mean over layers")
        for col in (
            "layout",
            "partition",
            "bytes / 16-bit",
            "K rel err",
            "V rel err",
            "attn rel err",
            "attn rel err (max layer)",
        ):
            sweep_table.add_column(col, justify="right")
        for row in rows:
            sweep_table.add_row(
                row["layout"],
                str(row["partition"]),
                f"{row['bytes_ratio']:.4f}",
                f"{row['k_rel_err']:.4f}",
                f"{row['v_rel_err']:.4f}",
                f"{row['attn_rel_err']:.4f}",
                f"{row['attn_rel_err_max']:.4f}",
            )
        console.print(sweep_table)
        result["sweep"] = rows
    if json_out is not None:
        json_out.write_text(json.dumps(result, indent=1))
        console.print(f"wrote {json_out}")
    sys.stdout.flush()

"""`hack-kv eval`: accuracy of HACK and the baselines against 16-bit KV on real text."""

from __future__ import annotations

from pathlib import Path

import typer

from . import app


@app.command("eval")
def eval_cmd(
    model: str = typer.Option(
        None, help="Local checkpoint dir or .gguf; default: embedded SmolLM2-135M"
    ),
    size: str = typer.Option(
        "full", help="full (the committed table, ~15 min on 2 cores) or ci (<1 min)"
    ),
    out_dir: Path = typer.Option(
        Path("benchmarks/results"), help="Where accuracy.{md,json,png} go"
    ),
    data_dir: Path = typer.Option(None, help="Folder with HumanEval.jsonl.gz and gsm8k_test.jsonl"),
    methods: str = typer.Option(None, help="Comma-separated method names (default: all)"),
    n_score: int = typer.Option(None, min=1, help="Override: scoring samples per dataset"),
    threads: int = typer.Option(
        1, min=1, help="torch threads (1 is fastest on shared, busy cores)"
    ),
) -> None:
    """Perplexity, top-1 agreement and KL against 16-bit, greedy continuations, HumanEval similarity."""
    import dataclasses

    import torch

    from ..eval.data import DATA_DIR
    from ..eval.harness import CI, FULL, run_eval
    from ..eval.methods import find_method
    from ..model import ModelNotFound, load_model

    if size not in ("full", "ci"):
        raise typer.BadParameter("size must be full or ci")
    sizes = FULL if size == "full" else CI
    if n_score is not None:
        sizes = dataclasses.replace(sizes, n_score=n_score)
    try:
        chosen = [find_method(n.strip()) for n in methods.split(",")] if methods else None
    except ValueError as e:
        raise typer.BadParameter(str(e)) from e
    torch.set_num_threads(threads)
    try:
        loaded = load_model(model)
    except ModelNotFound as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from e
    try:
        result = run_eval(
            loaded,
            sizes,
            chosen,
            out_dir=out_dir,
            data_dir=data_dir or DATA_DIR,
            stem="accuracy" if size == "full" else "accuracy_ci",
        )
    except FileNotFoundError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from e
    typer.echo(result["paths"]["md"].read_text())
    typer.echo(
        f"wrote {', '.join(str(p) for p in result['paths'].values())} in {result['meta']['seconds']} s"
    )

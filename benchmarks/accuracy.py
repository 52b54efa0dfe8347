"""Accuracy benchmark: `python benchmarks/accuracy.py [--size ci]`, the same as `hack-kv eval`."""

import typer

from hack_integrations.cli.eval import eval_cmd

if __name__ == "__main__":
    typer.run(eval_cmd)

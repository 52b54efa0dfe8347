"""The `hack-kv` command line: one module per sub-command, registered here."""

import typer

app = typer.Typer(help="hack-kv: 2-bit homomorphic KV compression and transfer.", no_args_is_help=True)


def main() -> None:
    app()

"""The `hack-kv` command line: one module per sub-command, registered here."""

import typer

app = typer.Typer(
    help="hack-kv: 2-bit homomorphic KV compression and transfer.", no_args_is_help=True
)


@app.callback()
def _root() -> None:
    """hack-kv: 2-bit homomorphic KV compression and transfer for disaggregated inference."""


def main() -> None:
    app()


# Sub-commands register themselves on `app` when imported.
from . import (  # noqa: E402
    bench,  # noqa: F401
    demo,  # noqa: F401
    eval,  # noqa: F401
    inspect,  # noqa: F401
    serve,  # noqa: F401
)

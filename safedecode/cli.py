"""The `safedecode` command line."""

from __future__ import annotations

import json

import typer

app = typer.Typer(help="safedecode: decoding-time safety alignment that costs no throughput.",
                  no_args_is_help=True, add_completion=False)


@app.command()
def info(as_json: bool = typer.Option(False, "--json", help="Print machine-readable JSON.")):
    """Show which backends loaded here and why others did not."""
    from safedecode import info as info_mod

    if as_json:
        typer.echo(json.dumps(info_mod.collect(), indent=2))
    else:
        typer.echo(info_mod.render())


@app.callback()
def main() -> None:
    """safedecode command line."""


if __name__ == "__main__":
    app()

"""The `staleflow` command line. Each command is a thin shell over a function of services/ (or a side)."""

from __future__ import annotations

import sys
from pathlib import Path

import typer
from rich.console import Console

from services.config import ConfigError, dump_config, load_config

app = typer.Typer(
    help="staleflow: asynchronous RL for LLMs that keeps learning on stale data (M2PO).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
config_app = typer.Typer(help="Inspect configs.", no_args_is_help=True)
app.add_typer(config_app, name="config")

err = Console(stderr=True, soft_wrap=True)


def split_args(args: list[str]) -> tuple[list[str], list[str]]:
    """Positional words are config files (*.yaml) or dotted overrides (k=v)."""
    files = [a for a in args if "=" not in a]
    overrides = [a for a in args if "=" in a]
    return files, overrides


def resolve(args: list[str]):
    files, overrides = split_args(args)
    try:
        return load_config(files, overrides)
    except ConfigError as exc:
        err.print(f"[bold red]config error:[/] {exc}", highlight=False)
        raise typer.Exit(2) from None


@config_app.command("show")
def config_show(args: list[str] = typer.Argument(None, help="FILE.yaml ... key=value ...")) -> None:
    """Print the resolved config (files merged left to right, then overrides)."""
    cfg = resolve(args or [])
    sys.stdout.write(dump_config(cfg))


def main() -> None:  # pragma: no cover - console entry
    app()


if __name__ == "__main__":  # pragma: no cover
    main()

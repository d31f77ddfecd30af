"""Sub-command registration, so that command modules stay independent of each other."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    from billing_cli.cli import sources

    app.add_typer(sources.app, name="sources")

"""Sub-command registration, so that command modules stay independent of each other."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    from billing_cli.cli import sources

    app.add_typer(sources.app, name="sources")
    from billing_cli.cli import status

    app.command("status", help=status.HELP)(status.status_command)
    from billing_cli.cli import usage

    app.command("usage", help=usage.HELP)(usage.usage_command)
    from billing_cli.cli import ledger

    app.command("ledger", help=ledger.HELP)(ledger.ledger_command)
    from billing_cli.cli import ingest

    app.command("ingest", help=ingest.HELP)(ingest.ingest_command)
    from billing_cli.cli import collect, reconcile

    app.command("collect", help=collect.HELP)(collect.collect_command)
    app.command("reconcile", help=reconcile.HELP)(reconcile.reconcile_command)
    from billing_cli.cli import demo

    app.command("demo", help=demo.HELP)(demo.demo_command)

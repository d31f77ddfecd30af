"""Sub-command registration, so that command modules stay independent of each other.

The order here is the order ``billing --help`` lists them: the daily job first, then
monitoring and repair, then the registry, then data in and out.
"""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    from billing_cli.cli import (
        collect,
        demo,
        ingest,
        integrity,
        ledger,
        reconcile,
        sources,
        status,
        usage,
    )

    app.command("collect", help=collect.HELP)(collect.collect_command)
    app.command("status", help=status.HELP)(status.status_command)
    app.add_typer(integrity.app, name="integrity")
    app.command("reconcile", help=reconcile.HELP)(reconcile.reconcile_command)
    app.add_typer(sources.app, name="sources")
    app.command("ingest", help=ingest.HELP)(ingest.ingest_command)
    app.command("usage", help=usage.HELP)(usage.usage_command)
    app.command("ledger", help=ledger.HELP)(ledger.ledger_command)
    app.command("demo", help=demo.HELP)(demo.demo_command)

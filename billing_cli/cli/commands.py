"""Sub-command registration, so that command modules stay independent of each other.

The order here is the order ``billing --help`` lists them: the daily job first, then
monitoring and repair, then the registry, then data in and out.

Registration is lazy: ``billing collect`` runs from cron every minute and should not pay
for importing every other command (the registry editor, the simulator, ...). ``run``
registers only the command named on the line; help and unknown names register all.
"""

from __future__ import annotations

import importlib
from typing import Any

import typer

# name -> (module under billing_cli.cli, "command" function name or "group" Typer app)
COMMANDS: dict[str, tuple[str, str]] = {
    "collect": ("collect", "collect_command"),
    "status": ("status", "status_command"),
    "integrity": ("integrity", "app"),
    "reconcile": ("reconcile", "reconcile_command"),
    "compact": ("compact", "compact_command"),
    "sources": ("sources", "app"),
    "ingest": ("ingest", "ingest_command"),
    "usage": ("usage", "usage_command"),
    "ledger": ("ledger", "ledger_command"),
    "statement": ("statement", "statement_command"),
    "period": ("period", "app"),
    "rerate": ("rerate", "rerate_command"),
    "demo": ("demo", "demo_command"),
}


def new_app(help: str, *, add_completion: bool = False, **settings: Any) -> typer.Typer:
    """A Typer application (the main one or a command group) with the CLI's settings:
    plain help text, one "Did you mean" on a typo (click's own; typer's suggestion would
    repeat it), and shell completion options on the main application only."""
    return typer.Typer(
        help=help,
        no_args_is_help=True,
        add_completion=add_completion,
        rich_markup_mode=None,
        suggest_commands=False,
        **settings,
    )


def register(app: typer.Typer, names: list[str] | None = None) -> None:
    """Add the named commands (all when ``names`` is None) in their listing order; a
    command already registered is left alone."""
    done = {c.name for c in app.registered_commands} | {g.name for g in app.registered_groups}
    for name, (module_name, attr) in COMMANDS.items():
        if name in done or (names is not None and name not in names):
            continue
        module = importlib.import_module(f"billing_cli.cli.{module_name}")
        target = getattr(module, attr)
        if isinstance(target, typer.Typer):
            app.add_typer(target, name=name)
        else:
            app.command(name, help=module.HELP)(target)
    # Registered one by one across runs in one process (tests): keep the listing order.
    order = list(COMMANDS)
    app.registered_commands.sort(key=lambda c: order.index(c.name or ""))
    app.registered_groups.sort(key=lambda g: order.index(g.name or ""))

"""What every command receives: global options resolved once, in one place."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.console import Console

if TYPE_CHECKING:
    from billing_cli.registry.model import Registry

DEFAULT_REGISTRY = "sources.toml"
DEFAULT_DB = "billing.db"


@dataclass
class AppContext:
    registry_path: Path
    registry_explicit: bool  # given by flag or BILLING_REGISTRY, not the default
    db_url: str
    log_format: str = "text"
    verbosity: int = 0  # -1 quiet, 0 normal, 1 verbose (-v), 2 debug (-vv)
    out: Console = field(default_factory=lambda: make_console(stderr=False))
    err: Console = field(default_factory=lambda: make_console(stderr=True))

    @property
    def quiet(self) -> bool:
        return self.verbosity < 0

    @property
    def interactive(self) -> bool:
        """True when attached to a terminal: progress bars allowed. Cron gets summaries only."""
        return self.err.is_terminal and not self.quiet

    def load_registry(self) -> Registry:
        from billing_cli.registry.load import load_registry

        return load_registry(self.registry_path, explicit=self.registry_explicit)


# Piped output (a cron mail, a log, grep) has no width to respect; rich would assume 80
# columns and truncate table cells. Tables take their natural width up to this instead.
PIPED_WIDTH = 200


def make_console(*, stderr: bool) -> Console:
    console = Console(stderr=stderr, soft_wrap=True)
    if not console.is_terminal and "COLUMNS" not in os.environ:
        console = Console(stderr=stderr, soft_wrap=True, width=PIPED_WIDTH)
    return console


def resolve_db_url(flag: str | None) -> str:
    return (
        flag
        or os.environ.get("BILLING_DATABASE_URL")
        or os.environ.get("DATABASE_URL")
        or DEFAULT_DB
    )


def get_context(ctx: typer.Context) -> AppContext:
    root = ctx.find_root()
    obj = root.obj
    if not isinstance(obj, AppContext):  # pragma: no cover - only if invoked outside main()
        raise RuntimeError("billing CLI context missing")
    return obj

"""Tables for people, readable at 80 columns (the defaults) and complete with ``--wide``.

One style for every command's table: a header rule, no outer box, no padding at the edges
(the narrowest rich layout that still lines columns up). Long ids are shortened in the
default view (``--wide`` shows them whole; JSON and CSV always do), times drop what a
minute bucket never has, and free text (errors, details) goes below the table, where it
can take the whole line.
"""

from __future__ import annotations

from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from billing_cli._time import format_rfc3339_ns

SHORT_ID = 8  # characters kept of a long id (a uuid's first group) in the default view

_STATUS_STYLE = {"ok": "green", "failed": "red", "skipped": "yellow"}


def result_table(title: str | None = None) -> Table:
    return Table(
        title=title,
        title_justify="left",
        box=box.SIMPLE_HEAD,
        show_edge=False,
        pad_edge=False,
    )


def status_text(status: str) -> Text:
    return Text(status, style=_STATUS_STYLE.get(status, ""))


def short_id(value: str, keep: int = SHORT_ID) -> str:
    """``6f1c2e9a-0000-4000-8000-000000000001`` -> ``6f1c2e9a…``; short ids stay whole."""
    if len(value) <= keep + 4:
        return value
    return value[:keep] + "…"


def minute_text(ns: int) -> str:
    """A minute bucket start as ``2026-11-24 10:01`` (UTC; the title says so)."""
    full = format_rfc3339_ns(ns)
    return full[:10] + " " + full[11:16]


def second_text(ns: int) -> str:
    """An instant to the second, as ``2026-11-24 10:01:05`` (UTC)."""
    full = format_rfc3339_ns(ns - ns % 1_000_000_000)
    return full[:10] + " " + full[11:19]


def print_notes(console: Console, notes: list[tuple[str, str]]) -> None:
    """Free text under a table: ``label: text`` per line. On a terminal the text wraps at
    word boundaries under itself (the label stays in its own column); piped, each note is
    one whole line (greppable, as cron mails it)."""
    if not notes:
        return
    if not console.is_terminal:
        for label, text in notes:
            console.print(f"  {label}: {text}", markup=False, highlight=False, emoji=False)
        return
    grid = Table.grid(padding=(0, 1))
    grid.add_column(no_wrap=True)
    grid.add_column(overflow="fold")
    for label, text in notes:
        grid.add_row(Text(f" {label}:"), Text(text))
    console.print(grid)

"""Shared plumbing of the read commands (``billing usage``, ``billing ledger``).

Filters are turned into a :class:`RowFilter` here (``--source`` is the only flag that reads
the registry), the store is opened read-only (a missing SQLite file or a database without
the billing schema is an error; nothing is ever created), and rows are written as a rich
table, a JSON list or CSV. JSON and CSV are streamed row by row so that millions of rows
never sit in memory.
"""

from __future__ import annotations

import csv
import json
import os
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Literal, TypeVar

import click
import orjson
import typer
from rich.console import Console
from rich.text import Text

from billing_cli._errors import UsageError
from billing_cli._time import format_rfc3339_ns
from billing_cli.cli._context import AppContext
from billing_cli.cli._flags import period_flag, source_option, time_flag
from billing_cli.cli._tables import print_notes, result_table
from billing_cli.collect.locks import sqlite_path
from billing_cli.core.periods import period_end_ns
from billing_cli.store.base import RowFilter

if TYPE_CHECKING:
    from billing_cli.store.base import Store

OutputFormat = Literal["table", "json", "csv"]
FORMATS: tuple[OutputFormat, ...] = ("table", "json", "csv")
Cell = str | int
T = TypeVar("T")

# The filter and output flags every read command takes (``usage``, ``ledger``).
SourcesOption = Annotated[
    list[str] | None, source_option("Only this source's node_id/env (from the registry).")
]
NodeIdOption = Annotated[str | None, typer.Option("--node-id", help="Only this node_id.")]
EnvOption = Annotated[str | None, typer.Option("--env", help="Only this env.")]
UuidOption = Annotated[str | None, typer.Option("--uuid", help="Only this account (uuid).")]
SinceOption = Annotated[
    str | None,
    typer.Option("--since", help="Buckets starting at or after this time (RFC3339 or 2h)."),
]
UntilOption = Annotated[
    str | None,
    typer.Option("--until", help="Buckets starting before this time (RFC3339 or 2h)."),
]
PeriodOption = Annotated[
    str | None,
    typer.Option("--period", metavar="YYYY-MM", help="Only this calendar month (UTC)."),
]
FormatOption = Annotated[
    str,
    typer.Option("--format", click_type=click.Choice(list(FORMATS)), help="Output format."),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Same as --format json.")]

# Rows rendered as a table are for people; past this many, say so and suggest json/csv.
TABLE_ROW_LIMIT = 10_000
_PIPED_TABLE_WIDTH = 400


# Many rows share a bucket start (every series of one minute): format each instant once.
format_time = lru_cache(maxsize=65_536)(format_rfc3339_ns)


def output_format(fmt: str, as_json: bool) -> OutputFormat:
    """``--format`` (already checked by click) with ``--json`` as a shorthand."""
    if as_json:
        if fmt not in ("table", "json"):
            raise UsageError(f"--json conflicts with --format {fmt}; give one of them")
        return "json"
    for f in FORMATS:
        if f == fmt:
            return f
    raise UsageError(f"--format: expected one of {', '.join(FORMATS)}, got {fmt!r}")


def build_filter(
    app: AppContext,
    *,
    sources: Sequence[str],
    node_id: str | None,
    env: str | None,
    uuid: str | None,
    since: str | None,
    until: str | None,
    period: str | None = None,
    accounting_period: bool = False,
    posted_since: str | None = None,
    posted_until: str | None = None,
) -> RowFilter:
    """The store filter for the common flags; ``--source`` resolves through the registry.

    ``--period`` selects bucket times (``usage``: the same as ``--since``/``--until`` of
    the month, so not beside them), or with ``accounting_period`` the postings accounted
    in that period (``ledger``: corrections carried in included; bucket times still
    filter with ``--since``/``--until``).
    """
    since_ns = time_flag("--since", since)
    until_ns = time_flag("--until", until)
    if since_ns is not None and until_ns is not None and since_ns >= until_ns:
        raise UsageError(f"--since ({since}) must be before --until ({until})")
    period_ns = period_flag("--period", period)
    if period_ns is not None and not accounting_period:
        if since_ns is not None or until_ns is not None:
            raise UsageError(
                "--period selects the month's bucket times: give --period or --since/--until, "
                "not both"
            )
        since_ns, until_ns = period_ns, period_end_ns(period_ns)
    posted_since_ns = time_flag("--posted-since", posted_since)
    posted_until_ns = time_flag("--posted-until", posted_until)
    if (
        posted_since_ns is not None
        and posted_until_ns is not None
        and posted_since_ns >= posted_until_ns
    ):
        raise UsageError(
            f"--posted-since ({posted_since}) must be before --posted-until ({posted_until})"
        )
    pairs: tuple[tuple[str, str], ...] = ()
    if sources:
        registry = app.load_registry()
        # dict keeps order and drops duplicates (two sources may share node_id/env)
        pairs = tuple(
            dict.fromkeys((registry.get(s).node_id, registry.get(s).env) for s in sources)
        )
    return RowFilter(
        node_id=node_id,
        env=env,
        uuid=uuid,
        since_ns=since_ns,
        until_ns=until_ns,
        series_filters=pairs,
        period_start_ns=period_ns if accounting_period else None,
        posted_since_ns=posted_since_ns,
        posted_until_ns=posted_until_ns,
    )


def _sqlite_path(url: str) -> Path | None:
    """The file behind a SQLite URL/path (as ``open_store`` reads it), ``None`` otherwise."""
    if "://" in url and not url.startswith("sqlite://"):
        return None  # a server URL (or an unsupported one: open_store explains)
    path = sqlite_path(url)
    if not path or path == ":memory:":
        return None
    return Path(path).expanduser()


@contextmanager
def open_existing_store(app: AppContext, *, write: bool = False) -> Iterator[Store]:
    """Open the store of a command that works on existing data: read-only (no schema, no
    migration, no lock: DESIGN §8) unless ``write``; a missing SQLite file is a one-line
    error and is never created."""
    from billing_cli.store import open_store

    if write:
        # Data to change must exist: a missing file or a database without the schema is
        # "no billing data" (from the read-only open), never created by this command.
        open_store(app.db_url, read_only=True).close()
    store = open_store(app.db_url, read_only=not write)
    try:
        yield store
    finally:
        store.close()


@contextmanager
def closing_rows(rows: Iterator[T]) -> Iterator[Iterator[T]]:
    """Close a store's row iterator on exit, before the store itself is closed.

    Output may stop early (a capped table, ``| head`` closing the pipe); a store cursor
    left suspended would otherwise be finalised later, against a closed connection.
    """
    try:
        yield rows
    finally:
        close = getattr(rows, "close", None)
        if callable(close):
            close()


def _dumps(row: Mapping[str, Cell]) -> str:
    try:
        return orjson.dumps(row).decode()
    except orjson.JSONEncodeError:
        # orjson stops at 64-bit integers; totals may exceed that. The stdlib is exact.
        return json.dumps(row, separators=(",", ":"))


@dataclass(frozen=True)
class TableSpec:
    """How rows look as a table for people (JSON and CSV always carry every column).

    ``columns`` are the default view (fits 80 columns), ``wide`` the ``--wide`` one;
    ``labels`` are short headers, ``short`` formats a cell for the default view (a short
    id, a minute without seconds), and ``below`` gives the free text of a row (a detail,
    an error) as ``(label, text)``, printed under the table instead of in a column.
    """

    columns: Sequence[str]
    wide: Sequence[str] = ()
    right_aligned: frozenset[str] = frozenset()
    labels: Mapping[str, str] = field(default_factory=dict)
    short: Mapping[str, Callable[[Cell], str]] = field(default_factory=dict)
    below: Callable[[Mapping[str, Cell]], tuple[str, str] | None] | None = None


def write_rows(
    app: AppContext,
    fmt: OutputFormat,
    columns: Sequence[str],
    rows: Iterable[Mapping[str, Cell]],
    *,
    title: str,
    empty_message: str,
    table: TableSpec | None = None,
    wide: bool = False,
) -> int:
    """Write ``rows`` (dicts keyed by ``columns``) in ``fmt``; return how many were written.

    A reader that goes away (``billing usage --json | head``) ends the output quietly: the
    rest of stdout goes to /dev/null so the interpreter's final flush cannot fail either.
    """
    try:
        if fmt == "json":
            return _write_json(rows)
        if fmt == "csv":
            return _write_csv(columns, rows)
        return _write_table(app, table or TableSpec(columns), rows, title, empty_message, wide)
    except BrokenPipeError:
        _silence_stdout()
        return 0


def _silence_stdout() -> None:
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):
        return  # not a real file (tests): nothing will be flushed at exit
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, fd)
    os.close(devnull)


def _write_json(rows: Iterable[Mapping[str, Cell]]) -> int:
    out = sys.stdout
    n = 0
    out.write("[")
    for row in rows:
        out.write(",\n" if n else "\n")
        out.write(_dumps(row))
        n += 1
    out.write("\n]\n" if n else "]\n")
    out.flush()
    return n


def _write_csv(columns: Sequence[str], rows: Iterable[Mapping[str, Cell]]) -> int:
    out = sys.stdout
    n = 0
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        writer.writerow([row[c] for c in columns])
        n += 1
    out.flush()
    return n


def _write_table(
    app: AppContext,
    spec: TableSpec,
    rows: Iterable[Mapping[str, Cell]],
    title: str,
    empty_message: str,
    wide: bool,
) -> int:
    n = 0
    columns = spec.wide if wide and spec.wide else spec.columns
    table = result_table(title)
    for c in columns:
        label = c if wide else spec.labels.get(c, c)
        table.add_column(
            label, justify="right" if c in spec.right_aligned else "left", overflow="fold"
        )
    truncated = False
    notes: list[tuple[str, str]] = []
    for row in rows:
        if n >= TABLE_ROW_LIMIT:
            truncated = True
            break
        cells: list[Text] = []
        for c in columns:
            short = None if wide else spec.short.get(c)
            cells.append(Text(short(row[c]) if short is not None else str(row[c])))
        table.add_row(*cells)
        if spec.below is not None and not wide:
            line = spec.below(row)
            if line:
                notes.append(line)
        n += 1
    if n == 0:
        app.out.print(empty_message)
        return 0
    out = app.out
    if not out.is_terminal:
        # Piped or redirected: rich would squeeze the table into 80 columns and fold every
        # cell. Let it take its natural width instead (it never pads beyond that).
        out = Console(file=sys.stdout, width=_PIPED_TABLE_WIDTH, soft_wrap=True)
    out.print(table)
    print_notes(out, notes)
    if truncated:
        app.err.print(
            f"showing the first {TABLE_ROW_LIMIT} rows; use --totals, narrower filters, "
            "or --format csv/json for all of them"
        )
    return n

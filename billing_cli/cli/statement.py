"""``billing statement``: what to invoice per account for one period (DESIGN §5a).

A pure read of the postings accounted in the period, so the statement of a closed period
prints the same, byte for byte, however much data arrives later: corrections of it are
accounted in the next open period and show up there as ``carried`` lines.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator
from typing import Annotated, Any

import orjson
import typer

from billing_cli._errors import UsageError
from billing_cli.cli._context import get_context
from billing_cli.cli._flags import WideOption, period_flag
from billing_cli.cli._period import (
    STATEMENT_COLUMNS,
    close_fields,
    close_of,
    close_text,
    statement_lines,
)
from billing_cli.cli._rows import (
    Cell,
    EnvOption,
    FormatOption,
    JsonOption,
    NodeIdOption,
    SourcesOption,
    TableSpec,
    build_filter,
    open_existing_store,
    output_format,
    write_rows,
)
from billing_cli.cli._tables import short_id
from billing_cli.core.periods import format_period

HELP = """\
Print the statement of one accounting period (a calendar month, UTC): per account
(uuid) its email, uplink/downlink/total bytes, included bytes used, rated bytes, the
charges of the period's own usage, the adjustments carried in from closed periods (one
line per period they correct), the amount to invoice, currency and rule versions; then
a total per currency.

It only reads the postings accounted in the period, so once the period is closed
(`billing period close`) its statement never changes: late data and reconciles post
their corrections into the next open period instead. --format json gives one object
(period, state, closed_at, close_run_id, closed_by, lines); csv has the lines with the
same columns (period, line, uuid, email, corrects_period, currency, uplink_bytes,
downlink_bytes, total_bytes, included_bytes_used, rated_bytes, charges, adjustments,
amount, rule_versions). line is account, carried or total.

Exit status: 0 (also for a period without postings), 2 on a bad flag, registry or
--source, 4 when the database is missing or cannot be read.

Examples:

  billing statement --period 2026-11

  billing statement --period 2026-11 --uuid 6f1c2e9a-0000-4000-8000-000000000001

  billing statement --period 2026-11 --source node-a-prod --format csv > nov.csv

  billing statement --period 2026-12 --json | jq '.lines[] | select(.line == "carried")'
"""

_TABLE_COLUMNS = (
    "line",
    "uuid",
    "email",
    "corrects_period",
    "total_bytes",
    "included_bytes_used",
    "rated_bytes",
    "charges",
    "adjustments",
    "amount",
    "currency",
)
_NUMERIC = frozenset(
    {"total_bytes", "included_bytes_used", "rated_bytes", "charges", "adjustments", "amount"}
)
# At 80 columns: the line, the account (short uuid, email), what it corrects, bytes,
# amount; --wide: every column (quota used, rated bytes, charges and adjustments apart).
_TABLE = TableSpec(
    columns=("line", "uuid", "email", "corrects_period", "total_bytes", "amount", "currency"),
    wide=_TABLE_COLUMNS,
    right_aligned=_NUMERIC,
    labels={"corrects_period": "corrects", "total_bytes": "bytes", "currency": "cur"},
    short={"uuid": lambda v: short_id(str(v))},
)


def _csv_rows(lines: Iterable[dict[str, Any]]) -> Iterator[dict[str, Cell]]:
    for line in lines:
        yield {**line, "rule_versions": ";".join(line["rule_versions"])}


def _table_rows(lines: Iterable[dict[str, Any]]) -> Iterator[dict[str, Cell]]:
    for line in lines:
        yield {c: "" if v is None else v for c, v in line.items()}


def statement_command(
    ctx: typer.Context,
    period: Annotated[
        str | None,
        typer.Option("--period", metavar="YYYY-MM", help="The period, e.g. 2026-11 (required)."),
    ] = None,
    uuid: Annotated[
        list[str] | None,
        typer.Option("--uuid", metavar="UUID", help="Only this account. Repeatable."),
    ] = None,
    source: SourcesOption = None,
    node_id: NodeIdOption = None,
    env: EnvOption = None,
    wide: WideOption = False,
    fmt: FormatOption = "table",
    as_json: JsonOption = False,
) -> None:
    app = get_context(ctx)
    out_fmt = output_format(fmt, as_json)
    if period is None:
        raise UsageError("--period is required: the month to print, e.g. --period 2026-11")
    period_ns = period_flag("--period", period)
    assert period_ns is not None
    flt = build_filter(
        app, sources=source or (), node_id=node_id, env=env, uuid=None, since=None, until=None
    )
    flt = dataclasses.replace(flt, uuids=tuple(dict.fromkeys(uuid or ())))
    with open_existing_store(app) as store:
        st = store.statement(period_ns, flt)
        close = close_of(store, period_ns)
    lines = list(statement_lines(st))
    if out_fmt == "json":
        doc = {"period": format_period(period_ns), **close_fields(close), "lines": lines}
        typer.echo(orjson.dumps(doc, option=orjson.OPT_INDENT_2).decode())
        return
    if out_fmt == "csv":
        write_rows(app, "csv", STATEMENT_COLUMNS, _csv_rows(lines), title="", empty_message="")
        return
    write_rows(
        app,
        "table",
        _TABLE_COLUMNS,
        _table_rows(lines),
        title=f"Statement {format_period(period_ns)} ({close_text(close)})",
        empty_message=f"No postings are accounted in {format_period(period_ns)}.",
        table=_TABLE,
        wide=wide,
    )

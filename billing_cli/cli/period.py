"""``billing period list|close``: accounting periods and closing them (DESIGN §5a).

A period is a calendar month (UTC). Closing one records who and when as a run (kind
``period_close``) and freezes its statement: from then on a change to one of its
buckets posts its correction into the first open period after it. There is no reopen.
"""

from __future__ import annotations

import getpass
import socket
from collections.abc import Iterable, Iterator
from typing import Annotated, Any

import orjson
import typer

from billing_cli._errors import UsageError
from billing_cli._time import format_rfc3339_ns, now_ns
from billing_cli.cli._context import get_context
from billing_cli.cli._flags import WideOption, period_flag
from billing_cli.cli._period import (
    TOTALS_COLUMNS,
    close_fields,
    open_store_for_writing,
    totals_json,
)
from billing_cli.cli._rows import (
    Cell,
    FormatOption,
    JsonOption,
    TableSpec,
    open_existing_store,
    output_format,
    write_rows,
)
from billing_cli.cli.commands import new_app
from billing_cli.core.money import format_amount
from billing_cli.core.periods import format_period, next_period, period_end_ns
from billing_cli.store.base import PeriodTotals, RowFilter

HELP = """\
Accounting periods (calendar months, UTC): list them with their totals, and close one
once its invoices are issued. A closed period is final: its statement never changes;
later corrections of its buckets are posted into the first open period after it.

Examples:

\b
  billing period list
  billing period list --json | jq '.[] | select(.state == "open")'
  billing period close 2026-11
  billing period close 2026-11 --by alice --json
"""

app = new_app(HELP)

COLUMNS = (
    "period",
    "state",
    "closed_at",
    "close_run_id",
    "closed_by",
    "currency",
    "postings",
    "total_bytes",
    "rated_bytes",
    "amount",
)
_NUMERIC = frozenset({"close_run_id", "postings", "total_bytes", "rated_bytes", "amount"})
# At 80 columns: the period, open/closed (and when, to the minute), bytes, amount; --wide:
# every column (the close run, who closed it, postings, rated bytes).
_TABLE = TableSpec(
    columns=("period", "state", "closed_at", "currency", "total_bytes", "amount"),
    wide=COLUMNS,
    right_aligned=_NUMERIC,
    labels={"closed_at": "closed (UTC)", "total_bytes": "bytes", "currency": "cur"},
    short={"closed_at": lambda v: str(v)[:16].replace("T", " ")},
)
_TOTALS_TABLE = TableSpec(
    columns=("currency", "accounts", "total_bytes", "included_bytes_used", "amount"),
    wide=TOTALS_COLUMNS,
    right_aligned=frozenset(TOTALS_COLUMNS) - {"currency"},
    labels={"total_bytes": "bytes", "included_bytes_used": "included used", "currency": "cur"},
)

LIST_HELP = """\
List every accounting period that has postings or was closed, oldest first: open or
closed (when, by which run and whom), and its totals per currency — postings, bytes
(uplink + downlink), rated bytes and amount of the postings accounted in it, corrections
carried in from closed periods included.

--format json gives a list of objects (period, state, closed_at, close_run_id,
closed_by, currency, postings, total_bytes, rated_bytes, amount; closed_* are null while
open); csv has the same columns.

Exit status: 0, 2 on a bad flag, 4 when the database is missing or cannot be read.

Examples:

\b
  billing period list
  billing period list --format csv > periods.csv
  billing period list --json | jq -r '.[] | select(.state == "open") | .period'
"""


def _rows(totals: Iterable[PeriodTotals]) -> Iterator[dict[str, Any]]:
    for t in totals:
        c = t.closed
        yield {
            "period": format_period(t.period_start_ns),
            "state": "open" if c is None else "closed",
            "closed_at": None if c is None else format_rfc3339_ns(c.closed_at_ns),
            "close_run_id": None if c is None else c.run_id,
            "closed_by": None if c is None else c.actor,
            "currency": t.currency,
            "postings": t.postings,
            "total_bytes": t.total_bytes,
            "rated_bytes": t.rated_bytes,
            "amount": format_amount(t.amount_nano),
        }


def _cells(rows: Iterable[dict[str, Any]]) -> Iterator[dict[str, Cell]]:
    """Rows for CSV or a table: null as empty."""
    for row in rows:
        yield {k: "" if v is None else v for k, v in row.items()}


@app.command("list", help=LIST_HELP)
def list_command(
    ctx: typer.Context,
    wide: WideOption = False,
    fmt: FormatOption = "table",
    as_json: JsonOption = False,
) -> None:
    app_ctx = get_context(ctx)
    out_fmt = output_format(fmt, as_json)
    with open_existing_store(app_ctx) as store:
        totals = store.period_totals()
    rows = list(_rows(totals))
    if out_fmt == "json":
        typer.echo(orjson.dumps(rows, option=orjson.OPT_INDENT_2).decode())
        return
    write_rows(
        app_ctx,
        out_fmt,
        COLUMNS,
        _cells(rows),
        title="Accounting periods",
        empty_message="No periods yet: nothing has been posted.",
        table=_TABLE,
        wide=wide,
    )


CLOSE_HELP = """\
Close PERIOD (YYYY-MM) after its invoices are issued, and print its final statement
totals. Only a period that has ended can be closed (the error says when it ends).
Closing is recorded in runs (kind period_close) with the time and who (--by, default
user@host); closing a closed period again changes nothing and says when it was closed.
There is no reopen.

After the close, anything that changes one of its buckets (late items, reconcile,
rerate of the next period) posts its adjustment into the first open period after it,
naming the bucket it corrects; its statement stays byte-identical. A warning names each
source whose collected data does not yet reach the end of the period.

--json gives one object: period, closed_now (false when it was closed already),
state, closed_at, close_run_id, closed_by, totals (per currency: currency, accounts,
uplink_bytes, downlink_bytes, total_bytes, included_bytes_used, rated_bytes, charges,
adjustments, amount).

Exit status: 0 closed (or already closed), 2 for a bad or unfinished period, 4 when the
database is missing or cannot be written.

Examples:

\b
  billing period close 2026-11
  billing period close 2026-11 --by alice@billing-ops --json
"""


def _default_actor() -> str:
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    return f"{user}@{socket.gethostname()}"


@app.command("close", help=CLOSE_HELP)
def close_command(
    ctx: typer.Context,
    period: Annotated[str, typer.Argument(metavar="PERIOD", help="The month, YYYY-MM.")],
    by: Annotated[
        str | None,
        typer.Option("--by", help="Who closes it (recorded in runs). [default: user@host]"),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object.")] = False,
    wide: WideOption = False,
) -> None:
    app_ctx = get_context(ctx)
    period_ns = period_flag("PERIOD", period)
    assert period_ns is not None
    actor = (by if by is not None else _default_actor()).strip()
    if not actor:
        raise UsageError("--by: must not be empty (who closes the period)")
    # The registry is optional here, but when there is one its enabled sources that have
    # never collected are behind too (read before the close: a broken one stops nothing yet).
    registered: list[str] = []
    if app_ctx.registry_explicit or app_ctx.registry_path.exists():
        registered = [s.source_id for s in app_ctx.load_registry().enabled_sources()]
    with open_store_for_writing(app_ctx) as store:
        close, made = store.close_period(period_ns, actor=actor, now_ns=now_ns())
        st = store.statement(period_ns, RowFilter())
        end = period_end_ns(period_ns)
        checkpoints = {cp.source_id: cp for cp in store.list_checkpoints()} if made else {}
    behind: list[tuple[str, int | None]] = []
    for sid in sorted(set(checkpoints) | (set(registered) if made else set())):
        cp = checkpoints.get(sid)
        until = cp.last_successful_until_ns if cp is not None else None
        if until is None or until < end:
            behind.append((sid, until))
    name = format_period(period_ns)
    if as_json:
        doc = {
            "period": name,
            "closed_now": made,
            **close_fields(close),
            "totals": [totals_json(t) for t in st.totals],
        }
        typer.echo(orjson.dumps(doc, option=orjson.OPT_INDENT_2).decode())
    elif not app_ctx.quiet:
        when = format_rfc3339_ns(close.closed_at_ns)
        if made:
            head = f"closed {name} at {when} by {close.actor} (run {close.run_id})"
        else:
            head = (
                f"{name} was already closed at {when} by {close.actor} (run {close.run_id});"
                " nothing changed"
            )
        app_ctx.out.print(head, markup=False, highlight=False)
        write_rows(
            app_ctx,
            "table",
            TOTALS_COLUMNS,
            (totals_json(t) for t in st.totals),
            title=f"Final statement totals {name}",
            empty_message=f"No postings are accounted in {name}.",
            table=_TOTALS_TABLE,
            wide=wide,
        )
    if behind and not app_ctx.quiet:
        nxt = format_period(next_period(period_ns))
        for sid, until in behind:
            upto = "nothing yet" if until is None else f"only up to {format_rfc3339_ns(until)}"
            app_ctx.err.print(
                f"warning: source '{sid}' has collected {upto}: its later data for "
                f"{name} will be carried into {nxt} or later",
                markup=False,
                highlight=False,
            )

"""``billing ledger``: the append-only rated ledger (charges and adjustments), or totals."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Annotated

import typer

from billing_cli.cli._context import get_context
from billing_cli.cli._flags import WideOption
from billing_cli.cli._rows import (
    Cell,
    EnvOption,
    FormatOption,
    JsonOption,
    NodeIdOption,
    SinceOption,
    SourcesOption,
    TableSpec,
    UntilOption,
    UuidOption,
    build_filter,
    closing_rows,
    format_time,
    open_existing_store,
    output_format,
    write_rows,
)
from billing_cli.cli._tables import short_id
from billing_cli.core.money import format_amount
from billing_cli.core.periods import format_period
from billing_cli.store.base import LedgerRow

HELP = """\
Show ledger postings: per bucket a charge (revision 0), then adjustments that carry only
the difference when late data or a reconcile re-rated it. The postings of a bucket add up
to its current rating; nothing is ever updated or deleted.

Every posting is accounted in a period (a calendar month, UTC): its bucket's month, or,
when it corrects a bucket of a closed period, the first open period after it.
--period YYYY-MM selects the postings accounted in that period (what its statement adds
up). --since (inclusive) and --until (exclusive) filter on the bucket the posting belongs
to, --posted-since/--posted-until on when it was posted; each RFC3339 with a zone or a
duration ago such as 2h or 7d. amount is a decimal string in currency units with nine
decimals (exact; never a float). --totals prints one row per uuid and currency (uuid,
rated_bytes, amount, currency). --format json gives a list of objects (entry_id,
node_id, env, uuid, inbound_tag, bucket_start, revision, entry_type, rated_bytes,
amount, currency, pricing_rule_version, run_id, created_at, accounting_period,
uplink_bytes, downlink_bytes, included_bytes: the differences each posting carries);
csv has the same columns.

Exit status: 0 on success (also when no row matches), 2 on a bad flag, registry or
--source, 4 when the database is missing or cannot be read.

Examples:

  billing ledger --since 1h

  billing ledger --since 2026-11-01T00:00:00Z --until 2026-12-01T00:00:00Z --totals

  billing ledger --period 2026-12 --since 2026-11-01T00:00:00Z --until 2026-12-01T00:00:00Z

  billing ledger --posted-since 24h --format json

  billing ledger --uuid 6f1c2e9a-0000-4000-8000-000000000001 --format json

  billing ledger --source node-a-prod --since 7d --format csv > ledger.csv

  billing ledger --format json | jq '[.[] | select(.entry_type == "adjustment")]'
"""

COLUMNS = (
    "entry_id",
    "node_id",
    "env",
    "uuid",
    "inbound_tag",
    "bucket_start",
    "revision",
    "entry_type",
    "rated_bytes",
    "amount",
    "currency",
    "pricing_rule_version",
    "run_id",
    "created_at",
    "accounting_period",
    "uplink_bytes",
    "downlink_bytes",
    "included_bytes",
)
TOTAL_COLUMNS = ("uuid", "rated_bytes", "amount", "currency")
_NUMERIC = frozenset(
    {
        "entry_id",
        "revision",
        "rated_bytes",
        "amount",
        "run_id",
        "uplink_bytes",
        "downlink_bytes",
        "included_bytes",
    }
)
_LABELS = {
    "bucket_start": "bucket (UTC)",
    "entry_type": "type",
    "rated_bytes": "bytes",
    "currency": "cur",
}
# At 80 columns: bucket, account (short uuid), node, charge or adjustment, bytes, amount;
# --wide: every column, full uuids and RFC3339 times.
TABLE = TableSpec(
    columns=("bucket_start", "uuid", "node_id", "entry_type", "rated_bytes", "amount", "currency"),
    wide=COLUMNS,
    right_aligned=_NUMERIC,
    labels=_LABELS,
    short={
        "uuid": lambda v: short_id(str(v)),
        "bucket_start": lambda v: str(v)[:16].replace("T", " "),
        "entry_type": lambda v: "adjust" if v == "adjustment" else str(v),
    },
)
TOTALS_TABLE = TableSpec(
    columns=TOTAL_COLUMNS,
    wide=TOTAL_COLUMNS,
    right_aligned=frozenset({"rated_bytes", "amount"}),
    labels={"rated_bytes": "rated bytes"},
)


def posting_rows(rows: Iterable[LedgerRow]) -> Iterator[dict[str, Cell]]:
    for r in rows:
        yield {
            "entry_id": r.entry_id,
            "node_id": r.node_id,
            "env": r.env,
            "uuid": r.uuid,
            "inbound_tag": r.inbound_tag,
            "bucket_start": format_time(r.bucket_start_ns),
            "revision": r.revision,
            "entry_type": r.entry_type,
            "rated_bytes": r.rated_bytes,
            "amount": format_amount(r.amount_nano),
            "currency": r.currency,
            "pricing_rule_version": r.pricing_rule_version,
            "run_id": r.run_id,
            "created_at": format_time(r.created_at_ns),
            "accounting_period": format_period(r.period_start_ns),
            "uplink_bytes": r.uplink_bytes,
            "downlink_bytes": r.downlink_bytes,
            "included_bytes": r.included_bytes,
        }


def total_rows(rows: Iterable[LedgerRow]) -> Iterator[dict[str, Cell]]:
    """One row per (uuid, currency), ordered by uuid then currency; sums are exact ints."""
    acc: dict[tuple[str, str], list[int]] = {}
    for r in rows:
        cur = acc.setdefault((r.uuid, r.currency), [0, 0])
        cur[0] += r.rated_bytes
        cur[1] += r.amount_nano
    for uuid, currency in sorted(acc):
        rated, amount = acc[(uuid, currency)]
        yield {
            "uuid": uuid,
            "rated_bytes": rated,
            "amount": format_amount(amount),
            "currency": currency,
        }


def ledger_command(
    ctx: typer.Context,
    source: SourcesOption = None,
    node_id: NodeIdOption = None,
    env: EnvOption = None,
    uuid: UuidOption = None,
    since: SinceOption = None,
    until: UntilOption = None,
    period: Annotated[
        str | None,
        typer.Option(
            "--period",
            metavar="YYYY-MM",
            help="Only postings accounted in this period (corrections carried in included).",
        ),
    ] = None,
    posted_since: Annotated[
        str | None,
        typer.Option("--posted-since", help="Postings made at or after this time (RFC3339 or 2h)."),
    ] = None,
    posted_until: Annotated[
        str | None,
        typer.Option("--posted-until", help="Postings made before this time (RFC3339 or 2h)."),
    ] = None,
    totals: Annotated[
        bool,
        typer.Option("--totals", help="One row per uuid (and currency): rated bytes, amount."),
    ] = False,
    wide: WideOption = False,
    fmt: FormatOption = "table",
    as_json: JsonOption = False,
) -> None:
    app = get_context(ctx)
    out_fmt = output_format(fmt, as_json)
    flt = build_filter(
        app,
        sources=source or (),
        node_id=node_id,
        env=env,
        uuid=uuid,
        since=since,
        until=until,
        period=period,
        accounting_period=True,
        posted_since=posted_since,
        posted_until=posted_until,
    )
    with open_existing_store(app) as store, closing_rows(store.iter_ledger(flt)) as rows:
        if totals:
            write_rows(
                app,
                out_fmt,
                TOTAL_COLUMNS,
                total_rows(rows),
                title="Ledger totals per uuid",
                empty_message="No ledger postings match these filters.",
                table=TOTALS_TABLE,
                wide=wide,
            )
            return
        write_rows(
            app,
            out_fmt,
            COLUMNS,
            posting_rows(rows),
            title="Ledger postings",
            empty_message="No ledger postings match these filters.",
            table=TABLE,
            wide=wide,
        )

"""``billing usage``: per-minute usage buckets (or hour/day roll-ups, or per-uuid totals)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Annotated

import click
import typer

from billing_cli._time import NS_PER_MINUTE
from billing_cli.cli._context import get_context
from billing_cli.cli._flags import WideOption
from billing_cli.cli._rows import (
    Cell,
    EnvOption,
    FormatOption,
    JsonOption,
    NodeIdOption,
    PeriodOption,
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
from billing_cli.core.types import SeriesKey
from billing_cli.store.base import UsageRow

HELP = """\
Show usage buckets: bytes per series (node_id, env, uuid, inbound_tag) per minute.

Times are bucket starts in UTC; --since is inclusive and --until exclusive, each RFC3339
with a zone or a duration meaning "that long ago" (2h, 7d); --period YYYY-MM is one
calendar month (UTC) of bucket starts. With no filter, every row is
shown. --by hour|day adds up the minute buckets of each series per hour or UTC day.
--totals prints one row per uuid instead. --format json gives a list of objects
(node_id, env, uuid, inbound_tag, bucket_start, uplink_bytes, downlink_bytes,
total_bytes); csv has the same columns.

Exit status: 0 on success (also when no row matches), 2 on a bad flag, registry or
--source, 4 when the database is missing or cannot be read.

Examples:

  billing usage --since 1h

  billing usage --uuid 6f1c2e9a-0000-4000-8000-000000000001 --by day

  billing usage --period 2026-11 --totals

  billing usage --source node-a-prod --since 2026-11-01T00:00:00Z --until 2026-12-01T00:00:00Z

  billing usage --env prod --since 30d --totals --format csv > usage.csv

  billing usage --node-id node-a --format json | jq 'map(.total_bytes) | add'
"""

COLUMNS = (
    "node_id",
    "env",
    "uuid",
    "inbound_tag",
    "bucket_start",
    "uplink_bytes",
    "downlink_bytes",
    "total_bytes",
)
TOTAL_COLUMNS = ("uuid", "uplink_bytes", "downlink_bytes", "total_bytes")
_NUMERIC = frozenset({"uplink_bytes", "downlink_bytes", "total_bytes"})
_LABELS = {
    "bucket_start": "bucket (UTC)",
    "inbound_tag": "tag",
    "uplink_bytes": "uplink",
    "downlink_bytes": "downlink",
    "total_bytes": "bytes",
}
# At 80 columns: the bucket to the minute, the series with a short uuid, and the bytes;
# --wide: every column as stored, full uuids and RFC3339 times.
TABLE = TableSpec(
    columns=("bucket_start", "node_id", "env", "uuid", "inbound_tag", "total_bytes"),
    wide=COLUMNS,
    right_aligned=_NUMERIC,
    labels=_LABELS,
    short={
        "uuid": lambda v: short_id(str(v)),
        "bucket_start": lambda v: str(v)[:16].replace("T", " "),
    },
)
TOTALS_TABLE = TableSpec(
    columns=TOTAL_COLUMNS,
    wide=TOTAL_COLUMNS,
    right_aligned=_NUMERIC,
    labels={**_LABELS, "total_bytes": "total"},
)
BY_NS = {"minute": NS_PER_MINUTE, "hour": 60 * NS_PER_MINUTE, "day": 1440 * NS_PER_MINUTE}


def _row(key: tuple[str, str, str, str], start_ns: int, up: int, down: int) -> dict[str, Cell]:
    return {
        "node_id": key[0],
        "env": key[1],
        "uuid": key[2],
        "inbound_tag": key[3],
        "bucket_start": format_time(start_ns),
        "uplink_bytes": up,
        "downlink_bytes": down,
        "total_bytes": up + down,
    }


def minute_rows(rows: Iterable[UsageRow]) -> Iterator[dict[str, Cell]]:
    for r in rows:
        key = (r.node_id, r.env, r.uuid, r.inbound_tag)
        yield _row(key, r.bucket_start_ns, r.uplink_bytes, r.downlink_bytes)


def rollup_rows(rows: Iterable[UsageRow], width_ns: int) -> Iterator[dict[str, Cell]]:
    """Add minute buckets per series per ``width_ns`` period (UTC-aligned).

    Holds one entry per output row (not per input row), then emits them in time, then
    series key order — a deterministic order whatever order the store returned.
    """
    acc: dict[tuple[int, SeriesKey], list[int]] = {}
    for r in rows:
        k = (
            r.bucket_start_ns - r.bucket_start_ns % width_ns,
            SeriesKey(r.node_id, r.env, r.uuid, r.inbound_tag),
        )
        cur = acc.get(k)
        if cur is None:
            acc[k] = [r.uplink_bytes, r.downlink_bytes]
        else:
            cur[0] += r.uplink_bytes
            cur[1] += r.downlink_bytes
    for (start, key), (up, down) in sorted(acc.items()):
        yield _row(key, start, up, down)


def total_rows(rows: Iterable[UsageRow]) -> Iterator[dict[str, Cell]]:
    """One row per uuid, ordered by uuid."""
    acc: dict[str, list[int]] = {}
    for r in rows:
        cur = acc.setdefault(r.uuid, [0, 0])
        cur[0] += r.uplink_bytes
        cur[1] += r.downlink_bytes
    for uuid in sorted(acc):
        up, down = acc[uuid]
        yield {"uuid": uuid, "uplink_bytes": up, "downlink_bytes": down, "total_bytes": up + down}


def usage_command(
    ctx: typer.Context,
    source: SourcesOption = None,
    node_id: NodeIdOption = None,
    env: EnvOption = None,
    uuid: UuidOption = None,
    since: SinceOption = None,
    until: UntilOption = None,
    period: PeriodOption = None,
    by: Annotated[
        str,
        typer.Option(
            "--by",
            click_type=click.Choice(list(BY_NS)),
            help="Bucket width of the output: minute (as stored), hour or UTC day.",
        ),
    ] = "minute",
    totals: Annotated[
        bool, typer.Option("--totals", help="One row per uuid with summed bytes.")
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
    )
    with open_existing_store(app) as store, closing_rows(store.iter_usage(flt)) as rows:
        if totals:
            write_rows(
                app,
                out_fmt,
                TOTAL_COLUMNS,
                total_rows(rows),
                title="Usage totals per uuid (bytes)",
                empty_message="No usage matches these filters.",
                table=TOTALS_TABLE,
                wide=wide,
            )
            return
        out_rows = minute_rows(rows) if by == "minute" else rollup_rows(rows, BY_NS[by])
        write_rows(
            app,
            out_fmt,
            COLUMNS,
            out_rows,
            title=f"Usage per {by}",
            empty_message="No usage matches these filters.",
            table=TABLE,
            wide=wide,
        )

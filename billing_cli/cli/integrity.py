"""``billing integrity``: list and acknowledge integrity events (DESIGN §6).

Events (conflicts, counter anomalies, rejected samples, identity mismatches) are written
by ``apply`` and the collector and stay *open* until acknowledged; ``billing status``
counts the open ones per source. Acknowledging only sets ``acknowledged_at`` (the first
time); nothing is deleted, so ``list --all`` keeps the history.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Annotated

import click
import orjson
import typer

from billing_cli._errors import UsageError
from billing_cli._time import format_rfc3339_ns, now_ns
from billing_cli.cli._context import get_context
from billing_cli.cli._flags import WideOption, id_flag, source_option, time_flag
from billing_cli.cli._rows import (
    Cell,
    TableSpec,
    closing_rows,
    open_existing_store,
    write_rows,
)
from billing_cli.cli._tables import short_id
from billing_cli.cli.commands import new_app
from billing_cli.store.base import INTEGRITY_KINDS, IntegrityEvent, IntegrityKind

HELP = """\
List and acknowledge integrity events: conflicts, counter anomalies, rejected samples
and identity mismatches (an exporter answering for another node_id/env).

An event stays open until acknowledged; `billing status` shows the open ones per source.
Acknowledging records when, and never deletes anything.

Examples:

\b
  billing integrity list
  billing integrity list --source node-a-prod --kind identity_mismatch --json
  billing integrity ack 12 13
  billing integrity ack --source node-a-prod
"""

app = new_app(HELP)

COLUMNS = (
    "id",
    "kind",
    "node_id",
    "env",
    "uuid",
    "inbound_tag",
    "collected_at",
    "source_id",
    "run_id",
    "detail",
    "created_at",
    "acknowledged_at",
)
# At 80 columns: which event, of what and when; the detail goes below the table, one line
# per event. --wide: every column, the detail in the table. All of it is in --json.
TABLE = TableSpec(
    columns=("id", "kind", "source_id", "uuid", "collected_at"),
    wide=(
        "id",
        "kind",
        "source_id",
        "node_id",
        "env",
        "uuid",
        "inbound_tag",
        "collected_at",
        "run_id",
        "created_at",
        "acknowledged_at",
        "detail",
    ),
    right_aligned=frozenset({"id", "run_id"}),
    labels={"source_id": "source", "collected_at": "collected at (UTC)"},
    short={
        "uuid": lambda v: short_id(str(v)),
        "collected_at": lambda v: str(v)[:19].replace("T", " "),
    },
    below=lambda row: (str(row["id"]), str(row["detail"])),
)


def _time(ns: int | None) -> str | None:
    return None if ns is None else format_rfc3339_ns(ns)


def event_json(e: IntegrityEvent) -> dict[str, Cell | None]:
    return {
        "id": e.id,
        "kind": e.kind,
        "node_id": e.node_id,
        "env": e.env,
        "uuid": e.uuid,
        "inbound_tag": e.inbound_tag,
        "collected_at": _time(e.collected_at_ns),
        "source_id": e.source_id,
        "run_id": e.run_id,
        "detail": e.detail,
        "created_at": format_rfc3339_ns(e.created_at_ns),
        "acknowledged_at": _time(e.acknowledged_at_ns),
    }


def _table_rows(events: Iterable[IntegrityEvent]) -> Iterator[dict[str, Cell]]:
    # Cells are plain text (never rich markup): details quote exporter data such as "[/]".
    for e in events:
        yield {c: "" if v is None else v for c, v in event_json(e).items()}


def _print_json(payload: object) -> None:
    # Plain stdout, not rich: no markup or wrapping may touch the JSON text.
    click.echo(orjson.dumps(payload, option=orjson.OPT_INDENT_2).decode())


LIST_HELP = """\
List integrity events, oldest first: open ones by default, --all for acknowledged too.

--since filters on when the event was recorded (RFC3339 with a zone, or a duration ago
such as 2h or 7d). The table fits 80 columns with each event's detail below it; --wide
puts every column in the table. --json gives a list of objects (id, kind, node_id, env, uuid,
inbound_tag, collected_at, source_id, run_id, detail, created_at, acknowledged_at);
times are RFC3339 UTC, missing values null.

Exit status: 0 (also when nothing matches), 2 on a bad flag, 4 when the database is
missing or cannot be read.

Examples:

\b
  billing integrity list
  billing integrity list --source node-a-prod --since 24h
  billing integrity list --kind conflict --all --json
  billing integrity list --json | jq -r '.[] | select(.kind == "anomaly") | .detail'
"""

# Checked here rather than by click.Choice: a bad value is one line, like other flags.
KindOption = Annotated[
    str | None,
    typer.Option(
        "--kind",
        metavar="KIND",
        help=f"Only events of this kind: {', '.join(INTEGRITY_KINDS)}.",
    ),
]


def _kind(value: str | None) -> IntegrityKind | None:
    if value is None:
        return None
    for k in INTEGRITY_KINDS:
        if k == value:
            return k
    raise UsageError(f"--kind: expected one of {', '.join(INTEGRITY_KINDS)}, got {value!r}")


def _ids(values: list[str] | None) -> list[int]:
    return [id_flag("integrity ack: event id", v) for v in values or ()]


@app.command("list", help=LIST_HELP)
def list_events(
    ctx: typer.Context,
    source: Annotated[list[str] | None, source_option("Only this source's events.")] = None,
    kind: KindOption = None,
    show_all: Annotated[bool, typer.Option("--all", help="Include acknowledged events.")] = False,
    since: Annotated[
        str | None,
        typer.Option("--since", help="Events recorded at or after this time (RFC3339 or 2h)."),
    ] = None,
    wide: WideOption = False,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    app_ctx = get_context(ctx)
    since_ns = time_flag("--since", since)
    wanted = _kind(kind)
    with (
        open_existing_store(app_ctx) as store,
        closing_rows(
            store.iter_integrity_events(
                source_id=source or None, kind=wanted, open_only=not show_all, since_ns=since_ns
            )
        ) as events,
    ):
        if as_json:
            _print_json([event_json(e) for e in events])
            return
        write_rows(
            app_ctx,
            "table",
            COLUMNS,
            _table_rows(events),
            title="Integrity events" if show_all else "Open integrity events",
            empty_message=(
                "No integrity events match these filters."
                if show_all
                else "No open integrity events match these filters."
            ),
            table=TABLE,
            wide=wide,
        )


ACK_HELP = """\
Acknowledge open integrity events: by id, every open event of one --source, or
--all-open. Already acknowledged events keep their first acknowledgement time. Prints
how many events were acknowledged (--json: {"acknowledged": N}).

Exit status: 0, 2 when neither ids, --source nor --all-open is given or an id matches no
event ("no such event"; then nothing is acknowledged), 4 when the database is missing or
cannot be read.

Examples:

\b
  billing integrity ack 12 13
  billing integrity ack --source node-a-prod
  billing integrity ack --all-open --json
"""


@app.command("ack", help=ACK_HELP)
def ack_events(
    ctx: typer.Context,
    ids: Annotated[
        list[str] | None, typer.Argument(metavar="[ID]...", help="Event ids (from list).")
    ] = None,
    source: Annotated[
        list[str] | None,
        source_option("Open events of this source (with ids: of those, only this source's)."),
    ] = None,
    all_open: Annotated[
        bool, typer.Option("--all-open", help="Every open event of every source.")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    app_ctx = get_context(ctx)
    event_ids = _ids(ids)
    if not event_ids and not source and not all_open:
        raise UsageError("integrity ack: give event IDs, --source ID or --all-open")
    if all_open and (event_ids or source):
        raise UsageError("integrity ack: --all-open acknowledges everything; drop IDs/--source")
    with open_existing_store(app_ctx, write=True) as store:
        if event_ids:
            # Events are never deleted: an id no event has is a typo, not "already done".
            unknown = store.unknown_integrity_event_ids(event_ids)
            if unknown:
                shown = ", ".join(str(i) for i in unknown[:10]) + (
                    " ..." if len(unknown) > 10 else ""
                )
                raise UsageError(
                    f"integrity ack: no such event: {shown}; nothing acknowledged "
                    "(see `billing integrity list --all`)"
                )
        n = store.acknowledge_integrity_events(
            event_ids or None, source_id=source or None, at_ns=now_ns()
        )
    if as_json:
        _print_json({"acknowledged": n})
        return
    if not app_ctx.quiet:
        app_ctx.out.print(
            f"acknowledged {n} integrity event(s)", markup=False, highlight=False, emoji=False
        )

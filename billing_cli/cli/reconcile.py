"""``billing reconcile``: re-pull an exact range of a source and report what it repaired.

It uses the collector's pull loop (chunks, pagination, cursor and identity safety rules)
over ``[since, until)`` regardless of checkpoints, applies every page with
``collect_bucket_changes`` and reports: new and conflicting observations, buckets repaired
(old and new bytes), ledger adjustments (count and amount) and completeness — the minutes
of the range in which the source delivered no item.

Checkpoints: reconcile never touches them. It neither advances ``last_successful_until``
(collect owns forward progress, and a reconcile of old history says nothing about the
minutes after it) nor records attempts or failures, so ``billing status`` keeps describing
the regular collection. It takes the same per-source lock as collect, so it never runs
concurrently with a collect of the same source.

``--dry-run`` runs exactly the same code inside ``store.dry_run()``: every page is applied
in one transaction that is rolled back at the end, and no run record is written, so the
report is exact and the database is unchanged row for row.
"""

from __future__ import annotations

from typing import Annotated, Any

import orjson
import typer
from rich.table import Table

from billing_cli._errors import UsageError
from billing_cli._time import NS_PER_MINUTE, format_rfc3339_ns, minute_floor_ns, now_ns
from billing_cli.cli._context import AppContext, get_context
from billing_cli.cli._flags import time_flag
from billing_cli.cli._pull import (
    echo_failures,
    exit_code_for,
    finish_run,
    locked_outcomes,
    pull,
    run_outcome,
    store_and_locks,
)
from billing_cli.cli._runlog import log_outcomes
from billing_cli.collect.collector import PullSettings, PullTask, SourceOutcome
from billing_cli.core.money import format_amount
from billing_cli.store.base import BucketChange

HELP = """\
Re-pull a time range of one or more sources and repair what collect missed.

Reads [--since, --until) again from the exporter (regardless of checkpoints), applies it
and reports what changed: new and conflicting observations, buckets repaired (with the
byte differences), ledger adjustments (count and amount) and completeness: the minutes
in the range with no item from the source. Re-delivered data changes nothing, so a
reconcile is always safe. Checkpoints are never touched; the source's lock is taken.

--dry-run produces the same report and writes nothing (everything is rolled back), which
makes it a comparison tool: e.g. during the move from EXPORTER_BASE_URL to the registry.

Exit codes: 0 done (holes are reported, not failures); 1 a source failed; 2 bad flags or
registry; 75 every selected source is held by another run.

Examples:

\b
  billing reconcile --source node-a --since 2026-11-24T00:00:00Z --until 2026-11-24T06:00:00Z
  billing reconcile --source node-a --since 6h --dry-run       # what would change?
  billing reconcile --all --since 24h --json | jq '.sources[].completeness'
"""

MAX_LISTED_CHANGES = 1000  # --json lists at most this many bucket changes per source
RECONCILE_BUDGET_S = 24 * 3600.0


def reconcile_command(
    ctx: typer.Context,
    source: Annotated[
        list[str] | None,
        typer.Option("--source", "-s", help="Source to reconcile (repeatable)."),
    ] = None,
    all_sources: Annotated[
        bool, typer.Option("--all", help="Every enabled source (window API).")
    ] = False,
    since: Annotated[
        str | None,
        typer.Option(
            "--since", help="Start, inclusive (RFC3339 with a zone, or a duration ago: 6h)."
        ),
    ] = None,
    until: Annotated[
        str | None, typer.Option("--until", help="End, exclusive (default: now).")
    ] = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Report what would change; write nothing.")
    ] = False,
    concurrency: Annotated[
        int, typer.Option("--concurrency", "-j", min=1, max=256, help="Sources pulled at once.")
    ] = 4,
    json_out: Annotated[bool, typer.Option("--json", help="Machine-readable report.")] = False,
) -> int:
    app = get_context(ctx)
    now = now_ns()
    if since is None:
        raise UsageError("--since is required (e.g. --since 2026-11-24T00:00:00Z or --since 6h)")
    if bool(source) == all_sources:
        raise UsageError("give --source ID (repeatable) or --all, not both and not neither")
    since_ns = time_flag("--since", since, now=now)
    until_ns = time_flag("--until", until, now=now) or now
    assert since_ns is not None
    if since_ns >= until_ns:
        raise UsageError(
            f"--since {format_rfc3339_ns(since_ns)} is not before --until "
            f"{format_rfc3339_ns(until_ns)}"
        )
    registry = app.load_registry()
    notes: list[str] = []
    if source:
        selected = [registry.get(sid) for sid in dict.fromkeys(source)]
        for src in selected:
            if src.api != "window":
                raise UsageError(
                    f"source '{src.source_id}' uses api = \"latest\", which cannot serve a past "
                    "range; reconcile needs the window API"
                )
    else:
        selected = []
        for src in registry.enabled_sources():
            if src.api == "window":
                selected.append(src)
            else:
                notes.append(f"source '{src.source_id}' skipped: api = \"latest\" has no ranges")
    if not selected:
        raise UsageError("no enabled window-API source to reconcile")

    defaults = registry.defaults
    with store_and_locks(app) as (store, locks):
        got, locked = locks.acquire([s.source_id for s in selected])
        by_id = {s.source_id: s for s in selected}
        tasks = [
            PullTask(by_id[sid], since_ns=since_ns, until_ns=until_ns, advance_checkpoint=False)
            for sid in got
        ]
        # Dry run: no run record either (run id 0 only labels rows that are rolled back).
        run_id = 0 if dry_run else store.start_run("reconcile", [s.source_id for s in selected])
        # An operator-run repair of a known range: no per-run budget worth cutting it short
        # (each request is still bounded by request_timeout and the retry attempts).
        settings = PullSettings(
            chunk_s=defaults.chunk_s,
            page_limit=defaults.page_limit,
            budget_s=RECONCILE_BUDGET_S,
            collect_bucket_changes=True,
        )
        outcomes = locked_outcomes(by_id, locked, now)
        outcomes.update(
            pull(
                app,
                json_out,
                store,
                locks,
                tasks,
                pricing=registry.pricing,
                run_id=run_id,
                settings=settings,
                concurrency=concurrency,
                record_checkpoints=False,
                dry_run=dry_run,
                kind="reconcile",
            )
        )
        ordered = [outcomes[s.source_id] for s in selected]
        if not dry_run:
            finish_run(store, run_id, "reconcile", ordered)
        code = exit_code_for(ordered)
        doc = reconcile_report(
            ordered, since_ns, until_ns, dry_run=dry_run, run_id=run_id or None, notes=notes
        )
        doc["exit_code"] = int(code)
        _emit(app, json_out, doc, ordered)
        return int(code)


def missing_minutes(since_ns: int, until_ns: int, seen: set[int]) -> list[tuple[int, int]]:
    """Holes: maximal runs of minutes in ``[since, until)`` with no item, as ``[start, end)``.

    A minute counts when any part of it lies in the range (the first minute is the one
    containing ``since``).
    """
    holes: list[tuple[int, int]] = []
    m = minute_floor_ns(since_ns)
    start: int | None = None
    while m < until_ns:
        if m in seen:
            if start is not None:
                holes.append((start, m))
                start = None
        elif start is None:
            start = m
        m += NS_PER_MINUTE
    if start is not None:
        holes.append((start, m))
    return holes


def _change_json(c: BucketChange) -> dict[str, Any]:
    return {
        "node_id": c.key.node_id,
        "env": c.key.env,
        "uuid": c.key.uuid,
        "inbound_tag": c.key.inbound_tag,
        "bucket_start": format_rfc3339_ns(c.bucket_start_ns),
        "old_uplink_bytes": c.old_uplink,
        "old_downlink_bytes": c.old_downlink,
        "new_uplink_bytes": c.new_uplink,
        "new_downlink_bytes": c.new_downlink,
        "delta_bytes": (c.new_uplink + c.new_downlink) - (c.old_uplink + c.old_downlink),
    }


def source_report(o: SourceOutcome, since_ns: int, until_ns: int) -> dict[str, Any]:
    r = o.report
    total_minutes = max(0, -(-(until_ns - minute_floor_ns(since_ns)) // NS_PER_MINUTE))
    holes = missing_minutes(since_ns, until_ns, o.minutes_seen) if o.status == "ok" else []
    missing = sum((e - s) // NS_PER_MINUTE for s, e in holes)
    changes = r.bucket_changes
    return {
        "source_id": o.source_id,
        "node_id": o.node_id,
        "env": o.env,
        "status": o.status,
        "pages": o.pages,
        "items": r.items,
        "samples": r.samples,
        "new_observations": r.new_observations,
        "duplicates": r.duplicates,
        "conflicts": r.conflicts,
        "rejected": r.rejected,
        "anomalies": r.anomalies,
        "buckets_repaired": len(changes) if changes else r.buckets_changed,
        "bytes_delta": sum(
            (c.new_uplink + c.new_downlink) - (c.old_uplink + c.old_downlink) for c in changes
        ),
        "bucket_changes": [_change_json(c) for c in changes[:MAX_LISTED_CHANGES]],
        "bucket_changes_truncated": len(changes) > MAX_LISTED_CHANGES,
        "postings": r.postings,
        "ledger_adjustments": r.adjustments,
        "adjustment_amount": format_amount(r.adjustment_amount_nano),
        "completeness": {
            "minutes": total_minutes,
            "minutes_with_items": total_minutes - missing if o.status == "ok" else None,
            "missing_minutes": missing if o.status == "ok" else None,
            "holes": [
                {"start": format_rfc3339_ns(s), "end": format_rfc3339_ns(e)} for s, e in holes
            ],
        },
        "error": o.error,
        "note": o.note,
    }


def reconcile_report(
    outcomes: list[SourceOutcome],
    since_ns: int,
    until_ns: int,
    *,
    dry_run: bool,
    run_id: int | None,
    notes: list[str],
) -> dict[str, Any]:
    return {
        "run_id": run_id,
        "dry_run": dry_run,
        "since": format_rfc3339_ns(since_ns),
        "until": format_rfc3339_ns(until_ns),
        "outcome": run_outcome(outcomes),
        "sources": [source_report(o, since_ns, until_ns) for o in outcomes],
        "notes": notes,
    }


def _emit(
    app: AppContext, json_out: bool, doc: dict[str, Any], outcomes: list[SourceOutcome]
) -> None:
    if json_out:
        typer.echo(orjson.dumps(doc).decode())
        return
    if log_outcomes(app, "reconcile", doc.get("run_id"), outcomes) and not app.interactive:
        return  # --log-format json: the log records are the report
    if app.quiet:
        echo_failures(outcomes)
        return
    title = f"reconcile {doc['since']} .. {doc['until']}" + (
        " (dry run: nothing written)" if doc["dry_run"] else ""
    )
    table = Table(title=title, title_justify="left")
    cols = ("source", "status", "new", "conflicts", "buckets", "bytes Δ", "adjust", "amount")
    for col in (*cols, "missing min"):
        table.add_column(col, justify="left" if col in ("source", "status") else "right")
    for s in doc["sources"]:
        comp = s["completeness"]
        missing = comp["missing_minutes"]
        table.add_row(
            s["source_id"],
            s["status"],
            f"{s['new_observations']:,}",
            f"{s['conflicts']:,}",
            f"{s['buckets_repaired']:,}",
            f"{s['bytes_delta']:+,}",
            f"{s['ledger_adjustments']:,}",
            s["adjustment_amount"],
            "-" if missing is None else f"{missing}/{comp['minutes']}",
        )
    app.out.print(table)
    for s in doc["sources"]:
        for hole in s["completeness"]["holes"][:20]:
            app.out.print(
                f"  {s['source_id']}: no items in [{hole['start']}, {hole['end']})",
                markup=False,
                highlight=False,
            )
    for s in doc["sources"]:
        if s["error"] or s["note"]:
            app.out.print(
                f"  {s['source_id']}: {s['error'] or s['note']}", markup=False, highlight=False
            )
    for note in doc["notes"]:
        app.out.print(f"  note: {note}", markup=False, highlight=False)

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
in its own transaction, rolled back at once (the write lock is held for one page, never
for the whole run), after the new observations of the earlier pages are re-applied in it,
so the report is exact; no run record is written and the database is unchanged row for
row.

``--until`` in the future is capped at now; a time budget (``--source-timeout``) bounds
each source like collect's does.
"""

from __future__ import annotations

import re
from typing import Annotated, Any

import orjson
import typer
from rich.table import Table
from rich.text import Text

from billing_cli._errors import UsageError
from billing_cli._time import (
    NS_PER_MINUTE,
    NS_PER_SECOND,
    format_rfc3339_ns,
    minute_floor_ns,
    now_ns,
    parse_rfc3339_ns,
)
from billing_cli.cli._context import AppContext, get_context
from billing_cli.cli._flags import (
    WideOption,
    capped_note,
    duration_flag,
    source_option,
    time_flag,
    until_flag,
)
from billing_cli.cli._pricing import warn_if_unpriced
from billing_cli.cli._pull import (
    chunk_count,
    echo_failures,
    exit_code_for,
    finish_run,
    locked_outcomes,
    pull,
    run_outcome,
    store_and_locks,
)
from billing_cli.cli._retention import beyond_retention_note
from billing_cli.cli._runlog import log_outcomes
from billing_cli.cli._tables import print_notes, result_table, second_text, status_text
from billing_cli.collect.collector import PullSettings, PullTask, SourceOutcome
from billing_cli.core.money import format_amount
from billing_cli.store.base import BucketChange

HELP = """\
Re-pull a time range of one or more sources and repair what collect missed.

Reads [--since, --until) again from the exporter (regardless of checkpoints), applies it
and reports what changed: new and conflicting observations, buckets repaired (with the
byte differences), the money posted (net amount: charges plus adjustments) and
completeness: the minutes in the range with no item from the source. Re-delivered data
changes nothing, so a reconcile is always safe. Checkpoints are never touched; the
source's lock is taken. --until in the future is capped at now; --source-timeout bounds
each source (default 1h). The table fits 80 columns; --wide shows every column.

Data older than the retention horizon ([defaults] retention, default 35d) is refused and
counted (beyond_retention), never applied: its neighbours may be compacted away.

--dry-run produces the same report and writes nothing (each page is rolled back at once,
so it never blocks collect), which makes it a comparison tool: e.g. during the move from
EXPORTER_BASE_URL to the registry.

Exit codes: 0 done (holes are reported, not failures); 1 a source failed; 2 bad flags or
registry; 4 database error; 75 every selected source is held by another run; 130 / 143
stopped by Ctrl-C / SIGTERM.

Examples:

\b
  billing reconcile --source node-a --since 2026-11-24T00:00:00Z --until 2026-11-24T06:00:00Z
  billing reconcile --source node-a --since 6h --dry-run       # what would change?
  billing reconcile --all --since 24h --json | jq '.sources[].completeness'
"""

MAX_LISTED_CHANGES = 1000  # --json lists at most this many bucket changes per source
DEFAULT_BUDGET = "1h"
# A reconcile walks [since, until) chunk by chunk; a range of more chunks than this (11
# years of 1h chunks) is a typo, not a repair.
MAX_CHUNKS = 100_000


def reconcile_command(
    ctx: typer.Context,
    source: Annotated[list[str] | None, source_option("Source to reconcile.")] = None,
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
    source_timeout: Annotated[
        str,
        typer.Option(
            "--source-timeout",
            help="Time budget per source; past it the source fails, saying how far it got.",
        ),
    ] = DEFAULT_BUDGET,
    wide: WideOption = False,
    json_out: Annotated[bool, typer.Option("--json", help="Machine-readable report.")] = False,
) -> int:
    app = get_context(ctx)
    now = now_ns()
    if since is None:
        raise UsageError("--since is required (e.g. --since 2026-11-24T00:00:00Z or --since 6h)")
    if bool(source) == all_sources:
        raise UsageError("give --source ID (repeatable) or --all, not both and not neither")
    since_ns = time_flag("--since", since, now=now)
    assert since_ns is not None
    # Exporters cannot serve minutes that have not happened: walking them would only
    # request empty chunks (for hours, with --until years ahead).
    until_ns, capped = until_flag("--until", until, now=now)
    if since_ns >= until_ns:
        raise UsageError(
            f"--since {format_rfc3339_ns(since_ns)} is not before --until "
            f"{format_rfc3339_ns(until_ns)}" + (" (now)" if capped or until is None else "")
        )
    budget_s = duration_flag("--source-timeout", source_timeout)
    registry = app.load_registry()
    chunks = chunk_count(since_ns, until_ns, int(registry.defaults.chunk_s * NS_PER_SECOND))
    if chunks > MAX_CHUNKS:
        raise UsageError(
            f"--since {format_rfc3339_ns(since_ns)}: the range is {chunks:,} chunks of "
            f"{registry.defaults.chunk}; reconcile at most {MAX_CHUNKS:,} at a time "
            "(a later --since, or a larger [defaults] chunk)"
        )
    if capped and until is not None and not app.quiet:
        app.err.print(capped_note("--until", until, until_ns), markup=False, highlight=False)
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
    warn_if_unpriced(app, registry)
    with store_and_locks(app, dry_run=dry_run) as (store, locks):
        got, locked = locks.acquire([s.source_id for s in selected])
        by_id = {s.source_id: s for s in selected}
        tasks = [
            PullTask(by_id[sid], since_ns=since_ns, until_ns=until_ns, advance_checkpoint=False)
            for sid in got
        ]
        # Dry run: no run record either (run id 0 only labels rows that are rolled back).
        run_id = 0 if dry_run else store.start_run("reconcile", [s.source_id for s in selected])
        # Like collect's: a range that takes longer than the budget fails that source
        # (saying how far it got) instead of holding the source lock for hours.
        settings = PullSettings(
            chunk_s=defaults.chunk_s,
            page_limit=defaults.page_limit,
            budget_s=budget_s,
            collect_bucket_changes=True,
            retention_s=defaults.retention_s,
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
                label="reconcile (dry run)" if dry_run else "reconcile",
                kind="reconcile",
            )
        )
        ordered = [outcomes[s.source_id] for s in selected]
        for o in ordered:
            o.error = _budget_error(o, since_ns, source_timeout, dry_run=dry_run)
        if not dry_run:
            finish_run(store, run_id, "reconcile", ordered)
        code = exit_code_for(ordered)
        doc = reconcile_report(
            ordered,
            since_ns,
            until_ns,
            dry_run=dry_run,
            run_id=run_id or None,
            notes=notes,
            currency=registry.pricing.currency,
        )
        doc["exit_code"] = int(code)
        _emit(app, json_out, doc, ordered, wide=wide)
        return int(code)


# The collector's budget message (between pages) speaks of checkpoints, which reconcile
# never moves; the transport's (during a request) says only that the budget ran out.
_CHECKPOINT_CLAUSE = re.compile(
    r"; committed pages are kept and the next run continues from the checkpoint"
)


def _budget_error(o: SourceOutcome, since_ns: int, budget: str, *, dry_run: bool) -> str | None:
    """A reconcile stopped by its time budget: say what is done and how to finish."""
    if o.error is None or "time budget" not in o.error:
        return o.error
    # Re-reading the last minute that arrived is harmless (re-delivery changes nothing).
    resume = max(o.minutes_seen, default=minute_floor_ns(since_ns))
    done = "nothing was written (dry run)" if dry_run else "the pages before it are applied"
    return (
        _CHECKPOINT_CLAUSE.sub("", o.error)
        + f"; {done}; reconcile again with --since {format_rfc3339_ns(resume)}"
        + f" (or a --source-timeout above {budget}) to finish"
    )


def missing_minutes(since_ns: int, until_ns: int, seen: set[int]) -> list[tuple[int, int]]:
    """Holes: maximal runs of minutes in ``[since, until)`` with no item, as ``[start, end)``.

    A minute counts when any part of it lies in the range (the first minute is the one
    containing ``since``). Walks the minutes seen, not every minute of the range.
    """
    holes: list[tuple[int, int]] = []
    start = minute_floor_ns(since_ns)
    for m in sorted(x for x in seen if start <= x < until_ns):
        if m > start:
            holes.append((start, m))
        start = m + NS_PER_MINUTE
    end = minute_floor_ns(until_ns - 1) + NS_PER_MINUTE
    if start < end:
        holes.append((start, end))
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
        "beyond_retention": r.beyond_retention,
        "anomalies": r.anomalies,
        "buckets_repaired": len(changes) if changes else r.buckets_changed,
        "bytes_delta": sum(
            (c.new_uplink + c.new_downlink) - (c.old_uplink + c.old_downlink) for c in changes
        ),
        "bucket_changes": [_change_json(c) for c in changes[:MAX_LISTED_CHANGES]],
        "bucket_changes_truncated": len(changes) > MAX_LISTED_CHANGES,
        "postings": r.postings,
        # The money the run posted: charges of buckets it created plus adjustments of the
        # ones it changed (the same figure `billing ingest` reports as charged_amount).
        "amount": format_amount(r.charged_amount_nano),
        "charges": r.postings - r.adjustments,
        "charge_amount": format_amount(r.charged_amount_nano - r.adjustment_amount_nano),
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
    currency: str = "",
) -> dict[str, Any]:
    return {
        "run_id": run_id,
        "dry_run": dry_run,
        "currency": currency,
        "since": format_rfc3339_ns(since_ns),
        "until": format_rfc3339_ns(until_ns),
        "outcome": run_outcome(outcomes),
        "sources": [source_report(o, since_ns, until_ns) for o in outcomes],
        "notes": notes,
    }


def _emit(
    app: AppContext,
    json_out: bool,
    doc: dict[str, Any],
    outcomes: list[SourceOutcome],
    *,
    wide: bool = False,
) -> None:
    if json_out:
        typer.echo(orjson.dumps(doc).decode())
        return
    if log_outcomes(app, "reconcile", doc.get("run_id"), outcomes) and not app.interactive:
        return  # --log-format json: the log records are the report
    if app.quiet:
        echo_failures(outcomes)
        return
    app.out.print(reconcile_table(doc, wide=wide))
    print_notes(app.out, reconcile_lines(doc))


def reconcile_table(doc: dict[str, Any], *, wide: bool = False) -> Table:
    """The people's report. At 80 columns: what changed and the net money; --wide adds the
    charge/adjustment split and the other counts. Errors, notes and holes go below."""
    title = (
        f"reconcile{' (dry run)' if doc['dry_run'] else ''} "
        f"{second_text(parse_rfc3339_ns(doc['since']))} .. "
        f"{second_text(parse_rfc3339_ns(doc['until']))} UTC"
    )
    cols: list[tuple[str, str]] = [
        ("source", "source_id"),
        ("status", "status"),
        ("new", "new_observations"),
    ]
    if wide:
        cols += [("dup", "duplicates"), ("conflicts", "conflicts"), ("rejected", "rejected")]
    cols += [("buckets", "buckets_repaired"), ("bytes Δ", "bytes_delta")]
    if wide:
        cols += [
            ("charges", "charges"),
            ("charged", "charge_amount"),
            ("adjust", "ledger_adjustments"),
            ("adjusted", "adjustment_amount"),
        ]
    cols += [("amount " + (doc.get("currency") or ""), "amount"), ("missing min", "missing")]
    table = result_table(title)
    for label, key in cols:
        table.add_column(
            label.strip(),
            justify="left" if key in ("source_id", "status") else "right",
            no_wrap=key != "source_id",
            overflow="fold",
        )
    for s in doc["sources"]:
        comp = s["completeness"]
        missing = comp["missing_minutes"]
        cells: list[str | Text] = []
        for _, key in cols:
            value = s.get(key)
            if key == "missing":
                cells.append("-" if missing is None else f"{missing}/{comp['minutes']}")
            elif key == "status":
                cells.append(status_text(s["status"]))
            elif key == "bytes_delta":
                cells.append(f"{value:+,}")
            elif isinstance(value, int):
                cells.append(f"{value:,}")
            else:
                cells.append(Text(str(value)))
        table.add_row(*cells)
    return table


def reconcile_lines(doc: dict[str, Any]) -> list[tuple[str, str]]:
    """What goes below the table: holes (at most 20 per source), errors, notes."""
    out: list[tuple[str, str]] = []
    for s in doc["sources"]:
        holes = s["completeness"]["holes"]
        for hole in holes[:20]:
            out.append((s["source_id"], f"no items in [{hole['start']}, {hole['end']})"))
        if len(holes) > 20:
            out.append((s["source_id"], f"... and {len(holes) - 20} more holes (see --json)"))
    for s in doc["sources"]:
        if s["error"] or s["note"]:
            out.append((s["source_id"], s["error"] or s["note"]))
        if s["beyond_retention"]:
            out.append((s["source_id"], beyond_retention_note(s["beyond_retention"])))
    out.extend(("note", note) for note in doc["notes"])
    if doc["dry_run"]:
        out.append(("dry run", "nothing was written"))
    return out

"""``billing collect``: pull every due source once, apply, checkpoint, report (DESIGN §7).

Cron runs it every minute. Per selected source:

1. **Due?** A source whose ``collect_interval`` has not elapsed since its last attempt is
   "not due" and skipped quietly (a little slack absorbs cron start jitter). Sources named
   with ``--source`` are always due.
2. **Lock.** A non-blocking per-source lock (file next to SQLite, advisory lock with
   PostgreSQL); a source another run holds is *skipped*, not failed.
3. **Pull** ``[last_successful_until - overlap, now)`` (first run: ``now -
   initial_lookback`` or ``--since``) in chunks, page by page, each page committed with its
   checkpoint (see ``billing_cli.collect.collector``).

Exit codes: 0 every processed source ok; 1 at least one failed (the others still
committed); 2 configuration error; 75 every selected source was skipped because other
runs hold their locks.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Annotated, Any

import orjson
import typer
from rich.table import Table
from rich.text import Text

from billing_cli._errors import ExitCode, UsageError
from billing_cli._time import (
    NS_PER_SECOND,
    format_duration,
    format_rfc3339_ns,
    now_ns,
)
from billing_cli.cli._context import AppContext, get_context
from billing_cli.cli._flags import WideOption, duration_flag, source_option, time_flag
from billing_cli.cli._pricing import warn_if_unpriced
from billing_cli.cli._pull import (
    echo_failures,
    exit_code_for,
    failure_line,
    finish_run,
    locked_outcomes,
    pull,
    run_outcome,
    store_and_locks,
)
from billing_cli.cli._retention import (
    COLLECT_COMPACT_BUDGET_S,
    beyond_retention_note,
    compaction_json,
    compaction_line,
    retention_ns,
)
from billing_cli.cli._runlog import log_outcomes
from billing_cli.cli._tables import print_notes, result_table, status_text
from billing_cli.collect.collector import PullSettings, PullTask, SourceOutcome
from billing_cli.collect.schedule import is_due, pull_start
from billing_cli.health import lag_seconds
from billing_cli.store.base import Checkpoint, CompactReport

log = logging.getLogger("billing_cli.collect")

HELP = """\
Pull every due source once and apply what it returns (what cron runs every minute).

Per source: from the checkpoint minus the overlap (first run: the initial lookback or
--since) up to now, in chunks, page by page; each page is committed together with the
source's checkpoint, so a crash never loses or double-counts anything. Sources run
concurrently; one failing source never stops the others. A source another run is still
collecting is skipped, not failed. A source whose collect_interval has not elapsed since
its last attempt is not due and is skipped quietly (unless named with --source).

Retention needs nothing extra: at most once a day collect starts compacting the
observations older than [defaults] retention (default 35d) and spends at most a second
per run on it until done (like `billing compact`); data older than the horizon is refused
and counted as beyond_retention.

Exit codes: 0 all processed sources ok; 1 at least one source failed (the others were
still committed); 2 configuration error; 4 database error; 75 every selected source was
skipped because other runs hold their locks; 130 / 143 stopped by Ctrl-C / SIGTERM (the
page being applied committed or rolled back, the run recorded as interrupted).

Examples:

\b
  billing collect
  billing collect --source node-a --source node-b      # just these two, due or not
  billing collect --since 2026-11-24T00:00:00Z         # first run: start there, not 1h ago
  billing collect --json | jq '.sources[] | select(.status != "ok")'
  * * * * *  billing -q collect                        # crontab: silent unless a failure
"""


def collect_command(
    ctx: typer.Context,
    source: Annotated[
        list[str] | None, source_option("Collect only this source, due or not.")
    ] = None,
    since: Annotated[
        str | None,
        typer.Option(
            "--since",
            help="Start of the first pull for sources without a checkpoint (RFC3339 or a "
            "duration ago, e.g. 6h). Sources with a checkpoint continue from it; use "
            "`billing reconcile` to re-read history.",
        ),
    ] = None,
    concurrency: Annotated[
        int, typer.Option("--concurrency", "-j", min=1, max=256, help="Sources pulled at once.")
    ] = 8,
    source_timeout: Annotated[
        str,
        typer.Option(
            "--source-timeout",
            help="Time budget per source for this run; a long catch-up continues next run.",
        ),
    ] = "5m",
    wide: WideOption = False,
    json_out: Annotated[bool, typer.Option("--json", help="Machine-readable result.")] = False,
) -> int:
    app = get_context(ctx)
    now = now_ns()
    since_ns = time_flag("--since", since, now=now)
    if since_ns is not None and since_ns >= now:
        raise UsageError(f"--since {since}: must be in the past")
    budget_s = duration_flag("--source-timeout", source_timeout)
    registry = app.load_registry()
    if source:
        selected = [registry.get(sid) for sid in dict.fromkeys(source)]
        for src in selected:
            if not src.enabled:
                raise UsageError(
                    f"source '{src.source_id}' is disabled; enable it with "
                    f"`billing sources enable {src.source_id}` or drop --source"
                )
    else:
        selected = registry.enabled_sources()
    if not selected:
        _emit_nothing(app, json_out, "no enabled sources in the registry")
        return int(ExitCode.OK)

    defaults = registry.defaults
    with store_and_locks(app) as (store, locks):
        checkpoints = {cp.source_id: cp for cp in store.list_checkpoints()}
        if source:
            due = selected
        else:
            due = [
                s
                for s in selected
                if is_due(checkpoints.get(s.source_id), s.collect_interval_s, now)
            ]
        not_due = [s.source_id for s in selected if s not in due]
        if not due:
            _emit_nothing(app, json_out, "no source is due", not_due=not_due)
            return int(ExitCode.OK)
        got, locked = locks.acquire([s.source_id for s in due])
        by_id = {s.source_id: s for s in due}
        # Re-read under the lock: another run may have collected a source between our
        # first read and taking its lock; then it is no longer due (or starts later).
        for sid in got:
            fresh = store.get_checkpoint(sid)
            if fresh is not None:
                checkpoints[sid] = fresh
        if not source:
            late = [
                sid
                for sid in got
                if not is_due(checkpoints.get(sid), by_id[sid].collect_interval_s, now_ns())
            ]
            for sid in late:
                locks.release(sid)
                got.remove(sid)
                not_due.append(sid)
            due = [s for s in due if s.source_id not in late]
            if not due:
                _emit_nothing(app, json_out, "no source is due", not_due=not_due)
                return int(ExitCode.OK)
        overlap_ns = int(defaults.overlap_s * NS_PER_SECOND)
        lookback_ns = int(defaults.initial_lookback_s * NS_PER_SECOND)
        tasks = [
            PullTask(
                by_id[sid],
                since_ns=pull_start(checkpoints.get(sid), since_ns, now, overlap_ns, lookback_ns),
                until_ns=now,
            )
            for sid in got
        ]
        warn_if_unpriced(app, registry)
        run_id = store.start_run("collect", [s.source_id for s in due])
        outcomes = locked_outcomes(by_id, locked, now)
        settings = PullSettings(
            chunk_s=defaults.chunk_s,
            page_limit=defaults.page_limit,
            budget_s=budget_s,
            retention_s=defaults.retention_s,
        )
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
                kind="collect",
            )
        )
        ordered = [outcomes[s.source_id] for s in due]
        finish_run(store, run_id, "collect", ordered)
        # Retention needs nothing extra under cron: at most once a day a compaction cycle
        # starts, and every run spends at most a bounded time continuing it.
        compaction = store.compact(
            now_ns=now_ns(),
            retention_ns=retention_ns(registry),
            budget_s=COLLECT_COMPACT_BUDGET_S,
            daily=True,
        )
        if compaction.ran:
            log.info(compaction_line(compaction))
        after = {cp.source_id: cp for cp in store.list_checkpoints()}
        code = exit_code_for(ordered)
        _report(app, json_out, run_id, ordered, after, not_due, code, compaction, wide=wide)
        return int(code)


def lag_s(cp: Checkpoint | None, now: int) -> float | None:
    """The age of the newest snapshot received: lag is measured from the data (DESIGN §8)."""
    return lag_seconds(now, cp.newest_collected_at_ns if cp is not None else None)


def outcome_json(o: SourceOutcome, cp: Checkpoint | None, now: int) -> dict[str, Any]:
    lag = lag_s(cp, now)
    return {
        "source_id": o.source_id,
        "node_id": o.node_id,
        "env": o.env,
        "status": o.status,
        **o.counts(),
        "since": format_rfc3339_ns(o.since_ns) if o.since_ns is not None else None,
        "until": format_rfc3339_ns(o.until_ns) if o.until_ns is not None else None,
        "last_successful_until": (
            format_rfc3339_ns(cp.last_successful_until_ns)
            if cp is not None and cp.last_successful_until_ns is not None
            else None
        ),
        "newest_collected_at": (
            format_rfc3339_ns(cp.newest_collected_at_ns)
            if cp is not None and cp.newest_collected_at_ns is not None
            else None
        ),
        "lag_seconds": round(lag, 3) if lag is not None else None,
        "duration_seconds": round(max(0, o.finished_at_ns - o.started_at_ns) / NS_PER_SECOND, 3),
        "error": o.error,
        "note": o.note,
    }


def _emit_nothing(
    app: AppContext, json_out: bool, why: str, not_due: list[str] | None = None
) -> None:
    if json_out:
        doc = {
            "run_id": None,
            "outcome": "nothing_due",
            "exit_code": 0,
            "sources": [],
            "not_due": not_due or [],
            "message": why,
        }
        typer.echo(orjson.dumps(doc).decode())
    elif app.verbosity > 0 or (app.interactive and not app.quiet):
        app.err.print(f"collect: {why}")


def _report(
    app: AppContext,
    json_out: bool,
    run_id: int,
    outcomes: list[SourceOutcome],
    after: dict[str, Checkpoint],
    not_due: list[str],
    code: ExitCode,
    compaction: CompactReport,
    *,
    wide: bool = False,
) -> None:
    now = now_ns()
    if json_out:
        doc = {
            "run_id": run_id,
            "outcome": run_outcome(outcomes),
            "exit_code": int(code),
            "sources": [outcome_json(o, after.get(o.source_id), now) for o in outcomes],
            "not_due": not_due,
            "compaction": compaction_json(compaction) if compaction.ran else None,
        }
        typer.echo(orjson.dumps(doc).decode())
        return
    if log_outcomes(app, "collect", run_id, outcomes) and not app.interactive:
        return  # --log-format json: the log records are the report
    if app.quiet:
        echo_failures(outcomes)
        return
    lines = collect_lines(outcomes)
    if compaction.ran:
        lines.append(("retention", compaction_line(compaction)))
    if app.interactive:
        app.out.print(collect_table(outcomes, after, now, run_id, wide=wide))
        print_notes(app.out, lines)
        return
    # Under cron: a short summary, one line per source that needs attention.
    for o in outcomes:
        if o.status == "failed":
            typer.echo(failure_line(o), err=True)
        elif o.status == "skipped":
            typer.echo(f"skipped: source '{o.source_id}': {o.note}", err=True)
    typer.echo(summary_line("collect", run_id, outcomes))
    if compaction.ran:
        typer.echo(compaction_line(compaction))


def summary_line(kind: str, run_id: int, outcomes: list[SourceOutcome]) -> str:
    def n(status: str) -> int:
        return sum(1 for o in outcomes if o.status == status)

    samples = sum(o.report.samples for o in outcomes)
    new = sum(o.report.new_observations for o in outcomes)
    buckets = sum(o.report.buckets_changed for o in outcomes)
    beyond = sum(o.report.beyond_retention for o in outcomes)
    return (
        f"{kind} run {run_id}: {n('ok')} ok, {n('failed')} failed, {n('skipped')} skipped; "
        f"{samples} samples, {new} new observations, {buckets} buckets changed"
        + (f", {beyond} samples beyond the retention horizon refused" if beyond else "")
    )


def collect_table(
    outcomes: list[SourceOutcome],
    after: dict[str, Checkpoint],
    now: int,
    run_id: int,
    *,
    wide: bool = False,
) -> Table:
    """Per source at 80 columns: status, samples, new, buckets, postings, lag; --wide adds
    pages, items, duplicates, conflicts and rejections. Errors go below the table."""
    cols = ["source", "status"]
    if wide:
        cols += ["pages", "items"]
    cols += ["samples", "new"]
    if wide:
        cols += ["dup", "conflicts", "rejected"]
    cols += ["buckets", "postings", "lag"]
    table = result_table(f"collect run {run_id}")
    for col in cols:
        table.add_column(
            col,
            justify="left" if col in ("source", "status") else "right",
            no_wrap=col != "source",
            overflow="fold",
        )
    fmt: Callable[[int], str] = "{:,}".format
    for o in outcomes:
        r = o.report
        lag = lag_s(after.get(o.source_id), now)
        values: dict[str, str | Text] = {
            "source": Text(o.source_id),
            "status": status_text(o.status),
            "pages": fmt(o.pages),
            "items": fmt(r.items),
            "samples": fmt(r.samples),
            "new": fmt(r.new_observations),
            "dup": fmt(r.duplicates),
            "conflicts": fmt(r.conflicts),
            "rejected": fmt(r.rejected),
            "buckets": fmt(r.buckets_changed),
            "postings": fmt(r.postings),
            "lag": format_duration(lag) if lag is not None else "-",
        }
        table.add_row(*(values[c] for c in cols))
    return table


def collect_lines(outcomes: list[SourceOutcome]) -> list[tuple[str, str]]:
    """Below the table: one note per source with an error or a note (full width), and
    per source the samples refused as older than the retention horizon."""
    lines = [
        (o.source_id, f"error: {o.error}" if o.error else o.note or "")
        for o in outcomes
        if o.error or o.note
    ]
    lines += [
        (o.source_id, beyond_retention_note(o.report.beyond_retention))
        for o in outcomes
        if o.report.beyond_retention
    ]
    return lines

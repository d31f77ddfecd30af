"""``billing status``: per-source health for people (a table) and for monitoring (``--json``).

Read-only: it loads the registry and reads checkpoints, the last run of each source and the
open integrity events; it never contacts an exporter and never writes to the store. The
classification rule lives in :mod:`billing_cli.health`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import orjson
import typer
from rich.table import Table
from rich.text import Text

from billing_cli._errors import ExitCode, UsageError, one_line
from billing_cli._time import (
    format_duration,
    format_rfc3339_ns,
    now_ns,
)
from billing_cli.cli._context import get_context
from billing_cli.cli._flags import duration_flag
from billing_cli.collect.locks import is_postgres_url, sqlite_path
from billing_cli.health import Health, Verdict, all_healthy, classify, default_max_lag_s
from billing_cli.store.base import Checkpoint, RunRecord, SourceRunResult

# Bumped only for incompatible changes; new fields may be added without a bump.
JSON_SCHEMA_VERSION = 1

HELP = """\
Show the health of every source: healthy, degraded, failing or disabled.

Reads the registry and the database only (never contacts an exporter). Lag is
now - last_successful_until. Rule: never collected, 3+ consecutive failures or
lag > 3 x max lag -> failing; any failure or lag > max lag -> degraded.
Default max lag per source: max(2 x collect_interval + overlap, 5m).

Exit status: 0 when every enabled source is healthy, 1 otherwise, 2 on a
configuration error (bad registry, unknown --source, bad --max-lag), 4 when the
database cannot be read.

Examples:

\b
  billing status
  billing status --source node-a-prod
  billing -q status || echo "some source is not healthy"
  billing status --max-lag 10m --json | jq '.sources[] | select(.health != "healthy")'
"""

_STYLE = {
    Health.HEALTHY: "green",
    Health.DEGRADED: "yellow",
    Health.FAILING: "bold red",
    Health.DISABLED: "dim",
}

# Defence in depth: errors are written secret-free by the collector, but an exporter's own
# error text could still echo a header or a URL with a password. Never print those.
_REDACTIONS: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"-----BEGIN [^-]*-----.*?(?:-----END [^-]*-----|$)", re.S), "[redacted key]"),
    (re.compile(r"(?i)\b(bearer|basic)\s+[A-Za-z0-9._~+/=-]+"), r"\1 [redacted]"),
    (re.compile(r"(?i)(authorization\s*[:=]\s*)\S+"), r"\1[redacted]"),
    (
        re.compile(r"(?i)\b((?:access_)?token|password|passwd|secret|api_?key)=[^&\s]+"),
        r"\1=[redacted]",
    ),
    (re.compile(r"(://[^/@\s:]+):[^@\s/]+@"), r"\1:[redacted]@"),
)
_TABLE_ERROR_WIDTH = 120


def redact_error(error: str | None) -> str | None:
    """One line, with anything that looks like a credential replaced by ``[redacted]``."""
    if error is None:
        return None
    text = error
    for pattern, replacement in _REDACTIONS:
        text = pattern.sub(replacement, text)
    return one_line(text) or None


@dataclass(frozen=True)
class SourceStatus:
    source_id: str
    node_id: str
    env: str
    enabled: bool
    max_lag_s: float
    verdict: Verdict
    checkpoint: Checkpoint | None
    last_run: SourceRunResult | None
    open_integrity_events: int

    def to_json(self) -> dict[str, Any]:
        cp = self.checkpoint
        run = self.last_run
        return {
            "source_id": self.source_id,
            "node_id": self.node_id,
            "env": self.env,
            "enabled": self.enabled,
            "health": self.verdict.health.value,
            "reasons": list(self.verdict.reasons),
            "lag_seconds": self.verdict.lag_s,
            "max_lag_seconds": self.max_lag_s,
            "last_successful_until": _ts(cp.last_successful_until_ns if cp else None),
            "last_succeeded_at": _ts(cp.last_succeeded_at_ns if cp else None),
            "last_attempted_at": _ts(cp.last_attempted_at_ns if cp else None),
            "consecutive_failures": cp.consecutive_failures if cp else 0,
            "last_error": redact_error(cp.last_error if cp else None),
            "open_integrity_events": self.open_integrity_events,
            "last_run": None
            if run is None
            else {
                "run_id": run.run_id,
                "kind": run.kind,
                "outcome": run.outcome,
                "started_at": _ts(run.started_at_ns),
                "finished_at": _ts(run.finished_at_ns),
                "duration_seconds": max(0, run.finished_at_ns - run.started_at_ns) / 1e9,
                "counts": dict(sorted(run.counts.items())),
                "error": redact_error(run.error),
            },
        }


def _ts(ns: int | None) -> str | None:
    return None if ns is None else format_rfc3339_ns(ns)


def database_exists(db_url: str) -> bool:
    """False for a SQLite file that does not exist yet: status must not create it."""
    if is_postgres_url(db_url):
        return True
    path = sqlite_path(db_url)
    return path == ":memory:" or Path(path).expanduser().exists()


def collect_status(
    ctx: typer.Context, source: str | None, max_lag: str | None, now: int
) -> tuple[list[SourceStatus], int]:
    """Registry + store -> one ``SourceStatus`` per selected source, and unattributed events."""
    app_ctx = get_context(ctx)
    override_s: float | None = None
    if max_lag is not None:
        override_s = duration_flag("--max-lag", max_lag)
    registry = app_ctx.load_registry()
    sources = list(registry.sources)
    if source is not None:
        sources = [s for s in sources if s.source_id == source]
        if not sources:
            known = ", ".join(s.source_id for s in registry.sources) or "none"
            raise UsageError(
                f"--source {source!r}: no such source in {app_ctx.registry_path} (known: {known})"
            )

    checkpoints: dict[str, Checkpoint] = {}
    last_runs: dict[str, SourceRunResult] = {}
    events: dict[str, int] = {}
    if database_exists(app_ctx.db_url):
        from billing_cli.store import open_store

        store = open_store(app_ctx.db_url)
        try:
            checkpoints = {cp.source_id: cp for cp in store.list_checkpoints()}
            last_runs = store.last_source_results()
            _add_abandoned(last_runs, store.abandoned_runs())
            events = store.integrity_event_counts()
        finally:
            store.close()

    overlap_s = registry.defaults.overlap_s
    out: list[SourceStatus] = []
    for src in sources:
        cp = checkpoints.get(src.source_id)
        limit = (
            override_s
            if override_s is not None
            else default_max_lag_s(src.collect_interval_s, overlap_s)
        )
        verdict = classify(
            enabled=src.enabled,
            last_successful_until_ns=cp.last_successful_until_ns if cp else None,
            consecutive_failures=cp.consecutive_failures if cp else 0,
            now_ns=now,
            max_lag_s=limit,
        )
        out.append(
            SourceStatus(
                source_id=src.source_id,
                node_id=src.node_id,
                env=src.env,
                enabled=src.enabled,
                max_lag_s=limit,
                verdict=verdict,
                checkpoint=cp,
                last_run=last_runs.get(src.source_id),
                open_integrity_events=events.get(src.source_id, 0),
            )
        )
    return out, events.get("", 0)


def _add_abandoned(last_runs: dict[str, SourceRunResult], runs: list[RunRecord]) -> None:
    """A run killed before it recorded an outcome (its process is gone) is the source's
    last run when nothing newer exists: shown as ``abandoned``, not as never having run."""
    for run in runs:
        if run.kind not in ("collect", "reconcile"):
            continue  # like their results, a manual ingest says nothing about a source
        for sid in run.sources:
            prev = last_runs.get(sid)
            if prev is None or prev.run_id < run.run_id:
                last_runs[sid] = SourceRunResult(
                    run_id=run.run_id,
                    source_id=sid,
                    kind=run.kind,
                    started_at_ns=run.started_at_ns,
                    finished_at_ns=run.started_at_ns,
                    outcome="abandoned",
                    counts={},
                    error=f"run {run.run_id} never finished: its process {run.pid} on "
                    f"{run.host} is gone (killed?)",
                )


def status_document(statuses: list[SourceStatus], unattributed: int, now: int) -> dict[str, Any]:
    """The ``--json`` document (schema in the README; keep field names stable)."""
    counts = {h.value: 0 for h in Health}
    for s in statuses:
        counts[s.verdict.health.value] += 1
    return {
        "schema_version": JSON_SCHEMA_VERSION,
        "generated_at": format_rfc3339_ns(now),
        "healthy": all_healthy([s.verdict for s in statuses]),
        "summary": counts,
        "unattributed_integrity_events": unattributed,
        "sources": [s.to_json() for s in statuses],
    }


# The counts worth a glance in the table (all of them are in --json), with short labels.
_TABLE_COUNTS = (
    ("items", "items"),
    ("new_observations", "new"),
    ("conflicts", "conflicts"),
    ("rejected", "rejected"),
    ("anomalies", "anomalies"),
    ("adjustments", "adjustments"),
)


def _counts_text(run: SourceRunResult | None) -> str:
    if run is None:
        return "-"
    shown = ", ".join(
        f"{run.counts[key]} {label}" for key, label in _TABLE_COUNTS if run.counts.get(key)
    )
    return f"{run.kind} {run.outcome}" + (f": {shown}" if shown else "")


def _short_time(ns: int | None, now: int) -> str:
    """``02:02:36Z`` today, ``2026-11-23 23:59:01Z`` otherwise: the table must stay narrow."""
    if ns is None:
        return "-"
    full = format_rfc3339_ns(ns - ns % 1_000_000_000)
    if full[:10] == format_rfc3339_ns(now)[:10]:
        return full[11:]
    return full.replace("T", " ")


def _render_table(statuses: list[SourceStatus], now: int) -> Table:
    table = Table(title=f"Sources at {format_rfc3339_ns(now - now % 1_000_000_000)}")
    for col in ("source", "enabled", "health", "lag", "failures", "last success"):
        table.add_column(col, no_wrap=True)
    table.add_column("last run", min_width=12)
    table.add_column("events", justify="right", no_wrap=True)
    table.add_column("last error / reasons", min_width=20)
    for s in statuses:
        cp = s.checkpoint
        lag = s.verdict.lag_s
        lag_text = Text("never" if lag is None else format_duration(lag))
        if lag is not None and lag > s.max_lag_s and s.enabled:
            lag_text.stylize("yellow")
        error = redact_error(cp.last_error if cp else None)
        if error and len(error) > _TABLE_ERROR_WIDTH:
            error = error[: _TABLE_ERROR_WIDTH - 1] + "…"
        detail = error or "; ".join(s.verdict.reasons) or ""
        table.add_row(
            s.source_id,
            "yes" if s.enabled else "no",
            Text(s.verdict.health.value, style=_STYLE[s.verdict.health]),
            lag_text,
            str(cp.consecutive_failures if cp else 0),
            _short_time(cp.last_succeeded_at_ns if cp else None, now),
            _counts_text(s.last_run),
            str(s.open_integrity_events),
            Text(detail),
        )
    return table


def status_command(
    ctx: typer.Context,
    source: Annotated[
        str | None, typer.Option("--source", help="Only this source_id.", show_default=False)
    ] = None,
    max_lag: Annotated[
        str | None,
        typer.Option(
            "--max-lag",
            help="Allowed lag for every source, e.g. 10m "
            "[default: max(2 x collect_interval + overlap, 5m) per source].",
            show_default=False,
        ),
    ] = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="One JSON document on stdout (stable schema).")
    ] = False,
) -> None:
    """Show the health of every source (see --help)."""
    now = now_ns()
    statuses, unattributed = collect_status(ctx, source, max_lag, now)
    app_ctx = get_context(ctx)
    doc = status_document(statuses, unattributed, now)
    if as_json:
        typer.echo(orjson.dumps(doc, option=orjson.OPT_INDENT_2).decode())
    elif not app_ctx.quiet:
        app_ctx.out.print(_render_table(statuses, now))
        summary = doc["summary"]
        line = ", ".join(f"{n} {h}" for h, n in summary.items() if n) or "no sources"
        if unattributed:
            line += f"; {unattributed} integrity event(s) without a source"
        if not database_exists(app_ctx.db_url):
            line += f"; database {app_ctx.db_url} does not exist yet (run `billing collect`)"
        app_ctx.out.print(line)
    code = ExitCode.OK if doc["healthy"] else ExitCode.FAILED
    raise typer.Exit(int(code))

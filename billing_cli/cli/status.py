"""``billing status``: per-source health for people (a table), scripts (``--json``) and
Prometheus (``--format openmetrics``).

Read-only: it loads the registry and reads checkpoints, the last run of each source and the
open integrity events; it never contacts an exporter and never writes to the store. The
classification rule lives in :mod:`billing_cli.health`; the OpenMetrics rendering in
:mod:`billing_cli.cli._openmetrics`.
"""

from __future__ import annotations

import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import click
import orjson
import typer
from rich.table import Table
from rich.text import Text

from billing_cli._errors import ExitCode, StoreError, UsageError, one_line
from billing_cli._time import format_duration, format_rfc3339_ns, now_ns
from billing_cli.cli._context import AppContext, get_context
from billing_cli.cli._flags import SourcesOption, WideOption, duration_flag
from billing_cli.cli._pricing import pricing_state
from billing_cli.collect.locks import is_postgres_url, sqlite_path
from billing_cli.health import Delivery, Freshness, Health, Verdict, all_healthy, classify
from billing_cli.store.base import Checkpoint, RunRecord, SourceRunResult

# Bumped only for incompatible changes; new fields may be added without a bump.
# 2: lag_seconds is measured from the newest data received (it was the request horizon).
JSON_SCHEMA_VERSION = 2

HELP = """\
Show the health of every source: healthy, degraded, failing or disabled.

Health is measured from the data, not from HTTP statuses: lag is the age of the newest
snapshot received, and a last run whose samples were (mostly) refused is not healthy.
Reads the registry and the database only (never contacts an exporter, never writes).
Rule: never collected, 3+ consecutive failures, lag > 3 x max lag or every sample of the
last run refused -> failing; any failure, lag > max lag or more than max_refused_share
of the samples refused -> degraded. Default max lag per source: its stale_after, else
max(5 x collect_interval, 5m).

Exit status: 0 when every enabled source is healthy, 1 otherwise, 2 on a
configuration error (bad registry, unknown --source, bad --max-lag), 4 when the
database does not exist or cannot be read.

Examples:

\b
  billing status
  billing status -s node-a-prod -s node-b-prod --wide
  billing -q status || echo "some source is not healthy"
  billing status --max-lag 10m --json | jq '.sources[] | select(.health != "healthy")'
  billing status --format openmetrics --output /var/lib/node_exporter/textfile/billing.prom
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
    max_refused_share: float
    verdict: Verdict
    checkpoint: Checkpoint | None
    last_run: SourceRunResult | None
    delivery: Delivery | None
    open_integrity_events: int

    def to_json(self) -> dict[str, Any]:
        cp = self.checkpoint
        run = self.last_run
        share = self.delivery.refused_share if self.delivery is not None else None
        return {
            "source_id": self.source_id,
            "node_id": self.node_id,
            "env": self.env,
            "enabled": self.enabled,
            "health": self.verdict.health.value,
            "reasons": list(self.verdict.reasons),
            "lag_seconds": self.verdict.lag_s,
            "max_lag_seconds": self.max_lag_s,
            "newest_collected_at": _ts(cp.newest_collected_at_ns if cp else None),
            "last_successful_until": _ts(cp.last_successful_until_ns if cp else None),
            "last_succeeded_at": _ts(cp.last_succeeded_at_ns if cp else None),
            "last_attempted_at": _ts(cp.last_attempted_at_ns if cp else None),
            "consecutive_failures": cp.consecutive_failures if cp else 0,
            "last_error": redact_error(cp.last_error if cp else None),
            "refused_share": share,
            "max_refused_share": self.max_refused_share,
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
                "top_rejection": redact_error(run.top_rejection),
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


def _delivery(run: SourceRunResult | None) -> Delivery | None:
    """What the last collect delivered; None when it delivered nothing (nothing to judge)."""
    if run is None:
        return None
    # Samples older than the retention horizon are refused like rejected ones: a source
    # whose clock is far behind bills nothing, and must not look healthy.
    samples = run.counts.get("samples", 0)
    refused = run.counts.get("rejected", 0) + run.counts.get("beyond_retention", 0)
    if samples + refused == 0:
        return None
    return Delivery(samples=samples, refused=refused, top_refusal=redact_error(run.top_rejection))


def collect_status(
    app_ctx: AppContext, source_ids: list[str], max_lag: str | None, now: int
) -> tuple[list[SourceStatus], int]:
    """Registry + store -> one ``SourceStatus`` per selected source, and unattributed events."""
    override_s: float | None = None
    if max_lag is not None:
        override_s = duration_flag("--max-lag", max_lag)
    registry = app_ctx.load_registry()
    sources = list(registry.sources)
    if source_ids:
        unknown = [sid for sid in source_ids if sid not in registry.ids]
        if unknown:
            known = ", ".join(registry.ids) or "none"
            raise UsageError(
                f"--source {unknown[0]!r}: no such source in {app_ctx.registry_path} "
                f"(known: {known})"
            )
        sources = [s for s in sources if s.source_id in source_ids]
    if not database_exists(app_ctx.db_url):
        raise StoreError(
            f"no billing data in {app_ctx.db_url}: the database does not exist yet "
            "(run `billing collect` first)"
        )

    from billing_cli.store import open_store

    store = open_store(app_ctx.db_url, read_only=True)
    try:
        checkpoints = {cp.source_id: cp for cp in store.list_checkpoints()}
        last_runs = store.last_source_results()
        _add_abandoned(last_runs, store.abandoned_runs())
        events = store.integrity_event_counts()
    finally:
        store.close()

    out: list[SourceStatus] = []
    for src in sources:
        cp = checkpoints.get(src.source_id)
        run = last_runs.get(src.source_id)
        limit = override_s if override_s is not None else src.stale_after_s
        delivery = _delivery(run)
        verdict = classify(
            enabled=src.enabled,
            collected_successfully=cp is not None and cp.last_succeeded_at_ns is not None,
            consecutive_failures=cp.consecutive_failures if cp else 0,
            freshness=Freshness(
                newest_collected_at_ns=cp.newest_collected_at_ns if cp else None,
                # Databases from before freshness was kept: the last success will do.
                first_succeeded_at_ns=(cp.first_succeeded_at_ns or cp.last_succeeded_at_ns)
                if cp
                else None,
            ),
            delivery=delivery,
            now_ns=now,
            max_lag_s=limit,
            max_refused_share=src.effective_max_refused_share,
        )
        out.append(
            SourceStatus(
                source_id=src.source_id,
                node_id=src.node_id,
                env=src.env,
                enabled=src.enabled,
                max_lag_s=limit,
                max_refused_share=src.effective_max_refused_share,
                verdict=verdict,
                checkpoint=cp,
                last_run=run,
                delivery=delivery,
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


# --- the table: 80 columns by default, everything with --wide ---------------------------------


def _short_time(ns: int | None, now: int) -> str:
    """``02:02:36Z`` today, ``2026-11-23 23:59:01Z`` otherwise: the table must stay narrow."""
    if ns is None:
        return "-"
    full = format_rfc3339_ns(ns - ns % 1_000_000_000)
    if full[:10] == format_rfc3339_ns(now)[:10]:
        return full[11:]
    return full.replace("T", " ")


def _refused_text(s: SourceStatus) -> str:
    d = s.delivery
    if d is None or not d.refused:
        return "0"
    share = d.refused_share or 0.0
    return f"{d.refused:,} ({share:.0%})"


def _render_table(statuses: list[SourceStatus], now: int, *, wide: bool) -> Table:
    table = Table(title=f"Sources at {_short_time(now, now)}", box=None, pad_edge=False)
    table.add_column("source", no_wrap=True, overflow="ellipsis", max_width=24)
    table.add_column("health", no_wrap=True)
    table.add_column("lag", justify="right", no_wrap=True)
    table.add_column("fails", justify="right", no_wrap=True)
    table.add_column("refused", justify="right", no_wrap=True)
    table.add_column("events", justify="right", no_wrap=True)
    table.add_column("last run", no_wrap=True)
    if wide:
        table.add_column("newest snapshot", no_wrap=True)
        table.add_column("last success", no_wrap=True)
        table.add_column("node_id / env", no_wrap=True)
    for s in statuses:
        cp = s.checkpoint
        lag = s.verdict.lag_s
        lag_text = Text("-" if lag is None else format_duration(lag))
        if lag is not None and lag > s.max_lag_s and s.enabled:
            lag_text.stylize("yellow")
        run = s.last_run
        row: list[str | Text] = [
            s.source_id,
            Text(s.verdict.health.value, style=_STYLE[s.verdict.health]),
            lag_text,
            str(cp.consecutive_failures if cp else 0),
            _refused_text(s),
            str(s.open_integrity_events),
            "-" if run is None else f"{run.kind} {run.outcome}",
        ]
        if wide:
            row += [
                _short_time(cp.newest_collected_at_ns if cp else None, now),
                _short_time(cp.last_succeeded_at_ns if cp else None, now),
                f"{s.node_id} / {s.env}",
            ]
        table.add_row(*row)
    return table


def _detail_lines(statuses: list[SourceStatus]) -> list[str]:
    """Below the table, so it stays narrow: why each source is not healthy, and errors."""
    out: list[str] = []
    for s in statuses:
        for reason in s.verdict.reasons:
            out.append(f"{s.source_id}: {reason}")
        error = redact_error(s.checkpoint.last_error if s.checkpoint else None)
        if error:
            out.append(f"{s.source_id}: last error: {error}")
        run = s.last_run
        if run is not None and run.outcome == "abandoned" and run.error:
            out.append(f"{s.source_id}: {run.error}")
    return out


def _write_atomically(path: Path, text: str) -> None:
    """Readers (node_exporter's textfile collector) never see half a file."""
    directory = path.parent
    if not path.name:
        raise UsageError(
            "--output needs a file name, e.g. --output /var/lib/node_exporter/billing.prom"
        )
    if not directory.is_dir():
        raise UsageError(f"--output {str(path)[:200]}: directory {directory} does not exist")
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name[:100]}.", dir=directory)
    except OSError as exc:
        raise UsageError(f"--output {path}: cannot write in {directory}: {exc.strerror}") from None
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        raise UsageError(f"--output {path}: cannot write it: {exc.strerror}") from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def status_command(
    ctx: typer.Context,
    source: SourcesOption = None,
    max_lag: Annotated[
        str | None,
        typer.Option(
            "--max-lag",
            help="Allowed age of the newest snapshot for every source, e.g. 10m "
            "[default: per source: stale_after, else max(5 x collect_interval, 5m)].",
            show_default=False,
        ),
    ] = None,
    fmt: Annotated[
        str,
        typer.Option(
            "--format",
            click_type=click.Choice(["table", "json", "openmetrics"]),
            help="table for people, json for scripts, openmetrics for Prometheus.",
        ),
    ] = "table",
    as_json: Annotated[bool, typer.Option("--json", help="Same as --format json.")] = False,
    wide: WideOption = False,
    output: Annotated[
        Path | None,
        typer.Option(
            "--output",
            "-o",
            help="Write to this file atomically instead of stdout (json, openmetrics).",
            show_default=False,
        ),
    ] = None,
) -> None:
    """Show the health of every source (see --help)."""
    if as_json:
        fmt = "json"
    if output is not None and fmt == "table":
        raise UsageError("--output needs --format json or --format openmetrics")
    now = now_ns()
    app_ctx = get_context(ctx)
    statuses, unattributed = collect_status(app_ctx, source or [], max_lag, now)
    doc = status_document(statuses, unattributed, now)
    # No silent zero prices (issue 11): "none" when the registry sets no price.
    registry = app_ctx.load_registry()
    doc["pricing"] = pricing_state(registry)
    text: str | None = None
    if fmt == "json":
        text = orjson.dumps(doc, option=orjson.OPT_INDENT_2).decode() + "\n"
    elif fmt == "openmetrics":
        from billing_cli.cli._openmetrics import render_status

        text = render_status(doc)
    if text is not None:
        if output is not None:
            _write_atomically(output, text)
        else:
            typer.echo(text, nl=False)
    elif not app_ctx.quiet:
        app_ctx.out.print(_render_table(statuses, now, wide=wide))
        for line in _detail_lines(statuses):
            app_ctx.out.print(line, markup=False, highlight=False)
        summary = doc["summary"]
        line = ", ".join(f"{n} {h}" for h, n in summary.items() if n) or "no sources"
        if unattributed:
            line += f"; {unattributed} integrity event(s) without a source"
        if doc["pricing"] == "none":
            line += f"; pricing: none ({registry.unpriced_reason()})"
        app_ctx.out.print(line, markup=False, highlight=False)
    code = ExitCode.OK if doc["healthy"] else ExitCode.FAILED
    raise typer.Exit(int(code))

"""``billing ingest``: apply exporter snapshots from a file or stdin through the store.

One pass over the input. It is parsed and validated batch by batch (and every item's
identity checked against ``--source``) without touching the database; the validated
batches wait in a compact spool (``_spool``) until the last line has been read, so input
that cannot be parsed, or that belongs to another node, writes nothing. Then they are
applied from the spool, each batch of about ``--batch-samples`` samples one transaction:
a kill between batches leaves earlier batches committed, and ingesting the same input
again converges because re-delivered observations are no-ops. Memory stays bounded by a
batch for NDJSON; a pipe works since nothing is read twice. The cyclic GC is paused
throughout: the parser builds millions of small acyclic tuples that it would only scan.
"""

from __future__ import annotations

import gc
import logging
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, BinaryIO

import orjson
import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from billing_cli._errors import IdentityMismatchError, InputError, StoreError
from billing_cli._time import format_rfc3339_ns
from billing_cli.cli._context import AppContext, get_context
from billing_cli.cli._pricing import warn_if_unpriced
from billing_cli.cli._retention import retention_ns
from billing_cli.cli._spool import Spool
from billing_cli.core.money import format_amount
from billing_cli.core.types import Item, Rejection
from billing_cli.pricing import Pricing
from billing_cli.store.base import ApplyReport, Batch, Store
from billing_cli.wire import WireFormatError, iter_ingest

if TYPE_CHECKING:
    from billing_cli.registry.model import Registry

log = logging.getLogger("billing_cli.ingest")

# A batch of 100,000 samples: ~250 MB peak RSS (SQLite page cache included), half the
# commits of 50,000 (SQLite pays per commit for every series leaf a batch touches).
DEFAULT_BATCH_SAMPLES = 100_000

HELP = """\
Apply exporter snapshots from FILE (or - for stdin) to the database.

Accepted shapes: a window response ({"node_id", "env", "items" or "snapshots"}),
a JSON array of items, NDJSON with one item per line, or an exporter snapshot
store file ({"snapshots": [...]}, items carrying node_id/env). The input is
validated completely before anything is written; it is then applied in atomic
batches, so an interrupted ingest can simply be run again: re-delivered
samples are counted as duplicates and change nothing.

Invalid samples (negative, float or out-of-range counters, missing uuid,
timestamps without a zone, ...) and conflicting re-deliveries are recorded as
integrity events and counted; the valid rest is applied. Items older than the
retention horizon ([defaults] retention, default 35d) are refused and counted
as beyond retention.

Pricing comes from the registry's [pricing] table. Without a registry file
(and without --source) everything rates at zero, with a warning.

Exit status: 0 applied (even with rejections or conflicts); 1 an item's
node_id/env does not match --source (nothing written); 2 bad flag or
registry; 3 input unreadable or not parseable (nothing written); 4 database
failure.

Examples:

\b
  billing ingest snapshots.ndjson
  billing ingest snapshots.ndjson --json                 # again: all duplicates, no change
  billing ingest --source node-a-prod window-page.json   # node_id/env must match node-a-prod
  xz -dc archive.ndjson.xz | billing ingest -
  billing --db postgresql://billing@db/billing ingest /var/lib/xray-exporter/snapshots.json
"""


@dataclass
class _InputStats:
    items: int = 0
    samples: int = 0
    rejected: int = 0
    batches: int = 0


def ingest_command(
    ctx: typer.Context,
    file: Annotated[str, typer.Argument(help="Snapshot file, or - for stdin.", show_default=False)],
    source: Annotated[
        str | None,
        typer.Option(
            "--source",
            "-s",
            metavar="ID",
            help="Registry source the input comes from: every item's node_id/env must match.",
            show_default=False,
        ),
    ] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")] = False,
    batch_samples: Annotated[
        int,
        typer.Option(
            "--batch-samples",
            min=1,
            help="Samples per transaction (bounds memory; each batch is atomic).",
        ),
    ] = DEFAULT_BATCH_SAMPLES,
) -> None:
    app = get_context(ctx)
    registry, identity = _registry_and_identity(app, source)
    pricing = None if registry is None else registry.pricing
    with _gc_paused(), _open_input(file) as (stream, name), Spool() as spool:
        stats = _read_input(stream, name, batch_samples, source, identity, spool)
        if pricing is None:
            # Warned only once the input is known to be good, so errors stay one line.
            if not app.quiet:
                app.err.print(
                    f"warning: no registry at {app.registry_path}: using default pricing "
                    "(everything rates at zero); pass --registry to rate",
                    highlight=False,
                )
            pricing = Pricing()
        elif registry is not None:
            warn_if_unpriced(app, registry)
        report, run_id, stats.batches = _apply(app, spool, name, source, pricing, stats, registry)
    _print_summary(app, report, stats, run_id, source, pricing, json_out)


@contextmanager
def _gc_paused() -> Iterator[None]:
    """No cyclic GC while ingesting: parsing a million samples builds millions of small
    acyclic objects, and generation-0 collections would keep re-scanning the batch being
    built (parsing is 1.4-1.8x faster without). Cycles are rare: ~20 objects a batch."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


# --- setup --------------------------------------------------------------------------------


def _registry_and_identity(
    app: AppContext, source: str | None
) -> tuple[Registry | None, tuple[str, str] | None]:
    """The registry and the source's (node_id, env); ``None``: no registry file at all."""
    if source is None and not app.registry_explicit and not app.registry_path.exists():
        return None, None
    registry = app.load_registry()
    if source is None:
        return registry, None
    src = registry.get(source)
    return registry, (src.node_id, src.env)


@contextmanager
def _open_input(file: str) -> Iterator[tuple[BinaryIO, str]]:
    if file == "-":
        yield sys.stdin.buffer, "stdin"  # read once, like any other input: no copy needed
        return
    path = Path(file)
    try:
        f = path.open("rb")
    except FileNotFoundError:
        raise InputError(f"{file}: no such file") from None
    except IsADirectoryError:
        raise InputError(f"{file}: is a directory, expected a snapshot file") from None
    except OSError as exc:
        raise InputError(f"{file}: cannot read: {exc.strerror or exc}") from None
    with f:
        yield f, file


# --- read: parse, validate, spool ------------------------------------------------------


def _batches(
    stream: BinaryIO, name: str, batch_samples: int
) -> Iterator[tuple[list[Item], list[Rejection]]]:
    try:
        yield from iter_ingest(stream, batch_samples)
    except WireFormatError as exc:
        raise InputError(f"{name}: {exc}; nothing written") from None
    except OSError as exc:
        raise InputError(f"{name}: cannot read: {exc.strerror or exc}; nothing written") from None


def _read_input(
    stream: BinaryIO,
    name: str,
    batch_samples: int,
    source: str | None,
    identity: tuple[str, str] | None,
    spool: Spool,
) -> _InputStats:
    """Parse the whole input once into ``spool``; nothing touches the database here."""
    stats = _InputStats()
    started = time.perf_counter()
    spooling = 0.0
    for items, rejections in _batches(stream, name, batch_samples):
        if identity is not None:
            _check_identity(name, source or "", identity, items, rejections, stats.items)
        stats.items += len(items)
        stats.samples += sum(len(i.samples) for i in items)
        stats.rejected += len(rejections)
        t = time.perf_counter()
        try:
            spool.add(items, rejections)
        except OSError as exc:
            raise InputError(
                f"{name}: cannot keep the validated input in a temporary file "
                f"({exc.strerror or exc}; set TMPDIR to a file system with room); "
                "nothing written"
            ) from None
        spooling += time.perf_counter() - t
    took = time.perf_counter() - started
    log.info(
        "read %s: %d items, %d samples, %d rejected in %.2f s (%.2f s of it spooling %d bytes)",
        name,
        stats.items,
        stats.samples,
        stats.rejected,
        took,
        spooling,
        spool.bytes_on_disk,
        extra={
            "fields": {
                "phase": "read",
                "samples": stats.samples,
                "seconds": round(took, 4),
                "spool_write_seconds": round(spooling, 4),
                "spool_bytes": spool.bytes_on_disk,
                "batches": len(spool),
            }
        },
    )
    return stats


def _check_identity(
    name: str,
    source: str,
    identity: tuple[str, str],
    items: list[Item],
    rejections: list[Rejection],
    offset: int,
) -> None:
    node_id, env = identity
    for n, item in enumerate(items, start=offset + 1):
        if item.node_id != node_id or item.env != env:
            raise IdentityMismatchError(
                f"{name}: item {n} (collected_at {format_rfc3339_ns(item.collected_at_ns)}) is "
                f"node_id={item.node_id!r} env={item.env!r}, but source '{source}' is "
                f"node_id={node_id!r} env={env!r}; nothing written"
            )
    for r in rejections:
        if r.node_id != node_id or r.env != env:
            raise IdentityMismatchError(
                f"{name}: a rejected item is node_id={r.node_id!r} env={r.env!r}, but source "
                f"'{source}' is node_id={node_id!r} env={env!r}; nothing written"
            )


# --- apply ----------------------------------------------------------------------------


def _apply(
    app: AppContext,
    spool: Spool,
    name: str,
    source: str | None,
    pricing: Pricing,
    stats: _InputStats,
    registry: Registry | None,
) -> tuple[ApplyReport, int, int]:
    from billing_cli.store import open_store

    started = time.perf_counter()
    unspooling = 0.0
    batches = 0
    store = open_store(app.db_url)
    retention = retention_ns(registry)
    try:
        run_id = store.start_run("ingest", [source] if source else [])
        report = ApplyReport()
        progress = _progress(app, stats.samples)
        try:
            with progress or nullcontext():
                task = progress.add_task("ingest", total=stats.samples) if progress else None
                spooled = iter(spool)
                while True:
                    t = time.perf_counter()
                    try:
                        batch = next(spooled, None)
                    except OSError as exc:
                        raise InputError(
                            f"{name}: cannot read the validated input back from its temporary "
                            f"file ({exc.strerror or exc}); {batches} batch(es) already "
                            "applied; running the same ingest again is safe"
                        ) from None
                    unspooling += time.perf_counter() - t
                    if batch is None:
                        break
                    items, rejections = batch
                    report += store.apply(
                        Batch(
                            items=items,
                            run_id=run_id,
                            pricing=pricing,
                            source_id=source,
                            rejections=rejections,
                            retention_ns=retention,
                        )
                    )
                    batches += 1
                    if progress is not None and task is not None:
                        progress.advance(task, sum(len(i.samples) for i in items))
                    del batch, items, rejections  # the next batch is read with this one freed
        except BaseException as exc:
            # Batches already applied stay committed (each was atomic); record the stop.
            log.debug("ingest stopped after %d batch(es): %r", batches, exc)
            # Ctrl-C or SIGTERM (systemd) is an interruption, not a failure of the input.
            stopped = isinstance(exc, KeyboardInterrupt)
            _finish(store, run_id, "interrupted" if stopped else "failed")
            raise
        _finish(store, run_id, "ok")
    finally:
        store.close()  # SQLite copies its WAL back here: part of the apply's cost
    took = time.perf_counter() - started
    log.info(
        "applied %d batch(es) in %.2f s (%.2f s of it reading the spool back)",
        batches,
        took,
        unspooling,
        extra={
            "fields": {
                "phase": "apply",
                "batches": batches,
                "seconds": round(took, 4),
                "spool_read_seconds": round(unspooling, 4),
            }
        },
    )
    return report, run_id, batches


def _finish(store: Store, run_id: int, outcome: str) -> None:
    try:
        # Ingest runs are recorded in ``runs`` only, not per source: a manual ingest must
        # not make a failing source look freshly collected in ``billing status``.
        store.finish_run(run_id, outcome, {})
    except StoreError as exc:
        if outcome == "ok":
            raise
        # The ingest is already failing with its own error (re-raised by the caller); the
        # applied batches stay committed, only the run row keeps no outcome. Say so.
        log.warning("ingest run %d could not be marked failed: %s", run_id, exc.message)


def _progress(app: AppContext, total: int) -> Progress | None:
    if not app.interactive or total == 0:
        return None
    return Progress(
        TextColumn("ingest"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=app.err,
        transient=True,
    )


# --- summary -------------------------------------------------------------------------------


def _counts(report: ApplyReport) -> dict[str, int]:
    return {
        "items": report.items,
        "samples": report.samples,
        "new_observations": report.new_observations,
        "duplicates": report.duplicates,
        "conflicts": report.conflicts,
        "rejected_samples": report.rejected,
        "beyond_retention": report.beyond_retention,
        "anomalies": report.anomalies,
        "buckets_changed": report.buckets_changed,
        "postings": report.postings,
        "adjustments": report.adjustments,
    }


def _print_summary(
    app: AppContext,
    report: ApplyReport,
    stats: _InputStats,
    run_id: int,
    source: str | None,
    pricing: Pricing,
    json_out: bool,
) -> None:
    counts = _counts(report)
    amount = format_amount(report.charged_amount_nano)
    if json_out:
        payload: dict[str, Any] = {
            "run_id": run_id,
            "source_id": source,
            **counts,
            "batches": stats.batches,
            "charged_amount": amount,  # net: charges + adjustments (reconcile's "amount")
            "charge_amount": format_amount(
                report.charged_amount_nano - report.adjustment_amount_nano
            ),
            "adjustment_amount": format_amount(report.adjustment_amount_nano),
            "currency": pricing.currency,
        }
        typer.echo(orjson.dumps(payload).decode())
        return
    if app.quiet:
        return
    table = Table(title=f"ingest run {run_id}" + (f" (source {source})" if source else ""))
    table.add_column("", style="bold")
    table.add_column("count", justify="right")
    labels = {
        "items": "items",
        "samples": "samples",
        "new_observations": "new observations",
        "duplicates": "duplicates",
        "conflicts": "conflicts",
        "rejected_samples": "rejected samples",
        "beyond_retention": "beyond retention",
        "anomalies": "counter anomalies",
        "buckets_changed": "buckets changed",
        "postings": "ledger postings",
        "adjustments": "of which adjustments",
    }
    for key, label in labels.items():
        table.add_row(label, f"{counts[key]:,}")
    table.add_row("charged", f"{amount} {pricing.currency}")
    app.out.print(table)

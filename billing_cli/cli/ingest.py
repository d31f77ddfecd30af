"""``billing ingest``: apply exporter snapshots from a file or stdin through the store.

Two passes over the input. The first parses and validates everything (and checks every
item's identity against ``--source``) without touching the database, so input that
cannot be parsed, or that belongs to another node, writes nothing. The second applies
it in batches of about ``--batch-samples`` samples, each batch one transaction: a kill
between batches leaves earlier batches committed, and ingesting the same input again
converges because re-delivered observations are no-ops. Stdin is spooled to a temporary
file first so that it can be read twice; memory stays bounded by one batch for NDJSON.
"""

from __future__ import annotations

import io
import logging
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Annotated, Any, BinaryIO, cast

import orjson
import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from billing_cli._errors import IdentityMismatchError, InputError, StoreError
from billing_cli._time import format_rfc3339_ns
from billing_cli.cli._context import AppContext, get_context
from billing_cli.cli._pricing import warn_if_unpriced
from billing_cli.cli._retention import retention_ns
from billing_cli.core.money import format_amount
from billing_cli.core.types import Item, Rejection
from billing_cli.pricing import Pricing
from billing_cli.store.base import ApplyReport, Batch, Store
from billing_cli.wire import WireFormatError, iter_ingest

if TYPE_CHECKING:
    from _typeshed import WriteableBuffer

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
    with _open_input(file) as (stream, name):
        stats = _validate(stream, name, batch_samples, source, identity)
        validated = io.BufferedReader(_Head(stream, stream.tell()), 1 << 20)
        stream.seek(0)
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
        report, run_id, stats.batches = _apply(
            app,
            cast(BinaryIO, validated),
            name,
            batch_samples,
            source,
            identity,
            pricing,
            stats,
            registry,
        )
    _print_summary(app, report, stats, run_id, source, pricing, json_out)


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
        # Spool stdin to disk: the input is read twice (validate, then apply).
        with tempfile.TemporaryFile(prefix="billing-ingest-") as spool:
            try:
                _copy(sys.stdin.buffer, spool)
            except OSError as exc:
                raise InputError(f"stdin: cannot read: {exc.strerror or exc}") from None
            spool.seek(0)
            yield spool, "stdin"
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


def _copy(src: IO[bytes], dst: IO[bytes]) -> None:
    while chunk := src.read(1 << 20):
        dst.write(chunk)


# --- pass 1: validate ------------------------------------------------------------------------


def _batches(
    stream: BinaryIO,
    name: str,
    batch_samples: int,
    outcome: Callable[[], str] = lambda: "nothing written",
) -> Iterator[tuple[list[Item], list[Rejection]]]:
    try:
        yield from iter_ingest(stream, batch_samples)
    except WireFormatError as exc:
        raise InputError(f"{name}: {exc}; {outcome()}") from None
    except OSError as exc:
        raise InputError(f"{name}: cannot read: {exc.strerror or exc}; {outcome()}") from None


class _Head(io.RawIOBase):
    """The first ``limit`` bytes of ``f``: the apply pass reads exactly what was validated,
    even if the file grows meanwhile (an exporter appending to its NDJSON)."""

    def __init__(self, f: BinaryIO, limit: int) -> None:
        super().__init__()
        self._f = f
        self._left = limit

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: WriteableBuffer) -> int:
        if self._left <= 0:
            return 0
        view = memoryview(buffer).cast("B")
        data = self._f.read(min(len(view), self._left))
        view[: len(data)] = data
        self._left -= len(data)
        return len(data)


def _validate(
    stream: BinaryIO,
    name: str,
    batch_samples: int,
    source: str | None,
    identity: tuple[str, str] | None,
) -> _InputStats:
    stats = _InputStats()
    for items, rejections in _batches(stream, name, batch_samples):
        if identity is not None:
            _check_identity(name, source or "", identity, items, rejections, stats.items)
        stats.items += len(items)
        stats.samples += sum(len(i.samples) for i in items)
        stats.rejected += len(rejections)
    return stats


def _check_identity(
    name: str,
    source: str,
    identity: tuple[str, str],
    items: list[Item],
    rejections: list[Rejection],
    offset: int,
    outcome: str = "nothing written",
) -> None:
    node_id, env = identity
    for n, item in enumerate(items, start=offset + 1):
        if item.node_id != node_id or item.env != env:
            raise IdentityMismatchError(
                f"{name}: item {n} (collected_at {format_rfc3339_ns(item.collected_at_ns)}) is "
                f"node_id={item.node_id!r} env={item.env!r}, but source '{source}' is "
                f"node_id={node_id!r} env={env!r}; {outcome}"
            )
    for r in rejections:
        if r.node_id != node_id or r.env != env:
            raise IdentityMismatchError(
                f"{name}: a rejected item is node_id={r.node_id!r} env={r.env!r}, but source "
                f"'{source}' is node_id={node_id!r} env={env!r}; {outcome}"
            )


# --- pass 2: apply -------------------------------------------------------------------------


def _apply(
    app: AppContext,
    stream: BinaryIO,
    name: str,
    batch_samples: int,
    source: str | None,
    identity: tuple[str, str] | None,
    pricing: Pricing,
    stats: _InputStats,
    registry: Registry | None,
) -> tuple[ApplyReport, int, int]:
    from billing_cli.store import open_store

    store = open_store(app.db_url)
    retention = retention_ns(registry)
    try:
        run_id = store.start_run("ingest", [source] if source else [])
        report = ApplyReport()
        batches = 0
        applied_items = 0

        def changed() -> str:
            # Only reachable if the file was rewritten between the two passes.
            return (
                f"the input changed while being ingested ({batches} batch(es) already "
                "applied; running the same ingest again is safe)"
            )

        progress = _progress(app, stats.samples)
        try:
            with progress or nullcontext():
                task = progress.add_task("ingest", total=stats.samples) if progress else None
                for items, rejections in _batches(stream, name, batch_samples, changed):
                    if identity is not None:
                        _check_identity(
                            name, source or "", identity, items, rejections, applied_items,
                            outcome=changed(),
                        )  # fmt: skip
                    applied_items += len(items)
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
        except BaseException as exc:
            # Batches already applied stay committed (each was atomic); record the stop.
            log.debug("ingest stopped after %d batch(es): %r", batches, exc)
            # Ctrl-C or SIGTERM (systemd) is an interruption, not a failure of the input.
            stopped = isinstance(exc, KeyboardInterrupt)
            _finish(store, run_id, "interrupted" if stopped else "failed")
            raise
        _finish(store, run_id, "ok")
        return report, run_id, batches
    finally:
        store.close()


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

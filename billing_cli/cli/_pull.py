"""What ``billing collect`` and ``billing reconcile`` share around the pull loop.

Both commands open the store, take the per-source locks (a source another run holds is
*skipped*, not failed), pull through :func:`billing_cli.collect.collector.run_sources` with
a progress bar on a terminal, record the run, and map the outcomes to an exit code. The
commands differ only in which range they pull and whether checkpoints move.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from billing_cli._errors import BillingError, ExitCode
from billing_cli._time import NS_PER_SECOND, format_rfc3339_ns
from billing_cli.cli._context import AppContext
from billing_cli.collect.collector import (
    ClientFactory,
    ExporterClient,
    PullSettings,
    PullTask,
    SourceOutcome,
    run_sources,
    transport_client_factory,
)
from billing_cli.collect.locks import Locker, SourceLock, locker_for
from billing_cli.collect.redact import Redactor
from billing_cli.pricing import Pricing
from billing_cli.registry.model import SourceConfig
from billing_cli.store.base import RunKind, SourceRunResult, Store

LOCKED_NOTE = "another run holds this source"
log = logging.getLogger("billing_cli.run")


class Locks:
    """The locks one run holds; each released as soon as its source is done."""

    def __init__(self, locker: Locker) -> None:
        self.locker = locker
        self.held: dict[str, SourceLock] = {}

    def acquire(self, source_ids: list[str]) -> tuple[list[str], list[str]]:
        got: list[str] = []
        skipped: list[str] = []
        for sid in source_ids:
            lock = self.locker.try_acquire(sid)
            if lock is None:
                skipped.append(sid)
            else:
                self.held[sid] = lock
                got.append(sid)
        return got, skipped

    def release(self, source_id: str) -> None:
        lock = self.held.pop(source_id, None)
        if lock is not None:
            lock.release()

    def release_all(self) -> None:
        for sid in list(self.held):
            self.release(sid)
        self.locker.close()


@contextmanager
def store_and_locks(app: AppContext, *, dry_run: bool = False) -> Iterator[tuple[Store, Locks]]:
    """The run's store and lock set; every lock is released and the store closed at exit.
    A dry run creates and migrates nothing: it needs the database it compares against."""
    from billing_cli.store import open_store

    store: Store = open_store(app.db_url, migrate=not dry_run)
    locks = Locks(locker_for(app.db_url))
    try:
        yield store, locks
    finally:
        locks.release_all()
        store.close()


@dataclass
class _SourceProgress:
    chunks: int  # in the task's range
    chunk_ns: int
    since_ns: int
    started: int = 0  # chunks requested so far (the one in flight included)
    done: bool = False
    pages: int = 0
    samples: int = 0
    position_ns: int | None = None  # start of the chunk in flight


def chunk_count(since_ns: int, until_ns: int, chunk_ns: int) -> int:
    """How many chunks :func:`plan_chunks` makes of ``[since, until)`` (without making them)."""
    if until_ns <= since_ns:
        return 0
    return -(-(until_ns - since_ns) // max(chunk_ns, 1))


class ProgressHooks:
    """Progress on a terminal (stderr); lock release as each source finishes.

    The bar counts chunks (a long catch-up or reconcile advances per chunk, also through
    hours of empty ones); the description names the source, the chunk being pulled and the
    pages and samples so far, so a long single chunk is visibly moving too. Chunk starts
    are reported by the worker threads (the client wrapper below), pages and finishes by
    the writer thread; rich's Progress is thread-safe, our own state takes a lock.
    """

    def __init__(
        self,
        progress: Progress | None,
        locks: Locks,
        tasks: list[PullTask[SourceConfig]],
        chunk_s: float,
        label: str,
    ) -> None:
        self.progress = progress
        self.locks = locks
        self.label = label
        self._mutex = threading.Lock()
        chunk_ns = int(chunk_s * NS_PER_SECOND)
        self.sources: dict[str, _SourceProgress] = {}
        for t in tasks:
            latest = t.source.api == "latest"
            n = 1 if latest else max(1, chunk_count(t.since_ns, t.until_ns, chunk_ns))
            self.sources[t.source.source_id] = _SourceProgress(n, chunk_ns, t.since_ns)
        total = sum(p.chunks for p in self.sources.values())
        self.task = progress.add_task(label, total=max(total, 1)) if progress is not None else None

    def on_request(self, source_id: str, since_ns: int, cursor: str | None) -> None:
        """A window request (worker thread): ``cursor`` None starts a chunk."""
        if cursor is not None:
            return
        with self._mutex:
            p = self.sources.get(source_id)
            if p is None:
                return
            index = (since_ns - p.since_ns) // max(p.chunk_ns, 1) + 1
            p.started = max(p.started, min(index, p.chunks))
            p.position_ns = since_ns
            self._refresh(source_id)

    def on_page(self, outcome: SourceOutcome) -> None:
        with self._mutex:
            p = self.sources.get(outcome.source_id)
            if p is not None:
                p.pages, p.samples = outcome.pages, outcome.report.samples
            self._refresh(outcome.source_id)

    def on_finished(self, outcome: SourceOutcome) -> None:
        # Only now is the source's last page committed: the next run may take it.
        self.locks.release(outcome.source_id)
        with self._mutex:
            p = self.sources.get(outcome.source_id)
            if p is not None:
                p.done = True
            self._refresh(outcome.source_id)

    def _refresh(self, source_id: str) -> None:
        if self.progress is None or self.task is None:
            return
        completed = sum(
            p.chunks if p.done else max(0, p.started - 1) for p in self.sources.values()
        )
        p = self.sources.get(source_id)
        finished = sum(1 for q in self.sources.values() if q.done)
        parts = [self.label]
        if len(self.sources) > 1:
            parts.append(f"{finished}/{len(self.sources)} sources ·")
        if p is not None and not p.done:
            where = ""
            if p.position_ns is not None and p.chunks > 1 and len(self.sources) == 1:
                stamp = format_rfc3339_ns(p.position_ns)
                where = f" {stamp[5:10]} {stamp[11:16]}"  # the chunk being pulled (UTC)
            parts.append(f"{source_id}{where}: page {p.pages}, {p.samples:,} samples")
        self.progress.update(self.task, completed=completed, description=" ".join(parts))


class _ReportingClient:
    """An exporter client that tells the progress hooks which chunk is being pulled."""

    def __init__(self, inner: ExporterClient, source_id: str, hooks: ProgressHooks) -> None:
        self.inner = inner
        self.source_id = source_id
        self.hooks = hooks

    def get_window(self, since_ns: int, until_ns: int, limit: int, cursor: str | None) -> bytes:
        self.hooks.on_request(self.source_id, since_ns, cursor)
        return self.inner.get_window(since_ns, until_ns, limit, cursor)

    def get_latest(self) -> bytes:
        return self.inner.get_latest()

    @property
    def redactor(self) -> Redactor:
        return self.inner.redactor

    def abort(self) -> None:
        self.inner.abort()


def reporting(
    factory: ClientFactory[SourceConfig], hooks: ProgressHooks
) -> ClientFactory[SourceConfig]:
    @contextmanager
    def make(source: SourceConfig) -> Iterator[ExporterClient]:
        with factory(source) as client:
            yield _ReportingClient(client, source.source_id, hooks)

    return make


def make_progress(app: AppContext, json_out: bool) -> Progress | None:
    if not app.interactive or json_out:
        return None
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(bar_width=20),  # leaves the description ~45 columns on an 80-column screen
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=app.err,  # the logging handler's console too: log lines print above the bar
        transient=True,
    )


def pull(
    app: AppContext,
    json_out: bool,
    store: Store,
    locks: Locks,
    tasks: list[PullTask[SourceConfig]],
    *,
    pricing: Pricing,
    run_id: int,
    settings: PullSettings,
    concurrency: int,
    record_checkpoints: bool = True,
    dry_run: bool = False,
    label: str = "collect",
    kind: RunKind | None = None,
) -> dict[str, SourceOutcome]:
    """Pull ``tasks`` over HTTPS with a progress bar on a terminal.

    ``dry_run`` applies every page inside ``store.dry_run()`` (each page rolled back). The
    per-source time budget is ``settings.budget_s``. When the run is interrupted (Ctrl-C,
    SIGTERM) and ``kind`` is given, the run is recorded as ``interrupted`` — with what
    each source did before — and the interruption goes on up (locks released, exit 130
    or 143).
    """
    progress = make_progress(app, json_out)
    hooks = ProgressHooks(progress, locks, tasks, settings.chunk_s, label)
    outcomes: dict[str, SourceOutcome] = {}
    if progress is not None:
        progress.start()
    try:
        scope: AbstractContextManager[None] = store.dry_run() if dry_run else nullcontext()
        with scope:
            return run_sources(
                store,
                tasks,
                reporting(transport_client_factory(settings.budget_s), hooks),
                pricing=pricing,
                run_id=run_id,
                settings=settings,
                concurrency=concurrency,
                hooks=hooks,
                record_checkpoints=record_checkpoints,
                outcomes=outcomes,
            )
    except KeyboardInterrupt:
        if kind is not None and not dry_run:
            finish_interrupted(store, run_id, kind, list(outcomes.values()))
        raise
    finally:
        if progress is not None:
            progress.stop()


def finish_interrupted(
    store: Store, run_id: int, kind: RunKind, outcomes: list[SourceOutcome]
) -> None:
    """Record a run stopped by a signal; never let that bookkeeping replace the stop."""
    try:
        store.finish_run(
            run_id, "interrupted", {o.source_id: run_result(run_id, kind, o) for o in outcomes}
        )
    except BillingError as exc:
        log.warning("run %d could not be marked interrupted: %s", run_id, exc.message)


def failure_line(outcome: SourceOutcome) -> str:
    """How a failed source is reported on stderr (quiet mode and under cron)."""
    return f"error: {outcome.error}"


def echo_failures(outcomes: list[SourceOutcome]) -> None:
    for o in outcomes:
        if o.status == "failed":
            typer.echo(failure_line(o), err=True)


def skipped_outcome(source: SourceConfig, now: int, reason: str) -> SourceOutcome:
    return SourceOutcome(
        source_id=source.source_id,
        node_id=source.node_id,
        env=source.env,
        status="skipped",
        started_at_ns=now,
        finished_at_ns=now,
        note=reason,
    )


def locked_outcomes(
    by_id: dict[str, SourceConfig], locked: list[str], now: int
) -> dict[str, SourceOutcome]:
    """Skipped outcomes for the sources whose lock another run holds."""
    return {sid: skipped_outcome(by_id[sid], now, LOCKED_NOTE) for sid in locked}


def run_result(run_id: int, kind: RunKind, outcome: SourceOutcome) -> SourceRunResult:
    return SourceRunResult(
        run_id=run_id,
        source_id=outcome.source_id,
        kind=kind,
        started_at_ns=outcome.started_at_ns,
        finished_at_ns=outcome.finished_at_ns,
        outcome=outcome.status,
        counts=outcome.counts(),
        error=outcome.error,
        top_rejection=outcome.report.top_rejection,
    )


def finish_run(store: Store, run_id: int, kind: RunKind, outcomes: list[SourceOutcome]) -> None:
    store.finish_run(
        run_id,
        run_outcome(outcomes),
        {o.source_id: run_result(run_id, kind, o) for o in outcomes},
    )


def exit_code_for(outcomes: list[SourceOutcome]) -> ExitCode:
    if any(o.status == "failed" for o in outcomes):
        return ExitCode.FAILED
    if outcomes and all(o.status == "skipped" for o in outcomes):
        return ExitCode.LOCKED
    return ExitCode.OK


def run_outcome(outcomes: list[SourceOutcome]) -> str:
    if any(o.status == "interrupted" for o in outcomes):
        return "interrupted"
    if any(o.status == "failed" for o in outcomes):
        return "failed"
    if outcomes and all(o.status == "skipped" for o in outcomes):
        return "skipped"
    return "ok"

"""The per-source pull loop shared by ``billing collect`` and ``billing reconcile`` (DESIGN §7).

Two halves, so that the database has exactly one writer per process:

* :func:`iter_source_batches` — runs in a worker thread per source. It talks to one
  exporter (window pages or the legacy ``latest`` item), enforces the protocol safety
  rules (cursor loops, empty ``has_more`` pages, node_id/env identity on every page and
  every item) and turns each page into a :class:`Batch` carrying its own
  :class:`CheckpointAdvance`. It never touches the store.
* :func:`run_sources` — runs in the calling thread. It starts the workers with a bound on
  concurrency, receives their batches through a bounded queue (memory stays bounded by a
  few pages, whatever the window) and applies each one through ``store.apply`` — one
  transaction per page, the checkpoint in the same transaction, so the checkpoint never
  runs ahead of the data. SQLite allows one writer anyway; funnelling every write through
  one connection also lets ``reconcile --dry-run`` roll every page back (``store.dry_run``).

A failing or slow source only fails itself: its worker reports an error, the writer
records it (``record_failure``, redacted one line) and keeps serving the other workers.
Each source also has a time budget, checked between pages and — by the transport — during
each request, so a request in flight cannot outlast it.

What an exporter sends is not trusted beyond the wire contract:

* every page and every error of a source passes that source's
  :class:`~billing_cli.collect.redact.Redactor` before it leaves the worker, so an echoed
  bearer token reaches no output, log or table;
* an item outside the window it was requested for, or later than now plus
  :data:`CLOCK_SKEW_NS`, is rejected with a recorded reason (not applied, and not counted
  in the page's newest ``collected_at``);
* a cursor longer than the wire bound is a protocol error; the cursors seen are kept as
  digests, so an exporter inventing new ones cannot grow memory by more than a few bytes
  a page (the time budget ends such a run).

Workers are daemon threads: a run that is stopped (Ctrl-C, SIGTERM reach the writer)
aborts the requests in flight and does not wait for a stuck exporter.
"""

from __future__ import annotations

import hashlib
import logging
import queue
import threading
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Generic, Literal, Protocol, TypeVar

from billing_cli._errors import (
    BillingError,
    HTTPStatusError,
    ProtocolError,
    SourceError,
    SourceIdentityError,
    one_line,
)
from billing_cli._time import (
    NS_PER_MINUTE,
    NS_PER_SECOND,
    format_rfc3339_ns,
    minute_floor_ns,
    now_ns,
)
from billing_cli.collect.redact import NO_SECRETS, Redactor
from billing_cli.core.types import Item, Rejection
from billing_cli.pricing import Pricing
from billing_cli.store.base import ApplyReport, Batch, CheckpointAdvance, Store
from billing_cli.wire import WireFormatError, parse_latest, parse_window_page

if TYPE_CHECKING:
    from billing_cli.registry.model import SourceConfig

log = logging.getLogger(__name__)

SourceStatus = Literal["ok", "failed", "skipped", "interrupted"]

MAX_ERROR_CHARS = 400
FIRST_PAGE_ITEMS = 8
# What the deployed exporter's /v1/snapshots/latest answers (HTTP 404, text/plain) until
# it has taken its first snapshot.
NO_SNAPSHOT_BODY = "no snapshot available"
# How far ahead of this host's clock an item may be dated before it is refused as future.
CLOCK_SKEW_NS = 5 * NS_PER_MINUTE
OUTSIDE_WINDOW = "collected_at is outside the window it was requested for"
IN_THE_FUTURE = "collected_at is later than now plus the 5m clock-skew allowance"


@dataclass(frozen=True)
class PullNote:
    """Something worth reporting about a source that is not a failure (a run's note)."""

    text: str


class BudgetExceededError(SourceError):
    """The source used up its time budget for this run (progress so far is committed)."""


class SourceLike(Protocol):
    """What the pull loop needs from a registry ``SourceConfig``."""

    @property
    def source_id(self) -> str: ...

    @property
    def node_id(self) -> str: ...

    @property
    def env(self) -> str: ...

    @property
    def api(self) -> str: ...


class ExporterClient(Protocol):
    """What the pull loop needs from ``transport.SourceClient`` (one per source)."""

    @property
    def redactor(self) -> Redactor:
        """The source's secrets, for the one redaction step of what the exporter sends."""
        ...

    def get_window(self, since_ns: int, until_ns: int, limit: int, cursor: str | None) -> bytes: ...

    def get_latest(self) -> bytes: ...

    def abort(self) -> None:
        """End the request in flight now (from another thread): the run is stopping."""
        ...


# The pull loop only reads ``SourceLike`` fields; the client factory gets the task's own
# source type (a registry ``SourceConfig`` in production, a small fake in tests).
S = TypeVar("S", bound=SourceLike)
ClientFactory = Callable[[S], AbstractContextManager[ExporterClient]]


@dataclass(frozen=True)
class PullTask(Generic[S]):
    """Pull ``[since_ns, until_ns)`` of one source.

    ``advance_checkpoint`` is True for ``collect`` (cursor on every page,
    ``last_successful_until`` on each chunk's last page) and False for ``reconcile``,
    which re-reads history and never touches the checkpoint.
    """

    source: S
    since_ns: int
    until_ns: int
    advance_checkpoint: bool = True


@dataclass
class PullSettings:
    """Per-run knobs (from the registry ``[defaults]`` and the command line)."""

    chunk_s: float = 3600.0
    page_limit: int = 1000
    # Items per request are also capped so one page holds about this many samples: memory
    # is bounded by a few pages whatever the window or the fleet's series count.
    page_samples: int = 48_000
    budget_s: float = 300.0
    collect_bucket_changes: bool = False
    # [defaults] retention: items older than the run's start minus this are refused.
    retention_s: float | None = None


@dataclass
class SourceOutcome:
    """One source's result in one run."""

    source_id: str
    node_id: str
    env: str
    status: SourceStatus
    since_ns: int | None = None
    until_ns: int | None = None
    started_at_ns: int = 0
    finished_at_ns: int = 0
    pages: int = 0
    chunks_completed: int = 0
    report: ApplyReport = field(default_factory=ApplyReport)
    covered_until_ns: int | None = None  # highest last_successful_until committed this run
    minutes_seen: set[int] = field(default_factory=set)  # minute starts with an item
    error: str | None = None
    note: str | None = None

    def counts(self) -> dict[str, int]:
        r = self.report
        return {
            "pages": self.pages,
            "items": r.items,
            "samples": r.samples,
            "new_observations": r.new_observations,
            "duplicates": r.duplicates,
            "conflicts": r.conflicts,
            "rejected": r.rejected,
            "beyond_retention": r.beyond_retention,
            "anomalies": r.anomalies,
            "buckets_changed": r.buckets_changed,
            "bytes": r.bytes,
            "postings": r.postings,
            "adjustments": r.adjustments,
        }


def plan_chunks(since_ns: int, until_ns: int, chunk_ns: int) -> list[tuple[int, int]]:
    """Split ``[since, until)`` into consecutive half-open chunks of at most ``chunk_ns``."""
    if until_ns <= since_ns:
        return []
    chunk_ns = max(chunk_ns, 1)
    out: list[tuple[int, int]] = []
    start = since_ns
    while start < until_ns:
        end = min(start + chunk_ns, until_ns)
        out.append((start, end))
        start = end
    return out


def _check_identity(
    source: SourceLike, node_id: str, env: str, what: str, collected_at_ns: int | None = None
) -> None:
    if node_id != source.node_id or env != source.env:
        raise SourceIdentityError(
            source.source_id,
            f"{what} is from node_id '{node_id}' env '{env}' but the registry says node_id "
            f"'{source.node_id}' env '{source.env}'; nothing from it was applied and the "
            "checkpoint did not move (fix the registry entry or the exporter's identity)",
            node_id=node_id,
            env=env,
            collected_at_ns=collected_at_ns,
        )


def _check_items(source: SourceLike, items: list[Item], where: str) -> None:
    for item in items:
        if item.node_id != source.node_id or item.env != source.env:
            _check_identity(
                source,
                item.node_id,
                item.env,
                f"{where} item collected at {format_rfc3339_ns(item.collected_at_ns)}",
                item.collected_at_ns,
            )


def iter_source_batches(
    task: PullTask[S],
    client: ExporterClient,
    *,
    pricing: Pricing,
    run_id: int,
    settings: PullSettings,
    attempted_at_ns: int,
    deadline_ns: int | None = None,
    clock: Callable[[], int] = now_ns,
) -> Iterator[Batch | PullNote]:
    """Pull one source and yield one :class:`Batch` per page, in order (and a
    :class:`PullNote` when there is something to say that is not a failure).

    Raises a :class:`SourceError` subclass on the first protocol, identity, transport or
    budget failure; batches already yielded stay valid (each carries only the checkpoint
    movement its own data justifies).
    """
    source = task.source
    redactor = client.redactor
    if source.api == "latest":
        yield from _iter_latest(task, client, pricing, run_id, settings, attempted_at_ns, clock)
        return
    chunk_ns = int(settings.chunk_s * NS_PER_SECOND)
    # Start small (series per item are unknown yet) and adapt after the first page.
    limit = min(settings.page_limit, FIRST_PAGE_ITEMS)
    seen_items = seen_samples = 0
    for chunk_since, chunk_until in plan_chunks(task.since_ns, task.until_ns, chunk_ns):
        cursor: str | None = None
        seen: set[bytes] = set()  # digests of the cursors received (bounded memory)
        page_no = 0
        while True:
            if deadline_ns is not None and clock() > deadline_ns:
                raise BudgetExceededError(
                    source.source_id,
                    f"time budget of {settings.budget_s:g}s used up at "
                    f"{format_rfc3339_ns(chunk_since)}; committed pages are kept and the next "
                    "run continues from the checkpoint",
                )
            page_no += 1
            where = f"page {page_no} of chunk {format_rfc3339_ns(chunk_since)}"
            # The window API's bounds are inclusive; chunks are half-open, so ask for
            # [since, until - 1ns] and no item is fetched twice at a chunk boundary.
            raw = client.get_window(chunk_since, chunk_until - 1, limit, cursor)
            try:
                page = parse_window_page(raw)
            except WireFormatError as exc:
                raise ProtocolError(source.source_id, f"{where}: {exc}") from None
            if redactor.may_contain(raw):
                page = redactor.page(page)
            del raw
            # A page without identity (the deployed exporter's empty page) claims nothing;
            # its items, if any, are checked one by one below.
            if page.node_id is not None or page.env is not None:
                _check_identity(
                    source, page.node_id or source.node_id, page.env or source.env, where
                )
            if page.source_id is not None and page.source_id != source.source_id:
                raise SourceIdentityError(
                    source.source_id,
                    f"{where} names source_id '{page.source_id}'; nothing from it was applied "
                    "and the checkpoint did not move",
                    node_id=page.node_id or "",
                    env=page.env or "",
                )
            _check_items(source, page.items, where)
            for r in page.rejections:
                # A rejected item still names its node: another node's item is foreign too.
                if not _rejection_ok(source, r):
                    _check_identity(
                        source, r.node_id, r.env, f"{where} rejected item", r.collected_at_ns
                    )
            next_digest = _digest(page.next_cursor)
            if page.has_more:
                if not page.next_cursor:
                    raise ProtocolError(source.source_id, f"{where}: has_more without next_cursor")
                if not page.items and not page.rejections:
                    raise ProtocolError(
                        source.source_id, f"{where}: has_more is true but the page is empty"
                    )
                if page.next_cursor == cursor or next_digest in seen:
                    raise ProtocolError(
                        source.source_id,
                        f"{where}: exporter repeated a cursor (pagination loop); stopped",
                    )
            last = not page.has_more
            if page.items:
                # Adapt the item limit to the exporter's series count (samples per item).
                seen_items += len(page.items)
                seen_samples += sum(len(i.samples) for i in page.items)
                per_item = max(1, seen_samples // seen_items)
                limit = max(1, min(settings.page_limit, settings.page_samples // per_item))
            items, rejections = _in_window(
                page.items, page.rejections, chunk_since, chunk_until, clock()
            )
            stored_cursor = page.next_cursor if page.next_cursor is not None else cursor
            advance = _advance(
                task,
                last_cursor=redactor.opt(stored_cursor),
                until_ns=chunk_until if last else None,
                attempted_at_ns=attempted_at_ns,
                items=items,
            )
            yield _batch(task, items, rejections, advance, pricing, run_id, settings)
            if last:
                break
            assert page.next_cursor is not None
            assert next_digest is not None
            seen.add(next_digest)
            cursor = page.next_cursor  # verbatim: cursors are opaque (nanosecond RFC3339)


def _digest(cursor: str | None) -> bytes | None:
    if cursor is None:
        return None
    return hashlib.blake2b(cursor.encode("utf-8", "surrogatepass"), digest_size=16).digest()


def _in_window(
    items: list[Item],
    rejections: list[Rejection],
    since_ns: int | None,
    until_ns: int | None,
    now: int,
) -> tuple[list[Item], list[Rejection]]:
    """Items inside ``[since_ns, until_ns)`` (None: unbounded) and not later than ``now``
    plus the clock-skew allowance; the others become rejections, one per sample.

    An exporter that answers a window with items from elsewhere (a 1970 item re-baselines
    a user and bills history from before billing began into one minute; a year-2200 item
    creates buckets in 2200) is not trusted with them; the window that covers them asks
    again for those that are real.
    """
    latest_ok = now + CLOCK_SKEW_NS
    bad = [
        i
        for i in items
        if i.collected_at_ns > latest_ok
        or (since_ns is not None and i.collected_at_ns < since_ns)
        or (until_ns is not None and i.collected_at_ns >= until_ns)
    ]
    if not bad:
        return items, rejections
    out = list(rejections)
    for i in bad:
        reason = IN_THE_FUTURE if i.collected_at_ns > latest_ok else OUTSIDE_WINDOW
        if not i.samples:
            out.append(Rejection(i.collected_at_ns, i.node_id, i.env, "", "", reason))
        out.extend(
            Rejection(i.collected_at_ns, i.node_id, i.env, s.uuid, s.inbound_tag, reason)
            for s in i.samples
        )
    ids = {id(i) for i in bad}
    return [i for i in items if id(i) not in ids], out


def _iter_latest(
    task: PullTask[S],
    client: ExporterClient,
    pricing: Pricing,
    run_id: int,
    settings: PullSettings,
    attempted_at_ns: int,
    clock: Callable[[], int],
) -> Iterator[Batch | PullNote]:
    """Legacy ``/v1/snapshots/latest``: one item per run.

    Whatever happened between two runs is one delta attributed to the later item's
    minute (DESIGN §4): the metering rules, not the collector, handle the gap.
    """
    source = task.source
    try:
        raw = client.get_latest()
    except HTTPStatusError as exc:
        if exc.status != 404 or exc.body != NO_SNAPSHOT_BODY:
            raise
        # The deployed exporter's answer until its first snapshot exists (a new node):
        # nothing to bill yet, not a failure. Freshness (billing status) still sees that
        # no data has arrived.
        yield PullNote(
            f"the exporter has no snapshot yet (HTTP 404 '{NO_SNAPSHOT_BODY}'); "
            "nothing to bill until it has one"
        )
        items: list[Item] = []
        rejections: list[Rejection] = []
    else:
        try:
            items, rejections = parse_latest(raw, node_id=source.node_id, env=source.env)
        except WireFormatError as exc:
            raise ProtocolError(source.source_id, f"latest snapshot: {exc}") from None
        if client.redactor.may_contain(raw):
            items, rejections = client.redactor.items(items, rejections)
    _check_items(source, items, "latest snapshot")
    rejections = [r for r in rejections if _rejection_ok(source, r)]
    # No window to hold the item to, but the future is still refused.
    items, rejections = _in_window(items, rejections, None, None, clock())
    advance = _advance(
        task,
        last_cursor=None,
        until_ns=max((i.collected_at_ns for i in items), default=None),
        attempted_at_ns=attempted_at_ns,
        items=items,
    )
    yield _batch(task, items, rejections, advance, pricing, run_id, settings)


def _advance(
    task: PullTask[S],
    *,
    last_cursor: str | None,
    until_ns: int | None,
    attempted_at_ns: int,
    items: list[Item],
) -> CheckpointAdvance | None:
    """The checkpoint movement a batch carries (none for reconcile).

    It also carries the newest ``collected_at`` of the page's items: health measures the
    source's freshness from the data received, not from the request's ``until``.
    """
    if not task.advance_checkpoint:
        return None
    source = task.source
    return CheckpointAdvance(
        source_id=source.source_id,
        node_id=source.node_id,
        env=source.env,
        last_cursor=last_cursor,
        last_successful_until_ns=until_ns,
        attempted_at_ns=attempted_at_ns,
        newest_collected_at_ns=max((i.collected_at_ns for i in items), default=None),
    )


def _batch(
    task: PullTask[S],
    items: list[Item],
    rejections: list[Rejection],
    advance: CheckpointAdvance | None,
    pricing: Pricing,
    run_id: int,
    settings: PullSettings,
) -> Batch:
    return Batch(
        items=items,
        run_id=run_id,
        pricing=pricing,
        source_id=task.source.source_id,
        rejections=rejections,
        checkpoint=advance,
        collect_bucket_changes=settings.collect_bucket_changes,
        retention_ns=None if settings.retention_s is None else int(settings.retention_s * 1e9),
    )


def _rejection_ok(source: SourceLike, r: Rejection) -> bool:
    return bool(r.node_id == source.node_id and r.env == source.env) or not r.node_id


# --- orchestration: workers pull, the calling thread writes ----------------------------


@dataclass
class _Msg:
    kind: Literal["batch", "note", "done", "error"]
    source_id: str
    batch: Batch | None = None
    error: BaseException | None = None
    note: str | None = None


class RunHooks(Protocol):
    """Callbacks for progress display and lock release (all called in the writer thread)."""

    def on_page(self, outcome: SourceOutcome) -> None: ...

    def on_finished(self, outcome: SourceOutcome) -> None: ...


class _NoHooks:
    def on_page(self, outcome: SourceOutcome) -> None:
        return None

    def on_finished(self, outcome: SourceOutcome) -> None:
        return None


def _error_text(exc: BaseException) -> str:
    """Errors are stored and printed as one bounded line."""
    if isinstance(exc, BillingError):
        return one_line(exc.message, MAX_ERROR_CHARS)
    # A bug or an unexpected library exception: name it, without a traceback.
    return one_line(f"internal error: {type(exc).__name__}: {exc}", MAX_ERROR_CHARS)


def run_sources(
    store: Store,
    tasks: list[PullTask[S]],
    make_client: ClientFactory[S],
    *,
    pricing: Pricing,
    run_id: int,
    settings: PullSettings,
    concurrency: int = 8,
    hooks: RunHooks | None = None,
    record_checkpoints: bool = True,
    clock: Callable[[], int] = now_ns,
    outcomes: dict[str, SourceOutcome] | None = None,
) -> dict[str, SourceOutcome]:
    """Pull every task concurrently (bounded) and apply their pages in this thread.

    ``record_checkpoints``: call ``record_success``/``record_failure`` per source
    (collect); reconcile passes False and leaves checkpoints alone. ``outcomes``, when
    given, is filled as the run goes: when the run is interrupted (a ``KeyboardInterrupt``
    — Ctrl-C or SIGTERM — raised in this thread) it holds what was done, the unfinished
    sources marked ``interrupted``, and the exception propagates at once: the requests in
    flight are aborted, no stuck worker is waited for.
    """
    hooks = hooks or _NoHooks()
    outcomes = {} if outcomes is None else outcomes
    if not tasks:
        return outcomes
    # Bounded: a fast exporter cannot run ahead of the writer by more than a few pages.
    # Peak memory is about (concurrency + 2 + 1) pages, whatever the window.
    inbox: queue.Queue[_Msg] = queue.Queue(maxsize=2)
    abandoned: set[str] = set()  # sources the writer failed; their workers stop early
    abandoned_lock = threading.Lock()
    stop = threading.Event()  # the writer gave up (interrupt, bug): workers must not block
    live: dict[str, ExporterClient] = {}  # clients with a request possibly in flight
    live_lock = threading.Lock()

    def put(msg: _Msg) -> None:
        while not stop.is_set():
            try:
                inbox.put(msg, timeout=0.2)
                return
            except queue.Full:
                continue

    def work(task: PullTask[S], outcome: SourceOutcome) -> None:
        sid = task.source.source_id
        # The budget and last_attempted_at count from when the pull really starts, not
        # from when it was queued behind the concurrency bound.
        outcome.started_at_ns = clock()
        redactor = NO_SECRETS
        try:
            deadline = outcome.started_at_ns + int(settings.budget_s * NS_PER_SECOND)
            with make_client(task.source) as client:
                redactor = client.redactor
                with live_lock:
                    live[sid] = client
                if stop.is_set():
                    client.abort()
                try:
                    for batch in iter_source_batches(
                        task,
                        client,
                        pricing=pricing,
                        run_id=run_id,
                        settings=settings,
                        attempted_at_ns=outcome.started_at_ns,
                        deadline_ns=deadline,
                        clock=clock,
                    ):
                        with abandoned_lock:
                            if sid in abandoned or stop.is_set():
                                break
                        if isinstance(batch, PullNote):
                            put(_Msg("note", sid, note=redactor.text(batch.text)))
                        else:
                            put(_Msg("batch", sid, batch=batch))
                finally:
                    with live_lock:
                        live.pop(sid, None)
            put(_Msg("done", sid))
        except BaseException as exc:  # noqa: BLE001 - reported to the writer, never lost
            # Whatever the exporter said inside the error leaves the worker redacted.
            put(_Msg("error", sid, error=redactor.error(exc)))

    todo: queue.SimpleQueue[PullTask[S]] = queue.SimpleQueue()
    for task in tasks:
        src = task.source
        outcomes[src.source_id] = SourceOutcome(
            source_id=src.source_id,
            node_id=src.node_id,
            env=src.env,
            status="ok",
            since_ns=task.since_ns,
            until_ns=task.until_ns,
            started_at_ns=clock(),
        )
        todo.put(task)

    def runner() -> None:
        while not stop.is_set():
            try:
                task = todo.get_nowait()
            except queue.Empty:
                return
            work(task, outcomes[task.source.source_id])

    # Daemon threads, not a ThreadPoolExecutor: the interpreter joins an executor's
    # threads at exit, so one exporter that never answers would hold a stopped run.
    workers = [
        threading.Thread(target=runner, name=f"pull-{n}", daemon=True)
        for n in range(max(1, min(concurrency, len(tasks))))
    ]
    for w in workers:
        w.start()
    try:
        _write_loop(
            store,
            tasks,
            inbox,
            outcomes,
            hooks,
            abandoned,
            abandoned_lock,
            record_checkpoints,
            clock,
            run_id,
        )
    except BaseException as exc:
        stop.set()
        with live_lock:
            stuck = list(live.values())
        for client in stuck:
            client.abort()
        if isinstance(exc, KeyboardInterrupt):
            _mark_interrupted(outcomes, exc, clock())
        raise
    finally:
        stop.set()
    for w in workers:
        w.join()  # every worker has reported its source: they are ending
    return outcomes


def _mark_interrupted(outcomes: dict[str, SourceOutcome], exc: KeyboardInterrupt, now: int) -> None:
    name = getattr(exc, "signal_name", "SIGINT")
    for o in outcomes.values():
        if o.finished_at_ns == 0 and o.status != "skipped":
            o.status = "interrupted"
            o.finished_at_ns = now
            o.error = (
                f"source '{o.source_id}': interrupted by {name} before it finished; the "
                "pages committed so far are kept and the next run continues from the checkpoint"
            )


def _write_loop(
    store: Store,
    tasks: list[PullTask[S]],
    inbox: queue.Queue[_Msg],
    outcomes: dict[str, SourceOutcome],
    hooks: RunHooks,
    abandoned: set[str],
    abandoned_lock: threading.Lock,
    record_checkpoints: bool,
    clock: Callable[[], int],
    run_id: int,
) -> None:
    pending = len(tasks)
    by_id = {t.source.source_id: t for t in tasks}
    while pending:
        msg = inbox.get()
        outcome = outcomes[msg.source_id]
        task = by_id[msg.source_id]
        if msg.kind == "note":
            outcome.note = msg.note
            continue
        if msg.kind == "batch":
            if outcome.status == "failed":
                continue
            assert msg.batch is not None
            try:
                outcome.report += store.apply(msg.batch)
            except Exception as exc:  # noqa: BLE001 - fails this source only
                _fail(outcome, exc, abandoned, abandoned_lock)
                continue
            _account_page(outcome, msg.batch)
            hooks.on_page(outcome)
            continue
        pending -= 1
        if msg.kind == "error" and outcome.status != "failed":
            assert msg.error is not None
            if isinstance(msg.error, BudgetExceededError) and outcome.chunks_completed:
                # A long catch-up made progress and continues next run: not a failure.
                outcome.note = _error_text(msg.error)
            else:
                _fail(outcome, msg.error, abandoned, abandoned_lock)
                if isinstance(msg.error, SourceIdentityError):
                    _record_identity_mismatch(store, outcome, msg.error, run_id)
                if not isinstance(msg.error, BillingError):
                    log.debug("internal error pulling %s", msg.source_id, exc_info=msg.error)
        outcome.finished_at_ns = clock()
        if record_checkpoints:
            _record(store, outcome, task)
        hooks.on_finished(outcome)


def _account_page(outcome: SourceOutcome, batch: Batch) -> None:
    outcome.pages += 1
    for item in batch.items:
        outcome.minutes_seen.add(minute_floor_ns(item.collected_at_ns))
    cp = batch.checkpoint
    if cp is not None and cp.last_successful_until_ns is not None:
        outcome.chunks_completed += 1
        prev = outcome.covered_until_ns
        if prev is None or cp.last_successful_until_ns > prev:
            outcome.covered_until_ns = cp.last_successful_until_ns


def _fail(
    outcome: SourceOutcome,
    exc: BaseException,
    abandoned: set[str],
    abandoned_lock: threading.Lock,
) -> None:
    outcome.status = "failed"
    outcome.error = _error_text(exc)
    with abandoned_lock:
        abandoned.add(outcome.source_id)


def _record_identity_mismatch(
    store: Store, outcome: SourceOutcome, exc: SourceIdentityError, run_id: int
) -> None:
    """An exporter answering for another node is an integrity event (DESIGN §6), not only
    a failed run: it stays listed until someone acknowledges it (``billing integrity``).
    Once per distinct claim: a mis-identified source retried every minute is one event."""
    try:
        store.record_identity_mismatch(
            node_id=exc.node_id,
            env=exc.env,
            collected_at_ns=exc.collected_at_ns,
            source_id=outcome.source_id,
            run_id=run_id,
            detail=outcome.error or _error_text(exc),
        )
    except BillingError as err:
        log.warning("could not record the identity mismatch of %s: %s", outcome.source_id, err)


def _record(store: Store, outcome: SourceOutcome, task: PullTask[S]) -> None:
    src = task.source
    try:
        if outcome.status == "failed":
            store.record_failure(
                src.source_id, src.node_id, src.env, outcome.started_at_ns, outcome.error or ""
            )
        else:
            store.record_success(src.source_id, src.node_id, src.env, outcome.finished_at_ns)
    except BillingError as exc:
        # The data of this run is committed; only the health bookkeeping failed.
        log.warning("could not record the outcome of %s: %s", src.source_id, exc.message)


# --- glue to the real transport --------------------------------------------------------


def transport_client_factory(budget_s: float) -> ClientFactory[SourceConfig]:
    """Build one HTTPS ``SourceClient`` per source from its registry entry.

    Credential refs are resolved inside the worker, so a source with a broken ref fails
    alone (with a one-line message naming the ref) instead of stopping the run. Timeout,
    size cap, CA bundle and retry attempts come from the source's resolved values.
    """
    from billing_cli.collect.transport import SourceClient, build_transport_config

    def make(source: SourceConfig) -> AbstractContextManager[ExporterClient]:
        return SourceClient(build_transport_config(source, budget_s=budget_s))

    return make

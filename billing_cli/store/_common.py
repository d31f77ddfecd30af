"""The store algorithm shared by SQLite and PostgreSQL, over a thin dialect layer.

Everything that decides *what* is written lives here, once: grouping a batch by series,
reading heads and late-item windows in bulk, metering through
:func:`billing_cli.core.metering.diff_series`, bucket arithmetic, re-rating and ledger
postings, integrity events and the checkpoint. A :class:`Dialect` only knows *how* to
talk to its database (placeholders, key sets, bulk writes, transactions).

Hot path per page: one read of the series rows (heads) of every touched series, one
read of the stored windows of late series only, one read of the existing buckets that
can exist (minutes at or before the head), then one bulk write per table. Never a query
per sample.
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
import threading
from abc import ABC, abstractmethod
from collections import defaultdict, deque
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from functools import partial
from itertools import repeat
from operator import itemgetter
from typing import Any, Literal, NamedTuple, cast

import orjson

from billing_cli import _process
from billing_cli._errors import StoreError
from billing_cli._interrupt import protected
from billing_cli._time import NS_PER_SECOND, now_ns
from billing_cli.core import ledger, periods, rating
from billing_cli.core.metering import diff_series, minute_of
from billing_cli.core.statement import Statement
from billing_cli.core.types import Item, Observation, Rejection, SeriesKey
from billing_cli.pricing import Pricing
from billing_cli.store import _periods
from billing_cli.store.base import (
    ApplyReport,
    Batch,
    BucketChange,
    Checkpoint,
    IntegrityEvent,
    IntegrityKind,
    LedgerRow,
    PeriodClose,
    PeriodTotals,
    RerateReport,
    RowFilter,
    RunKind,
    RunOutcome,
    RunRecord,
    SourceRunResult,
    UsageRow,
)
from billing_cli.store.schema import SCHEMA_VERSION, migrations

Row = tuple[Any, ...]
KeyCol = tuple[str, Literal["bigint", "text"]]


class Dialect(ABC):
    """How to talk to one database; no billing logic here."""

    name: Literal["sqlite", "postgres"]
    errors: tuple[type[Exception], ...]
    order_collate: str = ""  # appended to ORDER BY text columns (binary order everywhere)
    # Appended to the series lookup of apply(). SQLite needs nothing (BEGIN IMMEDIATE
    # already serialises writers); PostgreSQL locks the touched series rows so two
    # concurrent applies to one series cannot both meter against the same head.
    lock_series: str = ""
    # Load the series of a (node_id, env) a page touches in bulk by one range scan of the
    # series key index (and keep those the page names) instead of a key-set join. SQLite
    # only: on PostgreSQL the scan would also lock the untouched series rows.
    scan_series: bool = False

    @abstractmethod
    def q(self, sql: str) -> str:
        """Rewrite ``?`` placeholders for this driver."""

    @abstractmethod
    def execute(self, sql: str, params: Sequence[Any] = ()) -> list[Row]: ...

    @abstractmethod
    def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None: ...

    @abstractmethod
    def stream(self, sql: str, params: Sequence[Any] = ()) -> Iterator[Row]: ...

    @abstractmethod
    def keyset(
        self, name: str, cols: Sequence[KeyCol], rows: Sequence[Row]
    ) -> tuple[str, list[Any]]:
        """A CTE fragment ``name(cols) AS (...)`` holding ``rows``, and its parameters."""

    keyset_chunk: int = 5000  # rows per key-set query

    @abstractmethod
    def transaction(self) -> AbstractContextManager[None]:
        """One atomic unit, committed at exit (rolled back on an exception)."""

    @abstractmethod
    def rolled_back(self) -> AbstractContextManager[None]:
        """Like :meth:`transaction` (same write locks), but always rolled back at exit."""

    @abstractmethod
    def has_table(self, name: str) -> bool:
        """Whether ``name`` is a table of the store's schema (without creating anything)."""

    @abstractmethod
    def bulk_insert(self, table: str, cols: Sequence[str], rows: Sequence[Row]) -> None:
        """Append rows to a table (executemany / COPY)."""

    @abstractmethod
    def add_uuid_usage(self, rows: Sequence[Row]) -> None:
        """Rows: (uuid, period_start_ns, d_uplink, d_downlink, bucket_start_ns): add the
        byte deltas to ``uuid_period_usage`` and raise its latest bucket start."""

    @abstractmethod
    def update_buckets(self, rows: Sequence[Row]) -> None:
        """Rows: (uplink, downlink, rated, amount, revision, included, series_id,
        bucket_start_ns)."""

    def insert_observations(self, rows: Sequence[Row]) -> None:
        """Rows: (series_id, collected_at_ns, uplink, downlink, epoch, run_id, source_id)."""
        self.bulk_insert("observations", _OBS_COLS, rows)

    @abstractmethod
    def update_heads(self, rows: Sequence[Row]) -> None:
        """Rows: (collected_at_ns, uplink, downlink, epoch, series_id)."""

    @abstractmethod
    def close(self) -> None: ...

    def migration_lock(self) -> None:  # noqa: B027 - optional hook, SQLite needs none
        """Serialise concurrent first-use migrations (inside the migration transaction)."""

    def lock_periods(self, *, exclusive: bool) -> None:  # noqa: B027 - SQLite needs none
        """Inside a transaction: shared by writers of postings, exclusive for a close
        (SQLite's BEGIN IMMEDIATE already serialises every writer)."""


# Items this close to the newest item of their node in a batch get their digest stored:
# the part the next pull's overlap (default 2 minutes) re-delivers. Older items are not
# remembered; re-delivered, they take the exact per-observation path (same result).
REMEMBER_ITEMS_NS = 10 * 60 * NS_PER_SECOND

_ItemKey = tuple[int, str, str]  # (collected_at_ns, node_id, env)


def _item_digest(item: Item) -> bytes | None:
    """A collision-resistant digest of an item's content: epoch and every sample, in order.

    Equal digests mean equal content; an item re-sent in another sample order just misses
    the shortcut. Column-wise (``zip``) so serialising needs no Python call per sample.
    None for content no store can hold (a counter beyond 64 bits): the apply refuses it.
    """
    try:
        body = orjson.dumps([item.counter_epoch, *zip(*item.samples, strict=True)])
    except TypeError:
        return None
    return hashlib.blake2b(body, digest_size=16).digest()


def rejection_events(
    rejections: list[Rejection], source_id: str | None, run_id: int, now: int
) -> list[Row]:
    """Integrity-event rows for a batch's rejections: one per item and reason, with the
    number of samples it covers (not one per sample: 1,000 samples of an item with a bad
    ``collected_at`` are one event), at most :data:`MAX_REJECTION_EVENTS_PER_ITEM` per
    item. Each row ends with its fingerprint (what it says, not when or by which run)."""
    groups: dict[tuple[int | None, str, str, str], list[Rejection]] = {}
    for r in rejections:
        groups.setdefault((r.collected_at_ns, r.node_id, r.env, r.reason), []).append(r)
    per_item: dict[tuple[int | None, str, str], int] = {}
    overflow: dict[tuple[int | None, str, str], list[int]] = {}  # item -> [reasons, samples]
    rows: list[Row] = []

    def row(at: int | None, node: str, env: str, uuid: str, tag: str, detail: str) -> None:
        digest = hashlib.blake2b(
            orjson.dumps(["rejected", node, env, uuid, tag, at, detail]), digest_size=16
        ).digest()
        rows.append(("rejected", node, env, uuid, tag, at, source_id, run_id, detail, now, digest))

    for (at, node, env, reason), members in groups.items():
        item = (at, node, env)
        n = per_item.get(item, 0)
        per_item[item] = n + 1
        if n >= MAX_REJECTION_EVENTS_PER_ITEM:
            slot = overflow.setdefault(item, [0, 0])
            slot[0] += 1
            slot[1] += len(members)
            continue
        if len(members) == 1:
            only = members[0]
            row(at, node, env, only.uuid, only.inbound_tag, reason)
        else:
            tags = {m.inbound_tag for m in members}
            row(at, node, env, "", tags.pop() if len(tags) == 1 else "",
                f"{reason} ({len(members)} samples)")  # fmt: skip
    for (at, node, env), (reasons, samples) in overflow.items():
        row(at, node, env, "", "", f"{samples} more rejected samples of this item, "
            f"{reasons} other reasons")  # fmt: skip
    return rows


def _late_row(series_id: int, obs: list[Observation]) -> Row:
    ts = [o.collected_at_ns for o in obs]
    return (series_id, min(ts), max(ts))


# A dry run re-applies its earlier pages' new observations before every page (see
# SqlStore.dry_run); past this many it stops rather than hold the lock for ever longer.
DRY_RUN_MAX_NEW = 1_000_000


@dataclass
class _DryPage:
    """What one page of a dry run genuinely added: its new observations per series."""

    pricing: Pricing
    observations: dict[RawKey, list[Observation]] = field(default_factory=dict)
    emails: dict[RawKey, str] = field(default_factory=dict)


@dataclass
class _DryRun:
    pages: list[_DryPage] = field(default_factory=list)
    new_observations: int = 0


_SCAN_MIN = 256  # keys of one (node_id, env) in a page before the series range scan pays


class _Series(NamedTuple):
    series_id: int
    email: str
    head: Observation | None
    key: SeriesKey


# A series key as a plain tuple: equal (and hashing equal) to the SeriesKey NamedTuple,
# but built without a Python-level constructor call on the per-sample path.
RawKey = tuple[str, str, str, str]
_tuple_new = tuple.__new__
_new_observation = partial(_tuple_new, Observation)  # Observation from a 4-tuple, in C


def _consume(iterator: Iterator[object]) -> None:
    """Run an iterator for its side effects at C speed (the itertools 'consume' recipe)."""
    deque(iterator, maxlen=0)


@dataclass(slots=True)
class _Bucket:
    """One bucket being changed in this batch (bytes and derived rating state)."""

    series_id: int
    key: SeriesKey
    start: int
    uplink: int
    downlink: int
    rated: int
    amount: int
    revision: int
    existed: bool
    old_uplink: int  # also what its postings add up to (every change of bytes is posted)
    old_downlink: int
    rating_dirty: bool = False  # rating state changed, bytes did not (quota re-rating)
    included: int = 0  # included quota used by its current rating


_OBS_COLS = (
    "series_id",
    "collected_at_ns",
    "uplink_total",
    "downlink_total",
    "counter_epoch",
    "run_id",
    "source_id",
)
_BUCKET_COLS = (
    "series_id",
    "bucket_start_ns",
    "uplink_bytes",
    "downlink_bytes",
    "rated_bytes",
    "amount_nano",
    "revision",
    "included_bytes",
)
_LEDGER_COLS = (
    "series_id",
    "bucket_start_ns",
    "revision",
    "entry_type",
    "rated_bytes",
    "amount_nano",
    "currency",
    "pricing_rule_version",
    "run_id",
    "created_at_ns",
    "period_start_ns",
    "uplink_bytes",
    "downlink_bytes",
    "included_bytes",
)
_ADD_UUID_USAGE = (
    "INSERT INTO uuid_period_usage AS t (uuid, period_start_ns, uplink_bytes, downlink_bytes,"
    " last_bucket_start_ns) VALUES (?,?,?,?,?) ON CONFLICT (uuid, period_start_ns) DO UPDATE SET"
    " uplink_bytes = t.uplink_bytes + excluded.uplink_bytes,"
    " downlink_bytes = t.downlink_bytes + excluded.downlink_bytes,"
    " last_bucket_start_ns = CASE WHEN excluded.last_bucket_start_ns > t.last_bucket_start_ns"
    " THEN excluded.last_bucket_start_ns ELSE t.last_bucket_start_ns END"
)
_CLOSED_SET_SQL = "SELECT period_start_ns FROM closed_periods"
_EVENT_SQL = (
    "INSERT INTO integrity_events (kind, node_id, env, uuid, inbound_tag, collected_at_ns,"
    " source_id, run_id, detail, created_at_ns) VALUES (?,?,?,?,?,?,?,?,?,?)"
)
# Rejection events carry a fingerprint: the same rejection delivered again (the overlap
# of every pull) is not stored twice.
_REJECTION_EVENT_SQL = (
    "INSERT INTO integrity_events (kind, node_id, env, uuid, inbound_tag, collected_at_ns,"
    " source_id, run_id, detail, created_at_ns, fingerprint) VALUES (?,?,?,?,?,?,?,?,?,?,?)"
    " ON CONFLICT (fingerprint) DO NOTHING"
)
# At most this many rejection events per item (one per distinct reason); the rest of an
# item's reasons are summed up in one more.
MAX_REJECTION_EVENTS_PER_ITEM = 20
_SERIES_COLS = (
    "s.series_id, s.node_id, s.env, s.uuid, s.inbound_tag, s.email,"
    " s.head_collected_at_ns, s.head_uplink, s.head_downlink, s.head_epoch"
)


def _group_by_series(
    items: list[Item],
) -> tuple[dict[RawKey, list[Observation]], dict[RawKey, str]]:
    """The page's observations per series key, in delivery order (the first value seen
    for a time wins), and each series' email from its latest sample in the page.

    Column by column with zip/map, so the per-sample work runs in C: this touches every
    sample of the page.
    """
    grouped: defaultdict[RawKey, list[Observation]] = defaultdict(list)
    item_emails: list[tuple[int, list[RawKey], tuple[str, ...]]] = []
    for item in items:
        if not item.samples:
            continue
        uuids, mails, tags, ups, downs = zip(*item.samples, strict=True)
        keys = list(zip(repeat(item.node_id), repeat(item.env), uuids, tags, strict=False))
        obs = map(
            _new_observation,
            zip(repeat(item.collected_at_ns), ups, downs, repeat(item.counter_epoch)),
        )
        _consume(map(list.append, map(grouped.__getitem__, keys), obs))
        item_emails.append((item.collected_at_ns, keys, mails))
    emails: dict[RawKey, str] = {}
    item_emails.sort(key=itemgetter(0))  # stable: equal times keep delivery order
    for _, keys, mails in item_emails:
        emails.update(zip(keys, mails, strict=True))
    return dict(grouped), emails


def _series_of(r: Row) -> _Series:
    """A ``_SERIES_COLS`` row as a ``_Series`` (both drivers return Python ints), built
    without the NamedTuple constructors: this runs once per series per page."""
    key = _tuple_new(SeriesKey, r[1:5])
    head = None if r[6] is None else _tuple_new(Observation, r[6:10])
    return _tuple_new(_Series, (r[0], r[5], head, key))


@contextmanager
def _gc_paused() -> Iterator[None]:
    """Pause the cyclic GC while a page is applied.

    A page allocates tens of thousands of small tuples and no reference cycles; without
    this, generation-0 collections keep re-scanning them (about a tenth of apply time).
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _period_end_ns(period_start: int, pricing: Pricing) -> int:
    # 32 days after a month start is always inside the next month.
    return rating.period_start_ns(period_start + 32 * 86400 * NS_PER_SECOND, pricing)


class SqlStore:
    """The :class:`~billing_cli.store.base.Store` implementation for both back ends."""

    # How far before the newest item of its node an item still gets its digest stored;
    # None: never (the tests compare both ways).
    remember_items_ns: int | None = REMEMBER_ITEMS_NS

    def __init__(self, db: Dialect, url_for_display: str, *, read_only: bool = False) -> None:
        self.db = db
        self.url_for_display = url_for_display
        self.read_only = read_only
        # The collector may share one store between threads; one operation at a time.
        self._lock = threading.RLock()
        self._dry: _DryRun | None = None
        try:
            if read_only:
                # Readers never create, migrate or lock anything (DESIGN §8).
                with self._guard("read the schema version"):
                    self._check_schema()
            else:
                with self._guard("migrate the schema"):
                    self._migrate()
        except BaseException:
            # A refused open (schema too new, locked) must not leak its connection.
            db.close()
            raise

    # --- plumbing ---------------------------------------------------------------------

    @contextmanager
    def _guard(self, what: str, *, lock: bool = True) -> Iterator[None]:
        # Readers that stream rows (iter_usage/iter_ledger) do not hold the lock while
        # suspended: a consumer may stop iterating at any point. Every other operation
        # ends (commits or rolls back) before a stop signal takes effect (_interrupt).
        with self._lock if lock else nullcontext(), protected() if lock else nullcontext():
            try:
                yield
            except self.db.errors as exc:
                first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
                raise StoreError(
                    f"database {self.url_for_display}: could not {what}: {first}"
                ) from None
            except OverflowError:
                # SQLite's driver refuses ints outside 64 bits before the database sees them.
                raise StoreError(
                    f"database {self.url_for_display}: could not {what}: a value is outside"
                    " the 64-bit integer range (bytes < 2^63, amounts < 2^63 nano-units)"
                ) from None

    def _too_new(self, current: int) -> StoreError:
        return StoreError(
            f"database {self.url_for_display} has schema version {current}, newer than "
            f"this billing supports ({SCHEMA_VERSION}); upgrade billing"
        )

    def _check_schema(self) -> None:
        """A read-only open: the schema must be there, at this billing's version.

        Readers never migrate (they never write); an older version is migrated by the next
        collect or ingest, and until then a read says so instead of reading columns that
        are not there yet.
        """
        current = 0
        if self.db.has_table("schema_version"):
            rows = self.db.execute("SELECT max(version) FROM schema_version")
            current = int(rows[0][0] or 0)
        if current == 0:
            raise StoreError(
                f"no billing data in {self.url_for_display}: it has no billing tables "
                "(run `billing collect` or `billing ingest FILE` against it first, or check --db)"
            )
        if current > SCHEMA_VERSION:
            raise self._too_new(current)
        if current < SCHEMA_VERSION:
            raise StoreError(
                f"database {self.url_for_display} has schema version {current}, older than "
                f"this billing ({SCHEMA_VERSION}): the next `billing collect` or `billing "
                "ingest` migrates it (read commands never write)"
            )

    def _migrate(self) -> None:
        with self.db.transaction():
            self.db.migration_lock()
            self.db.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
            rows = self.db.execute("SELECT max(version) FROM schema_version")
            current = int(rows[0][0] or 0)
            if current > SCHEMA_VERSION:
                raise self._too_new(current)
            for version, statements in migrations(self.db.name):
                if version <= current:
                    continue
                for stmt in statements:
                    self.db.execute(stmt)
                self.db.execute("INSERT INTO schema_version (version) VALUES (?)", (version,))

    def _keyset_query(
        self, sql: str, name: str, cols: Sequence[KeyCol], rows: Sequence[Row]
    ) -> list[Row]:
        """Run ``WITH <keyset> <sql>`` over ``rows`` in chunks; concatenate the results."""
        out: list[Row] = []
        step = self.db.keyset_chunk
        for i in range(0, len(rows), step):
            frag, params = self.db.keyset(name, cols, rows[i : i + step])
            out.extend(self.db.execute(f"WITH {frag} {sql}", params))
        return out

    def close(self) -> None:
        self.db.close()

    # --- dry runs -------------------------------------------------------------------------
    #
    # A dry run must never block the writers of other sources (the SQLite write lock is one
    # per file; PostgreSQL's per-uuid quota rows are shared by every node). So each page is
    # applied in its own transaction that is rolled back at once: the lock is held for one
    # page, never for the whole run. For the report to stay exact, page k must see what
    # pages 1..k-1 of the same dry run would have written. It does: before page k, inside
    # its transaction, the genuinely new observations of each earlier page are applied
    # again, page by page and silently (metering, buckets, rating and postings exactly as
    # the first time; an observation that was a duplicate or a refused conflict changes
    # nothing, so it is not kept). Replaying page by page, not merged, keeps even the
    # charge/adjustment split of later postings identical to a real run.
    #
    # Cost: page k re-applies the new observations of the pages before it, so a dry run
    # costs O(pages x new observations) and holds the lock per page for about the time
    # those take to apply. A reconcile of collected history finds few new observations
    # (cheap); a dry run of a range that was never collected replays everything each page,
    # so it is refused beyond DRY_RUN_MAX_NEW new observations (with a one-line error
    # saying so) instead of holding the lock for longer and longer pages.

    @contextmanager
    def _dry_run(self) -> Iterator[None]:
        if self._dry is not None:
            raise RuntimeError("dry runs do not nest")
        self._dry = _DryRun()
        try:
            yield
        finally:
            self._dry = None

    def dry_run(self) -> AbstractContextManager[None]:
        return self._dry_run()

    def _tx(self) -> AbstractContextManager[None]:
        """A write transaction; inside a dry run one that is rolled back at exit."""
        return self.db.rolled_back() if self._dry is not None else self.db.transaction()

    def _apply_dry(self, batch: Batch, dry: _DryRun) -> ApplyReport:
        page = _DryPage(batch.pricing)
        with self._guard("apply a batch"), _gc_paused(), self.db.rolled_back():
            for earlier in dry.pages:
                per_key = {k: list(v) for k, v in earlier.observations.items()}
                replay = Batch(items=[], run_id=0, pricing=earlier.pricing)
                self._apply_observations(
                    replay, per_key, dict(earlier.emails), ApplyReport(), [], now_ns()
                )
            report = self._apply(batch, capture=page)
        if page.observations:
            dry.new_observations += sum(len(v) for v in page.observations.values())
            if dry.new_observations > DRY_RUN_MAX_NEW:
                raise StoreError(
                    f"dry run stopped: more than {DRY_RUN_MAX_NEW:,} new observations (this "
                    "range was mostly never collected, and a dry run re-applies them for every "
                    "page); reconcile without --dry-run, or a shorter range"
                )
            dry.pages.append(page)
        return report

    # --- runs ---------------------------------------------------------------------------

    def start_run(self, kind: RunKind, sources: list[str], actor: str | None = None) -> int:
        # The process is recorded so that a run killed before it could finish is seen as
        # abandoned (its process is gone) rather than as running forever.
        with self._guard("start a run"), self._tx():
            rows = self.db.execute(
                "INSERT INTO runs (kind, sources, started_at_ns, actor, pid, host)"
                " VALUES (?,?,?,?,?,?) RETURNING run_id",
                (kind, json.dumps(sources), now_ns(), actor, os.getpid(), _process.this_host()),
            )
            return int(rows[0][0])

    def finish_run(self, run_id: int, outcome: str, per_source: dict[str, SourceRunResult]) -> None:
        with self._guard("finish a run"), self._tx():
            self.db.execute(
                "UPDATE runs SET finished_at_ns = ?, outcome = ? WHERE run_id = ?",
                (now_ns(), outcome, run_id),
            )
            self.db.executemany(
                "INSERT INTO run_sources (run_id, source_id, kind, started_at_ns, finished_at_ns,"
                " outcome, counts, error, top_rejection) VALUES (?,?,?,?,?,?,?,?,?)"
                " ON CONFLICT (run_id, source_id) DO UPDATE SET kind = excluded.kind,"
                " started_at_ns = excluded.started_at_ns, finished_at_ns = excluded.finished_at_ns,"
                " outcome = excluded.outcome, counts = excluded.counts, error = excluded.error,"
                " top_rejection = excluded.top_rejection",
                [
                    (
                        run_id,
                        sid,
                        r.kind,
                        r.started_at_ns,
                        r.finished_at_ns,
                        r.outcome,
                        json.dumps(r.counts, sort_keys=True),
                        r.error,
                        r.top_rejection,
                    )
                    for sid, r in per_source.items()
                ],
            )

    def last_source_results(self) -> dict[str, SourceRunResult]:
        with self._guard("read run results"):
            rows = self.db.execute(
                "SELECT r.run_id, r.source_id, r.kind, r.started_at_ns, r.finished_at_ns,"
                " r.outcome, r.counts, r.error, r.top_rejection FROM run_sources r WHERE r.run_id ="
                " (SELECT max(r2.run_id) FROM run_sources r2 WHERE r2.source_id = r.source_id)"
            )
        return {
            row[1]: SourceRunResult(
                run_id=int(row[0]),
                source_id=row[1],
                kind=cast(RunKind, row[2]),
                started_at_ns=int(row[3]),
                finished_at_ns=int(row[4]),
                outcome=cast(RunOutcome, row[5]),
                counts={str(k): int(v) for k, v in json.loads(row[6]).items()},
                error=row[7],
                top_rejection=row[8],
            )
            for row in rows
        }

    def unfinished_runs(self) -> list[RunRecord]:
        with self._guard("read runs"):
            rows = self.db.execute(
                "SELECT run_id, kind, sources, started_at_ns, pid, host FROM runs"
                " WHERE outcome IS NULL ORDER BY run_id"
            )
        out: list[RunRecord] = []
        for r in rows:
            pid = None if r[4] is None else int(r[4])
            started = int(r[3])
            out.append(
                RunRecord(
                    run_id=int(r[0]),
                    kind=cast(RunKind, r[1]),
                    sources=[str(x) for x in json.loads(r[2])],
                    started_at_ns=started,
                    pid=pid,
                    host=r[5],
                    process_gone=_process.process_gone(pid, r[5], started),
                )
            )
        return out

    def abandoned_runs(self) -> list[RunRecord]:
        return [r for r in self.unfinished_runs() if r.process_gone]

    # --- checkpoints ----------------------------------------------------------------------

    _CP_COLS = (
        "source_id, node_id, env, last_successful_until_ns, last_cursor, last_attempted_at_ns,"
        " last_succeeded_at_ns, last_error, consecutive_failures, newest_collected_at_ns,"
        " first_succeeded_at_ns"
    )

    @staticmethod
    def _checkpoint(row: Row) -> Checkpoint:
        return Checkpoint(
            source_id=row[0],
            node_id=row[1],
            env=row[2],
            last_successful_until_ns=None if row[3] is None else int(row[3]),
            last_cursor=row[4],
            last_attempted_at_ns=None if row[5] is None else int(row[5]),
            last_succeeded_at_ns=None if row[6] is None else int(row[6]),
            last_error=row[7],
            consecutive_failures=int(row[8]),
            newest_collected_at_ns=None if row[9] is None else int(row[9]),
            first_succeeded_at_ns=None if row[10] is None else int(row[10]),
        )

    def get_checkpoint(self, source_id: str) -> Checkpoint | None:
        with self._guard("read a checkpoint"):
            rows = self.db.execute(
                f"SELECT {self._CP_COLS} FROM source_checkpoints WHERE source_id = ?",
                (source_id,),
            )
        return self._checkpoint(rows[0]) if rows else None

    def list_checkpoints(self) -> list[Checkpoint]:
        with self._guard("read checkpoints"):
            rows = self.db.execute(
                f"SELECT {self._CP_COLS} FROM source_checkpoints"
                f" ORDER BY source_id{self.db.order_collate}"
            )
        return [self._checkpoint(r) for r in rows]

    def record_failure(
        self, source_id: str, node_id: str, env: str, attempted_at_ns: int, error: str
    ) -> None:
        with self._guard("record a failure"), self._tx():
            self.db.execute(
                "INSERT INTO source_checkpoints (source_id, node_id, env, last_attempted_at_ns,"
                " last_error, consecutive_failures) VALUES (?,?,?,?,?,1)"
                " ON CONFLICT (source_id) DO UPDATE SET node_id = excluded.node_id,"
                " env = excluded.env, last_attempted_at_ns = excluded.last_attempted_at_ns,"
                " last_error = excluded.last_error,"
                " consecutive_failures = source_checkpoints.consecutive_failures + 1",
                (source_id, node_id, env, attempted_at_ns, error),
            )

    def record_success(self, source_id: str, node_id: str, env: str, at_ns: int) -> None:
        with self._guard("record a success"), self._tx():
            self.db.execute(
                "INSERT INTO source_checkpoints (source_id, node_id, env, last_succeeded_at_ns,"
                " first_succeeded_at_ns, consecutive_failures) VALUES (?,?,?,?,?,0)"
                " ON CONFLICT (source_id) DO UPDATE SET node_id = excluded.node_id,"
                " env = excluded.env, last_succeeded_at_ns = excluded.last_succeeded_at_ns,"
                " first_succeeded_at_ns = COALESCE(source_checkpoints.first_succeeded_at_ns,"
                " excluded.first_succeeded_at_ns),"
                " last_error = NULL, consecutive_failures = 0",
                (source_id, node_id, env, at_ns, at_ns),
            )

    # --- reads ----------------------------------------------------------------------------

    def _where(
        self, flt: RowFilter, time_col: str, *, ledger: bool = False
    ) -> tuple[str, list[Any]]:
        conds: list[str] = []
        params: list[Any] = []
        for col, val in (("node_id", flt.node_id), ("env", flt.env), ("uuid", flt.uuid)):
            if val is not None:
                conds.append(f"s.{col} = ?")
                params.append(val)
        if flt.uuids:
            conds.append(f"s.uuid IN ({','.join('?' * len(flt.uuids))})")
            params.extend(flt.uuids)
        if ledger:
            # (the accounting period selects the table itself: see iter_ledger)
            for cond, bound in (
                ("l.created_at_ns >= ?", flt.posted_since_ns),
                ("l.created_at_ns < ?", flt.posted_until_ns),
            ):
                if bound is not None:
                    conds.append(cond)
                    params.append(bound)
        if flt.since_ns is not None:
            conds.append(f"{time_col} >= ?")
            params.append(flt.since_ns)
        if flt.until_ns is not None:
            conds.append(f"{time_col} < ?")
            params.append(flt.until_ns)
        if flt.series_filters:
            conds.append(
                "(" + " OR ".join("(s.node_id = ? AND s.env = ?)" for _ in flt.series_filters) + ")"
            )
            for node_id, env in flt.series_filters:
                params.extend((node_id, env))
        return (" AND ".join(conds) or "1 = 1"), params

    def _order(self, *cols: str) -> str:
        c = self.db.order_collate
        return ", ".join(f"{col}{c}" if col.startswith("s.") else col for col in cols)

    def iter_usage(self, flt: RowFilter) -> Iterator[UsageRow]:
        where, params = self._where(flt, "b.bucket_start_ns")
        sql = (
            "SELECT s.node_id, s.env, s.uuid, s.inbound_tag, b.bucket_start_ns, b.uplink_bytes,"
            " b.downlink_bytes FROM buckets b JOIN series s ON s.series_id = b.series_id"
            f" WHERE (b.uplink_bytes <> 0 OR b.downlink_bytes <> 0) AND {where} ORDER BY "
            + self._order("b.bucket_start_ns", "s.node_id", "s.env", "s.uuid", "s.inbound_tag")
        )
        with self._guard("read usage", lock=False):
            for r in self.db.stream(sql, params):
                yield UsageRow(r[0], r[1], r[2], r[3], int(r[4]), int(r[5]), int(r[6]))

    def iter_ledger(self, flt: RowFilter) -> Iterator[LedgerRow]:
        where, params = self._where(flt, "l.bucket_start_ns", ledger=True)
        source = (
            "ledger_postings"
            if flt.period_start_ns is None
            else f"({_periods.accounted_in(flt.period_start_ns)})"
        )
        sql = (
            "SELECT l.entry_id, s.node_id, s.env, s.uuid, s.inbound_tag, l.bucket_start_ns,"
            " l.revision, l.entry_type, l.rated_bytes, l.amount_nano, l.currency,"
            " l.pricing_rule_version, l.run_id, l.created_at_ns, l.period_start_ns,"
            " l.uplink_bytes, l.downlink_bytes, l.included_bytes"
            f" FROM {source} l JOIN series s ON s.series_id = l.series_id"
            f" WHERE {where} ORDER BY "
            + self._order(
                "l.bucket_start_ns", "s.node_id", "s.env", "s.uuid", "s.inbound_tag", "l.revision"
            )
        )
        with self._guard("read the ledger", lock=False):
            for r in self.db.stream(sql, params):
                yield LedgerRow(
                    entry_id=int(r[0]),
                    node_id=r[1],
                    env=r[2],
                    uuid=r[3],
                    inbound_tag=r[4],
                    bucket_start_ns=int(r[5]),
                    revision=int(r[6]),
                    entry_type=cast(Literal["charge", "adjustment"], r[7]),
                    rated_bytes=int(r[8]),
                    amount_nano=int(r[9]),
                    currency=r[10],
                    pricing_rule_version=r[11],
                    run_id=int(r[12]),
                    created_at_ns=int(r[13]),
                    period_start_ns=int(r[14]),
                    uplink_bytes=int(r[15]),
                    downlink_bytes=int(r[16]),
                    included_bytes=int(r[17]),
                )

    def integrity_event_counts(self) -> dict[str, int]:
        with self._guard("read integrity events"):
            rows = self.db.execute(
                "SELECT COALESCE(source_id, ''), count(*) FROM integrity_events"
                " WHERE acknowledged_at_ns IS NULL GROUP BY COALESCE(source_id, '')"
            )
        return {r[0]: int(r[1]) for r in rows}

    def record_integrity_event(
        self,
        kind: IntegrityKind,
        *,
        node_id: str,
        env: str,
        uuid: str = "",
        inbound_tag: str = "",
        collected_at_ns: int | None = None,
        source_id: str | None = None,
        run_id: int | None = None,
        detail: str,
    ) -> None:
        row = (kind, node_id, env, uuid, inbound_tag, collected_at_ns, source_id, run_id)
        with self._guard("record an integrity event"), self._tx():
            self.db.execute(_EVENT_SQL, (*row, detail, now_ns()))

    @staticmethod
    def _source_cond(
        source_id: str | Sequence[str] | None, conds: list[str], params: list[Any]
    ) -> None:
        if source_id is None:
            return
        ids = [source_id] if isinstance(source_id, str) else list(dict.fromkeys(source_id))
        conds.append(f"source_id IN ({','.join('?' * len(ids))})" if ids else "1 = 0")
        params.extend(ids)

    def record_identity_mismatch(
        self,
        *,
        source_id: str,
        node_id: str,
        env: str,
        collected_at_ns: int | None,
        run_id: int | None,
        detail: str,
    ) -> bool:
        with self._guard("record an integrity event"), self.db.transaction():
            last = self.db.execute(
                "SELECT node_id, env, created_at_ns FROM integrity_events WHERE source_id = ?"
                " AND kind = 'identity_mismatch' ORDER BY id DESC LIMIT 1",
                (source_id,),
            )
            if last and (last[0][0], last[0][1]) == (node_id, env):
                ok = self.db.execute(
                    "SELECT last_succeeded_at_ns FROM source_checkpoints WHERE source_id = ?",
                    (source_id,),
                )
                succeeded = ok[0][0] if ok else None
                if succeeded is None or int(succeeded) < int(last[0][2]):
                    return False  # the same claim, still going on: recorded already
            row = ("identity_mismatch", node_id, env, "", "", collected_at_ns, source_id, run_id)
            self.db.execute(_EVENT_SQL, (*row, detail, now_ns()))
            return True

    def iter_integrity_events(
        self,
        source_id: str | Sequence[str] | None = None,
        kind: IntegrityKind | None = None,
        open_only: bool = True,
        since_ns: int | None = None,
    ) -> Iterator[IntegrityEvent]:
        conds: list[str] = []
        params: list[Any] = []
        self._source_cond(source_id, conds, params)
        if kind is not None:
            conds.append("kind = ?")
            params.append(kind)
        if open_only:
            conds.append("acknowledged_at_ns IS NULL")
        if since_ns is not None:
            conds.append("created_at_ns >= ?")
            params.append(since_ns)
        sql = (
            "SELECT id, kind, node_id, env, uuid, inbound_tag, collected_at_ns, source_id,"
            " run_id, detail, created_at_ns, acknowledged_at_ns FROM integrity_events"
            f" WHERE {' AND '.join(conds) or '1 = 1'} ORDER BY id"
        )
        # Events are few; read them at once so no cursor outlives the lock.
        with self._guard("read integrity events"):
            rows = self.db.execute(sql, params)
        for r in rows:
            yield IntegrityEvent(
                id=int(r[0]),
                kind=cast(IntegrityKind, r[1]),
                node_id=r[2],
                env=r[3],
                uuid=r[4],
                inbound_tag=r[5],
                collected_at_ns=None if r[6] is None else int(r[6]),
                source_id=r[7],
                run_id=None if r[8] is None else int(r[8]),
                detail=r[9],
                created_at_ns=int(r[10]),
                acknowledged_at_ns=None if r[11] is None else int(r[11]),
            )

    def unknown_integrity_event_ids(self, ids: Sequence[int]) -> list[int]:
        """The ids among ``ids`` that no event has (events are never deleted)."""
        known: set[int] = set()
        unique = sorted(set(ids))
        with self._guard("read integrity events"):
            for i in range(0, len(unique), 10_000):
                part = unique[i : i + 10_000]
                marks = ",".join("?" * len(part))
                rows = self.db.execute(
                    f"SELECT id FROM integrity_events WHERE id IN ({marks})", part
                )
                known.update(int(r[0]) for r in rows)
        return [i for i in unique if i not in known]

    def acknowledge_integrity_events(
        self,
        ids: list[int] | None,
        *,
        source_id: str | Sequence[str] | None = None,
        at_ns: int,
    ) -> int:
        conds = ["acknowledged_at_ns IS NULL"]
        params: list[Any] = [at_ns]
        self._source_cond(source_id, conds, params)
        sql = f"UPDATE integrity_events SET acknowledged_at_ns = ? WHERE {' AND '.join(conds)}"
        # Only rows still open are touched, so acknowledging twice keeps the first time.
        n = 0
        with self._guard("acknowledge integrity events"), self._tx():
            if ids is None:
                return len(self.db.execute(sql + " RETURNING id", params))
            unique = sorted(set(ids))
            step = 10_000  # under SQLite's host parameter limit
            for i in range(0, len(unique), step):
                part = unique[i : i + step]
                marks = ",".join("?" * len(part))
                n += len(self.db.execute(f"{sql} AND id IN ({marks}) RETURNING id", params + part))
        return n

    # --- apply ----------------------------------------------------------------------------

    def apply(self, batch: Batch) -> ApplyReport:
        if self._dry is not None:
            return self._apply_dry(batch, self._dry)
        with self._guard("apply a batch"), _gc_paused(), self.db.transaction():
            return self._apply(batch)

    def _load_series(
        self, per_key: dict[RawKey, list[Observation]], emails: dict[RawKey, str]
    ) -> dict[RawKey, _Series]:
        cols: list[KeyCol] = [
            ("node_id", "text"),
            ("env", "text"),
            ("uuid", "text"),
            ("inbound_tag", "text"),
        ]
        sql = (
            f"SELECT {_SERIES_COLS} FROM k JOIN series s ON s.node_id = k.node_id"
            " AND s.env = k.env AND s.uuid = k.uuid AND s.inbound_tag = k.inbound_tag"
            f" ORDER BY s.series_id{self.db.lock_series}"
        )

        def load(keys: Sequence[RawKey]) -> dict[RawKey, _Series]:
            found: dict[RawKey, _Series] = {}
            for r in self._keyset_query(sql, "k", cols, keys):
                row = _series_of(r)
                found[row.key] = row
            return found

        series: dict[RawKey, _Series] = {}
        rest: list[RawKey] = list(per_key)
        if self.db.scan_series and len(per_key) >= _SCAN_MIN:
            groups: dict[tuple[str, str], int] = {}
            for k in per_key:
                g = (k[0], k[1])
                groups[g] = groups.get(g, 0) + 1
            scanned: set[tuple[str, str]] = set()
            for (node, env), n in groups.items():
                if n < _SCAN_MIN:
                    continue
                # Bounded waste: a node with more than twice the series the page names
                # falls back to the key-set join.
                rows = self.db.execute(
                    f"SELECT {_SERIES_COLS} FROM series s WHERE s.node_id = ? AND s.env = ?"
                    " LIMIT ?",
                    (node, env, 2 * n + 1),
                )
                if len(rows) > 2 * n:
                    continue
                scanned.add((node, env))
                for r in rows:
                    if r[1:5] in per_key:
                        row = _series_of(r)
                        series[row.key] = row
            if scanned:
                rest = [k for k in per_key if (k[0], k[1]) not in scanned]
        if rest:
            series.update(load(rest))
        missing = [k for k in per_key if k not in series]
        if missing:
            self.db.executemany(
                "INSERT INTO series (node_id, env, uuid, inbound_tag, email) VALUES (?,?,?,?,?)"
                " ON CONFLICT (node_id, env, uuid, inbound_tag) DO NOTHING",
                [(*k, emails[k]) for k in missing],
            )
            series.update(load(missing))
        # A series keeps the email of its latest observation (by collected_at): only a
        # page that moves the head past the stored one renames, so re-deliveries and late
        # items never bring an old email back, whatever the delivery order.
        renamed = [
            (emails[k], s.series_id)
            for k, s in series.items()
            if emails[k]
            and emails[k] != s.email
            and (s.head is None or max(o[0] for o in per_key[k]) > s.head.collected_at_ns)
        ]
        if renamed:
            self.db.executemany("UPDATE series SET email = ? WHERE series_id = ?", renamed)
        return series

    def _drop_redelivered(
        self, per_key: dict[RawKey, list[Observation]], series: dict[RawKey, _Series]
    ) -> tuple[int, list[Row]]:
        """Remove exact re-deliveries of stored observations from ``per_key``; return how
        many were removed and the late series left: ``(series_id, min t, max t)`` of each
        series that still has an observation at or before its head.

        Per series, the observations at or before the head are checked against the stored
        rows with the same ``collected_at`` (the head itself needs no query; the others
        come from one exact-key read). Only when *all* of them are identical to stored
        rows are they removed: then the merged series is the stored one plus the
        observations after the head, so metering the rest against the head alone gives
        exactly what the full window diff would (the duplicates count the same, too).
        Any missing or different stored row leaves the series untouched (full window
        diff: a genuine late item or a conflict). A series left with nothing is dropped.
        """
        candidates: list[tuple[RawKey, Observation, int]] = []  # (key, head, n at/before)
        wanted: list[Row] = []
        late: list[Row] = []
        for key, obs in per_key.items():
            sid, _, head, _ = series[key]
            if head is None:
                continue
            head_t = head.collected_at_ns
            early = [o for o in obs if o.collected_at_ns <= head_t]
            if not early:
                continue
            ok = True
            before_head: list[Row] = []
            for o in early:
                if o.collected_at_ns == head_t:
                    if o != head:
                        ok = False
                        break
                else:
                    before_head.append((sid, o.collected_at_ns))
            if ok:
                candidates.append((key, head, len(early)))
                wanted.extend(before_head)
            else:
                late.append(_late_row(sid, obs))
        if not candidates:
            return 0, late
        stored: dict[tuple[int, int], Observation] = {}
        if wanted:
            sql = (
                "SELECT o.series_id, o.collected_at_ns, o.uplink_total, o.downlink_total,"
                " o.counter_epoch FROM k JOIN observations o"
                " ON o.series_id = k.sid AND o.collected_at_ns = k.t"
            )
            cols: list[KeyCol] = [("sid", "bigint"), ("t", "bigint")]
            for r in self._keyset_query(sql, "k", cols, list(dict.fromkeys(wanted))):
                stored[(int(r[0]), int(r[1]))] = Observation(int(r[1]), int(r[2]), int(r[3]), r[4])
        dropped = 0
        for key, head, n_early in candidates:
            head_t = head.collected_at_ns
            sid = series[key].series_id
            obs = per_key[key]
            rest: list[Observation] = []
            for o in obs:
                t = o.collected_at_ns
                if t > head_t:
                    rest.append(o)
                elif t < head_t and stored.get((sid, t)) != o:
                    break  # not an exact re-delivery: keep the series for the full diff
            else:
                dropped += n_early
                if rest:
                    per_key[key] = rest
                else:
                    del per_key[key]
                continue
            late.append(_late_row(sid, obs))
        return dropped, late

    def _load_windows(self, late: list[Row]) -> dict[int, list[Observation]]:
        """Stored observations of each late series from the predecessor of its earliest
        new observation through the successor of its latest one, in one query."""
        if not late:
            return {}
        sql = (
            "SELECT o.series_id, o.collected_at_ns, o.uplink_total, o.downlink_total,"
            " o.counter_epoch FROM w JOIN observations o ON o.series_id = w.sid"
            " AND o.collected_at_ns >= COALESCE((SELECT max(p.collected_at_ns) FROM observations p"
            "   WHERE p.series_id = w.sid AND p.collected_at_ns < w.lo), w.lo)"
            " AND o.collected_at_ns <= COALESCE((SELECT min(p.collected_at_ns) FROM observations p"
            "   WHERE p.series_id = w.sid AND p.collected_at_ns > w.hi), w.hi)"
            " ORDER BY o.series_id, o.collected_at_ns"
        )
        out: dict[int, list[Observation]] = {}
        cols: list[KeyCol] = [("sid", "bigint"), ("lo", "bigint"), ("hi", "bigint")]
        for r in self._keyset_query(sql, "w", cols, late):
            out.setdefault(int(r[0]), []).append(Observation(int(r[1]), int(r[2]), int(r[3]), r[4]))
        return out

    def _load_buckets(self, wanted: list[Row]) -> dict[tuple[int, int], Row]:
        if not wanted:
            return {}
        sql = (
            "SELECT b.series_id, b.bucket_start_ns, b.uplink_bytes, b.downlink_bytes,"
            " b.rated_bytes, b.amount_nano, b.revision, b.included_bytes FROM k JOIN buckets b"
            " ON b.series_id = k.sid AND b.bucket_start_ns = k.m"
        )
        cols: list[KeyCol] = [("sid", "bigint"), ("m", "bigint")]
        return {(int(r[0]), int(r[1])): r for r in self._keyset_query(sql, "k", cols, wanted)}

    def _skip_applied_items(
        self, items: list[Item]
    ) -> tuple[list[Item], int, dict[_ItemKey, bytes]]:
        """Drop items already applied whole with identical content.

        An ``item_digests`` row is written only in the transaction that stored every
        observation of that exact content, and observations are never changed or removed,
        so an item whose digest matches is all duplicates: applying it again would change
        nothing and count each sample as a duplicate — which is what the caller reports.
        That is the overlap every pull re-delivers, recognised without reading it back.

        Returns the items to apply, the samples skipped, and the digests to remember once
        the kept items are applied (recent items only, see :attr:`remember_items_ns`).
        """
        horizon = self.remember_items_ns
        newest: dict[tuple[str, str], int] = {}
        for it in items:
            k = (it.node_id, it.env)
            if k not in newest or it.collected_at_ns > newest[k]:
                newest[k] = it.collected_at_ns
        keys = list(dict.fromkeys((it.collected_at_ns, it.node_id, it.env) for it in items))
        sql = (
            "SELECT d.collected_at_ns, d.node_id, d.env, d.digest FROM k JOIN item_digests d"
            " ON d.collected_at_ns = k.t AND d.node_id = k.node_id AND d.env = k.env"
        )
        cols: list[KeyCol] = [("t", "bigint"), ("node_id", "text"), ("env", "text")]
        stored = {
            (int(r[0]), r[1], r[2]): bytes(r[3]) for r in self._keyset_query(sql, "k", cols, keys)
        }
        kept: list[Item] = []
        skipped = 0
        remember: dict[_ItemKey, bytes] = {}
        for it in items:
            key = (it.collected_at_ns, it.node_id, it.env)
            known = stored.get(key)
            recent = (
                horizon is not None and it.collected_at_ns >= newest[(it.node_id, it.env)] - horizon
            )
            if known is None and not recent:
                kept.append(it)
                continue
            digest = _item_digest(it)
            if digest is not None and digest == known:
                skipped += len(it.samples)
                continue
            kept.append(it)
            if recent and digest is not None:
                remember[key] = digest
        return kept, skipped, remember

    def _apply(self, batch: Batch, capture: _DryPage | None = None) -> ApplyReport:
        now = now_ns()
        run_id, source_id = batch.run_id, batch.source_id
        report = ApplyReport(items=len(batch.items), rejected=len(batch.rejections))
        for r in batch.rejections:
            report.rejection_reasons[r.reason] = report.rejection_reasons.get(r.reason, 0) + 1
        items, skipped, remember = self._skip_applied_items(batch.items)
        report.duplicates += skipped
        events: list[Row] = []  # conflicts and anomalies found while metering

        per_key, emails = _group_by_series(items)
        report.samples = skipped + sum(len(it.samples) for it in items)

        if per_key:
            self._apply_observations(batch, per_key, emails, report, events, now, capture)
        if remember:
            # An item with a conflicting sample is not stored whole: never remembered.
            # (An event row is kind, node_id, env, uuid, inbound_tag, collected_at, ...)
            for e in events:
                if e[0] == "conflict":
                    remember.pop((e[5], e[1], e[2]), None)
            self.db.executemany(
                "INSERT INTO item_digests (collected_at_ns, node_id, env, digest)"
                " VALUES (?,?,?,?) ON CONFLICT (collected_at_ns, node_id, env)"
                " DO UPDATE SET digest = excluded.digest",
                [(*k, d) for k, d in remember.items()],
            )

        if events:
            self.db.executemany(_EVENT_SQL, events)
        if batch.rejections:
            self.db.executemany(
                _REJECTION_EVENT_SQL,
                rejection_events(batch.rejections, source_id, run_id, now),
            )
        if batch.checkpoint is not None:
            cp = batch.checkpoint
            self.db.execute(
                "INSERT INTO source_checkpoints (source_id, node_id, env, last_cursor,"
                " last_successful_until_ns, last_attempted_at_ns, newest_collected_at_ns,"
                " consecutive_failures)"
                " VALUES (?,?,?,?,?,?,?,0) ON CONFLICT (source_id) DO UPDATE SET"
                " node_id = excluded.node_id, env = excluded.env,"
                " last_cursor = excluded.last_cursor,"
                " last_successful_until_ns = CASE"
                "  WHEN excluded.last_successful_until_ns IS NULL"
                "   THEN source_checkpoints.last_successful_until_ns"
                "  WHEN source_checkpoints.last_successful_until_ns IS NULL"
                "   OR excluded.last_successful_until_ns"
                "    > source_checkpoints.last_successful_until_ns"
                "   THEN excluded.last_successful_until_ns"
                "  ELSE source_checkpoints.last_successful_until_ns END,"
                " newest_collected_at_ns = CASE"
                "  WHEN source_checkpoints.newest_collected_at_ns IS NULL"
                "   OR excluded.newest_collected_at_ns"
                "    > source_checkpoints.newest_collected_at_ns"
                "   THEN excluded.newest_collected_at_ns"
                "  ELSE source_checkpoints.newest_collected_at_ns END,"
                " last_attempted_at_ns = excluded.last_attempted_at_ns",
                (
                    cp.source_id,
                    cp.node_id,
                    cp.env,
                    cp.last_cursor,
                    cp.last_successful_until_ns,
                    cp.attempted_at_ns,
                    cp.newest_collected_at_ns,
                ),
            )
        return report

    def _apply_observations(
        self,
        batch: Batch,
        per_key: dict[RawKey, list[Observation]],
        emails: dict[RawKey, str],
        report: ApplyReport,
        events: list[Row],
        now: int,
        capture: _DryPage | None = None,
    ) -> None:
        run_id, source_id = batch.run_id, batch.source_id
        series = self._load_series(per_key, emails)

        # 2. Late series (an observation at or before the head) need their stored window,
        # unless every such observation is an exact re-delivery (the overlap of the
        # previous pull: the common case), which is dropped here as a duplicate.
        dropped, late = self._drop_redelivered(per_key, series)
        report.duplicates += dropped
        windows = self._load_windows(late)

        # 3. Meter each series.
        obs_rows: list[Row] = []
        head_rows: list[Row] = []
        changes: list[tuple[int, SeriesKey, int, int, int]] = []
        maybe_existing: list[Row] = []
        for raw, obs in per_key.items():
            sid, _, head, key = series[raw]
            window = windows.get(sid) if windows else None
            if window is None:
                window = [head] if head is not None else []
            d = diff_series(window, obs)
            report.duplicates += d.duplicates
            if d.inserted:
                obs_rows.extend(
                    zip(
                        repeat(sid),
                        *zip(*d.inserted, strict=True),
                        repeat(run_id),
                        repeat(source_id),
                        strict=False,
                    )
                )
            report.new_observations += len(d.inserted)
            if capture is not None and d.inserted:
                capture.observations[raw] = d.inserted
                capture.emails[raw] = emails[raw]
            if d.new_head is not None:
                h = d.new_head
                head_rows.append(
                    (h.collected_at_ns, h.uplink_total, h.downlink_total, h.counter_epoch, sid)
                )
            head_minute = None if head is None else minute_of(head.collected_at_ns)
            for m, (du, dd) in d.bucket_deltas.items():
                changes.append((sid, key, m, du, dd))
                # A bucket can only exist at or before the head's minute.
                if head_minute is not None and m <= head_minute:
                    maybe_existing.append((sid, m))
            for c in d.conflicts:
                report.conflicts += 1
                events.append(
                    ("conflict", *key, c.refused.collected_at_ns, source_id, run_id, c.detail, now)
                )
            for a in d.anomalies:
                report.anomalies += 1
                events.append(
                    ("anomaly", *key, a.cur.collected_at_ns, source_id, run_id, a.detail, now)
                )

        # 4. New bucket values.
        existing = self._load_buckets(maybe_existing)
        buckets: list[_Bucket] = []
        for sid, key, m, du, dd in changes:
            row = existing.get((sid, m))
            if row is None:
                b = _Bucket(sid, key, m, du, dd, 0, 0, 0, False, 0, 0)
            else:
                up, down = int(row[2]), int(row[3])
                b = _Bucket(
                    sid,
                    key,
                    m,
                    up + du,
                    down + dd,
                    int(row[4]),
                    int(row[5]),
                    int(row[6]),
                    True,
                    up,
                    down,
                    included=int(row[7]),
                )
            if b.uplink < 0 or b.downlink < 0:
                # Impossible by construction; refuse rather than store a negative bucket.
                raise StoreError(
                    f"internal metering error: bucket {key} at {m} would become negative"
                )
            buckets.append(b)

        # 5. Re-rate and post (quota state read before this batch's sums are added).
        postings, rerated = self._rate(batch.pricing, buckets, report)
        self._add_uuid_usage(batch.pricing, buckets)
        ledger_rows = self._ledger_rows(postings, batch.pricing, run_id, now)

        # 6. One bulk write per table.
        if obs_rows:
            self.db.insert_observations(obs_rows)
        if head_rows:
            self.db.update_heads(head_rows)
        inserts: list[Row] = []
        updates: list[Row] = []
        deletes: list[Row] = []
        for b in [*buckets, *rerated]:
            if not b.existed:
                inserts.append(
                    (
                        b.series_id,
                        b.start,
                        b.uplink,
                        b.downlink,
                        b.rated,
                        b.amount,
                        b.revision,
                        b.included,
                    )
                )
            elif b.uplink == 0 and b.downlink == 0 and b.revision == 0:
                deletes.append((b.series_id, b.start))
            else:
                # A posted bucket that drops to zero bytes stays as a row (its revision
                # numbers the next posting); readers only see non-zero buckets.
                updates.append(
                    (
                        b.uplink,
                        b.downlink,
                        b.rated,
                        b.amount,
                        b.revision,
                        b.included,
                        b.series_id,
                        b.start,
                    )
                )
        if inserts:
            self.db.bulk_insert("buckets", _BUCKET_COLS, inserts)
        if updates:
            self.db.update_buckets(updates)
        if deletes:
            self.db.executemany(
                "DELETE FROM buckets WHERE series_id = ? AND bucket_start_ns = ?", deletes
            )
        if ledger_rows:
            self.db.bulk_insert("ledger_postings", _LEDGER_COLS, ledger_rows)

        changed = [b for b in buckets if (b.uplink, b.downlink) != (b.old_uplink, b.old_downlink)]
        report.buckets_changed += len(changed)
        report.bytes += sum(b.uplink - b.old_uplink + b.downlink - b.old_downlink for b in changed)
        if batch.collect_bucket_changes:
            report.bucket_changes.extend(
                BucketChange(b.key, b.start, b.old_uplink, b.old_downlink, b.uplink, b.downlink)
                for b in changed
            )

    # --- accounting periods ---------------------------------------------------------------

    def closed_periods(self) -> list[PeriodClose]:
        return _periods.closed_periods(self)

    def close_period(
        self, period_start_ns: int, *, actor: str, now_ns: int
    ) -> tuple[PeriodClose, bool]:
        return _periods.close_period(self, period_start_ns, actor=actor, now_ns=now_ns)

    def period_totals(self) -> list[PeriodTotals]:
        return _periods.period_totals(self)

    def statement(self, period_start_ns: int, flt: RowFilter) -> Statement:
        return _periods.statement(self, period_start_ns, flt)

    def check_rerate(self, period_start_ns: int, pricing: Pricing) -> None:
        _periods.check_rerate(self, period_start_ns, pricing)

    def iter_rerate(
        self, period_start_ns: int, pricing: Pricing, run_id: int, *, dry_run: bool
    ) -> Iterator[RerateReport]:
        return _periods.iter_rerate(
            self, period_start_ns, pricing, run_id, dry_run=dry_run, now_ns=now_ns()
        )

    def _closed_period_set(self) -> frozenset[int]:
        """The closed periods, read inside a writing transaction: on PostgreSQL under a
        share lock that a close takes exclusively, so no posting can land in a period
        that a concurrent close is sealing (SQLite's writers are serialised anyway)."""
        self.db.lock_periods(exclusive=False)
        return frozenset(int(r[0]) for r in self.db.execute(_CLOSED_SET_SQL))

    def _ledger_rows(
        self,
        postings: list[tuple[_Bucket, ledger.Posting]],
        pricing: Pricing,
        run_id: int,
        now: int,
    ) -> list[Row]:
        """Rows for ``ledger_postings``, each in its accounting period: the bucket's month,
        or — when that period is closed — the first open one after it
        (:func:`billing_cli.core.periods.accounting_period`)."""
        if not postings:
            return []
        closed = self._closed_period_set()
        target: dict[int, int] = {}  # bucket start -> accounting period
        rows: list[Row] = []
        currency, version = pricing.currency, pricing.rule_version
        for b, p in postings:
            period = target.get(b.start)
            if period is None:
                period = target[b.start] = periods.accounting_period(
                    periods.period_of(b.start), closed
                )
            rows.append(
                (
                    b.series_id,
                    b.start,
                    p.revision,
                    p.entry_type,
                    p.rated_bytes,
                    p.amount_nano,
                    currency,
                    version,
                    run_id,
                    now,
                    period,
                    p.uplink_bytes,
                    p.downlink_bytes,
                    p.included_bytes,
                )
            )
        return rows

    # --- rating ---------------------------------------------------------------------------

    def _rate(
        self, pricing: Pricing, buckets: list[_Bucket], report: ApplyReport
    ) -> tuple[list[tuple[_Bucket, ledger.Posting]], list[_Bucket]]:
        """Re-rate changed buckets (and, under an included quota, the later buckets of the
        same uuid and period); update each bucket's rating state. Returns the postings and
        the unchanged-bytes buckets whose rating moved (their state must be written)."""
        rater = rating.rater_for(pricing)
        out: list[tuple[_Bucket, ledger.Posting]] = []
        quota_groups: dict[tuple[str, int], list[_Bucket]] = {}
        has_quota = pricing.has_included_quota
        # Without an included quota every bucket rates on its own (the hot path): the
        # amount is Rater.amount_nano inlined — the bucket's charged bytes times one
        # cached exact fraction, rounded once, half-even (tests/test_rating_fast.py).
        new_posting = ledger.Posting
        factor = rater.factor
        charge, free = pricing.charge, rater.free
        append = out.append
        postings = adjustments = adjustment_amount = charged = 0
        for b in buckets:
            if has_quota and pricing.included_for(b.key.uuid) > 0:
                ps = rating.period_start_ns(b.start, pricing)
                quota_groups.setdefault((b.key.uuid, ps), []).append(b)
                continue
            if charge == "total":
                cb = b.uplink + b.downlink
            else:
                cb = b.uplink if charge == "uplink" else b.downlink
            if cb == 0 or free:
                amount = 0
            else:
                num, den = factor(b.key, b.start)
                amount, rem = divmod(cb * num, den)
                twice = rem + rem
                if twice > den or (twice == den and amount & 1):
                    amount += 1
            # ledger.next_posting inlined: the differences of the bucket's totals (bytes,
            # rated bytes, included quota used -- none here --, amount).
            up, down = b.uplink, b.downlink
            if b.revision == 0:
                if not (up or down):
                    continue  # nothing to post (cb and amount are 0 too)
                p = new_posting("charge", 0, cb, amount, up, down, 0)
            else:
                d_up, d_down = up - b.old_uplink, down - b.old_downlink
                d_rated, d_amount, d_included = cb - b.rated, amount - b.amount, -b.included
                if not (d_up or d_down or d_rated or d_amount or d_included):
                    continue
                p = new_posting(
                    "adjustment", b.revision, d_rated, d_amount, d_up, d_down, d_included
                )
            append((b, p))
            b.rated, b.amount, b.included = cb, amount, 0
            b.revision += 1
            b.rating_dirty = True
            postings += 1
            charged += p.amount_nano
            if p.entry_type == "adjustment":
                adjustments += 1
                adjustment_amount += p.amount_nano
        report.postings += postings
        report.adjustments += adjustments
        report.adjustment_amount_nano += adjustment_amount
        report.charged_amount_nano += charged
        rerated: list[_Bucket] = []
        states = self._load_quota_state(list(quota_groups))
        for (uuid, ps), group in quota_groups.items():
            in_batch = {id(b) for b in group}
            state = states.get((uuid, ps))
            for b, new in self._rate_quota_tail(pricing, uuid, ps, group, state):
                self._post(b, new, out, report)
                if b.rating_dirty and id(b) not in in_batch:
                    rerated.append(b)
        return out, rerated

    @staticmethod
    def _post(
        b: _Bucket,
        new: rating.Rating,
        out: list[tuple[_Bucket, ledger.Posting]],
        report: ApplyReport,
    ) -> None:
        posted = (
            ledger.BucketTotals(b.old_uplink, b.old_downlink, b.rated, b.included, b.amount)
            if b.revision
            else ledger.ZERO_TOTALS
        )
        p = ledger.next_posting(posted, b.revision, ledger.totals(b.uplink, b.downlink, new))
        if p is None:
            return
        out.append((b, p))
        b.rated, b.amount, b.included = new.rated_bytes, new.amount_nano, new.included_bytes
        b.revision += 1
        b.rating_dirty = True
        report.postings += 1
        report.charged_amount_nano += p.amount_nano
        if p.entry_type == "adjustment":
            report.adjustments += 1
            report.adjustment_amount_nano += p.amount_nano

    def _add_uuid_usage(self, pricing: Pricing, buckets: list[_Bucket]) -> None:
        """Keep ``uuid_period_usage`` equal to the sums of the buckets (all uuids, so a
        quota introduced later finds correct sums)."""
        periods: dict[int, int] = {}
        acc: dict[tuple[str, int], list[int]] = {}
        for b in buckets:
            start = b.start
            ps = periods.get(start)
            if ps is None:
                ps = periods[start] = rating.period_start_ns(start, pricing)
            k = (b.key.uuid, ps)
            slot = acc.get(k)
            if slot is None:
                acc[k] = [b.uplink - b.old_uplink, b.downlink - b.old_downlink, start]
            else:
                slot[0] += b.uplink - b.old_uplink
                slot[1] += b.downlink - b.old_downlink
                if start > slot[2]:
                    slot[2] = start
        if acc:
            self.db.add_uuid_usage(
                [(u, ps, du, dd, last) for (u, ps), (du, dd, last) in acc.items()]
            )

    def _load_quota_state(self, groups: Sequence[tuple[str, int]]) -> dict[tuple[str, int], Row]:
        if not groups:
            return {}
        sql = (
            "SELECT u.uuid, u.period_start_ns, u.uplink_bytes, u.downlink_bytes,"
            " u.last_bucket_start_ns FROM k JOIN uuid_period_usage u"
            " ON u.uuid = k.uuid AND u.period_start_ns = k.ps"
        )
        cols: list[KeyCol] = [("uuid", "text"), ("ps", "bigint")]
        return {(r[0], int(r[1])): r for r in self._keyset_query(sql, "k", cols, list(groups))}

    def _rate_quota_tail(
        self,
        pricing: Pricing,
        uuid: str,
        period_start: int,
        changed: list[_Bucket],
        state: Row | None,
    ) -> list[tuple[_Bucket, rating.Rating]]:
        """Ratings for one uuid's buckets in one period from the earliest changed bucket on.

        The quota is consumed in canonical order (bucket start, then series key), so a
        change can move the rating of every later bucket of the uuid in the period. The
        stored tail is read once and merged with the changed buckets of this batch; the
        charged bytes before the tail come from one SUM query.
        """
        first = min(changed, key=lambda b: (b.start, b.key))
        if state is None or int(state[4]) < first.start:
            # Appended after every stored bucket of the uuid in the period (the normal
            # in-order page): consumption so far is the stored sums, there is no tail.
            consumed = (
                0 if state is None else rating.charged_bytes(pricing, int(state[2]), int(state[3]))
            )
            appended = sorted(changed, key=lambda b: (b.start, b.key))
            ratings = rating.rate_sequence(
                pricing,
                uuid,
                [rating.BucketForRating(b.key, b.start, b.uplink, b.downlink) for b in appended],
                consumed,
            )
            return list(zip(appended, ratings, strict=True))
        end = _period_end_ns(period_start, pricing)
        sums = self.db.execute(
            "SELECT COALESCE(SUM(b.uplink_bytes), 0), COALESCE(SUM(b.downlink_bytes), 0)"
            " FROM buckets b JOIN series s ON s.series_id = b.series_id"
            " WHERE s.uuid = ? AND b.bucket_start_ns >= ? AND b.bucket_start_ns < ?",
            (uuid, period_start, first.start),
        )
        # charged_bytes is linear in (uplink, downlink), so it applies to the sums.
        consumed = rating.charged_bytes(pricing, int(sums[0][0]), int(sums[0][1]))
        tail_rows = self.db.execute(
            "SELECT b.series_id, s.node_id, s.env, s.uuid, s.inbound_tag, b.bucket_start_ns,"
            " b.uplink_bytes, b.downlink_bytes, b.rated_bytes, b.amount_nano, b.revision,"
            " b.included_bytes"
            " FROM buckets b JOIN series s ON s.series_id = b.series_id"
            " WHERE s.uuid = ? AND b.bucket_start_ns >= ? AND b.bucket_start_ns < ?",
            (uuid, first.start, end),
        )
        by_id: dict[tuple[int, int], _Bucket] = {(b.series_id, b.start): b for b in changed}
        seq: list[_Bucket] = list(changed)
        first_pos = (first.start, first.key)
        for r in tail_rows:
            sid, start = int(r[0]), int(r[5])
            if (sid, start) in by_id:
                continue
            key = SeriesKey(r[1], r[2], r[3], r[4])
            up, down = int(r[6]), int(r[7])
            if (start, key) < first_pos:
                # Same minute as the first change but canonically before it: consumed.
                consumed += rating.charged_bytes(pricing, up, down)
                continue
            b = _Bucket(
                sid,
                key,
                start,
                up,
                down,
                int(r[8]),
                int(r[9]),
                int(r[10]),
                True,
                up,
                down,
                included=int(r[11]),
            )
            by_id[(sid, start)] = b
            seq.append(b)
        seq.sort(key=lambda b: (b.start, b.key))
        ratings = rating.rate_sequence(
            pricing,
            uuid,
            [rating.BucketForRating(b.key, b.start, b.uplink, b.downlink) for b in seq],
            consumed,
        )
        return list(zip(seq, ratings, strict=True))

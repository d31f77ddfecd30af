"""Accounting periods in the store (DESIGN §5a): close, list, statement, re-rate.

Shared by both back ends like the other parts of the store; ``SqlStore`` delegates to
these functions. What a period *is* and where a correction of a closed
period is accounted are decided in :mod:`billing_cli.core.periods`; what a statement
says, in :mod:`billing_cli.core.statement`. Here: the SQL around them.

Consistency with concurrent writers: every transaction that appends postings reads the
closed periods under ``Dialect.lock_periods(exclusive=False)`` and a close takes it
exclusively, so a posting never lands in a period that is being closed.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

from billing_cli._errors import PeriodError
from billing_cli._time import format_rfc3339_ns
from billing_cli.core import ledger, rating
from billing_cli.core.periods import format_period, period_end_ns
from billing_cli.core.statement import Statement, StatementPart, build_statement
from billing_cli.core.types import SeriesKey
from billing_cli.pricing import Pricing
from billing_cli.store.base import PeriodClose, PeriodTotals, RerateReport, RowFilter
from billing_cli.store.dialect import _LEDGER_COLS
from billing_cli.store.schema import month_start_sql

if TYPE_CHECKING:
    from billing_cli.store.dialect import KeyCol, Row
    from billing_cli.store.sql import SqlStore

# Buckets per re-rate page (one transaction). A page holds whole accounts: an account's
# month is rated as one sequence (its included quota), so a page may exceed this by at
# most one account's month.
RERATE_PAGE_BUCKETS = 20_000
_UUID: list[KeyCol] = [("uuid", "text")]

_CLOSES_SQL = (
    "SELECT c.period_start_ns, c.closed_at_ns, c.run_id, COALESCE(r.actor, '')"
    " FROM closed_periods c LEFT JOIN runs r ON r.run_id = c.run_id"
)


def accounted_in(period: int) -> str:
    """A derived table of the postings accounted in ``period``: those of its own buckets
    (a range of the time-first unique index) and the corrections carried into it (the
    partial index ``ledger_postings_carried``); use as ``FROM ({...}) l``."""
    start, end = int(period), int(period_end_ns(period))
    return (
        "SELECT * FROM ledger_postings WHERE bucket_start_ns >= "
        f"{start} AND bucket_start_ns < {end} AND period_start_ns = {start}"
        " UNION ALL SELECT * FROM ledger_postings"
        f" WHERE period_start_ns = {start} AND period_start_ns > bucket_start_ns"
    )


def _close_of(r: Row) -> PeriodClose:
    return PeriodClose(int(r[0]), int(r[1]), int(r[2]), str(r[3]))


def closed_periods(store: SqlStore) -> list[PeriodClose]:
    with store._guard("read closed periods"):
        rows = store.db.execute(_CLOSES_SQL + " ORDER BY c.period_start_ns")
    return [_close_of(r) for r in rows]


def not_ended_message(period: int) -> str:
    return (
        f"period {format_period(period)} has not ended: it ends at "
        f"{format_rfc3339_ns(period_end_ns(period))}; close it after that"
    )


def close_period(
    store: SqlStore, period: int, *, actor: str, now_ns: int
) -> tuple[PeriodClose, bool]:
    if period_end_ns(period) > now_ns:
        raise PeriodError(not_ended_message(period))
    db = store.db
    with store._guard("close a period"), db.transaction():
        db.lock_periods(exclusive=True)
        rows = db.execute(_CLOSES_SQL + " WHERE c.period_start_ns = ?", (period,))
        if rows:
            return _close_of(rows[0]), False
        run_id = int(
            db.execute(
                "INSERT INTO runs (kind, sources, started_at_ns, finished_at_ns, outcome, actor)"
                " VALUES (?,?,?,?,?,?) RETURNING run_id",
                ("period_close", json.dumps([format_period(period)]), now_ns, now_ns, "ok", actor),
            )[0][0]
        )
        db.execute(
            "INSERT INTO closed_periods (period_start_ns, closed_at_ns, run_id) VALUES (?,?,?)",
            (period, now_ns, run_id),
        )
        # The statement's emails as of the close: a later observation may rename a series,
        # the statement of a closed period must not change.
        uuids = [
            r[0]
            for r in db.execute(
                f"SELECT DISTINCT s.uuid FROM ({accounted_in(period)}) l JOIN series s"
                " ON s.series_id = l.series_id",
            )
        ]
        emails = _latest_emails(store, uuids)
        if uuids:
            db.executemany(
                "INSERT INTO closed_period_accounts (period_start_ns, uuid, email) VALUES (?,?,?)",
                [(period, u, emails.get(u, "")) for u in uuids],
            )
        return PeriodClose(period, now_ns, run_id, actor), True


def _latest_emails(store: SqlStore, uuids: Sequence[str]) -> dict[str, str]:
    """Per uuid, the email of its series observed last (non-empty ones preferred)."""
    if not uuids:
        return {}
    best: dict[str, tuple[tuple[bool, int, int], str]] = {}
    rows = store._keyset_query(
        "SELECT s.uuid, s.email, s.head_collected_at_ns, s.series_id FROM k JOIN series s"
        " ON s.uuid = k.uuid",
        "k",
        _UUID,
        [(u,) for u in dict.fromkeys(uuids)],
    )
    for uuid, email, head, sid in rows:
        rank = (bool(email), -(2**63) if head is None else int(head), int(sid))
        if uuid not in best or rank > best[uuid][0]:
            best[uuid] = (rank, email)
    return {u: e for u, (_, e) in best.items()}


def period_totals(store: SqlStore) -> list[PeriodTotals]:
    with store._guard("read period totals"):
        sums = store.db.execute(
            "SELECT period_start_ns, currency, count(*), SUM(uplink_bytes + downlink_bytes),"
            " SUM(rated_bytes), SUM(amount_nano) FROM ledger_postings"
            " GROUP BY period_start_ns, currency"
        )
        closes = {c.period_start_ns: c for c in map(_close_of, store.db.execute(_CLOSES_SQL))}
    out = [
        PeriodTotals(
            int(r[0]), closes.get(int(r[0])), r[1], int(r[2]), int(r[3]), int(r[4]), int(r[5])
        )
        for r in sums
    ]
    with_postings = {t.period_start_ns for t in out}
    out.extend(
        PeriodTotals(p, c, "", 0, 0, 0, 0) for p, c in closes.items() if p not in with_postings
    )
    return sorted(out, key=lambda t: (t.period_start_ns, t.currency))


def statement(store: SqlStore, period: int, flt: RowFilter) -> Statement:
    """Sum the postings accounted in ``period`` per account, currency, corrected period
    and rule version; nothing else is read (but the emails)."""
    db = store.db
    end = period_end_ns(period)
    where, params = store._where(flt, "l.bucket_start_ns")
    # A posting accounted here for a bucket outside the period corrects a closed period.
    sql = (
        "SELECT s.uuid, l.currency,"
        f" CASE WHEN l.bucket_start_ns >= {int(period)} AND l.bucket_start_ns < {int(end)}"
        f" THEN NULL ELSE {month_start_sql(db.name, 'l.bucket_start_ns')} END,"
        " l.pricing_rule_version, SUM(l.uplink_bytes), SUM(l.downlink_bytes),"
        " SUM(l.rated_bytes), SUM(l.included_bytes), SUM(l.amount_nano)"
        f" FROM ({accounted_in(period)}) l JOIN series s ON s.series_id = l.series_id"
        f" WHERE {where} GROUP BY 1, 2, 3, 4"
    )
    with store._guard("read a statement"):
        rows = db.execute(sql, params)
        parts = [
            StatementPart(
                r[0],
                r[1],
                None if r[2] is None else int(r[2]),
                r[3],
                *(int(v) for v in r[4:9]),
            )
            for r in rows
        ]
        uuids = sorted({p.uuid for p in parts})
        snapshot = {
            r[0]: r[1]
            for r in db.execute(
                "SELECT uuid, email FROM closed_period_accounts WHERE period_start_ns = ?",
                (period,),
            )
        }
        missing = [u for u in uuids if u not in snapshot]
        emails = {**_latest_emails(store, missing), **snapshot}
    return build_statement(period, parts, emails)


# --- re-rate ----------------------------------------------------------------------------


def check_rerate(store: SqlStore, period: int, pricing: Pricing) -> None:
    """Refuse a re-rate of a closed period, or one that would change the currency."""
    if any(c.period_start_ns == period for c in closed_periods(store)):
        raise PeriodError(
            f"period {format_period(period)} is closed: a closed period is final and is "
            "never re-rated (later corrections go to the first open period)"
        )
    with store._guard("read the period's currencies"):
        currencies = sorted(
            r[0]
            for r in store.db.execute(
                f"SELECT DISTINCT currency FROM ({accounted_in(period)}) l",
            )
        )
    other = [c for c in currencies if c != pricing.currency]
    if other:
        raise PeriodError(
            f"period {format_period(period)} is posted in {', '.join(currencies)} but "
            f"[pricing] currency is {pricing.currency}: a re-rate posts differences and "
            "cannot change the currency of a period"
        )


def iter_rerate(
    store: SqlStore,
    period: int,
    pricing: Pricing,
    run_id: int,
    *,
    dry_run: bool,
    now_ns: int,
    page_buckets: int = RERATE_PAGE_BUCKETS,
) -> Iterator[RerateReport]:
    check_rerate(store, period, pricing)
    after = ""  # uuids are never empty (the wire contract refuses empty ones)
    per_page = 1  # accounts: the first page measures, then about ``page_buckets`` a page
    while True:
        with store._guard("re-rate a period"):
            scope = store.db.rolled_back() if dry_run else store.db.transaction()
            with scope:
                page = _rerate_page(store, period, pricing, run_id, after, per_page, now_ns)
        if page is None:
            return
        report, after, accounts = page
        per_account = max(report.buckets / accounts, 1.0)
        per_page = max(1, min(10_000, int(page_buckets / per_account)))
        yield report


def _rerate_page(
    store: SqlStore,
    period: int,
    pricing: Pricing,
    run_id: int,
    after: str,
    limit: int,
    now_ns: int,
) -> tuple[RerateReport, str, int] | None:
    """Re-rate the buckets of the next ``limit`` accounts after ``after`` (one
    transaction, opened by the caller); ``None`` when no account is left."""
    db = store.db
    uuids = [
        r[0]
        for r in db.execute(
            "SELECT DISTINCT uuid FROM series WHERE uuid > ? ORDER BY uuid LIMIT ?",
            (after, limit),
        )
    ]
    if not uuids:
        return None
    keys = [(u,) for u in uuids]
    if db.lock_series:
        # Lock the accounts' series in series_id order, as apply() does, before touching
        # their buckets: a concurrent collect of the same series waits instead of
        # deadlocking with this page.
        store._keyset_query(
            "SELECT s.series_id FROM k JOIN series s ON s.uuid = k.uuid"
            f" ORDER BY s.series_id{db.lock_series}",
            "k",
            _UUID,
            keys,
        )
    if period in store._closed_period_set():
        raise PeriodError(
            f"period {format_period(period)} was closed while it was being re-rated; the "
            "pages before this one are committed, the rest of the period was not re-rated"
        )
    end = period_end_ns(period)
    rows = store._keyset_query(
        "SELECT b.series_id, s.node_id, s.env, s.uuid, s.inbound_tag, b.bucket_start_ns,"
        " b.uplink_bytes, b.downlink_bytes, b.rated_bytes, b.amount_nano, b.revision,"
        " b.included_bytes FROM k JOIN series s ON s.uuid = k.uuid JOIN buckets b"
        f" ON b.series_id = s.series_id AND b.bucket_start_ns >= {int(period)}"
        f" AND b.bucket_start_ns < {int(end)}",
        "k",
        _UUID,
        keys,
    )
    by_uuid: dict[str, list[Row]] = {}
    for r in rows:
        by_uuid.setdefault(r[3], []).append(r)
    report = RerateReport(pages=1, buckets=len(rows))
    postings: list[Row] = []
    updates: list[Row] = []
    for uuid, group in by_uuid.items():
        ratings = rating.rate_sequence(
            pricing,
            uuid,
            [
                rating.BucketForRating(SeriesKey(*r[1:5]), int(r[5]), int(r[6]), int(r[7]))
                for r in group
            ],
            0,  # the whole month of the account: nothing before it
        )
        acc = [0, 0, 0, 0]
        for r, new in zip(group, ratings, strict=True):
            sid, start, up, down = int(r[0]), int(r[5]), int(r[6]), int(r[7])
            revision = int(r[10])
            posted = (
                ledger.BucketTotals(up, down, int(r[8]), int(r[11]), int(r[9]))
                if revision
                else ledger.ZERO_TOTALS
            )
            p = ledger.next_posting(posted, revision, ledger.totals(up, down, new))
            if p is None:
                continue
            postings.append(
                (
                    sid,
                    start,
                    p.revision,
                    p.entry_type,
                    p.rated_bytes,
                    p.amount_nano,
                    pricing.currency,
                    pricing.rule_version,
                    run_id,
                    now_ns,
                    period,  # open (checked above, under the periods lock)
                    p.uplink_bytes,
                    p.downlink_bytes,
                    p.included_bytes,
                )
            )
            updates.append(
                (
                    up,
                    down,
                    new.rated_bytes,
                    new.amount_nano,
                    revision + 1,
                    new.included_bytes,
                    sid,
                    start,
                )
            )
            acc[0] += 1
            acc[1] += p.rated_bytes
            acc[2] += p.included_bytes
            acc[3] += p.amount_nano
        if acc[0]:
            report.accounts[uuid] = acc
            report.postings += acc[0]
    if postings:
        db.bulk_insert("ledger_postings", _LEDGER_COLS, postings)
        db.update_buckets(updates)
    return report, uuids[-1], len(uuids)

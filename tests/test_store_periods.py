"""Accounting periods in the store, on both back ends (DESIGN §5a).

Close (final, idempotent, recorded as a run), corrections of a closed period carried
into the first open period naming their bucket, statements that never change once the
period is closed, and re-rating an open period in pages.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any, cast

import pytest

from billing_cli._errors import PeriodError
from billing_cli._time import parse_rfc3339_ns as ts
from billing_cli.core.periods import parse_period
from billing_cli.core.types import Item, Sample
from billing_cli.pricing import Pricing
from billing_cli.store import _periods, open_store
from billing_cli.store.base import Batch, RerateReport, RowFilter, Store
from billing_cli.store.sql import SqlStore

M = 60_000_000_000
OCT, NOV, DEC, JAN = (parse_period(p) for p in ("2025-10", "2025-11", "2025-12", "2026-01"))
NOW = ts("2026-03-01T00:00:00Z")  # every period above has ended
P1 = Pricing(price_per_unit="0.5", unit="KB", currency="EUR", rule_version="r1")
P2 = Pricing(price_per_unit="0.75", unit="KB", currency="EUR", rule_version="r2")
Q1 = Pricing(
    price_per_unit="0.5", unit="KB", currency="EUR", rule_version="q1", included_bytes={"a": 900}
)
Q2 = Pricing(
    price_per_unit="2", unit="KB", currency="EUR", rule_version="q2", included_bytes={"a": 2500}
)


@pytest.fixture
def store(db_url: str) -> Iterator[Store]:
    s = open_store(db_url)
    yield s
    s.close()


def item(at: str, *samples: tuple[str, int, int], email: str = "") -> Item:
    return Item(
        ts(at),
        "n1",
        "prod",
        None,
        [Sample(u, email or f"{u}@x", "vless", up, dn) for u, up, dn in samples],
    )


def apply(store: Store, *items: Item, pricing: Pricing = P1) -> None:
    store.apply(Batch(list(items), store.start_run("ingest", ["s1"]), pricing, "s1"))


# November: a 10:00 baseline, then 1000 B at 10:01 and 3000 B at 10:03 (u "a");
# "b" 500 B at 10:01. A late item at 10:02 later moves 1000 B of a's 10:03 bucket to 10:02.
BASE = [
    item("2025-11-30T10:00:30Z", ("a", 0, 0), ("b", 0, 0)),
    item("2025-11-30T10:01:30Z", ("a", 600, 400), ("b", 500, 0)),
    item("2025-11-30T10:03:30Z", ("a", 2600, 1400), ("b", 500, 0)),
    item("2025-12-01T00:00:30Z", ("a", 2700, 1400), ("b", 600, 0)),
]
LATE = item("2025-11-30T10:02:30Z", ("a", 1100, 900), ("b", 500, 0))


def test_close_refuses_a_period_that_has_not_ended(store: Store) -> None:
    with pytest.raises(
        PeriodError, match=r"2025-11 has not ended: it ends at 2025-12-01T00:00:00Z"
    ):
        store.close_period(NOV, actor="ops", now_ns=ts("2025-11-30T23:59:59Z"))
    assert store.closed_periods() == []


def test_close_is_recorded_final_and_idempotent(store: Store) -> None:
    apply(store, *BASE)
    close, made = store.close_period(NOV, actor="alice@host", now_ns=NOW)
    assert made
    assert (close.period_start_ns, close.closed_at_ns, close.actor) == (NOV, NOW, "alice@host")
    again, made_again = store.close_period(NOV, actor="bob", now_ns=NOW + 5)
    assert not made_again
    assert again == close  # the first close stands: who, when, which run
    assert store.closed_periods() == [close]
    db = cast(SqlStore, store).db
    assert [
        tuple(r)
        for r in db.execute(
            "SELECT kind, outcome, actor FROM runs WHERE run_id = ?", (close.run_id,)
        )
    ] == [("period_close", "ok", "alice@host")]
    # There is no reopen, not even by hand.
    for sql in (
        "DELETE FROM closed_periods",
        "UPDATE closed_periods SET closed_at_ns = 0",
        "DELETE FROM closed_period_accounts",
    ):
        with pytest.raises(db.errors), db.transaction():
            db.execute(sql)
    assert store.closed_periods() == [close]


def _ledger(store: Store) -> list[tuple[Any, ...]]:
    return [
        (
            r.uuid,
            r.bucket_start_ns,
            r.revision,
            r.period_start_ns,
            r.uplink_bytes,
            r.downlink_bytes,
            r.rated_bytes,
            r.amount_nano,
        )
        for r in store.iter_ledger(RowFilter())
    ]


def test_a_correction_of_a_closed_period_is_carried_into_the_next_open_one(store: Store) -> None:
    apply(store, *BASE)
    store.close_period(NOV, actor="ops", now_ns=NOW)
    nov_before = store.statement(NOV, RowFilter())
    before = _ledger(store)
    apply(store, LATE)
    new = [r for r in _ledger(store) if r not in before]
    t02, t03 = ts("2025-11-30T10:02:00Z"), ts("2025-11-30T10:03:00Z")
    # Both postings name the November bucket they correct, and are accounted in December.
    assert new == [
        ("a", t02, 0, DEC, 500, 500, 1000, 500_000_000),
        ("a", t03, 1, DEC, -500, -500, -1000, -500_000_000),
    ]
    # The usage buckets themselves are exact.
    usage = {(u.uuid, u.bucket_start_ns): u.total_bytes for u in store.iter_usage(RowFilter())}
    assert (usage[("a", t02)], usage[("a", t03)]) == (1000, 2000)
    # November's statement is unchanged; December carries the correction as its own line.
    assert store.statement(NOV, RowFilter()) == nov_before
    dec = store.statement(DEC, RowFilter())
    a = next(x for x in dec.accounts if x.uuid == "a")
    assert [(c.corrects_period, c.rated_bytes, c.amount_nano) for c in a.carried] == [(NOV, 0, 0)]
    assert (a.total_bytes, a.charges_nano, a.amount_nano) == (100, 50_000_000, 50_000_000)


def test_corrections_skip_every_closed_period(store: Store) -> None:
    apply(store, *BASE)
    store.close_period(NOV, actor="ops", now_ns=NOW)
    store.close_period(DEC, actor="ops", now_ns=NOW)
    before = _ledger(store)
    apply(store, item("2025-11-30T10:02:30Z", ("a", 1100, 900), ("b", 550, 0)))
    new = [r for r in _ledger(store) if r not in before]
    # a@10:02 and b@10:02 are new buckets, a@10:03 and b@10:03 change (b's 550 at 10:02
    # is above its 500 at 10:03: a counter restart without epochs)
    assert len(new) == 4
    assert {r[3] for r in new} == {JAN}
    jan = store.statement(JAN, RowFilter())
    assert [(a.uuid, [c.corrects_period for c in a.carried]) for a in jan.accounts] == [
        ("a", [NOV]),
        ("b", [NOV]),
    ]


def test_statement_sums_the_period_and_keeps_the_email_of_its_close(store: Store) -> None:
    apply(store, *BASE)
    nov = store.statement(NOV, RowFilter())
    assert [
        (a.uuid, a.email, a.uplink_bytes, a.downlink_bytes, a.rated_bytes) for a in nov.accounts
    ] == [("a", "a@x", 2600, 1400, 4000), ("b", "b@x", 500, 0, 500)]
    # 0.5 EUR per KB: 4000 B = 2 EUR, 500 B = 0.25 EUR
    assert [a.charges_nano for a in nov.accounts] == [2_000_000_000, 250_000_000]
    assert [(t.currency, t.accounts, t.amount_nano) for t in nov.totals] == [
        ("EUR", 2, 2_250_000_000)
    ]
    assert store.statement(NOV, RowFilter(uuids=("b",))).accounts == nov.accounts[1:]
    store.close_period(NOV, actor="ops", now_ns=NOW)
    closed = store.statement(NOV, RowFilter())
    # A later observation renames "a": open statements show it, the closed one does not.
    apply(store, item("2026-01-05T00:00:00Z", ("a", 2800, 1400), email="new-a@x"))
    assert store.statement(NOV, RowFilter()) == closed
    assert [a.email for a in store.statement(JAN, RowFilter()).accounts] == ["new-a@x"]


def test_included_quota_stays_within_the_bucket_month(store: Store) -> None:
    apply(store, *BASE, pricing=Q1)
    store.close_period(NOV, actor="ops", now_ns=NOW)
    apply(store, LATE, pricing=Q1)
    nov = store.statement(NOV, RowFilter())
    assert [(a.uuid, a.included_bytes) for a in nov.accounts] == [("a", 900), ("b", 0)]
    dec = store.statement(DEC, RowFilter())
    a = next(x for x in dec.accounts if x.uuid == "a")
    # December's own usage has its own 900 B quota (100 B used); the carried November line
    # moves quota between November buckets only: its included sum is 0.
    assert a.included_bytes == 100
    assert [(c.corrects_period, c.included_bytes) for c in a.carried] == [(NOV, 0)]


def test_period_totals_list_every_period(store: Store) -> None:
    apply(store, *BASE)
    store.close_period(OCT, actor="ops", now_ns=NOW)  # nothing in it: listed, empty
    close, _ = store.close_period(NOV, actor="ops", now_ns=NOW)
    totals = store.period_totals()
    assert [
        (t.period_start_ns, t.currency, t.total_bytes, t.rated_bytes, t.amount_nano, t.closed)
        for t in totals
    ] == [
        (OCT, "", 0, 0, 0, store.closed_periods()[0]),
        (NOV, "EUR", 4500, 4500, 2_250_000_000, close),
        (DEC, "EUR", 200, 200, 100_000_000, None),
    ]


# --- re-rate ----------------------------------------------------------------------------


def _sums(store: Store) -> dict[tuple[str, int], tuple[int, ...]]:
    out: dict[tuple[str, int], list[int]] = {}
    for r in store.iter_ledger(RowFilter()):
        acc = out.setdefault((r.uuid, r.bucket_start_ns), [0] * 5)
        for i, v in enumerate(
            (r.uplink_bytes, r.downlink_bytes, r.rated_bytes, r.included_bytes, r.amount_nano)
        ):
            acc[i] += v
    return {k: tuple(v) for k, v in out.items()}


def _rerate(
    store: Store,
    period: int,
    pricing: Pricing,
    *,
    dry_run: bool = False,
    page_buckets: int | None = None,
) -> RerateReport:
    run = 0 if dry_run else store.start_run("rerate", [])
    total = RerateReport()
    s = cast(SqlStore, store)
    kw: dict[str, Any] = {} if page_buckets is None else {"page_buckets": page_buckets}
    for page in _periods.iter_rerate(s, period, pricing, run, dry_run=dry_run, now_ns=NOW, **kw):
        total += page
    return total


@pytest.mark.parametrize(("old", "new"), [(P1, P2), (Q1, Q2)])
def test_rerate_equals_rating_from_scratch_and_a_second_rerate_posts_nothing(
    db_url: str, tmp_path: Any, old: Pricing, new: Pricing
) -> None:
    many = [
        item(
            f"2025-11-{d:02d}T{h:02d}:00:30Z",
            *((u, d * 997 + h * 13 + i, h * 7) for i, u in enumerate("abcdef")),
        )
        for d in range(1, 4)
        for h in range(0, 24, 5)
    ]
    store = open_store(db_url)
    scratch = open_store(str(tmp_path / "scratch.db"))
    try:
        apply(store, *many, pricing=old)
        apply(scratch, *many, pricing=new)
        rep = _rerate(store, NOV, new, page_buckets=7)  # several pages
        assert rep.pages > 1
        assert rep.postings > 0
        assert _sums(store) == _sums(scratch)
        rerated = [r for r in store.iter_ledger(RowFilter()) if r.revision > 0]
        assert {(r.entry_type, r.pricing_rule_version, r.period_start_ns) for r in rerated} == {
            ("adjustment", new.rule_version, NOV)
        }
        again = _rerate(store, NOV, new)
        assert (again.postings, again.accounts) == (0, {})
        assert _sums(store) == _sums(scratch)
        # Unchanged pricing from the start: nothing either.
        assert _rerate(scratch, NOV, new).postings == 0
    finally:
        store.close()
        scratch.close()


def _dump(store: Store) -> dict[str, list[tuple[Any, ...]]]:
    db = cast(SqlStore, store).db
    tables = ["buckets", "ledger_postings", "runs", "uuid_period_usage", "closed_periods"]
    return {t: sorted(map(tuple, db.execute(f"SELECT * FROM {t}")), key=repr) for t in tables}


def test_dry_run_writes_nothing_and_reports_exactly_what_the_run_posts(store: Store) -> None:
    apply(store, *BASE, pricing=Q1)
    before = _dump(store)
    dry = _rerate(store, NOV, Q2, dry_run=True, page_buckets=1)
    assert _dump(store) == before
    assert dry.pages >= 2
    real = _rerate(store, NOV, Q2)
    assert (dry.buckets, dry.postings, dry.accounts) == (real.buckets, real.postings, real.accounts)
    assert real.postings > 0


def test_closed_periods_and_currency_changes_are_never_rerated(store: Store) -> None:
    apply(store, *BASE)
    store.close_period(NOV, actor="ops", now_ns=NOW)
    with pytest.raises(PeriodError, match="2025-11 is closed"):
        _rerate(store, NOV, P2)
    usd = Pricing(price_per_unit="1", unit="KB", currency="USD", rule_version="u")
    with pytest.raises(PeriodError, match="posted in EUR but \\[pricing\\] currency is USD"):
        _rerate(store, DEC, usd)


def test_a_close_waits_for_writers_in_flight_on_postgres(postgres_url: str) -> None:
    """A posting transaction that read the closed periods holds them shared; a close
    waits for it, so no posting lands in a period being closed. (SQLite needs no test:
    BEGIN IMMEDIATE serialises every writer.)"""
    writer, closer = cast(SqlStore, open_store(postgres_url)), open_store(postgres_url)
    done: list[float] = []
    try:
        with writer.db.transaction():
            assert NOV not in writer._closed_period_set()
            t = threading.Thread(
                target=lambda: (
                    closer.close_period(NOV, actor="x", now_ns=NOW),
                    done.append(time.monotonic()),
                )
            )
            t.start()
            time.sleep(0.5)
            assert done == []  # still waiting for the writer
            released = time.monotonic()
        t.join(10)
        assert done
        assert done[0] >= released
    finally:
        writer.close()
        closer.close()


@pytest.mark.parametrize("dry_run", [False, True])
def test_rerate_holds_no_lock_between_pages(db_url: str, dry_run: bool) -> None:
    """Between two pages (each its own transaction) a collector writes without waiting:
    SQLite's write lock and PostgreSQL's series row locks last one page."""
    store, other = cast(SqlStore, open_store(db_url)), cast(SqlStore, open_store(db_url))
    try:
        apply(store, *BASE)
        if db_url.startswith("postgresql"):
            other.db.execute("SET lock_timeout = '200ms'")
        else:
            other.db.execute("PRAGMA busy_timeout = 0")
        pages = _periods.iter_rerate(
            store, NOV, P2, 0 if dry_run else store.start_run("rerate", []),
            dry_run=dry_run, now_ns=NOW, page_buckets=1,
        )  # fmt: skip
        first = next(pages)
        assert first.buckets > 0
        # Late data for both accounts (the one re-rated, the one still to come) goes in
        # at once: no lock is waited for.
        rep = other.apply(
            Batch(
                [item("2025-11-30T10:02:30Z", ("a", 1100, 900), ("b", 500, 0))],
                other.start_run("collect", ["s1"]),
                P2,
                "s1",
            )
        )
        assert rep.postings > 0
        rest = list(pages)
        assert rest
    finally:
        store.close()
        other.close()

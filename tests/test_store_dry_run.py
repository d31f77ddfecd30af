"""``store.dry_run()``: every page in its own rolled-back transaction (the write lock is held
for one page, never for the whole run), and still exactly the report a real run gives:
page k sees what pages 1..k-1 of the same dry run would have written.

Both back ends; a hypothesis property compares random multi-page dry runs with real ones.
"""

from __future__ import annotations

import random
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import pytest
from hypothesis import given
from hypothesis import strategies as st
from test_convergence import PRICING as CONV_PRICING
from test_convergence import QUOTA_PRICING, deliveries, fleets
from test_store import PRICING, T0, M, batch, dump, item, usage

from billing_cli._errors import StoreError
from billing_cli.core.types import Item, Rejection
from billing_cli.pricing import Pricing
from billing_cli.store import dry_run, open_store
from billing_cli.store.base import ApplyReport, Batch, CheckpointAdvance, Store
from billing_cli.store.sql import SqlStore

S = 1_000_000_000
QUOTA = Pricing(
    price_per_unit="0.5", unit="KB", currency="EUR", rule_version="q", included_bytes={"a": 120}
)


@pytest.fixture
def pair(db_url: str, tmp_path: Path) -> Iterator[tuple[Store, Store]]:
    """Two stores of the same back end: one for the dry run, one for the real run."""
    if db_url.startswith("postgres"):
        import uuid as uuidlib

        import psycopg
        from conftest import POSTGRES_URL

        assert POSTGRES_URL
        schema = f"t_{uuidlib.uuid4().hex[:12]}"
        with psycopg.connect(POSTGRES_URL, autocommit=True) as conn:
            conn.execute(f"CREATE SCHEMA {schema}")
        sep = "&" if "?" in POSTGRES_URL else "?"
        other = f"{POSTGRES_URL}{sep}options=-csearch_path%3D{schema}"
        a, b = open_store(db_url), open_store(other)
        yield a, b
        a.close()
        b.close()
        with psycopg.connect(POSTGRES_URL, autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA {schema} CASCADE")
        return
    a, b = open_store(db_url), open_store(str(tmp_path / "real.db"))
    yield a, b
    a.close()
    b.close()


def _report(r: ApplyReport) -> dict[str, Any]:
    d = dict(vars(r))
    d["bucket_changes"] = sorted(
        (c.key, c.bucket_start_ns, c.old_uplink, c.old_downlink, c.new_uplink, c.new_downlink)
        for c in r.bucket_changes
    )
    return d


# Pages that depend on each other: page 2 re-splits what page 1 added, page 2 empties a
# bucket page 1 created (an adjustment to zero), page 3 fills it again (an adjustment in a
# real run, because the bucket was posted; a charge if page 1 were forgotten or merged).
HISTORY = [item(T0, ("a", 0, 0), ("b", 0, 0)), item(T0 + 2 * M + 10 * S, ("a", 100, 0))]
PAGES = [
    [item(T0 + M + 10 * S, ("a", 40, 0)), item(T0 + 3 * M + 10 * S, ("a", 150, 0), ("b", 7, 7))],
    [item(T0 + 2 * M + 50 * S, ("a", 150, 0)), item(T0 + M + 10 * S, ("a", 40, 0))],
    [
        item(T0 + 3 * M + 30 * S, ("a", 170, 0), ("b", 9, 9)),
        item(T0 + 3 * M + 10 * S, ("a", 151, 0)),
    ],
    [item(T0 + 4 * M, ("a", 200, 1), ("b", 9, 9))],
]


@pytest.mark.parametrize("pricing", [PRICING, QUOTA], ids=["flat", "quota"])
def test_dry_run_reports_what_a_real_run_would_page_by_page(
    pair: tuple[Store, Store], pricing: Pricing
) -> None:
    dry, real = pair
    for s in (dry, real):
        s.apply(batch(s, *HISTORY, pricing=pricing))
    before = dump(dry)
    with dry.dry_run():
        dry_reports = [
            _report(dry.apply(batch(dry, *page, pricing=pricing, run_id=0))) for page in PAGES
        ]
    assert dump(dry) == before
    real_reports = [_report(real.apply(batch(real, *page, pricing=pricing))) for page in PAGES]
    assert dry_reports == real_reports
    # The scenario exercises what it claims: page 2 sees page 1's observation (a conflict
    # with it is found), page 3's posting on the emptied bucket is an adjustment.
    assert real_reports[1]["duplicates"] == 1
    assert real_reports[2]["conflicts"] == 1
    assert real_reports[2]["adjustments"] >= 1


def test_dry_run_leaves_every_table_unchanged(db_url: str) -> None:
    store = open_store(db_url)
    try:
        store.apply(batch(store, item(T0, ("a", 0, 0)), item(T0 + 2 * M, ("a", 100, 0))))
        run_id = store.start_run("reconcile", ["s1"])
        before = dump(store)
        with store.dry_run():
            rep = store.apply(
                batch(
                    store,
                    item(T0 + M, ("a", 50, 0)),
                    item(T0 + 3 * M, ("a", 200, 0), ("new", 1, 1)),
                    run_id=run_id,
                    checkpoint=CheckpointAdvance("s1", "n1", "prod", "c", 99, 99),
                    rejections=[Rejection(None, "n1", "prod", "x", "y", "bad")],
                )
            )
            assert rep.postings == 3
            # Other writes inside a dry run are rolled back too.
            store.record_integrity_event("identity_mismatch", node_id="x", env="y", detail="d")
            store.record_failure("s1", "n1", "prod", 1, "boom")
            later = store.apply(batch(store, item(T0 + 4 * M, ("a", 300, 0)), run_id=run_id))
            assert later.postings == 1  # sees the page before: 200 -> 300 in minute 4
            # Readers outside the dry run's pages see the committed state only.
            assert len(usage(store)) == 1
        assert dump(store) == before
        # The store is fully usable afterwards.
        assert store.apply(batch(store, item(T0 + M, ("a", 50, 0)), run_id=run_id)).postings == 2
    finally:
        store.close()


def test_no_write_lock_is_held_between_pages_sqlite(tmp_path: Path) -> None:
    path = str(tmp_path / "b.db")
    store = open_store(path)
    other = sqlite3.connect(path, timeout=0, isolation_level=None)
    try:
        store.apply(batch(store, *HISTORY))
        with store.dry_run():
            store.apply(batch(store, *PAGES[0], run_id=0))
            # Another writer gets the lock at once (timeout 0): the page's transaction ended.
            other.execute("BEGIN IMMEDIATE")
            other.execute("ROLLBACK")
            store.apply(batch(store, *PAGES[1], run_id=0))
            other.execute("BEGIN IMMEDIATE")
            other.execute("ROLLBACK")
    finally:
        other.close()
        store.close()


@pytest.mark.postgres
def test_no_row_lock_is_held_between_pages_postgres(postgres_url: str) -> None:
    import psycopg

    store = open_store(postgres_url)
    try:
        store.apply(batch(store, *HISTORY, pricing=QUOTA))
        with store.dry_run(), psycopg.connect(postgres_url, autocommit=True) as other:
            store.apply(batch(store, *PAGES[0], pricing=QUOTA, run_id=0))
            # The per-uuid quota rows every node shares: updatable at once between pages.
            other.execute("SET lock_timeout = '200ms'")
            other.execute("UPDATE uuid_period_usage SET uplink_bytes = uplink_bytes")
            other.execute("UPDATE series SET email = email")
    finally:
        store.close()


def test_a_dry_run_of_mostly_new_data_stops_at_the_bound(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(dry_run, "DRY_RUN_MAX_NEW", 3)
    store = open_store(str(tmp_path / "b.db"))
    try:
        with store.dry_run():
            store.apply(batch(store, item(T0, ("a", 0, 0), ("b", 0, 0)), run_id=0))
            with pytest.raises(StoreError, match="dry run stopped: more than 3 new"):
                store.apply(batch(store, item(T0 + M, ("a", 1, 0), ("b", 1, 0)), run_id=0))
    finally:
        store.close()


# --- the property ----------------------------------------------------------------------------


def _fresh() -> Store:
    return open_store(":memory:")


@given(fleets(), st.randoms(use_true_random=False), st.sampled_from([CONV_PRICING, QUOTA_PRICING]))
def test_random_dry_runs_report_exactly_what_real_runs_do(
    fleet: Any, rnd: random.Random, pricing: Pricing
) -> None:
    dry, real = _fresh(), _fresh()
    try:
        items: list[Item] = fleet.items
        history = [it for it in items if rnd.random() < 0.5]  # collected before
        for s in (dry, real):
            if history:
                s.apply(Batch(history, 1, pricing))
        pages = deliveries(items, rnd)
        before = dump(dry)
        with dry.dry_run():
            got = [_report(dry.apply(Batch(p, 0, pricing))) for p in pages]
        assert dump(dry) == before
        want = [_report(real.apply(Batch(p, 0, pricing))) for p in pages]
        assert got == want
    finally:
        dry.close()
        real.close()


def test_dump_helper_sees_every_table(tmp_path: Path) -> None:
    store = open_store(str(tmp_path / "x.db"))
    try:
        db = cast(SqlStore, store).db
        assert db.has_table("ledger_postings")
        assert not db.has_table("nope")
        assert set(dump(store)) >= {"observations", "buckets", "ledger_postings"}
    finally:
        store.close()

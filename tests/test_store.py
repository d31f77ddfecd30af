"""Both stores (SQLite file and PostgreSQL) through the same tests via ``db_url``."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import pytest

from billing_cli._errors import StoreError
from billing_cli.core.types import Item, Rejection, Sample
from billing_cli.pricing import Pricing
from billing_cli.store import open_store, redact_url
from billing_cli.store.base import (
    ApplyReport,
    Batch,
    CheckpointAdvance,
    RowFilter,
    SourceRunResult,
    Store,
)
from billing_cli.store.schema import SCHEMA_VERSION
from billing_cli.store.sql import SqlStore

M = 60_000_000_000
T0 = 1_790_000_000 * 1_000_000_000 - (1_790_000_000 * 1_000_000_000) % M  # a minute start
PRICING = Pricing(price_per_unit="0.5", unit="KB", currency="EUR", rule_version="r7")
TABLES = [
    "series",
    "observations",
    "buckets",
    "uuid_period_usage",
    "ledger_postings",
    "source_checkpoints",
    "runs",
    "run_sources",
    "integrity_events",
    "schema_version",
]


@pytest.fixture
def store(db_url: str) -> Iterator[Store]:
    s = open_store(db_url)
    yield s
    s.close()


def item(
    t: int, *samples: tuple[str, int, int], epoch: str | None = None, node: str = "n1"
) -> Item:
    return Item(
        t, node, "prod", epoch, [Sample(u, f"{u}@x", "vless", up, dn) for u, up, dn in samples]
    )


def batch(store: Store, *items: Item, **kw: Any) -> Batch:
    run_id = kw.pop("run_id", None) or store.start_run("ingest", ["s1"])
    return Batch(list(items), run_id, kw.pop("pricing", PRICING), kw.pop("source_id", "s1"), **kw)


def usage(store: Store, **flt: Any) -> list[tuple[str, int, int, int]]:
    return [
        (r.uuid, r.bucket_start_ns - T0, r.uplink_bytes, r.downlink_bytes)
        for r in store.iter_usage(RowFilter(**flt))
    ]


def ledger_sums(store: Store) -> dict[tuple[str, int], tuple[int, int]]:
    out: dict[tuple[str, int], tuple[int, int]] = {}
    for r in store.iter_ledger(RowFilter()):
        k = (r.uuid, r.bucket_start_ns - T0)
        b, a = out.get(k, (0, 0))
        out[k] = (b + r.rated_bytes, a + r.amount_nano)
    return {k: v for k, v in out.items() if v != (0, 0)}


def dump(store: Store) -> dict[str, list[tuple[Any, ...]]]:
    db = cast(SqlStore, store).db
    return {t: sorted(map(tuple, db.execute(f"SELECT * FROM {t}")), key=repr) for t in TABLES}


# --- apply ---------------------------------------------------------------------------------


def test_apply_buckets_ledger_and_report(store: Store) -> None:
    rep = store.apply(
        batch(
            store,
            item(T0 + 5, ("a", 1000, 2000), ("b", 0, 0)),
            item(T0 + M + 5, ("a", 3000, 2500), ("b", 0, 0)),
            item(T0 + M + 9, ("a", 3500, 2500), ("b", 10, 0)),
        )
    )
    assert (rep.items, rep.samples, rep.new_observations, rep.duplicates) == (3, 6, 6, 0)
    assert rep.buckets_changed == 2
    assert rep.postings == 2
    assert rep.adjustments == 0
    assert usage(store) == [("a", M, 2500, 500), ("b", M, 10, 0)]
    rows = list(store.iter_ledger(RowFilter()))
    assert [(r.uuid, r.entry_type, r.revision, r.rated_bytes) for r in rows] == [
        ("a", "charge", 0, 3000),
        ("b", "charge", 0, 10),
    ]
    # 3000 B at 0.5 EUR per KB = 1.5 EUR; 10 B = 0.005 EUR.
    assert [r.amount_nano for r in rows] == [1_500_000_000, 5_000_000]
    assert {(r.currency, r.pricing_rule_version) for r in rows} == {("EUR", "r7")}
    assert rep.charged_amount_nano == 1_505_000_000


def test_idle_series_stores_observation_but_no_bucket(store: Store) -> None:
    store.apply(batch(store, item(T0, ("a", 5, 5))))
    rep = store.apply(batch(store, item(T0 + M, ("a", 5, 5))))
    assert rep.new_observations == 1
    assert rep.buckets_changed == 0
    assert rep.postings == 0
    assert usage(store) == []
    # Both observations are kept (the contract view shows each), in one run: the idle
    # sample only moved the series head.
    db = cast(SqlStore, store).db
    assert db.execute("SELECT count(*) FROM counter_observations") == [(2,)]
    assert db.execute("SELECT collected_at_ns, until_ns FROM observations") == [(T0, None)]


def test_replay_changes_nothing(store: Store) -> None:
    items = [item(T0 + i * M, ("a", i * 100, i * 7), ("b", i * i, 0)) for i in range(5)]
    store.apply(batch(store, *items))
    before = dump(store)
    run_id = store.start_run("ingest", ["s1"])
    before = dump(store)
    rep = store.apply(batch(store, *items[1:4], run_id=run_id))
    rep2 = store.apply(batch(store, *items, *items, run_id=run_id))
    assert (rep.duplicates, rep.new_observations, rep.postings, rep.buckets_changed) == (6, 0, 0, 0)
    assert (rep2.duplicates, rep2.conflicts) == (20, 0)
    assert dump(store) == before


def test_conflict_keeps_first_and_records_event(store: Store) -> None:
    store.apply(batch(store, item(T0, ("a", 0, 0)), item(T0 + M, ("a", 100, 100))))
    rep = store.apply(batch(store, item(T0 + M, ("a", 999, 100))))
    assert rep.conflicts == 1
    assert rep.new_observations == 0
    assert usage(store) == [("a", M, 100, 100)]
    assert store.integrity_event_counts() == {"s1": 1}
    ev = cast(SqlStore, store).db.execute(
        "SELECT kind, uuid, collected_at_ns, detail FROM integrity_events"
    )
    assert ev[0][:3] == ("conflict", "a", T0 + M)
    assert "999" in ev[0][3]
    # Within one batch, the first delivered value wins too.
    rep = store.apply(
        batch(store, item(T0 + 2 * M, ("a", 150, 150)), item(T0 + 2 * M, ("a", 1, 1)))
    )
    assert (rep.conflicts, rep.new_observations) == (1, 1)
    assert usage(store) == [("a", M, 100, 100), ("a", 2 * M, 50, 50)]


def test_late_item_splits_delta_and_adjusts_ledger(store: Store) -> None:
    store.apply(batch(store, item(T0, ("a", 0, 0)), item(T0 + 3 * M, ("a", 3000, 0))))
    assert usage(store) == [("a", 3 * M, 3000, 0)]
    rep = store.apply(batch(store, item(T0 + M, ("a", 1000, 0)), collect_bucket_changes=True))
    assert usage(store) == [("a", M, 1000, 0), ("a", 3 * M, 2000, 0)]
    assert rep.buckets_changed == 2
    assert sorted(
        (c.bucket_start_ns - T0, c.old_uplink, c.new_uplink) for c in rep.bucket_changes
    ) == [
        (M, 0, 1000),
        (3 * M, 3000, 2000),
    ]
    assert (rep.postings, rep.adjustments, rep.adjustment_amount_nano) == (2, 1, -500_000_000)
    entries = [
        (r.bucket_start_ns - T0, r.entry_type, r.revision, r.rated_bytes)
        for r in store.iter_ledger(RowFilter())
    ]
    assert entries == [
        (M, "charge", 0, 1000),
        (3 * M, "charge", 0, 3000),
        (3 * M, "adjustment", 1, -1000),
    ]
    assert ledger_sums(store) == {
        ("a", M): (1000, 500_000_000),
        ("a", 3 * M): (2000, 1_000_000_000),
    }


def test_bucket_emptied_by_late_item_disappears_and_reappears(store: Store) -> None:
    # 0 -> (2M+30s: 100). A late observation at 1M with the same totals empties minute 2.
    s30 = M // 2
    store.apply(batch(store, item(T0, ("a", 0, 0)), item(T0 + 2 * M + s30, ("a", 100, 0))))
    store.apply(batch(store, item(T0 + M, ("a", 100, 0))))
    assert usage(store) == [("a", M, 100, 0)]
    assert ledger_sums(store) == {("a", M): (100, 50_000_000)}
    # A later observation in minute 2 refills it: the next posting numbers on (revision 2).
    store.apply(batch(store, item(T0 + 2 * M + s30 + 1, ("a", 160, 0))))
    assert usage(store) == [("a", M, 100, 0), ("a", 2 * M, 60, 0)]
    revs = [r.revision for r in store.iter_ledger(RowFilter()) if r.bucket_start_ns == T0 + 2 * M]
    assert revs == [0, 1, 2]
    assert ledger_sums(store) == {("a", M): (100, 50_000_000), ("a", 2 * M): (60, 30_000_000)}


def test_restart_anomaly_and_rejections(store: Store) -> None:
    rej = Rejection(T0, "n1", "prod", "bad", "vless", "uplink_bytes_total: not an integer")
    rep = store.apply(
        batch(
            store,
            item(T0, ("a", 500, 500), epoch="e1"),
            item(T0 + M, ("a", 100, 600), epoch="e1"),  # drop within epoch: anomaly
            item(T0 + 2 * M, ("a", 50, 50), epoch="e2"),  # restart: bills the totals
            rejections=[rej],
        )
    )
    assert (rep.anomalies, rep.rejected) == (1, 1)
    assert usage(store) == [("a", 2 * M, 50, 50)]
    kinds = sorted(
        r[0] for r in cast(SqlStore, store).db.execute("SELECT kind FROM integrity_events")
    )
    assert kinds == ["anomaly", "rejected"]
    # Replaying records no new anomaly.
    assert store.apply(batch(store, item(T0 + M, ("a", 100, 600), epoch="e1"))).anomalies == 0
    assert store.integrity_event_counts() == {"s1": 2}


def test_checkpoint_never_moves_backwards_and_cursor_moves(store: Store) -> None:
    def cp(cursor: str | None, until: int | None, at: int) -> CheckpointAdvance:
        return CheckpointAdvance("s1", "n1", "prod", cursor, until, at)

    store.apply(batch(store, item(T0, ("a", 1, 1)), checkpoint=cp("c1", None, 10)))
    c = store.get_checkpoint("s1")
    assert c is not None
    assert (c.last_cursor, c.last_successful_until_ns, c.last_attempted_at_ns) == ("c1", None, 10)
    store.apply(batch(store, checkpoint=cp("c2", 1000, 11)))
    store.apply(batch(store, checkpoint=cp("c3", 500, 12)))
    c = store.get_checkpoint("s1")
    assert c is not None
    assert (c.last_cursor, c.last_successful_until_ns, c.last_attempted_at_ns) == ("c3", 1000, 12)
    store.record_failure("s1", "n1", "prod", 13, "boom")
    store.record_failure("s1", "n1", "prod", 14, "boom again")
    c = store.get_checkpoint("s1")
    assert c is not None
    assert (c.consecutive_failures, c.last_error, c.last_successful_until_ns) == (
        2,
        "boom again",
        1000,
    )
    store.record_success("s1", "n1", "prod", 15)
    c = store.get_checkpoint("s1")
    assert c is not None
    assert (c.consecutive_failures, c.last_error, c.last_succeeded_at_ns) == (0, None, 15)
    assert [x.source_id for x in store.list_checkpoints()] == ["s1"]


def test_freshness_is_the_newest_item_received_and_never_moves_back(store: Store) -> None:
    def cp(newest: int | None) -> CheckpointAdvance:
        return CheckpointAdvance("s1", "n1", "prod", None, None, 1, newest)

    store.apply(batch(store, checkpoint=cp(None)))  # an empty page: nothing received yet
    c = store.get_checkpoint("s1")
    assert c is not None
    assert c.newest_collected_at_ns is None
    store.apply(batch(store, item(T0 + M, ("a", 1, 1)), checkpoint=cp(T0 + M)))
    store.apply(batch(store, item(T0, ("a", 0, 0)), checkpoint=cp(T0)))  # a late item
    store.apply(batch(store, checkpoint=cp(None)))
    c = store.get_checkpoint("s1")
    assert c is not None
    assert c.newest_collected_at_ns == T0 + M
    # The first success is remembered; later ones do not move it.
    store.record_success("s1", "n1", "prod", 100)
    store.record_success("s1", "n1", "prod", 200)
    c = store.get_checkpoint("s1")
    assert c is not None
    assert (c.first_succeeded_at_ns, c.last_succeeded_at_ns) == (100, 200)


def test_the_most_frequent_rejection_reason_is_kept_with_the_run(store: Store) -> None:
    rejections = [Rejection(T0, "n1", "prod", f"u{i}", "", "uuid is bad") for i in range(3)]
    rejections.append(Rejection(T0, "n1", "prod", "v", "", "counter is bad"))
    run = store.start_run("collect", ["s1"])
    rep = store.apply(batch(store, run_id=run, rejections=rejections))
    assert (rep.rejected, rep.top_rejection) == (4, "uuid is bad")
    assert rep.rejection_reasons == {"uuid is bad": 3, "counter is bad": 1}
    rep += ApplyReport(rejection_reasons={"counter is bad": 5})
    assert rep.top_rejection == "counter is bad"
    result = SourceRunResult(run, "s1", "collect", 1, 2, "ok", {"rejected": 4}, None, "uuid is bad")
    store.finish_run(run, "ok", {"s1": result})
    assert store.last_source_results()["s1"].top_rejection == "uuid is bad"


def test_failed_apply_moves_nothing(store: Store) -> None:
    store.apply(batch(store, item(T0, ("a", 1, 1))))
    before = dump(store)
    bad = batch(
        store,
        item(T0 + M, ("a", 5, 5)),
        checkpoint=CheckpointAdvance("s1", "n1", "prod", "c", 9, 9),
    )
    before = dump(store)
    # A counter outside the 64-bit range fails inside the transaction, after other writes.
    broken = Batch(
        [*bad.items, item(T0 + M, ("z", 2**64, 0))],
        bad.run_id,
        PRICING,
        "s1",
        checkpoint=bad.checkpoint,
    )
    with pytest.raises(StoreError):
        store.apply(broken)
    assert dump(store) == before


# Dry runs: tests/test_store_dry_run.py.


def test_filters_and_order(store: Store) -> None:
    store.apply(
        batch(
            store,
            item(T0, ("b", 0, 0), ("a", 0, 0)),
            item(T0 + M, ("b", 1, 0), ("a", 2, 0)),
            item(T0, ("a", 0, 0), node="n2"),
            item(T0 + 2 * M, ("a", 3, 0), node="n2"),
        )
    )
    rows = list(store.iter_usage(RowFilter()))
    assert [(r.node_id, r.uuid, r.bucket_start_ns - T0) for r in rows] == [
        ("n1", "a", M),
        ("n1", "b", M),
        ("n2", "a", 2 * M),
    ]
    assert rows[0].total_bytes == 2
    assert usage(store, uuid="a") == [("a", M, 2, 0), ("a", 2 * M, 3, 0)]
    assert usage(store, node_id="n2") == [("a", 2 * M, 3, 0)]
    assert usage(store, since_ns=T0 + 2 * M) == [("a", 2 * M, 3, 0)]
    assert usage(store, until_ns=T0 + 2 * M) == [("a", M, 2, 0), ("b", M, 1, 0)]
    assert usage(store, series_filters=(("n2", "prod"), ("zz", "prod"))) == [("a", 2 * M, 3, 0)]
    assert usage(store, env="dev") == []
    assert [r.uuid for r in store.iter_ledger(RowFilter(node_id="n1"))] == ["a", "b"]


def test_included_quota_rerates_later_buckets(store: Store) -> None:
    pricing = Pricing(price_per_unit="1", unit="B", included_bytes={"a": 100})
    store.apply(
        batch(
            store,
            item(T0, ("a", 0, 0)),
            item(T0 + 3 * M, ("a", 150, 0)),
            item(T0 + 4 * M, ("a", 200, 0)),
            pricing=pricing,
        )
    )
    # Minute 3 uses the 100 free bytes (bills 50), minute 4 bills all 50.
    assert ledger_sums(store) == {("a", 3 * M): (150, 50 * 10**9), ("a", 4 * M): (50, 50 * 10**9)}
    # A late observation moves 120 bytes to minute 1: it now takes the quota (bills 20),
    # minute 3 keeps 30 bytes, all billed; minute 4 is unchanged.
    rep = store.apply(batch(store, item(T0 + M, ("a", 120, 0)), pricing=pricing))
    assert ledger_sums(store) == {
        ("a", M): (120, 20 * 10**9),
        ("a", 3 * M): (30, 30 * 10**9),
        ("a", 4 * M): (50, 50 * 10**9),
    }
    assert rep.postings == 2
    # Another series of the same uuid earlier in the period shifts the quota again, and
    # minute 1 (bytes unchanged) is re-rated.
    rep = store.apply(
        batch(
            store,
            item(T0 - 2 * M, ("a", 0, 0), node="n0"),
            item(T0, ("a", 90, 0), node="n0"),
            pricing=pricing,
        )
    )
    assert ledger_sums(store)[("a", 0)] == (90, 0)
    assert ledger_sums(store)[("a", M)] == (120, 110 * 10**9)
    assert rep.postings == 2


def test_ledger_is_append_only_in_the_database(store: Store) -> None:
    store.apply(batch(store, item(T0, ("a", 0, 0)), item(T0 + M, ("a", 5, 0))))
    db = cast(SqlStore, store).db
    with pytest.raises(db.errors), db.transaction():
        db.execute("UPDATE ledger_postings SET amount_nano = 0")
    with pytest.raises(db.errors), db.transaction():
        db.execute("DELETE FROM ledger_postings")
    assert len(list(store.iter_ledger(RowFilter()))) == 1


def test_contract_views(store: Store) -> None:
    store.apply(batch(store, item(T0, ("a", 0, 0)), item(T0 + M + 123, ("a", 5, 6))))
    db = cast(SqlStore, store).db
    obs = db.execute(
        "SELECT node_id, env, uuid, inbound_tag, collected_at_ns, uplink_total, source_id"
        " FROM counter_observations ORDER BY collected_at_ns"
    )
    assert obs[1] == ("n1", "prod", "a", "vless", T0 + M + 123, 5, "s1")
    b = db.execute(
        "SELECT uuid, bucket_start_ns, total_bytes, bucket_start FROM usage_minute_buckets"
    )
    assert b[0][:3] == ("a", T0 + M, 11)
    assert "2026" in str(b[0][3])
    led = db.execute("SELECT uuid, entry_type, amount_nano, currency FROM billing_ledger")
    assert led == [("a", "charge", 5_500_000, "EUR")]


def test_runs_and_last_source_results(store: Store) -> None:
    r1 = store.start_run("collect", ["s1", "s2"])
    res = SourceRunResult(r1, "s1", "collect", 1, 2, "ok", {"items": 3}, None)
    failed = SourceRunResult(r1, "s2", "collect", 1, 2, "failed", {}, "timeout")
    store.finish_run(r1, "ok", {"s1": res, "s2": failed})
    r2 = store.start_run("collect", ["s1"])
    assert r2 > r1
    store.finish_run(
        r2, "ok", {"s1": SourceRunResult(r2, "s1", "collect", 3, 4, "ok", {"items": 5}, None)}
    )
    last = store.last_source_results()
    assert last["s1"].run_id == r2
    assert last["s1"].counts == {"items": 5}
    assert (last["s2"].outcome, last["s2"].error) == ("failed", "timeout")


# --- schema and opening ---------------------------------------------------------------------


def test_schema_created_on_first_use_and_reopen_keeps_data(db_url: str) -> None:
    s = open_store(db_url)
    s.apply(
        Batch(
            [item(T0, ("a", 0, 0)), item(T0 + M, ("a", 7, 0))], s.start_run("ingest", []), PRICING
        )
    )
    db = cast(SqlStore, s).db
    assert db.execute("SELECT max(version) FROM schema_version") == [(SCHEMA_VERSION,)]
    s.close()
    s2 = open_store(db_url)
    assert usage(s2) == [("a", M, 7, 0)]
    # One row per migration step, each applied once.
    assert cast(SqlStore, s2).db.execute("SELECT count(*) FROM schema_version") == [
        (SCHEMA_VERSION,)
    ]
    s2.close()


def _previous_release(db_url: str, version: int, monkeypatch: pytest.MonkeyPatch) -> SqlStore:
    """A store whose schema is at ``version``, as that release created it (its rows are
    then written with plain SQL: today's apply writes today's columns)."""
    from billing_cli.store import schema, sql

    with monkeypatch.context() as m:
        m.setattr(sql, "SCHEMA_VERSION", version)
        m.setattr(sql, "migrations", lambda d: schema.migrations(d)[:version])
        s = cast(SqlStore, open_store(db_url))
    assert s.db.execute("SELECT max(version) FROM schema_version") == [(version,)]
    return s


def _old_rows(s: SqlStore, series: list[tuple[Any, ...]], **tables: list[tuple[Any, ...]]) -> None:
    """Insert rows as an older release wrote them (its column lists)."""
    cols = {
        "observations": "series_id, collected_at_ns, uplink_total, downlink_total, counter_epoch,"
        " run_id, source_id",
        "buckets": "series_id, bucket_start_ns, uplink_bytes, downlink_bytes, rated_bytes,"
        " amount_nano, revision",
        "ledger_postings": "series_id, bucket_start_ns, revision, entry_type, rated_bytes,"
        " amount_nano, currency, pricing_rule_version, run_id, created_at_ns",
    }
    with s.db.transaction():
        s.db.executemany(
            "INSERT INTO series (series_id, node_id, env, uuid, inbound_tag, email,"
            " head_collected_at_ns, head_uplink, head_downlink, head_epoch)"
            " VALUES (?,?,?,?,?,?,?,?,?,?)",
            series,
        )
        for table, rows in tables.items():
            marks = ",".join("?" * len(cols[table].split(",")))
            s.db.executemany(f"INSERT INTO {table} ({cols[table]}) VALUES ({marks})", rows)


def test_a_version_1_database_is_migrated_on_first_use(
    db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    s = _previous_release(db_url, 1, monkeypatch)
    _old_rows(
        s,
        [(1, "n1", "prod", "a", "vless", "a@x", T0 + M, 7, 0, None)],
        observations=[(1, T0, 0, 0, None, 1, "s1"), (1, T0 + M, 7, 0, None, 1, "s1")],
        buckets=[(1, T0 + M, 7, 0, 7, 3_500_000, 1)],
        ledger_postings=[(1, T0 + M, 0, "charge", 7, 3_500_000, "EUR", "r7", 1, T0)],
    )
    s.close()
    page = [item(T0, ("a", 0, 0)), item(T0 + M, ("a", 7, 0))]
    s2 = open_store(db_url)
    try:
        db = cast(SqlStore, s2).db
        assert db.execute("SELECT max(version) FROM schema_version") == [(SCHEMA_VERSION,)]
        assert usage(s2) == [("a", M, 7, 0)]
        run = s2.start_run("ingest", [])
        # No digest exists for the old items: the exact path counts them as duplicates...
        assert s2.apply(Batch(page, run, PRICING)).duplicates == 2
        # ...and now remembers them.
        assert db.execute("SELECT count(*) FROM item_digests") == [(2,)]
        assert usage(s2) == [("a", M, 7, 0)]
    finally:
        s2.close()


def test_a_version_2_database_gains_the_freshness_columns(
    db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Version 3 adds what health measures from the data; old checkpoints keep theirs."""
    from billing_cli.store import schema, sql

    with monkeypatch.context() as m:  # what the previous release created
        m.setattr(sql, "SCHEMA_VERSION", 2)
        m.setattr(sql, "migrations", lambda d: schema.migrations(d)[:2])
        s = open_store(db_url)
        cast(SqlStore, s).db.execute(
            "INSERT INTO source_checkpoints (source_id, node_id, env, last_successful_until_ns,"
            " consecutive_failures) VALUES ('s1', 'n1', 'prod', 5, 0)"
        )
        s.close()
    s2 = open_store(db_url)
    try:
        cp = s2.get_checkpoint("s1")
        assert cp is not None
        assert (cp.last_successful_until_ns, cp.newest_collected_at_ns) == (5, None)
        run = s2.start_run("collect", ["s1"])
        s2.apply(
            Batch(
                [item(T0, ("a", 0, 0))],
                run,
                PRICING,
                checkpoint=CheckpointAdvance("s1", "n1", "prod", None, T0 + M, T0 + M, T0),
            )
        )
        s2.record_success("s1", "n1", "prod", T0 + 2 * M)
        cp = s2.get_checkpoint("s1")
        assert cp is not None
        assert (cp.newest_collected_at_ns, cp.first_succeeded_at_ns) == (T0, T0 + 2 * M)
    finally:
        s2.close()


def test_a_version_3_database_gets_accounting_periods_on_first_use(
    db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from billing_cli._time import parse_rfc3339_ns as ts

    nov_last = ts("2026-11-30T23:59:00Z")
    dec_first = ts("2026-12-01T00:00:00Z")
    before_1970 = ts("1969-12-31T23:59:00Z")
    s = _previous_release(db_url, 3, monkeypatch)
    _old_rows(
        s,
        [
            (1, "n1", "prod", "a", "vless", "a@x", dec_first + 5, 11, 3, None),
            (2, "n1", "prod", "b", "vless", "b@x", before_1970 + 5, 1, 1, None),
        ],
        observations=[
            (1, nov_last - M + 5, 0, 0, None, 1, "s1"),
            (1, nov_last + 5, 7, 3, None, 1, "s1"),
            (1, dec_first + 5, 11, 3, None, 2, "s1"),
        ],
        buckets=[
            (1, nov_last, 7, 3, 10, 5_000_000, 2),
            (1, dec_first, 4, 0, 4, 2_000_000, 1),
            (2, before_1970, 1, 1, 2, 1_000_000, 1),
        ],
        ledger_postings=[
            (1, nov_last, 0, "charge", 8, 4_000_000, "EUR", "r7", 1, nov_last),
            (1, nov_last, 1, "adjustment", 2, 1_000_000, "EUR", "r7", 2, dec_first),
            (1, dec_first, 0, "charge", 4, 2_000_000, "EUR", "r7", 2, dec_first),
            (2, before_1970, 0, "charge", 2, 1_000_000, "EUR", "r7", 1, before_1970),
        ],
    )
    s.close()
    s2 = cast(SqlStore, open_store(db_url))
    try:
        db = s2.db
        assert db.execute("SELECT max(version) FROM schema_version") == [(SCHEMA_VERSION,)]
        # Every existing posting is accounted in its bucket's month (both SQL dialects'
        # month arithmetic agree with the Python one, before 1970 too) ...
        rows = db.execute(
            "SELECT uuid, bucket_start_ns, revision, accounting_period, period_start_ns,"
            " uplink_bytes, downlink_bytes, included_bytes FROM billing_ledger"
            " ORDER BY uuid, bucket_start_ns, revision"
        )
        assert [tuple(r) for r in rows] == [
            # ... and each bucket's bytes are carried by its first posting, so the ledger
            # adds up to the buckets (the included quota used was not stored: 0).
            ("a", nov_last, 0, "2026-11", ts("2026-11-01T00:00:00Z"), 7, 3, 0),
            ("a", nov_last, 1, "2026-11", ts("2026-11-01T00:00:00Z"), 0, 0, 0),
            ("a", dec_first, 0, "2026-12", dec_first, 4, 0, 0),
            ("b", before_1970, 0, "1969-12", ts("1969-12-01T00:00:00Z"), 1, 1, 0),
        ]
        assert db.execute("SELECT count(*) FROM closed_periods") == [(0,)]
        # Still append-only after the migration touched the rows.
        with pytest.raises(db.errors), db.transaction():
            db.execute("UPDATE ledger_postings SET amount_nano = 0")
        # The migrated store keeps working: a late item splits the delta between the
        # November and the December bucket; each difference is posted in its own (open)
        # period, with its bytes.
        run = s2.start_run("ingest", [])
        rep = s2.apply(Batch([item(nov_last + 30, ("a", 9, 3))], run, PRICING))
        assert rep.postings == 2
        new = [r for r in s2.iter_ledger(RowFilter()) if r.entry_id > 4]  # 4 were migrated
        assert [
            (r.bucket_start_ns, r.revision, r.period_start_ns, r.uplink_bytes, r.amount_nano)
            for r in new
        ] == [
            (nov_last, 2, ts("2026-11-01T00:00:00Z"), 2, 1_000_000),
            (dec_first, 1, dec_first, -2, -1_000_000),
        ]
    finally:
        s2.close()


def test_a_version_4_database_gains_run_processes_and_event_fingerprints(
    db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Version 5: a run left unfinished by the previous release has no pid (its process
    cannot be told: never 'abandoned'); its rejection events have no fingerprint and stay."""
    from billing_cli.core.types import Rejection
    from billing_cli.store import schema, sql

    rej = Rejection(T0, "n1", "prod", "u", "t", "uuid contains a NUL character")
    with monkeypatch.context() as m:
        m.setattr(sql, "SCHEMA_VERSION", 4)
        m.setattr(sql, "migrations", lambda d: schema.migrations(d)[:4])
        s = open_store(db_url)
        db = cast(SqlStore, s).db
        with db.transaction():
            (old_run,) = db.execute(
                "INSERT INTO runs (kind, sources, started_at_ns) VALUES ('collect', '[\"s1\"]', 1)"
                " RETURNING run_id"
            )[0]
            db.execute(
                "INSERT INTO integrity_events (kind, node_id, env, uuid, inbound_tag,"
                " collected_at_ns, source_id, run_id, detail, created_at_ns) VALUES"
                " ('rejected', 'n1', 'prod', 'u', 't', ?, 's1', ?, ?, 1)",
                (T0, old_run, rej.reason),
            )
        s.close()
    s2 = open_store(db_url)
    try:
        assert [(r.run_id, r.pid, r.process_gone) for r in s2.unfinished_runs()] == [
            (int(old_run), None, None)
        ]
        assert s2.abandoned_runs() == []
        run = s2.start_run("collect", ["s1"])
        s2.apply(Batch([], run, PRICING, "s1", rejections=[rej]))
        s2.apply(Batch([], run, PRICING, "s1", rejections=[rej]))
        # The old event stays; the new one is stored once.
        assert len(list(s2.iter_integrity_events(kind="rejected"))) == 2
    finally:
        s2.close()


def test_a_version_5_database_gains_the_retention_state_and_event_kind(
    db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Version 6: events are kept as they were (ids, fingerprints, acknowledgements), the
    kind ``beyond_retention`` is accepted, and nothing is compacted yet."""
    s = _previous_release(db_url, 5, monkeypatch)
    with s.db.transaction():
        s.db.executemany(
            "INSERT INTO integrity_events (id, kind, node_id, env, uuid, inbound_tag,"
            " collected_at_ns, source_id, run_id, detail, created_at_ns, acknowledged_at_ns,"
            " fingerprint) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
            [
                (3, "conflict", "n1", "prod", "a", "t", T0, "s1", 1, "c", 5, None, None),
                (7, "rejected", "n1", "prod", "", "", None, "s1", 1, "r", 6, 9, b"f" * 16),
            ],
        )
    before = s.db.execute("SELECT * FROM integrity_events ORDER BY id")
    s.close()
    s2 = cast(SqlStore, open_store(db_url))
    try:
        assert s2.db.execute("SELECT * FROM integrity_events ORDER BY id") == before
        assert s2.db.execute("SELECT cut_ns, cycle_next FROM retention_state") == [(-(2**63), None)]
        run = s2.start_run("ingest", [])
        rep = s2.apply(Batch([item(T0, ("a", 1, 1))], run, PRICING, retention_ns=M))
        assert rep.beyond_retention == 1
        kinds = sorted(e.kind for e in s2.iter_integrity_events(open_only=False))
        assert kinds == ["beyond_retention", "conflict", "rejected"]
        # The unique fingerprint index survived the rebuild.
        with pytest.raises(s2.db.errors), s2.db.transaction():
            s2.db.execute(
                "INSERT INTO integrity_events (kind, node_id, env, uuid, inbound_tag, detail,"
                " created_at_ns, fingerprint) VALUES ('rejected','n','e','','','x',1,?)",
                (b"f" * 16,),
            )
    finally:
        s2.close()


def test_newer_schema_is_refused(db_url: str) -> None:
    s = open_store(db_url)
    db = cast(SqlStore, s).db
    with db.transaction():
        db.execute("INSERT INTO schema_version (version) VALUES (?)", (SCHEMA_VERSION + 1,))
    s.close()
    with pytest.raises(StoreError, match="newer than this billing supports"):
        open_store(db_url)


def test_open_errors_are_one_line_and_redacted(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="does not exist") as e:
        open_store(str(tmp_path / "missing" / "x.db"))
    assert "\n" not in str(e.value)
    with pytest.raises(StoreError, match="unsupported database URL"):
        open_store("mysql://u:secret@h/db")
    with pytest.raises(StoreError, match="cannot connect") as e:
        open_store("postgresql://bob:s3cret-pw@127.0.0.1:1/db")
    assert "s3cret-pw" not in str(e.value)
    assert "***" in str(e.value)
    (tmp_path / "junk.db").write_bytes(b"not a database at all" * 100)
    with pytest.raises(StoreError):
        open_store(str(tmp_path / "junk.db"))


def test_redact_url() -> None:
    assert (
        redact_url("postgresql://u:pw@h:5/d?password=x&a=1")
        == "postgresql://u:***@h:5/d?password=***&a=1"
    )
    assert redact_url("postgresql://h/d") == "postgresql://h/d"


def test_sqlite_url_forms(tmp_path: Path) -> None:
    p = tmp_path / "x.db"
    s = open_store(f"sqlite:///{p}")
    s.close()
    assert p.exists()
    mode = sqlite3.connect(p).execute("PRAGMA journal_mode").fetchone()[0]
    assert mode == "wal"


def test_concurrent_writers_to_one_series_converge(db_url: str) -> None:
    # Two connections apply interleaved observations of the same series at the same time
    # (e.g. an ingest racing a collect); metering must never use a stale head.
    import threading

    obs = [item(T0 + i * (M // 3), ("a", i * 10, i)) for i in range(60)]
    stores = [open_store(db_url), open_store(db_url)]
    runs = [s.start_run("ingest", []) for s in stores]
    errors: list[BaseException] = []

    def worker(k: int) -> None:
        try:
            for it in obs[k::2]:
                stores[k].apply(Batch([it], runs[k], PRICING, "s1"))
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(k,)) for k in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    got = usage(stores[0])
    total_up = sum(r[2] for r in got)
    assert total_up == 590  # 59 intervals of 10 bytes after the baseline
    by_minute: dict[int, int] = {}
    for i in range(1, 60):
        m = (i * (M // 3)) // M * M
        by_minute[m] = by_minute.get(m, 0) + 10
    assert [(m, up) for _, m, up, _ in got] == sorted(by_minute.items())
    for s in stores:
        s.close()

"""Month partitions on PostgreSQL (schema version 8): observations, buckets and ledger
postings range-partitioned by calendar month (UTC); SQLite keeps its one file.

The migration from the previous version keeps every row (views included), rows land in
their month's partition, partitions are created before a page needs them (concurrently,
without waiting for applies in flight, never by a dry run, at most one catalog look-up per
month and process), retention empties whole old month partitions keeping each series'
anchor, and the ledger's partitions refuse UPDATE and DELETE like the ledger.
"""

from __future__ import annotations

import random
import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any, cast

import psycopg
import pytest
from test_convergence import PRICING, ledger_sums, usage
from test_retention import _schemas

from billing_cli._errors import StoreError
from billing_cli.core.periods import period_of
from billing_cli.core.types import Item, Sample
from billing_cli.store import open_store, schema, sql
from billing_cli.store.base import ApplyReport, Batch
from billing_cli.store.sql import SqlStore
from billing_cli.store.write import retention

S = 1_000_000_000
M = 60 * S
H = 60 * M
D = 24 * H
T0 = 1_793_000_000 * S - (1_793_000_000 * S) % D  # 2026-10-26, a day start
TABLES = {"observations": "collected_at_ns", "buckets": "bucket_start_ns"}
TABLES["ledger_postings"] = "bucket_start_ns"
VIEWS = ("counter_observations", "usage_minute_buckets", "billing_ledger")


def item(t: int, *samples: tuple[str, int], node: str = "n1") -> Item:
    return Item(t, node, "prod", None, [Sample(u, f"{u}@x", "t", up, 0) for u, up in samples])


def apply(store: SqlStore, items: list[Item], run: int = 1, **kw: Any) -> ApplyReport:
    return store.apply(Batch(items, run, PRICING, "src", **kw))


def history(days: int, step: int = 6 * H) -> list[Item]:
    """Items every ``step`` over ``days`` days from T0 (four months from 2026-10-26): a and
    b grow throughout, c only over the first 20 days, a restarts once (a counter drop)."""
    out = []
    for i in range(days * D // step):
        t = T0 + i * step
        a = 1000 + i * 37 if t < T0 + 50 * D else (i - 50 * D // step) * 11
        samples = [("a", a), ("b", 5 + i * 101)]
        if t < T0 + 20 * D:
            samples.append(("c", 7 + i * 13))
        out.append(item(t, *samples))
    return out


def month_name(ns: int) -> str:
    return datetime.fromtimestamp(period_of(ns) // S, tz=UTC).strftime("%Y%m")


def rows(store: SqlStore, relation: str) -> list[tuple[Any, ...]]:
    return sorted(map(tuple, store.db.execute(f"SELECT * FROM {relation}")), key=repr)


def where_rows_are(store: SqlStore, table: str) -> list[tuple[str, str]]:
    """(partition the row is in, the month its key says), per row."""
    key = TABLES[table]
    return [
        (str(p), f"{table}_p{month_name(int(k))}")
        for p, k in store.db.execute(f"SELECT tableoid::regclass::text, {key} FROM {table}")
    ]


@pytest.fixture
def pg(postgres_url: str) -> Iterator[SqlStore]:
    s = cast(SqlStore, open_store(postgres_url))
    yield s
    s.close()


def _open_previous_version(url: str, monkeypatch: pytest.MonkeyPatch) -> SqlStore:
    """A store migrated only up to the version before the partitions."""
    previous = schema.PARTITIONED_VERSION - 1
    with monkeypatch.context() as m:
        m.setattr(sql, "SCHEMA_VERSION", previous)
        m.setattr(sql, "migrations", lambda d: schema.migrations(d)[:previous])
        return cast(SqlStore, open_store(url))


# --- the migration --------------------------------------------------------------------------


def test_migration_keeps_every_row_and_view_row(
    db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    old = _open_previous_version(db_url, monkeypatch)
    items = history(100)
    late = items[1::5]
    apply(old, [it for it in items if it not in late])
    apply(old, late)  # late items: revised buckets, adjustment postings
    assert not old.db.partitioned
    physical = ("observations", "buckets", "ledger_postings", "series", "uuid_period_usage")
    before = {r: rows(old, r) for r in (*physical, *VIEWS)}
    assert len(before["ledger_postings"]) > len(before["buckets"])  # revisions are there
    old.close()

    new = cast(SqlStore, open_store(db_url))
    try:
        assert new.db.execute("SELECT max(version) FROM schema_version") == [
            (schema.SCHEMA_VERSION,)
        ]
        assert {r: rows(new, r) for r in (*physical, *VIEWS)} == before
        if new.db.name == "sqlite":
            assert not new.db.partitioned
            assert new.db.month_partitions("observations") == []
            return
        assert new.db.partitioned
        kinds = dict(
            new.db.execute(
                "SELECT relname, relkind FROM pg_class WHERE relnamespace ="
                " current_schema()::regnamespace AND relname = ANY(?)",
                (list(TABLES),),
            )
        )
        assert kinds == dict.fromkeys(TABLES, "p")
        months = [f"2026{m}" for m in ("10", "11", "12")] + ["202701", "202702"]
        for table in TABLES:
            assert [p[0] for p in new.db.month_partitions(table)] == [
                f"{table}_p{m}" for m in months
            ]
            placed = where_rows_are(new, table)
            assert placed
            assert all(p == want for p, want in placed)
        # The identity continues after the largest entry id; new pages land as before.
        top = max(r[0] for r in before["billing_ledger"])
        rep = apply(new, [item(T0 + 100 * D, ("a", 10**6), ("b", 10**7))])
        assert rep.postings == 2
        ids = [r[0] for r in new.db.execute("SELECT entry_id FROM ledger_postings")]
        assert len(set(ids)) == len(ids)
        assert sorted(ids)[-2:] == [top + 1, top + 2]
    finally:
        new.close()


def test_rows_land_in_their_month_across_a_year(pg: SqlStore) -> None:
    items = [item(T0 + k * 13 * D + k * 37 * M, ("a", 100 * k), ("b", 7 * k)) for k in range(30)]
    apply(pg, items)
    months = {month_name(it.collected_at_ns) for it in items}
    assert len(months) >= 12
    for table in TABLES:
        placed = where_rows_are(pg, table)
        assert placed
        assert all(p == want for p, want in placed)
        assert {p[0] for p in pg.db.month_partitions(table)} == {f"{table}_p{m}" for m in months}
    # Each partition has its own indexes (the primary key, and the ledger's carried one).
    idx = pg.db.execute(
        "SELECT count(*) FROM pg_indexes WHERE schemaname = current_schema() AND tablename = ?",
        (f"ledger_postings_p{month_name(T0)}",),
    )
    assert idx == [(2,)]


def test_a_page_before_the_policy_horizon_creates_no_partition(pg: SqlStore) -> None:
    run = pg.start_run("ingest", [])
    rep = apply(pg, [item(T0 - 400 * D, ("a", 1))], run=run, retention_ns=35 * D)
    assert rep.beyond_retention == 1
    assert pg.db.month_partitions("observations") == []


# --- creating partitions -------------------------------------------------------------------


def test_a_months_partitions_cost_one_look_up_per_process(
    pg: SqlStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    apply(pg, [item(T0, ("a", 1))])
    seen: list[str] = []
    execute = pg.db.execute

    def spy(q: str, params: Any = ()) -> Any:
        seen.append(q)
        return execute(q, params)

    monkeypatch.setattr(pg.db, "execute", spy)
    apply(pg, [item(T0 + M, ("a", 2)), item(T0 + 2 * M, ("a", 3))])
    catalog = ("billing_ensure_month", "billing:partitions", "pg_class", "pg_inherits")
    assert not [q for q in seen if any(c in q for c in catalog)]
    apply(pg, [item(T0 + 40 * D, ("a", 4))])  # a new month: one creation
    assert len([q for q in seen if "billing_ensure_month" in q]) == 1


def test_two_connections_create_the_same_month_at_once(postgres_url: str) -> None:
    stores = [cast(SqlStore, open_store(postgres_url)) for _ in range(2)]
    holder = psycopg.connect(postgres_url, autocommit=True)
    try:
        # Both writers queue on the creators' lock, then race for the same new month.
        holder.execute("BEGIN")
        holder.execute(
            "SELECT pg_advisory_xact_lock(hashtext('billing:partitions'),"
            " hashtext(current_schema()))"
        )
        errors: list[BaseException] = []

        def write(k: int) -> None:
            try:
                node = f"n{k}"
                apply(stores[k], [item(T0 + k * M, ("a", 10 + k), node=node)])
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=write, args=(k,)) for k in range(2)]
        for t in threads:
            t.start()
        waiting = 0
        for _ in range(200):
            waiting = holder.execute(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
            ).fetchall()[0][0]
            if waiting >= 2:
                break
            threading.Event().wait(0.05)
        assert waiting >= 2
        holder.execute("COMMIT")
        for t in threads:
            t.join(30)
        assert not errors
        assert [p[0] for p in stores[0].db.month_partitions("observations")] == [
            f"observations_p{month_name(T0)}"
        ]
        assert len(stores[0].db.execute("SELECT * FROM observations")) == 2
    finally:
        holder.close()
        for s in stores:
            s.close()


def test_creating_a_month_does_not_wait_for_applies_in_flight(postgres_url: str) -> None:
    store = cast(SqlStore, open_store(postgres_url))
    apply(store, [item(T0, ("a", 1))])
    other = psycopg.connect(postgres_url, autocommit=True)
    try:
        # A writer mid-transaction on every partitioned table (what an apply holds).
        other.execute("BEGIN")
        other.execute("SELECT count(*) FROM observations")
        other.execute("SELECT count(*) FROM buckets")
        other.execute("SELECT count(*) FROM ledger_postings")
        other.execute("LOCK TABLE observations, buckets, ledger_postings IN ROW EXCLUSIVE MODE")
        store.db.execute("SET lock_timeout = '3s'")
        rep = apply(store, [item(T0 + 40 * D, ("a", 5))])  # a new month, created now
        assert rep.new_observations == 1
        other.execute("COMMIT")
    finally:
        other.close()
        store.close()


def test_a_dry_run_creates_no_partition(pg: SqlStore) -> None:
    apply(pg, [item(T0, ("a", 1))])
    with pg.dry_run():
        rep = apply(pg, [item(T0 + 40 * D, ("a", 5))])
        again = apply(pg, [item(T0 + 80 * D, ("a", 9))])  # replays the first page's month
    assert (rep.new_observations, again.new_observations) == (1, 1)
    assert len(pg.db.month_partitions("observations")) == 1
    assert apply(pg, [item(T0 + 40 * D, ("a", 5))]).new_observations == 1
    assert len(pg.db.month_partitions("buckets")) == 2


def test_a_row_outside_every_partition_fails_loudly(pg: SqlStore) -> None:
    apply(pg, [item(T0, ("a", 1))])
    with pytest.raises(psycopg.errors.CheckViolation, match="no partition"):
        pg.db.execute(
            "INSERT INTO observations (series_id, collected_at_ns, uplink_total,"
            " downlink_total) VALUES (1, ?, 0, 0)",
            (T0 + 400 * D,),
        )


# --- the append-only ledger -----------------------------------------------------------------


def test_every_ledger_partition_is_append_only(pg: SqlStore) -> None:
    apply(pg, [item(T0, ("a", 1)), item(T0 + M, ("a", 5))])
    apply(pg, [item(T0 + 40 * D, ("a", 9)), item(T0 + 40 * D + M, ("a", 12))])
    parts = [p[0] for p in pg.db.month_partitions("ledger_postings")]
    assert len(parts) == 2
    for rel in ("ledger_postings", *parts):
        for stmt in (f"UPDATE {rel} SET amount_nano = 0", f"DELETE FROM {rel}"):
            with pytest.raises(StoreError, match="append-only"), pg._guard("write"):
                pg.db.execute(stmt)
    assert len(pg.db.execute("SELECT DISTINCT tableoid FROM ledger_postings")) == 2
    assert len(pg.db.execute("SELECT * FROM ledger_postings")) == 3  # all still there


# --- retention by partition -----------------------------------------------------------------

RET = 35 * D
NOW = T0 + 80 * D + RET  # the cut: 2027-01-14, three month partitions wholly before it
CUT = T0 + 80 * D


def _filenode(store: SqlStore, rel: str) -> int:
    return int(store.db.execute("SELECT pg_relation_filenode(?::regclass)", (rel,))[0][0])


@pytest.mark.parametrize("form", ["set", "rule"])
def test_compaction_empties_old_month_partitions_keeping_anchors(
    postgres_url: str, form: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    if form == "rule":  # the fallback: the partition scanned with REMOVABLE itself
        monkeypatch.setattr(retention, "KEPT_IN_PARTITION", None)
    with _schemas(postgres_url) as new:
        a = cast(SqlStore, open_store(postgres_url))
        b = cast(SqlStore, open_store(new()))  # the same deliveries, never compacted
        try:
            items = history(100)
            late = [it for it in items[::7] if it.collected_at_ns >= CUT]
            first = [it for it in items if it not in late]
            for s in (a, b):
                apply(s, first)
            parts = [p[0] for p in a.db.month_partitions("observations")]
            nodes = {p: _filenode(a, p) for p in parts}
            obs_before = rows(a, "counter_observations")
            kept_tables = ("buckets", "ledger_postings", "uuid_period_usage", "series")
            kept_before = {t: rows(a, t) for t in kept_tables}

            dry = a.compact(now_ns=NOW, retention_ns=RET, dry_run=True)
            rep = a.compact(now_ns=NOW, retention_ns=RET)
            assert (rep.complete, rep.cut_ns) == (True, CUT)
            # The three months wholly before the cut were emptied in one operation each
            # (a new file); the month the cut falls in went through the DELETE steps.
            old = [f"observations_p{m}" for m in ("202610", "202611", "202612")]
            assert [p for p in parts if _filenode(a, p) != nodes[p]] == old

            # What is left: each series' last observation before the cut, and all after.
            def t(r: tuple[Any, ...]) -> int:
                return int(r[5])

            anchors = {
                u: max((r for r in obs_before if r[2] == u and t(r) < CUT), key=t)
                for u in ("a", "b", "c")
            }
            after = rows(a, "counter_observations")
            assert after == sorted(
                [*anchors.values(), *(r for r in obs_before if t(r) >= CUT)], key=repr
            )
            # c's anchor lives in November's partition: emptied, but c kept it.
            assert a.db.execute(
                "SELECT o.tableoid::regclass::text FROM observations o JOIN series s"
                " ON s.series_id = o.series_id WHERE s.uuid = 'c'"
            ) == [("observations_p202611",)]
            assert rep.observations_removed == dry.observations_removed
            assert rep.observations_removed == len(obs_before) - len(after)
            assert rep.series_kept == dry.series_kept == 3
            assert {t: rows(a, t) for t in kept_tables} == kept_before
            # Later deliveries after the cut meter exactly as in the store never compacted.
            for s in (a, b):
                apply(s, late)
            apply(a, [item(NOW, ("a", 10**6), ("b", 10**7), ("c", 10**5))])
            apply(b, [item(NOW, ("a", 10**6), ("b", 10**7), ("c", 10**5))])
            assert usage(a) == usage(b)
            assert ledger_sums(a) == ledger_sums(b)
            # A second compaction to the same cut has nothing to remove: no partition is
            # emptied again (each holds only anchors, which the rule keeps).
            nodes = {p: _filenode(a, p) for p in parts}
            again = a.compact(now_ns=NOW, retention_ns=RET)
            assert (again.observations_removed, again.complete) == (0, True)
            assert {p: _filenode(a, p) for p in parts} == nodes
        finally:
            a.close()
            b.close()


def test_a_killed_partition_step_resumes(pg: SqlStore, monkeypatch: pytest.MonkeyPatch) -> None:
    apply(pg, history(100, step=12 * H))
    before = len(pg.db.execute("SELECT * FROM observations"))
    # Stop after the first partition step (the budget is spent at once).
    first = pg.compact(now_ns=NOW, retention_ns=RET, budget_s=0)
    assert not first.complete
    assert first.observations_removed > 0
    rest = pg.compact(now_ns=NOW, retention_ns=RET)
    assert rest.complete
    after = len(pg.db.execute("SELECT * FROM observations"))
    assert first.observations_removed + rest.observations_removed == before - after
    per_series = pg.db.execute(
        "SELECT series_id, count(*) FROM observations WHERE collected_at_ns < ? GROUP BY series_id",
        (CUT,),
    )
    assert sorted(n for _, n in per_series) == [1, 1, 1]


def test_the_set_form_of_the_rule_says_what_the_rule_says(pg: SqlStore) -> None:
    """KEPT_IN_PARTITION (per series) selects exactly the rows of a month partition that
    REMOVABLE (per row) does not match, for random histories and cuts."""
    assert retention.KEPT_IN_PARTITION is not None
    rnd = random.Random(12)
    items = []
    for _ in range(200):
        t = T0 + rnd.randrange(0, 120 * D) // M * M + rnd.randrange(0, 3) * S
        n = rnd.randrange(1, 4)
        # Series appear, stop and come back at random; some have a single observation.
        samples = [(f"u{u}", rnd.randrange(0, 10**6)) for u in rnd.sample(range(60), n)]
        items.append(item(t, *samples))
    items.sort(key=lambda it: it.collected_at_ns)
    for i in range(0, len(items), 50):
        apply(pg, items[i : i + 50])
    parts = pg.db.month_partitions("observations")
    assert len(parts) >= 4
    checked = 0
    for _ in range(12):
        # Just after a month boundary too: the month before holds many anchors then.
        target = T0 + rnd.randrange(30 * D, 125 * D)
        if rnd.random() < 0.5:
            target = rnd.choice([hi for _, _, hi in parts if hi is not None]) + rnd.randrange(D)
        for name, _, hi in parts:
            if hi is None or hi > target:
                continue
            part = f'"{name}"'
            by_rule = rows_of(
                pg,
                f"SELECT * FROM {part} AS o WHERE ({retention.REMOVABLE}) IS NOT TRUE",
                (target, target),
            )
            by_set = rows_of(pg, retention.kept_rows(part), retention.kept_params(target))
            assert by_set == by_rule
            checked += bool(by_rule)
    assert checked >= 6


def rows_of(store: SqlStore, q: str, params: tuple[int, ...]) -> list[tuple[Any, ...]]:
    return sorted(map(tuple, store.db.execute(q, params)), key=repr)

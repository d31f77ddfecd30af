"""Retention (DESIGN §6) in the store, on both back ends: the horizon, what is refused
beyond it, and compaction (bounded, resumable, never touching buckets or the ledger).

The property: compacting in the middle of random deliveries changes nothing that later
deliveries inside the horizon do — the compacted store ends up equal to one that never
compacted and received the same deliveries minus those older than the horizon, which are
refused and counted exactly.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, cast

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from test_convergence import PRICING, Fleet, deliveries, fleets, ledger_sums, usage

from billing_cli._errors import StoreError
from billing_cli.core.types import Item, Sample
from billing_cli.store import open_store
from billing_cli.store.base import ApplyReport, Batch, Store
from billing_cli.store.sql import SqlStore
from billing_cli.store.write import retention

S = 1_000_000_000
M = 60 * S
H = 60 * M
D = 24 * H
T0 = 1_793_000_000 * S - (1_793_000_000 * S) % D  # a day start


@pytest.fixture
def store(db_url: str) -> Iterator[SqlStore]:
    s = cast(SqlStore, open_store(db_url))
    yield s
    s.close()


def item(t: int, *samples: tuple[str, int], node: str = "n1") -> Item:
    return Item(t, node, "prod", None, [Sample(u, f"{u}@x", "t", up, 0) for u, up in samples])


def apply(store: Store, items: list[Item], **kw: Any) -> ApplyReport:
    run = kw.pop("run", None) or store.start_run("ingest", [])
    return store.apply(Batch(items, run, PRICING, "src", **kw))


def history(days: int, uuids: tuple[str, ...] = ("a", "b")) -> list[Item]:
    """One item an hour for ``days`` days before T0 + days (every series grows)."""
    return [
        item(T0 + i * H, *((u, i * 10 + k) for k, u in enumerate(uuids))) for i in range(24 * days)
    ]


def observations(store: SqlStore) -> list[tuple[Any, ...]]:
    return sorted(
        tuple(r)
        for r in store.db.execute(
            "SELECT uuid, collected_at_ns, uplink_total FROM counter_observations"
        )
    )


def dump(store: SqlStore, tables: tuple[str, ...]) -> dict[str, list[tuple[Any, ...]]]:
    return {t: sorted(map(tuple, store.db.execute(f"SELECT * FROM {t}")), key=repr) for t in tables}


# --- the horizon -----------------------------------------------------------------------------


def test_items_older_than_the_run_horizon_are_refused_counted_and_recorded(
    store: SqlStore,
) -> None:
    run = store.start_run("collect", ["src"])
    start = store._run_start(run)
    horizon = start - 10 * D
    old = item(horizon - 1, ("a", 5))
    edge = item(horizon, ("a", 7))  # exactly at the horizon: accepted
    new = item(horizon + M, ("a", 9))
    rep = apply(store, [old, edge, new], run=run, retention_ns=10 * D)
    assert (rep.beyond_retention, rep.samples, rep.new_observations) == (1, 2, 2)
    assert rep.top_rejection == retention.BEYOND_RETENTION_REASON
    assert [o[1] for o in observations(store)] == [horizon, horizon + M]
    (event,) = store.iter_integrity_events(kind="beyond_retention")
    assert (event.node_id, event.collected_at_ns, event.source_id, event.run_id) == (
        "n1",
        horizon - 1,
        "src",
        run,
    )
    assert "1 item, 1 sample at" in event.detail
    # Delivered again: refused again (never a duplicate), counted, but not stored twice.
    again = apply(store, [old], run=run, retention_ns=10 * D)
    assert (again.beyond_retention, again.duplicates) == (1, 0)
    assert len(list(store.iter_integrity_events(kind="beyond_retention"))) == 1


def test_without_a_retention_only_compacted_data_is_refused(store: SqlStore) -> None:
    rep = apply(store, [item(T0 - 3650 * D, ("a", 1)), item(T0, ("a", 2))])
    assert (rep.beyond_retention, rep.new_observations) == (0, 2)


def test_one_event_per_node_with_the_span(store: SqlStore) -> None:
    run = store.start_run("ingest", [])
    horizon = store._run_start(run) - 5 * D
    old = [item(horizon - k * H, ("a", k), ("b", k)) for k in range(1, 4)]
    rep = apply(store, [*old, item(horizon - H, ("c", 1), node="n2")], run=run, retention_ns=5 * D)
    assert rep.beyond_retention == 7
    events = sorted(store.iter_integrity_events(kind="beyond_retention"), key=lambda e: e.node_id)
    assert [e.node_id for e in events] == ["n1", "n2"]
    assert "3 items, 6 samples at" in events[0].detail
    assert events[0].collected_at_ns == horizon - 3 * H


# --- compaction ------------------------------------------------------------------------------

NOW = T0 + 40 * D
RET = 35 * D
CUT = NOW - RET - (NOW - RET) % H


def test_compaction_keeps_each_series_last_observation_before_the_cut(store: SqlStore) -> None:
    items = history(10) + [item(T0 + 30 * D + k * H, ("a", 9_000 + k)) for k in range(48)]
    # (b stops after day 10; a resumes on day 30, before and after the cut)
    apply(store, items, run=1)
    kept_tables = ("buckets", "ledger_postings", "uuid_period_usage", "series")
    before = dump(store, kept_tables)
    obs_before = observations(store)
    dry = store.compact(now_ns=NOW, retention_ns=RET, dry_run=True)
    assert dump(store, kept_tables) == before
    assert observations(store) == obs_before
    rep = store.compact(now_ns=NOW, retention_ns=RET)
    assert (rep.ran, rep.complete, rep.cut_ns, rep.target_ns) == (True, True, CUT, CUT)
    assert (dry.observations_removed, dry.series_kept) == (
        rep.observations_removed,
        rep.series_kept,
    )
    last_before = {u: max(o for o in obs_before if o[0] == u and o[1] < CUT) for u in ("a", "b")}
    assert observations(store) == sorted(
        [*last_before.values(), *(o for o in obs_before if o[1] >= CUT)]
    )
    assert rep.observations_removed == len(obs_before) - len(observations(store))
    assert rep.series_kept == 2
    assert dump(store, kept_tables) == before  # buckets and the ledger are never compacted
    assert store.db.execute(
        "SELECT count(*) FROM item_digests WHERE collected_at_ns < ?", (CUT,)
    ) == [(0,)]
    # Nothing left to do: a second compaction removes nothing.
    again = store.compact(now_ns=NOW, retention_ns=RET)
    assert (again.observations_removed, again.complete, again.cut_before_ns) == (0, True, CUT)


def test_data_before_the_cut_is_refused_even_without_a_retention(store: SqlStore) -> None:
    apply(store, history(3), run=1)
    store.compact(now_ns=T0 + 2 * D + RET, retention_ns=RET)
    cut = T0 + 2 * D
    rep = apply(store, [item(cut - 30 * M, ("a", 1)), item(cut + 30 * M, ("a", 10**6))])
    assert (rep.beyond_retention, rep.new_observations) == (1, 1)


def test_a_late_item_after_the_cut_meters_as_without_compaction(db_url: str) -> None:
    with _schemas(db_url) as new:
        a, b = cast(SqlStore, open_store(db_url)), cast(SqlStore, open_store(new()))
        _late_item_after_the_cut(a, b)


def _late_item_after_the_cut(a: SqlStore, b: SqlStore) -> None:
    try:
        items = history(4)
        late = [it for it in items if it.collected_at_ns % (5 * H) == 0]
        first = [it for it in items if it not in late]
        for s in (a, b):
            apply(s, first, run=1)
        a.compact(now_ns=T0 + 2 * D + RET, retention_ns=RET)
        cut = T0 + 2 * D
        for s in (a, b):
            apply(s, [it for it in late if it.collected_at_ns >= cut], run=1)
        assert usage(a) == usage(b)
        assert ledger_sums(a) == ledger_sums(b)
    finally:
        a.close()
        b.close()


def test_compaction_runs_in_bounded_resumable_steps(
    store: SqlStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    uuids = tuple(f"u{i}" for i in range(7))
    apply(store, history(3, uuids), run=1)
    monkeypatch.setattr(retention, "COMPACT_SERIES_PER_STEP", 2)
    now = T0 + 2 * D + RET
    first = store.compact(now_ns=now, retention_ns=RET, budget_s=0)
    assert (first.ran, first.complete, first.cut_ns) == (True, False, T0 + 2 * D)
    # The cut moved first: data before it is refused while the cycle is unfinished.
    assert apply(store, [item(T0 + D, ("u0", 1))]).beyond_retention == 1
    steps = [first]
    while not steps[-1].complete:
        steps.append(store.compact(now_ns=now, retention_ns=RET, budget_s=0))
    assert len(steps) == 5  # 7 series, 2 a step, then the digests
    assert sum(s.observations_removed for s in steps) == 7 * (2 * 24 - 1)
    assert sum(s.series_kept for s in steps) == 7


def test_an_interrupted_step_leaves_a_consistent_store_and_the_next_run_finishes(
    store: SqlStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    uuids = tuple(f"u{i}" for i in range(5))
    apply(store, history(3, uuids), run=1)
    obs = observations(store)
    monkeypatch.setattr(retention, "COMPACT_SERIES_PER_STEP", 2)
    real = retention.RetentionPart._compact_step
    calls = 0

    def failing(self: retention.RetentionPart, report: Any) -> bool:
        nonlocal calls
        calls += 1
        if calls == 2:  # inside the second step's transaction, after its deletes
            real(self, report)
            raise StoreError("boom")
        return real(self, report)

    monkeypatch.setattr(retention.RetentionPart, "_compact_step", failing)
    now = T0 + 2 * D + RET
    with pytest.raises(StoreError, match="boom"):
        store.compact(now_ns=now, retention_ns=RET)
    # The first step is committed, the second rolled back whole.
    cut = T0 + 2 * D
    left = observations(store)
    per_series = {u: sum(1 for o in left if o[0] == u and o[1] < cut) for u in uuids}
    assert per_series == {"u0": 1, "u1": 1, "u2": 2 * 24, "u3": 2 * 24, "u4": 2 * 24}
    monkeypatch.setattr(retention.RetentionPart, "_compact_step", real)
    rep = store.compact(now_ns=now, retention_ns=RET)
    assert rep.complete
    assert observations(store) == [o for o in obs if o[1] >= cut or o[1] == cut - H]


def test_collects_daily_cycle_starts_at_most_once_a_day(store: SqlStore) -> None:
    apply(store, history(3), run=1)
    now = T0 + 2 * D + RET
    first = store.compact(now_ns=now, retention_ns=RET, daily=True)
    assert (first.ran, first.complete, first.observations_removed) == (True, True, 2 * 47)
    # Later the same day: the horizon moved, but no new cycle yet.
    later = store.compact(now_ns=now + 20 * H, retention_ns=RET, daily=True)
    assert later.ran is False
    # A day after the start: a new cycle compacts up to the new horizon.
    nxt = store.compact(now_ns=now + D, retention_ns=RET, daily=True)
    assert (nxt.ran, nxt.cut_ns, nxt.observations_removed) == (True, T0 + 3 * D, 2 * 24)


def test_a_daily_run_continues_an_unfinished_cycle(
    store: SqlStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    apply(store, history(3, tuple(f"u{i}" for i in range(4))), run=1)
    monkeypatch.setattr(retention, "COMPACT_SERIES_PER_STEP", 1)
    now = T0 + 2 * D + RET
    assert store.compact(now_ns=now, retention_ns=RET, budget_s=0).complete is False
    rep = store.compact(now_ns=now + H, retention_ns=RET, budget_s=0, daily=True)
    assert (rep.ran, rep.cut_ns) == (True, T0 + 2 * D)  # the same cycle, one more step
    assert rep.observations_removed == 2 * 24 - 1


# --- the property --------------------------------------------------------------------------


@contextmanager
def _schemas(db_url: str) -> Iterator[Callable[[], str]]:
    """``new()``: the URL of one more empty store of the same back end (dropped at exit)."""
    made: list[str] = []
    if not db_url.startswith("postgres"):

        def new_file() -> str:
            made.append("")
            return f"{db_url}.{len(made)}.db"

        yield new_file
        return
    import uuid as uuidlib

    import psycopg
    from conftest import POSTGRES_URL

    assert POSTGRES_URL
    sep = "&" if "?" in POSTGRES_URL else "?"

    def new() -> str:
        schema = f"t_{uuidlib.uuid4().hex[:12]}"
        with psycopg.connect(POSTGRES_URL, autocommit=True) as conn:
            conn.execute(f"CREATE SCHEMA {schema}")
        made.append(schema)
        return f"{POSTGRES_URL}{sep}options=-csearch_path%3D{schema}"

    try:
        yield new
    finally:
        with psycopg.connect(POSTGRES_URL, autocommit=True) as conn:
            for schema in made:
                conn.execute(f"DROP SCHEMA {schema} CASCADE")


def check_compaction(fleet: Fleet, rnd: random.Random, make: Any) -> None:
    times = sorted({it.collected_at_ns for it in fleet.items})
    cut_at = rnd.choice(times) + rnd.randint(0, 3 * M)  # the horizon falls inside the data
    retention_ns = D
    now = cut_at + retention_ns
    cut = cut_at - cut_at % M
    first = [it for it in fleet.items if rnd.random() < 0.6]
    rest = [it for it in fleet.items if it not in first]
    a, b = make(), make()
    a.compact_chunk_ns = M  # cuts at minutes: small examples cross them
    try:
        for s in (a, b):
            for page in deliveries(first, rnd) if first else []:
                s.apply(Batch(page, 1, PRICING))
        rep_c = a.compact(now_ns=now, retention_ns=retention_ns)
        assert rep_c.cut_ns == cut
        event("compacted observations" if rep_c.observations_removed else "nothing compacted")
        pages = deliveries(rest, rnd) if rest else []
        got = ApplyReport()
        for page in pages:
            got += a.apply(Batch(page, 1, PRICING))
            b.apply(Batch([it for it in page if it.collected_at_ns >= cut], 1, PRICING))
        refused = sum(len(it.samples) for p in pages for it in p if it.collected_at_ns < cut)
        assert got.beyond_retention == refused
        event("refused late items" if refused else "nothing refused")
        assert usage(a) == usage(b)
        assert ledger_sums(a) == ledger_sums(b)
        db = cast(SqlStore, a).db
        # Per series at most one observation before the cut remains.
        assert db.execute(
            "SELECT count(*) FROM (SELECT series_id FROM observations WHERE collected_at_ns < ?"
            " GROUP BY series_id HAVING count(*) > 1) x",
            (cut,),
        ) == [(0,)]
        # Replays after compaction: inside the horizon duplicates, beyond it refused.
        before = (usage(a), ledger_sums(a))
        rep = a.apply(Batch(list(fleet.items), 1, PRICING))
        assert (rep.new_observations, rep.postings, rep.conflicts) == (0, 0, 0)
        assert rep.duplicates + rep.beyond_retention == sum(len(it.samples) for it in fleet.items)
        assert (usage(a), ledger_sums(a)) == before
    finally:
        a.close()
        b.close()


@settings(max_examples=60, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(fleets(), st.randoms(use_true_random=False))
def test_compaction_changes_nothing_later_deliveries_do_sqlite(
    fleet: Fleet, rnd: random.Random
) -> None:
    check_compaction(fleet, rnd, lambda: cast(SqlStore, open_store(":memory:")))


@pytest.mark.postgres
@settings(max_examples=15, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(fleet=fleets(), rnd=st.randoms(use_true_random=False))
def test_compaction_changes_nothing_later_deliveries_do_postgres(
    postgres_url: str, fleet: Fleet, rnd: random.Random
) -> None:
    with _schemas(postgres_url) as new:
        check_compaction(fleet, rnd, lambda: cast(SqlStore, open_store(new())))

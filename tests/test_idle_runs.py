"""Runs of equal totals (issue 12 point 2): idle samples cost no row, and every
convergence invariant of DESIGN §4 still holds.

The fleets here are mostly idle: series keep their totals for many items, leave items
and come back with the same totals, restart inside a run, and are re-delivered with
other totals at interior times of a run. Delivered in random pages (shuffled, late,
overlapping, replayed), the store must equal a reference that keeps every sample: the
pure metering (:func:`series_usage`) over the full set of observations, the first value
delivered for a time kept — buckets, the observations the contract view shows, and the
counts of new observations and conflicts.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, cast

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from test_convergence import PRICING, _pg_maker, deliveries, ledger_sums, pg_schemas, usage

from billing_cli.core.metering import series_usage
from billing_cli.core.types import Item, Observation, Sample
from billing_cli.store import open_store
from billing_cli.store.base import Batch, Store
from billing_cli.store.sql import SqlStore

__all__ = ["pg_schemas"]  # the fixture, imported for the PostgreSQL properties

S = 1_000_000_000
M = 60 * S
T0 = 1_793_000_000 * S - (1_793_000_000 * S) % M
NODES = {"n1": ["u1", "u2", "u3"], "n2": ["u1"]}

ObsKey = tuple[str, str, int]  # (node, uuid, collected_at_ns)


@dataclass
class IdleFleet:
    items: list[Item]


@st.composite
def idle_fleets(draw: st.DrawFn) -> IdleFleet:
    items: list[Item] = []
    for node, uuids in NODES.items():
        epochs = draw(st.booleans())
        epoch_no = 0
        t = T0 + draw(st.integers(0, 2 * M))
        totals = {u: (draw(st.integers(0, 30)), draw(st.integers(0, 30))) for u in uuids}
        for step in range(draw(st.integers(1, 10))):
            if step:
                # Several items in one minute, and gaps of a few minutes.
                t += draw(st.sampled_from([1, 20, 60, 61, 200])) * S
            restart = step > 0 and draw(st.integers(0, 9)) == 0
            if restart and epochs:
                epoch_no += 1
            samples = []
            for u in uuids:
                up, down = totals[u]
                kind = draw(st.sampled_from(["idle"] * 5 + ["grow", "absent", "drop"]))
                if restart:
                    new = (draw(st.integers(0, 40)), draw(st.integers(0, 40)))
                elif kind == "grow":
                    new = (up + draw(st.integers(0, 500)), down + draw(st.integers(1, 500)))
                elif kind == "drop" and up > 0:  # a restart without epoch, an anomaly with
                    new = (draw(st.integers(0, up - 1)), down)
                else:
                    new = (up, down)
                totals[u] = new
                if kind == "absent" and not restart:
                    continue
                samples.append(Sample(u, f"{u}@x", "vless", new[0], new[1]))
            if samples or draw(st.booleans()):
                epoch = f"e{epoch_no}" if epochs else None
                items.append(Item(t, node, "prod", epoch, samples))
    return IdleFleet(items)


def interior_conflicts(items: list[Item], rnd: random.Random) -> list[Item]:
    """Items re-delivered with other totals for one sample (a conflict inside a run)."""
    out = []
    for it in rnd.sample(items, k=min(2, len(items))):
        if it.samples:
            k = rnd.randrange(len(it.samples))
            s = it.samples[k]
            samples = list(it.samples)
            samples[k] = s._replace(downlink_total=s.downlink_total + 1)
            out.append(it._replace(samples=samples))
    return out


class Reference:
    """A store that keeps every sample: the first value per (series, time) wins."""

    def __init__(self) -> None:
        self.obs: dict[ObsKey, Observation] = {}
        self.conflicts = 0
        self.new = 0

    def apply(self, items: list[Item]) -> None:
        for it in items:
            for s in it.samples:
                key = (it.node_id, s.uuid, it.collected_at_ns)
                o = Observation(
                    it.collected_at_ns, s.uplink_total, s.downlink_total, it.counter_epoch
                )
                first = self.obs.get(key)
                if first is None:
                    self.obs[key] = o
                    self.new += 1
                elif first != o:
                    self.conflicts += 1

    def usage(self) -> list[tuple[str, str, int, int, int]]:
        per: dict[tuple[str, str], list[Observation]] = {}
        for (node, u, _), o in self.obs.items():
            per.setdefault((node, u), []).append(o)
        out = []
        for (node, u), obs in per.items():
            obs.sort()
            for m, (up, down) in series_usage(obs).items():
                out.append((node, u, m, up, down))
        return sorted(out)

    def view(self) -> list[tuple[Any, ...]]:
        return sorted((k[0], k[1], k[2], o[1], o[2], o[3]) for k, o in self.obs.items())


def view(store: Store) -> list[tuple[Any, ...]]:
    rows = cast(SqlStore, store).db.execute(
        "SELECT node_id, uuid, collected_at_ns, uplink_total, downlink_total, counter_epoch"
        " FROM counter_observations"
    )
    return sorted((r[0], r[1], int(r[2]), int(r[3]), int(r[4]), r[5]) for r in rows)


def rows_of(store: Store) -> int:
    return int(cast(SqlStore, store).db.execute("SELECT count(*) FROM observations")[0][0])


def check_idle(fleet: IdleFleet, rnd: random.Random, make: Any) -> None:
    store, clean = make(), make()
    try:
        ref = Reference()
        run = store.start_run("ingest", [])
        new = conflicts = 0
        pages = deliveries(fleet.items, rnd) if fleet.items else []
        extra = interior_conflicts(fleet.items, rnd)
        if extra:
            pages.insert(rnd.randrange(len(pages) + 1), extra)
        for page in pages:
            rep = store.apply(Batch(page, run, PRICING))
            ref.apply(page)
            new += rep.new_observations
            conflicts += rep.conflicts
            # Every page, not only at the end: each intermediate state is exact too.
            assert sorted(usage(store)) == ref.usage()
        assert view(store) == ref.view()
        assert (new, conflicts) == (ref.new, ref.conflicts)
        # The same observations delivered cleanly, in order, bill the same.
        crun = clean.start_run("ingest", [])
        firsts: dict[tuple[int, str], Item] = {}
        for it in fleet.items:
            firsts.setdefault((it.collected_at_ns, it.node_id), it)
        kept = [
            it._replace(
                samples=[
                    s._replace(
                        uplink_total=ref.obs[(it.node_id, s.uuid, it.collected_at_ns)][1],
                        downlink_total=ref.obs[(it.node_id, s.uuid, it.collected_at_ns)][2],
                    )
                    for s in it.samples
                ]
            )
            for it in sorted(firsts.values(), key=lambda i: i.collected_at_ns)
        ]
        clean.apply(Batch(kept, crun, PRICING))
        assert ledger_sums(store) == ledger_sums(clean)
        event("idle samples stored without a row" if rows_of(store) < len(ref.obs) else "no run")
        # Replays of everything change nothing.
        before = (usage(store), ledger_sums(store), view(store))
        rep = store.apply(Batch(list(fleet.items), run, PRICING))
        assert (rep.new_observations, rep.postings) == (0, 0)
        assert (usage(store), ledger_sums(store), view(store)) == before
    finally:
        store.close()
        clean.close()


@settings(max_examples=150, deadline=None)
@given(idle_fleets(), st.randoms(use_true_random=False))
def test_idle_runs_converge_sqlite(fleet: IdleFleet, rnd: random.Random) -> None:
    check_idle(fleet, rnd, lambda: open_store(":memory:"))


@pytest.mark.postgres
@settings(
    max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(fleet=idle_fleets(), rnd=st.randoms(use_true_random=False))
def test_idle_runs_converge_postgres(
    pg_schemas: list[str], fleet: IdleFleet, rnd: random.Random
) -> None:
    check_idle(fleet, rnd, _pg_maker(pg_schemas))


# --- examples: what a run is, on both back ends ----------------------------------------------


@pytest.fixture
def store(db_url: str) -> Iterator[SqlStore]:
    s = cast(SqlStore, open_store(db_url))
    yield s
    s.close()


def item(t: int, *samples: tuple[str, int], epoch: str | None = None) -> Item:
    return Item(t, "n1", "prod", epoch, [Sample(u, f"{u}@x", "t", up, 0) for u, up in samples])


def apply(store: Store, *items: Item) -> Any:
    return store.apply(Batch(list(items), store.start_run("ingest", []), PRICING))


def test_an_idle_in_order_sample_writes_no_observations_row(store: SqlStore) -> None:
    apply(store, item(T0, ("a", 5), ("b", 1)))
    for k in range(1, 6):
        rep = apply(store, item(T0 + k * M, ("a", 5), ("b", 1 + k)))
        assert rep.new_observations == 2
    # "a" is one run (one row); "b" changed every minute (a row each).
    assert rows_of(store) == 1 + 6
    assert store.db.execute("SELECT count(*) FROM counter_observations WHERE uuid = 'a'") == [(6,)]


def test_a_series_absent_from_an_item_is_not_claimed_there(store: SqlStore) -> None:
    apply(store, item(T0, ("a", 5), ("b", 1)))
    apply(store, item(T0 + M, ("b", 2)))  # "a" absent
    apply(store, item(T0 + 2 * M, ("a", 5), ("b", 3)))  # back, same totals: a new row
    assert rows_of(store) == 2 + 3
    assert [
        r[0]
        for r in store.db.execute(
            "SELECT collected_at_ns FROM counter_observations WHERE uuid = 'a' ORDER BY 1"
        )
    ] == [T0, T0 + 2 * M]
    # A late item inside "a"'s run without "a" splits it; with "a" at other totals it is
    # billed in the minutes a full store bills it.
    apply(store, item(T0 + 2 * M + 30 * S, ("b", 3)), item(T0 + 3 * M, ("a", 5)))
    apply(store, item(T0 + 2 * M + 40 * S, ("a", 9)))
    assert [
        (r.bucket_start_ns, r.uplink_bytes) for r in store.iter_usage(_all()) if r.uuid == "a"
    ] == [
        (T0 + 2 * M, 4),
        (T0 + 3 * M, 5),  # the restart back to 5 (a drop without epoch)
    ]


def _all() -> Any:
    from billing_cli.store.base import RowFilter

    return RowFilter()


# --- compaction inside runs --------------------------------------------------------------


def check_idle_compaction(fleet: IdleFleet, rnd: random.Random, make: Any) -> None:
    """Compacting to a cut inside runs keeps what a store keeping every sample keeps: per
    series its last observation before the cut, and every one after it; later deliveries
    then bill as in a store that never compacted (minus the items refused before the cut)."""
    times = sorted({it.collected_at_ns for it in fleet.items})
    cut_at = rnd.choice(times) + rnd.randint(0, 3 * M)
    day = 24 * 60 * M
    cut = cut_at - cut_at % M
    first = [it for it in fleet.items if rnd.random() < 0.6]
    rest = [it for it in fleet.items if it not in first]
    a, b = make(), make()
    a.compact_chunk_ns = M
    try:
        for s in (a, b):
            for page in deliveries(first, rnd) if first else []:
                s.apply(Batch(page, 1, PRICING))
        full = view(b)
        a.compact(now_ns=cut_at + day, retention_ns=day)
        last_before: dict[tuple[str, str], tuple[Any, ...]] = {}
        for r in full:
            if r[2] < cut:
                last_before[(r[0], r[1])] = r
        assert view(a) == sorted([*last_before.values(), *(r for r in full if r[2] >= cut)])
        for page in deliveries(rest, rnd) if rest else []:
            a.apply(Batch(page, 1, PRICING))
            b.apply(Batch([it for it in page if it.collected_at_ns >= cut], 1, PRICING))
        assert usage(a) == usage(b)
        assert ledger_sums(a) == ledger_sums(b)
        assert [r for r in view(a) if r[2] >= cut] == [r for r in view(b) if r[2] >= cut]
    finally:
        a.close()
        b.close()


@settings(max_examples=100, deadline=None)
@given(idle_fleets(), st.randoms(use_true_random=False))
def test_compaction_inside_runs_sqlite(fleet: IdleFleet, rnd: random.Random) -> None:
    if fleet.items:
        check_idle_compaction(fleet, rnd, lambda: cast(SqlStore, open_store(":memory:")))


@pytest.mark.postgres
@settings(
    max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(fleet=idle_fleets(), rnd=st.randoms(use_true_random=False))
def test_compaction_inside_runs_postgres(
    pg_schemas: list[str], fleet: IdleFleet, rnd: random.Random
) -> None:
    if fleet.items:
        check_idle_compaction(fleet, rnd, _fresh_cut(_pg_maker(pg_schemas)))


def _fresh_cut(make: Any) -> Any:
    """The schemas are shared by the examples: each starts uncompacted."""

    def fresh() -> SqlStore:
        s = cast(SqlStore, make())
        with s.db.transaction():
            s.db.execute(
                "UPDATE retention_state SET cut_ns = ?, cycle_started_at_ns = NULL,"
                " cycle_target_ns = NULL, cycle_next = NULL",
                (-(2**63),),
            )
        return s

    return fresh


# --- migration ---------------------------------------------------------------------------


def test_a_version_6_store_keeps_every_old_observation_exact(
    db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Old rows become runs of one observation and their items are recorded: the idle
    observations an older release stored one by one still split a late item's delta into
    the minutes a full store uses, and new idle samples cost no row."""
    from test_store import _old_rows, _previous_release

    s = _previous_release(db_url, 6, monkeypatch)
    # "a" idle at 5 for three minutes; "b" absent at T0 + M.
    _old_rows(
        s,
        [
            (1, "n1", "prod", "a", "t", "a@x", T0 + 2 * M, 5, 0, None),
            (2, "n1", "prod", "b", "t", "b@x", T0 + 2 * M, 1, 0, None),
        ],
        observations=[
            (1, T0, 5, 0, None, 1, "s1"),
            (1, T0 + M, 5, 0, None, 1, "s1"),
            (1, T0 + 2 * M, 5, 0, None, 1, "s1"),
            (2, T0, 1, 0, None, 1, "s1"),
            (2, T0 + 2 * M, 1, 0, None, 1, "s1"),
        ],
    )
    s.close()
    s2 = cast(SqlStore, open_store(db_url))
    try:
        assert [
            tuple(r)
            for r in s2.db.execute(
                "SELECT uuid, collected_at_ns FROM counter_observations ORDER BY 1, 2"
            )
        ] == [("a", T0), ("a", T0 + M), ("a", T0 + 2 * M), ("b", T0), ("b", T0 + 2 * M)]
        # Late: "a" at 9 between T0 and T0 + M (bills 4 there, then 5 at the restart to 5
        # in T0 + M's minute, as a full store would); "b" back at T0 + M with 1: nothing.
        rep = apply(s2, item(T0 + 30 * 1_000_000_000, ("a", 9)), item(T0 + M, ("a", 5), ("b", 1)))
        assert (rep.new_observations, rep.duplicates) == (2, 1)
        got = sorted((r.uuid, r.bucket_start_ns, r.uplink_bytes) for r in s2.iter_usage(_all()))
        assert got == [("a", T0, 4), ("a", T0 + M, 5)]
        rows = rows_of(s2)
        apply(s2, item(T0 + 3 * M, ("a", 5), ("b", 1)))
        assert rows_of(s2) == rows  # idle in order: only the heads moved
    finally:
        s2.close()

"""Idle runs (schema version 7) and month partitions (version 8) together, adversarially.

The two were built apart: runs rewrite rows before the cut (a late item splits a run that
starts long before; compaction trims an anchor to start later, which on PostgreSQL moves
the row to another month's partition), and partitions empty whole old months. Fleets here
are idle runs spanning month boundaries, delivered in random pages (late, overlapping,
replayed, some first as dry runs), with compaction at random cuts between pages, sometimes
left unfinished (one step, a series per step) while pages keep coming. The store must
equal one that never compacts and received the same accepted items (buckets, ledger, and
the contract view: each series' last observation before the cut and everything after),
and SQLite and PostgreSQL must agree row for row.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Any, cast

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_convergence import PRICING, _pg_maker, deliveries, ledger_sums, pg_schemas, usage
from test_idle_runs import _fresh_cut, view

from billing_cli.core.types import Item, Sample
from billing_cli.store import open_store
from billing_cli.store.base import Batch
from billing_cli.store.sql import SqlStore
from billing_cli.store.write import retention

__all__ = ["pg_schemas"]

S = 1_000_000_000
M = 60 * S
H = 60 * M
D = 24 * H
# 2026-11-30 18:00 UTC: six hours before a month boundary.
T0 = 1_796_061_600 * S
NODES = {"n1": ["u1", "u2", "u3"], "n2": ["u1"]}


@st.composite
def month_fleets(draw: st.DrawFn) -> list[Item]:
    """Mostly idle series whose runs cross month boundaries (gaps of hours to weeks)."""
    items: list[Item] = []
    for node, uuids in NODES.items():
        t = T0 + draw(st.integers(0, 3 * H))
        totals = {u: (draw(st.integers(0, 30)), 0) for u in uuids}
        for step in range(draw(st.integers(1, 12))):
            if step:
                t += draw(st.sampled_from([20 * S, 61 * S, 3 * H, 7 * H, D, 12 * D, 33 * D]))
            samples = []
            for u in uuids:
                up, down = totals[u]
                kind = draw(st.sampled_from(["idle"] * 6 + ["grow", "absent", "drop"]))
                if kind == "grow":
                    new = (up + draw(st.integers(1, 500)), down + draw(st.integers(0, 500)))
                elif kind == "drop" and up > 0:
                    new = (draw(st.integers(0, up - 1)), down)
                else:
                    new = (up, down)
                totals[u] = new
                if kind != "absent":
                    samples.append(Sample(u, f"{u}@x", "vless", new[0], new[1]))
            if samples:
                items.append(Item(t, node, "prod", None, samples))
    return items


def cut_of(store: SqlStore) -> int:
    return int(store.db.execute("SELECT cut_ns FROM retention_state")[0][0])


def state(store: SqlStore) -> tuple[Any, ...]:
    """Everything a dry run must leave as it found it (partitions included)."""
    db = store.db
    out: list[Any] = []
    for table in ("observations", "node_items", "series", "buckets", "ledger_postings"):
        out.append(sorted(map(repr, db.execute(f"SELECT * FROM {table}"))))
    out.append(sorted(db.month_partitions("observations")))
    return tuple(out)


def counts(r: Any) -> tuple[int, ...]:
    return (r.new_observations, r.duplicates, r.conflicts, r.postings, r.beyond_retention)


def scenario(items: list[Item], seed: int, make: Any) -> dict[str, Any]:
    """Deliver ``items`` (seeded: the same pages and cuts whatever the back end) into a
    compacting store and a never-compacting one; check them against each other; return
    what the compacting one ended with."""
    rnd = random.Random(seed)
    times = sorted({it.collected_at_ns for it in items})
    a, b = cast(SqlStore, make()), cast(SqlStore, make())
    a.compact_chunk_ns = M
    removed = 0
    try:
        with pytest.MonkeyPatch.context() as mp:
            # A step per series: unfinished cycles leave some anchors trimmed, others not.
            mp.setattr(retention, "COMPACT_SERIES_PER_STEP", rnd.choice([1, 512]))
            pages = deliveries(items, rnd)
            dry: list[tuple[int, ...]] = []  # what the dry run of the next pages said
            for k, page in enumerate(pages):
                if dry:
                    pass  # no compaction inside the pages a dry run spoke for
                elif rnd.random() < 0.25:
                    # A dry run of this page and the next ones (each later page replays
                    # the earlier ones' observations: splits and new months included).
                    before = state(a)
                    with a.dry_run():
                        ahead = pages[k : k + rnd.randint(1, 3)]
                        dry = [counts(a.apply(Batch(list(p), 1, PRICING))) for p in ahead]
                    assert state(a) == before
                elif rnd.random() < 0.35:
                    cut = rnd.choice(times) + rnd.choice([0, 1, M, 2 * H, 5 * D])
                    rep = a.compact(
                        now_ns=cut + D, retention_ns=D, budget_s=rnd.choice([0.0, None])
                    )
                    removed += rep.observations_removed
                horizon = cut_of(a)
                rep = a.apply(Batch(list(page), 1, PRICING))
                b.apply(Batch([it for it in page if it.collected_at_ns >= horizon], 1, PRICING))
                if dry:
                    assert dry.pop(0) == counts(rep)
                assert usage(a) == usage(b)
            rep = a.compact(now_ns=cut_of(a) + D, retention_ns=D)
            removed += rep.observations_removed
        cut = cut_of(a)
        assert usage(a) == usage(b)
        assert ledger_sums(a) == ledger_sums(b)
        full = view(b)
        last_before: dict[tuple[str, str], tuple[Any, ...]] = {}
        for r in full:
            if r[2] < cut:
                last_before[(r[0], r[1])] = r
        assert view(a) == sorted([*last_before.values(), *(r for r in full if r[2] >= cut)])
        if a.db.partitioned:
            # Every row in the partition of its month (row movement by the trim included).
            for name, lo, hi in a.db.month_partitions("observations"):
                bad = a.db.execute(
                    f'SELECT count(*) FROM "{name}" WHERE collected_at_ns < ?'
                    " OR collected_at_ns >= ?",
                    (-(2**63) if lo is None else lo, 2**63 - 1 if hi is None else hi),
                )
                assert bad == [(0,)]
        # Replays of everything change nothing.
        before = (usage(a), ledger_sums(a), view(a))
        a.apply(Batch(list(items), 1, PRICING))
        assert (usage(a), ledger_sums(a), view(a)) == before
        return {
            "view": view(a),
            "usage": usage(a),
            "ledger": ledger_sums(a),
            "rows": sorted(
                tuple(r)
                for r in a.db.execute(
                    # Series ids differ (a dry run's rolled-back insert uses a PostgreSQL
                    # sequence value): rows are named by their series' key.
                    "SELECT s.node_id, s.uuid, o.collected_at_ns, o.until_ns, o.uplink_total"
                    " FROM observations o JOIN series s ON s.series_id = o.series_id"
                )
            ),
            "items": sorted(map(tuple, a.db.execute("SELECT * FROM node_items"))),
            "removed": removed,
        }
    finally:
        a.close()
        b.close()


@settings(max_examples=150, deadline=None)
@given(month_fleets(), st.integers(0, 2**32))
def test_runs_across_months_with_compaction_sqlite(items: list[Item], seed: int) -> None:
    if items:
        scenario(items, seed, lambda: open_store(":memory:"))


@pytest.mark.postgres
@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(items=month_fleets(), seed=st.integers(0, 2**32))
def test_runs_across_months_with_compaction_postgres_equals_sqlite(
    pg_schemas: list[str], items: list[Item], seed: int
) -> None:
    if not items:
        return
    on_pg = scenario(items, seed, _fresh_cut(_pg_maker(list(pg_schemas))))
    on_sqlite = scenario(items, seed, lambda: open_store(":memory:"))
    assert on_pg == on_sqlite


# --- the migration to month partitions, from a store that already keeps runs -------------


def _item(t: int, *samples: tuple[str, int], node: str = "n1") -> Item:
    return Item(t, node, "prod", None, [Sample(u, f"{u}@x", "t", up, 0) for u, up in samples])


# 2026-11-20 00:00 UTC; December is 11 to 41 days later.
NOV20 = 1_795_132_800 * S
DEC1, JAN1 = NOV20 + 11 * D, NOV20 + 42 * D


def _idle_december() -> list[Item]:
    """a idle from November 20 to December 20 (one item a day), then grows on January 5:
    December holds item times only (no observations row, bucket or posting)."""
    return [_item(NOV20 + k * D, ("a", 5)) for k in range(31)] + [_item(NOV20 + 46 * D, ("a", 9))]


@pytest.mark.parametrize("then", ["compact", "late item"])
def test_months_of_item_times_only_get_their_partitions_on_migration(
    db_url: str, monkeypatch: pytest.MonkeyPatch, then: str
) -> None:
    """A store at version 7 (runs) holds months that only item times reach: an idle month.
    A later compaction trims the anchor into such a month, and a late item splits a run
    there (the piece after it starts at the next stored item time): both write a row in
    that month, so the migration must create its partitions like those of rows."""
    from test_pg_partitions import _open_previous_version

    items = _idle_december()
    old = _open_previous_version(db_url, monkeypatch)
    old.apply(Batch(items, 1, PRICING))
    old.close()
    with _schemas_pair(db_url) as other:
        a, b = cast(SqlStore, open_store(db_url)), cast(SqlStore, open_store(other))
        try:
            b.apply(Batch(items, 1, PRICING))
            assert view(a) == view(b)
            a.compact_chunk_ns = M
            if then == "compact":
                # The cut on January 1: a's anchor is trimmed to its last point before,
                # December 20.
                rep = a.compact(now_ns=JAN1 + D, retention_ns=D)
                assert rep.complete
                assert [r[2] for r in view(a)] == [NOV20 + 30 * D, NOV20 + 46 * D]
            else:
                # November 30 23:00, without a: the run splits, its second piece starts
                # on December 1 (the next item time).
                late = [_item(DEC1 - H, ("z", 1))]
                for s in (a, b):
                    s.apply(Batch(late, 1, PRICING))
                assert view(a) == view(b)
            later = [_item(NOV20 + 47 * D, ("a", 12))]
            for s in (a, b):
                s.apply(Batch(later, 1, PRICING))
            assert usage(a) == usage(b)
            assert ledger_sums(a) == ledger_sums(b)
        finally:
            a.close()
            b.close()


def _schemas_pair(db_url: str) -> Any:
    """One more empty store of the same back end (a context manager yielding its URL)."""
    from contextlib import contextmanager

    from test_retention import _schemas

    @contextmanager
    def one() -> Iterator[str]:
        with _schemas(db_url) as new:
            yield new()

    return one()


def _delta(
    after: list[tuple[str, str, int, int, int]], before: list[tuple[str, str, int, int, int]]
) -> dict[tuple[str, str, int], tuple[int, int]]:
    out = {(r[0], r[1], r[2]): (r[3], r[4]) for r in after}
    for r in before:
        up, down = out.pop((r[0], r[1], r[2]))
        if (up - r[3], down - r[4]) != (0, 0):
            out[(r[0], r[1], r[2])] = (up - r[3], down - r[4])
    return out


def test_a_version_6_store_with_idle_months_migrates_through_runs_and_partitions(
    db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Version 6 stored every sample: idle ones too, across months. Through versions 7
    (runs) and 8 (partitions) at once, counter_observations keeps every row; later pages
    (late ones splitting the old rows' minutes, idle ones, a compaction to a cut inside
    the old months) bill what a store given the same observations as items bills."""
    from test_store import _old_rows, _previous_release

    items = _idle_december()
    # b on another node's item every other day, c absent from every third item.
    items += [_item(NOV20 + k * D + H, ("b", 100 + k)) for k in range(0, 46, 2)]
    items = [
        it._replace(samples=[*it.samples, Sample("c", "c@x", "t", 7, 0)]) if k % 3 else it
        for k, it in enumerate(items)
    ]
    items.sort(key=lambda it: it.collected_at_ns)
    ref = cast(SqlStore, open_store(":memory:"))
    ref.apply(Batch(items, 1, PRICING))
    before = view(ref)
    heads = ref.db.execute(
        "SELECT series_id, node_id, env, uuid, inbound_tag, email, head_collected_at_ns,"
        " head_uplink, head_downlink, head_epoch FROM series"
    )
    sid = {(r[1], r[3]): int(r[0]) for r in heads}
    s = _previous_release(db_url, 6, monkeypatch)
    _old_rows(
        s,
        [tuple(r) for r in heads],
        observations=[
            (sid[(it.node_id, smp.uuid)], it.collected_at_ns, smp.uplink_total, 0, None, 1, "s")
            for it in items
            for smp in it.samples
        ],
    )
    if s.db.name != "sqlite":  # the ids above were given: new series come after them
        s.db.execute("SELECT setval(pg_get_serial_sequence('series', 'series_id'), 100)")
    s.close()
    a = cast(SqlStore, open_store(db_url))
    try:
        assert view(a) == before
        assert [r[0] for r in a.db.execute("SELECT max(version) FROM schema_version")] == [8]
        base_a, base_ref = usage(a), usage(ref)
        later = [
            _item(NOV20 + 10 * D + 7 * H, ("a", 6), ("c", 7)),  # late: a moved, c idle
            _item(NOV20 + 30 * D + 5 * H, ("z", 1)),  # late, without a or c
            _item(NOV20 + 48 * D, ("a", 9), ("c", 7)),
            _item(NOV20 + 49 * D, ("a", 9), ("c", 8)),
        ]
        for st_ in (a, ref):
            st_.apply(Batch(later, 1, PRICING))
        assert view(a) == view(ref)
        assert _delta(usage(a), base_a) == _delta(usage(ref), base_ref)
        a.compact_chunk_ns = M
        ref.compact_chunk_ns = M
        for st_ in (a, ref):
            assert st_.compact(now_ns=DEC1 + 15 * D + D, retention_ns=D).complete
        assert view(a) == view(ref)
        final = [_item(NOV20 + 50 * D, ("a", 11), ("c", 8), ("b", 1000))]
        base_a, base_ref = usage(a), usage(ref)
        for st_ in (a, ref):
            st_.apply(Batch(final, 1, PRICING))
        assert _delta(usage(a), base_a) == _delta(usage(ref), base_ref)
        assert view(a) == view(ref)
    finally:
        a.close()
        ref.close()


# --- concurrency: collectors applying while compaction steps run ---------------------------


def _fleet_over_months(rnd: random.Random) -> dict[str, list[Item]]:
    """Per node, an item every 6 hours for four months from November 20: mostly idle
    series, some absent for a while, a restart now and then."""
    out: dict[str, list[Item]] = {}
    for node, uuids in {"n1": ["a", "b", "c"], "n2": ["a", "d"]}.items():
        totals = dict.fromkeys(uuids, 0)
        its = []
        for k in range(480):
            samples = []
            for u in uuids:
                r = rnd.random()
                if r < 0.1:
                    totals[u] += rnd.randint(1, 10**6)
                elif r < 0.12:
                    totals[u] = rnd.randint(0, 10)  # a restart (a drop without epoch)
                if r < 0.9 or r > 0.97:  # absent now and then
                    samples.append((u, totals[u]))
            if samples:
                its.append(_item(NOV20 + k * 6 * H + rnd.randint(0, 59) * S, *samples, node=node))
        out[node] = its
    return out


def _late_order(items: list[Item], rnd: random.Random) -> list[Item]:
    """In order, except that one item in five arrives up to 8 items late."""
    order = [(i + (rnd.randint(1, 8) if rnd.random() < 0.2 else 0), i) for i in range(len(items))]
    return [items[i] for _, i in sorted(order)]


@pytest.mark.postgres
@pytest.mark.parametrize("seed", [7, 8])
def test_collectors_and_compaction_steps_at_once(postgres_url: str, seed: int) -> None:
    """Three collectors (two sources of one node, one of another) apply pages that reach
    new months, split runs and extend idle ones, while compaction steps (one series each,
    the month partitions emptied first) run between and among them, always to a cut
    before every item still to come. No deadlock, no error; the result is the serial
    result compacted to the same cut."""
    import threading

    from test_retention import _schemas

    rnd = random.Random(seed)
    fleet = _fleet_over_months(rnd)
    n1 = fleet["n1"]
    split = [it for it in n1 if rnd.random() < 0.5]
    feeds = {
        "s1": _late_order(split + rnd.sample(n1, 40), rnd),  # overlapping sources of n1
        "s2": _late_order([it for it in n1 if it not in split], rnd),
        "s3": _late_order(fleet["n2"], rnd),
    }
    feeds = {k: list({it.collected_at_ns: it for it in v}.values()) for k, v in feeds.items()}
    pending = {k: [it.collected_at_ns for it in v] for k, v in feeds.items()}
    errors: list[BaseException] = []
    done = threading.Event()

    def collector(source: str) -> None:
        s = cast(SqlStore, open_store(postgres_url))
        try:
            its = feeds[source]
            for i in range(0, len(its), 6):
                rep = s.apply(Batch(its[i : i + 6], 1, PRICING, source))
                assert rep.beyond_retention == 0
                pending[source] = pending[source][6:]
        except BaseException as exc:
            errors.append(exc)
        finally:
            s.close()

    def dry_runner() -> None:
        # Dry runs of pages months ahead (each creating, then rolling back, partitions
        # inside its transaction, under the shared retention lock) among all of it.
        s = cast(SqlStore, open_store(postgres_url))
        try:
            ahead = [it._replace(collected_at_ns=it.collected_at_ns + 200 * D) for it in n1]
            while not done.is_set():
                with s.dry_run():
                    for i in range(0, 18, 6):
                        s.apply(Batch(ahead[i : i + 6], 1, PRICING, "dry"))
                ahead = ahead[18:] or ahead
        except BaseException as exc:
            errors.append(exc)
        finally:
            s.close()

    def compactor() -> None:
        s = cast(SqlStore, open_store(postgres_url))
        s.compact_chunk_ns = M
        try:
            while not done.is_set():
                waiting = [min(p) for p in pending.values() if p]
                if not waiting:
                    break
                cut = min(waiting) - 3 * D  # eight items late at most: 2 days
                s.compact(now_ns=cut + D, retention_ns=D, budget_s=0.0)
        except BaseException as exc:
            errors.append(exc)
        finally:
            s.close()

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(retention, "COMPACT_SERIES_PER_STEP", 1)
        threads = [threading.Thread(target=collector, args=(k,)) for k in feeds]
        extra = [threading.Thread(target=f) for f in (dry_runner, compactor)]
        for t in [*threads, *extra]:
            t.start()
        for t in threads:
            t.join(timeout=600)
        done.set()
        for t in extra:
            t.join(timeout=600)
    assert not errors, errors
    a = cast(SqlStore, open_store(postgres_url))
    a.compact_chunk_ns = M
    with _schemas(postgres_url) as new:
        b = cast(SqlStore, open_store(new()))
        try:
            for k, its in feeds.items():
                b.apply(Batch(sorted(its, key=lambda it: it.collected_at_ns), 1, PRICING, k))
            assert a.compact(now_ns=cut_of(a) + D, retention_ns=D).complete
            cut = cut_of(a)
            assert cut > NOV20 + 60 * D  # compaction did go on while collectors ran
            # The dry runs left nothing: no row, no partition beyond the fleet's months.
            months = [p[0] for p in a.db.month_partitions("observations")]
            assert months[-1] == "observations_p202703", months
            assert usage(a) == usage(b)
            assert ledger_sums(a) == ledger_sums(b)
            full = view(b)
            last_before: dict[tuple[str, str], tuple[Any, ...]] = {}
            for r in full:
                if r[2] < cut:
                    last_before[(r[0], r[1])] = r
            assert view(a) == sorted([*last_before.values(), *(r for r in full if r[2] >= cut)])
        finally:
            a.close()
            b.close()

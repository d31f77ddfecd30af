"""Accounting periods as hypothesis properties, on real stores (DESIGN §5a).

Random fleets of counter series spanning several months (restarts with and without
epochs, drops within an epoch, several observations per minute) are delivered as random
pages — shuffled, overlapping, duplicated, late — with reconciles (a time range
delivered again, late items included) and periods closed at random points. Then:

* after each close, that period's statement never changes again (nor its postings);
* the buckets are exact (an oracle computed while generating the counters);
* the sum of all postings, over all periods, equals the rating of all buckets: each
  bucket's postings add up to its state, and to what one clean in-order delivery
  without any close rates;
* SQLite and PostgreSQL produce the same postings and statements.

Both run with the profile's example count (``HYPOTHESIS_PROFILE=ci``: 500).
"""

from __future__ import annotations

import os
import random
import uuid as uuidlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, cast

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from billing_cli._time import parse_rfc3339_ns
from billing_cli.core.periods import format_period, parse_period, period_of
from billing_cli.core.statement import Statement
from billing_cli.core.types import Item, Sample
from billing_cli.pricing import Pricing
from billing_cli.store import open_store
from billing_cli.store.base import Batch, RowFilter, Store
from billing_cli.store.sql import SqlStore

M = 60_000_000_000
S = 1_000_000_000
DAY = 86_400 * S
T0 = parse_rfc3339_ns("2025-10-29T23:50:00Z")
PERIODS = [parse_period(p) for p in ("2025-10", "2025-11", "2025-12", "2026-01")]
NOW = parse_rfc3339_ns("2026-06-01T00:00:00Z")  # every period above has ended
PRICINGS = [
    Pricing(price_per_unit="0.37", unit="KB", rule_version="p1"),
    # u1 is on both nodes: its quota is per uuid (across nodes) and per month
    Pricing(price_per_unit="1.25", unit="KB", rule_version="q1", included_bytes={"u1": 3_000}),
]
NODES = {"n1": ["u1", "u2"], "n2": ["u1"]}


@dataclass
class Fleet:
    items: list[Item]
    # oracle: (node, uuid) -> minute -> [uplink, downlink]
    expected: dict[tuple[str, str], dict[int, list[int]]] = field(default_factory=dict)


@st.composite
def fleets(draw: st.DrawFn) -> Fleet:
    fleet = Fleet(items=[])
    for node, uuids in NODES.items():
        epochs = draw(st.booleans())
        epoch_no = 0
        t = T0 + draw(st.integers(0, 20 * M))
        totals = {u: [draw(st.integers(0, 50)), 0] for u in uuids}
        for step in range(draw(st.integers(1, 8))):
            if step:
                # mostly minutes apart, sometimes days: the series crosses months
                if draw(st.integers(0, 3)) == 0:
                    t += draw(st.integers(1, 25)) * DAY + draw(st.integers(0, DAY - 1))
                else:
                    t += draw(st.integers(1, 150)) * S + draw(st.integers(0, S - 1))
            kind = (
                "first"
                if step == 0
                else draw(st.sampled_from(["normal"] * 3 + ["restart", "anomaly"]))
            )
            if kind == "restart" and epochs:
                epoch_no += 1
            samples = []
            for u in uuids:
                up, down = totals[u]
                bill = (0, 0)
                if kind == "first":
                    new = (up, down)
                elif kind == "restart" and epochs:
                    new = (draw(st.integers(0, 900)), draw(st.integers(0, 900)))
                    bill = new
                elif kind == "restart" and up > 0:  # no epoch: a restart shows as a drop
                    new = (draw(st.integers(0, up - 1)), draw(st.integers(0, 900)))
                    bill = new
                elif kind == "anomaly" and epochs and up > 0:  # a drop within one epoch
                    new = (draw(st.integers(0, up - 1)), down + draw(st.integers(0, 900)))
                else:
                    du, dd = draw(st.integers(0, 2_000)), draw(st.integers(0, 2_000))
                    new = (up + du, down + dd)
                    bill = (du, dd)
                totals[u] = list(new)
                if bill != (0, 0):
                    slot = fleet.expected.setdefault((node, u), {}).setdefault(t - t % M, [0, 0])
                    slot[0] += bill[0]
                    slot[1] += bill[1]
                samples.append(Sample(u, f"{u}@{node}.example", "vless", new[0], new[1]))
            fleet.items.append(Item(t, node, "prod", f"e{epoch_no}" if epochs else None, samples))
    return fleet


Op = tuple[str, Any]  # ("apply", [items]) or ("close", period)


def operations(items: list[Item], rnd: random.Random) -> list[Op]:
    """Random pages (shuffled, overlapping, replays, late items), reconciles of random
    time ranges, closes at random points, then everything once more (nothing is lost)."""
    order = list(items)
    rnd.shuffle(order)
    if rnd.random() < 0.3:  # sometimes mostly in order, with a few late items
        order.sort(key=lambda i: (i.collected_at_ns, rnd.random() < 0.2))
    ops: list[Op] = []
    pos = 0
    while pos < len(order):
        n = rnd.randint(1, 4)
        page = order[max(0, pos - rnd.randint(0, 2)) : pos + n]
        page += rnd.sample(items, k=rnd.randint(0, min(2, len(items))))
        rnd.shuffle(page)
        ops.append(("apply", page))
        pos += n
        if rnd.random() < 0.3:  # a reconcile: a time range again, whatever was missed
            a, b = sorted(rnd.choice(items).collected_at_ns for _ in range(2))
            ops.append(("apply", [i for i in items if a <= i.collected_at_ns <= b]))
    for period in rnd.sample(PERIODS, k=rnd.randint(0, len(PERIODS))):
        ops.insert(rnd.randint(0, len(ops)), ("close", period))
    ops.append(("apply", list(items)))
    return ops


def postings(store: Store) -> list[tuple[Any, ...]]:
    """The ledger without store-assigned ids and times."""
    return sorted(
        (
            r.node_id,
            r.uuid,
            r.bucket_start_ns,
            r.revision,
            r.entry_type,
            r.period_start_ns,
            r.uplink_bytes,
            r.downlink_bytes,
            r.rated_bytes,
            r.included_bytes,
            r.amount_nano,
            r.currency,
            r.pricing_rule_version,
        )
        for r in store.iter_ledger(RowFilter())
    )


def bucket_sums(store: Store) -> dict[tuple[str, str, int], tuple[int, ...]]:
    out: dict[tuple[str, str, int], list[int]] = {}
    for r in store.iter_ledger(RowFilter()):
        acc = out.setdefault((r.node_id, r.uuid, r.bucket_start_ns), [0] * 5)
        for i, v in enumerate(
            (r.uplink_bytes, r.downlink_bytes, r.rated_bytes, r.included_bytes, r.amount_nano)
        ):
            acc[i] += v
    return {k: tuple(v) for k, v in out.items() if any(v)}


def statements(store: Store) -> dict[int, Statement]:
    """Every period's statement (closing every period early carries into later ones)."""
    periods = {*PERIODS, *(r.period_start_ns for r in store.iter_ledger(RowFilter()))}
    return {p: store.statement(p, RowFilter()) for p in sorted(periods)}


def run(store: Store, ops: list[Op], pricing: Pricing) -> dict[int, Statement]:
    """Apply ``ops``; after each close, check that every closed period's statement and
    postings stay as they were at its close. Returns the statements at close."""
    frozen: dict[int, tuple[Statement, list[Any]]] = {}
    run_id = store.start_run("ingest", [])
    for kind, arg in ops:
        if kind == "close":
            store.close_period(arg, actor="prop", now_ns=NOW)
            if arg not in frozen:
                own = list(store.iter_ledger(RowFilter(period_start_ns=arg)))
                frozen[arg] = (store.statement(arg, RowFilter()), own)
        else:
            store.apply(Batch(arg, run_id, pricing))
        for period, (st_, own) in frozen.items():
            assert store.statement(period, RowFilter()) == st_, format_period(period)
            assert list(store.iter_ledger(RowFilter(period_start_ns=period))) == own
    return {p: s for p, (s, _) in frozen.items()}


def check(fleet: Fleet, rnd: random.Random, pricing: Pricing, messy: Store) -> list[Any]:
    """The property on ``messy`` (a fresh store); the clean delivery goes to SQLite."""
    clean = _sqlite()
    try:
        return _check(fleet, rnd, pricing, messy, clean)
    finally:
        clean.close()


def _check(
    fleet: Fleet, rnd: random.Random, pricing: Pricing, messy: Store, clean: Store
) -> list[Any]:
    ops = operations(fleet.items, rnd)
    closed = run(messy, ops, pricing)
    clean.apply(
        Batch(
            sorted(fleet.items, key=lambda i: i.collected_at_ns),
            clean.start_run("ingest", []),
            pricing,
        )
    )
    # Buckets exact.
    oracle = sorted(
        (node, u, m, up, down)
        for (node, u), minutes in fleet.expected.items()
        for m, (up, down) in minutes.items()
    )
    usage = sorted(
        (r.node_id, r.uuid, r.bucket_start_ns, r.uplink_bytes, r.downlink_bytes)
        for r in messy.iter_usage(RowFilter())
    )
    assert usage == oracle
    # All postings over all periods = the rating of all buckets, from scratch.
    assert bucket_sums(messy) == bucket_sums(clean)
    db = cast(SqlStore, messy).db
    state = {
        (r[0], r[1], int(r[2])): tuple(int(v) for v in r[3:])
        for r in db.execute(
            "SELECT s.node_id, s.uuid, b.bucket_start_ns, b.uplink_bytes, b.downlink_bytes,"
            " b.rated_bytes, b.included_bytes, b.amount_nano"
            " FROM buckets b JOIN series s ON s.series_id = b.series_id"
        )
    }
    assert bucket_sums(messy) == {k: v for k, v in state.items() if any(v)}
    # Every posting is accounted in its bucket's month or carried forward, never back;
    # the statements of all periods add up to the whole ledger.
    sts = statements(messy)
    carried = 0
    for p in postings(messy):
        assert p[5] >= period_of(p[2])
        carried += p[5] > period_of(p[2])
    event("corrections carried forward" if carried else "no correction carried")
    total = sum(a.amount_nano for s in sts.values() for a in s.accounts)
    assert total == sum(v[4] for v in bucket_sums(clean).values())
    # Closed periods: still what they were at their close.
    for period, st_ in closed.items():
        assert sts[period] == st_
    return [postings(messy), sts, sorted(closed)]


def _sqlite() -> Store:
    return open_store(":memory:")


@given(fleets(), st.randoms(use_true_random=False), st.sampled_from(PRICINGS))
def test_closed_statements_never_change_sqlite(
    fleet: Fleet, rnd: random.Random, pricing: Pricing
) -> None:
    store = _sqlite()
    try:
        check(fleet, rnd, pricing, store)
    finally:
        store.close()


# --- PostgreSQL: the same property, compared with SQLite, same example count -------------

PG_URL = os.environ.get("BILLING_TEST_POSTGRES_URL")
TABLES = (
    "series, observations, buckets, uuid_period_usage, ledger_postings, source_checkpoints, runs,"
    " run_sources, integrity_events, item_digests"
)


@pytest.fixture(scope="module")
def pg_store() -> Iterator[Store]:
    """One PostgreSQL store in a schema of its own, emptied before each example."""
    if not PG_URL:
        if os.environ.get("BILLING_REQUIRE_POSTGRES"):
            pytest.fail("BILLING_TEST_POSTGRES_URL is not set but PostgreSQL is required here")
        pytest.skip("PostgreSQL tests need BILLING_TEST_POSTGRES_URL (CI sets it)")
    import psycopg

    name = f"per_{uuidlib.uuid4().hex[:10]}"
    with psycopg.connect(PG_URL, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {name}")
    sep = "&" if "?" in PG_URL else "?"
    store = open_store(f"{PG_URL}{sep}options=-csearch_path%3D{name}")
    try:
        yield store
    finally:
        store.close()
        with psycopg.connect(PG_URL, autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA {name} CASCADE")


def _emptied(store: Store) -> Store:
    db = cast(SqlStore, store).db
    with db.transaction():
        # closed_periods and its snapshots are final (triggers refuse DELETE), but
        # TRUNCATE is not a row operation: a test schema may start over.
        db.execute(f"TRUNCATE {TABLES}, closed_periods, closed_period_accounts RESTART IDENTITY")
    return store


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(fleet=fleets(), seed=st.integers(0, 2**32 - 1), pricing=st.sampled_from(PRICINGS))
def test_closed_statements_never_change_and_match_sqlite_on_postgres(
    pg_store: Store, fleet: Fleet, seed: int, pricing: Pricing
) -> None:
    on_pg = check(fleet, random.Random(seed), pricing, _emptied(pg_store))
    sqlite = _sqlite()
    try:
        on_sqlite = check(fleet, random.Random(seed), pricing, sqlite)
    finally:
        sqlite.close()
    assert on_pg == on_sqlite

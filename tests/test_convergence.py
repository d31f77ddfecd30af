"""Convergence invariants of DESIGN §4 as hypothesis properties, on real stores.

Random fleets of counter series (restarts with and without epochs, drops inside one
epoch, counters beyond 2^53, several observations per minute) are delivered as random
pages: shuffled, overlapping, duplicated, late. The result must equal one clean in-order
delivery and an independent oracle computed while generating the counters.
"""

from __future__ import annotations

import os
import random
import uuid as uuidlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, cast

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from billing_cli.core.types import Item, Sample
from billing_cli.pricing import Pricing
from billing_cli.store import open_store
from billing_cli.store.base import Batch, RowFilter, Store
from billing_cli.store.sql import SqlStore

M = 60_000_000_000
S = 1_000_000_000
T0 = 1_793_000_000 * S - (1_793_000_000 * S) % M

# Non-zero prices with rounding at every bucket (amounts are stored as 64-bit nano-units).
PRICING = Pricing(price_per_unit="0.37", unit="GB", rule_version="p1")
QUOTA_PRICING = Pricing(price_per_unit="1.25", unit="GB", included_bytes={"u1": 3_000})
# Which series live on which node: u1 on both nodes (quota is per uuid across nodes).
NODES = {"n1": ["u1", "u2"], "n2": ["u1"]}


@dataclass
class Fleet:
    items: list[Item]
    # oracle: (node, uuid) -> minute -> [uplink, downlink] billed
    expected: dict[tuple[str, str], dict[int, list[int]]] = field(default_factory=dict)


@st.composite
def fleets(draw: st.DrawFn) -> Fleet:
    fleet = Fleet(items=[])
    for node, uuids in NODES.items():
        epochs = draw(st.booleans())
        epoch_no = 0
        n_steps = draw(st.integers(1, 7))
        t = T0 + draw(st.integers(0, 3 * M))
        base = draw(st.sampled_from([0, 2**54 + 3]))  # exercise counters beyond 2^53
        totals = {u: [base + draw(st.integers(0, 50)), base] for u in uuids}
        for step in range(n_steps):
            if step:
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
                samples.append(Sample(u, f"{u}@example", "vless", new[0], new[1]))
            fleet.items.append(Item(t, node, "prod", f"e{epoch_no}" if epochs else None, samples))
    return fleet


def deliveries(items: list[Item], rnd: random.Random) -> list[list[Item]]:
    """Random pages: shuffled, overlapping, with duplicates and late items."""
    order = list(items)
    rnd.shuffle(order)
    if rnd.random() < 0.3:  # sometimes mostly in order, with a few late items
        order.sort(key=lambda i: (i.collected_at_ns, rnd.random() < 0.2))
    pages: list[list[Item]] = []
    pos = 0
    while pos < len(order):
        n = rnd.randint(1, 4)
        page = order[max(0, pos - rnd.randint(0, 2)) : pos + n]  # overlap with the last page
        page += rnd.sample(items, k=rnd.randint(0, min(2, len(items))))  # replays
        rnd.shuffle(page)
        pages.append(page)
        pos += n
    return pages


def conflicting(items: list[Item], rnd: random.Random) -> list[Item]:
    """Re-deliveries of known items with other totals: must be refused, not applied."""
    out = []
    for it in rnd.sample(items, k=min(2, len(items))):
        s = it.samples[0]
        out.append(it._replace(samples=[s._replace(uplink_total=s.uplink_total + 1)]))
    return out


def usage(store: Store) -> list[tuple[str, str, int, int, int]]:
    return [
        (r.node_id, r.uuid, r.bucket_start_ns, r.uplink_bytes, r.downlink_bytes)
        for r in store.iter_usage(RowFilter())
    ]


def ledger_sums(store: Store) -> dict[tuple[str, str, int], tuple[int, int]]:
    out: dict[tuple[str, str, int], tuple[int, int]] = {}
    for r in store.iter_ledger(RowFilter()):
        k = (r.node_id, r.uuid, r.bucket_start_ns)
        b, a = out.get(k, (0, 0))
        out[k] = (b + r.rated_bytes, a + r.amount_nano)
    return {k: v for k, v in out.items() if v != (0, 0)}


def check(fleet: Fleet, rnd: random.Random, pricing: Pricing, make: Any) -> None:
    # Closed whatever happens: hypothesis may stop an example midway (st.randoms draws lazily).
    clean, messy = make(), make()
    try:
        _check(fleet, rnd, pricing, clean, messy)
    finally:
        clean.close()
        messy.close()


def _check(fleet: Fleet, rnd: random.Random, pricing: Pricing, clean: Store, messy: Store) -> None:
    run = clean.start_run("ingest", [])
    clean.apply(Batch(sorted(fleet.items, key=lambda i: i.collected_at_ns), run, pricing))
    run = messy.start_run("ingest", [])
    for page in deliveries(fleet.items, rnd):
        messy.apply(Batch(page, run, pricing))

    oracle = sorted(
        (node, u, m, up, down)
        for (node, u), minutes in fleet.expected.items()
        for m, (up, down) in minutes.items()
    )
    assert usage(clean) == sorted(usage(clean), key=lambda r: (r[2], r[0], r[1]))
    assert sorted(usage(clean)) == oracle
    assert sorted(usage(messy)) == oracle
    assert ledger_sums(messy) == ledger_sums(clean)

    for store in (clean, messy):
        db = cast(SqlStore, store).db
        # No negative bucket, ever (also the emptied rows kept for their revision).
        assert db.execute(
            "SELECT count(*) FROM buckets WHERE uplink_bytes < 0 OR downlink_bytes < 0"
        ) == [(0,)]
        # Each bucket's postings sum to its current rating and are numbered 0..n-1.
        # ... and so do its bytes and included quota used (a statement reads only those).
        rows = db.execute(
            "SELECT b.series_id, b.bucket_start_ns, b.rated_bytes, b.amount_nano, b.revision,"
            " COALESCE(SUM(l.rated_bytes), 0), COALESCE(SUM(l.amount_nano), 0), count(l.entry_id),"
            " COALESCE(max(l.revision), -1), b.uplink_bytes, b.downlink_bytes, b.included_bytes,"
            " COALESCE(SUM(l.uplink_bytes), 0), COALESCE(SUM(l.downlink_bytes), 0),"
            " COALESCE(SUM(l.included_bytes), 0)"
            " FROM buckets b LEFT JOIN ledger_postings l ON l.series_id = b.series_id"
            " AND l.bucket_start_ns = b.bucket_start_ns"
            " GROUP BY b.series_id, b.bucket_start_ns, b.rated_bytes, b.amount_nano, b.revision,"
            " b.uplink_bytes, b.downlink_bytes, b.included_bytes"
        )
        for r in rows:
            assert (int(r[2]), int(r[3])) == (int(r[5]), int(r[6]))
            assert int(r[4]) == int(r[7]) == int(r[8]) + 1
            assert (int(r[9]), int(r[10]), int(r[11])) == (int(r[12]), int(r[13]), int(r[14]))
        # The per-uuid period sums (quota state) equal the sums of the buckets.
        sums = db.execute(
            "SELECT s.uuid, SUM(b.uplink_bytes), SUM(b.downlink_bytes), MAX(b.bucket_start_ns)"
            " FROM buckets b JOIN series s ON s.series_id = b.series_id GROUP BY s.uuid"
        )
        kept = db.execute(
            "SELECT uuid, uplink_bytes, downlink_bytes, last_bucket_start_ns"
            " FROM uuid_period_usage WHERE uplink_bytes <> 0 OR downlink_bytes <> 0"
        )
        assert sorted((u, int(a), int(b)) for u, a, b, _ in sums if a or b) == sorted(
            (u, int(a), int(b)) for u, a, b, _ in kept
        )
        orphan = db.execute(
            "SELECT count(*) FROM ledger_postings l WHERE NOT EXISTS (SELECT 1 FROM buckets b"
            " WHERE b.series_id = l.series_id AND b.bucket_start_ns = l.bucket_start_ns)"
        )
        assert orphan == [(0,)]

    # Billed bytes are the true increments after the baseline.
    billed = sum(v[0] for v in ledger_sums(messy).values())
    charged = sum(up + down for *_, up, down in oracle)
    assert billed == charged

    # A dry run of more deliveries (even new data) leaves every table as it was.
    db = cast(SqlStore, messy).db
    tables = [
        "series",
        "observations",
        "buckets",
        "uuid_period_usage",
        "ledger_postings",
        "item_digests",
    ]
    snapshot = {t: sorted(map(tuple, db.execute(f"SELECT * FROM {t}")), key=repr) for t in tables}
    with messy.dry_run():
        later = [it._replace(collected_at_ns=it.collected_at_ns + 3600 * S) for it in fleet.items]
        for page in deliveries([*fleet.items, *later], rnd)[:3]:
            messy.apply(Batch(page, run, pricing))
    assert {
        t: sorted(map(tuple, db.execute(f"SELECT * FROM {t}")), key=repr) for t in tables
    } == snapshot

    # Replaying everything, plus conflicting re-deliveries, changes nothing.
    before = (usage(messy), ledger_sums(messy))
    rep = messy.apply(Batch([*fleet.items, *conflicting(fleet.items, rnd)], run, pricing))
    assert rep.postings == 0
    assert rep.new_observations == 0
    assert rep.conflicts >= 1
    assert (usage(messy), ledger_sums(messy)) == before


def _sqlite() -> Store:
    return open_store(":memory:")


@given(fleets(), st.randoms(use_true_random=False))
def test_converges_sqlite(fleet: Fleet, rnd: random.Random) -> None:
    check(fleet, rnd, PRICING, _sqlite)


@given(fleets(), st.randoms(use_true_random=False))
def test_converges_with_included_quota_sqlite(fleet: Fleet, rnd: random.Random) -> None:
    check(fleet, rnd, QUOTA_PRICING, _sqlite)


# --- PostgreSQL: the same properties, fewer examples (each opens two schemas) -------------

PG_URL = os.environ.get("BILLING_TEST_POSTGRES_URL")
TABLES = (
    "series, observations, node_items, buckets, uuid_period_usage, ledger_postings,"
    " source_checkpoints, runs,"
    " run_sources,"
    " integrity_events, item_digests"
)


@pytest.fixture(scope="module")
def pg_schemas() -> Iterator[list[str]]:
    if not PG_URL:
        if os.environ.get("BILLING_REQUIRE_POSTGRES"):
            pytest.fail("BILLING_TEST_POSTGRES_URL is not set but PostgreSQL is required here")
        pytest.skip("PostgreSQL tests need BILLING_TEST_POSTGRES_URL (CI sets it)")
    import psycopg

    names = [f"conv_{uuidlib.uuid4().hex[:10]}" for _ in range(2)]
    with psycopg.connect(PG_URL, autocommit=True) as conn:
        for n in names:
            conn.execute(f"CREATE SCHEMA {n}")
    sep = "&" if "?" in PG_URL else "?"
    urls = [f"{PG_URL}{sep}options=-csearch_path%3D{n}" for n in names]
    for u in urls:  # migrate once
        open_store(u).close()
    yield urls
    with psycopg.connect(PG_URL, autocommit=True) as conn:
        for n in names:
            conn.execute(f"DROP SCHEMA {n} CASCADE")


def _pg_maker(urls: list[str]) -> Any:
    pending = list(urls)

    def make() -> Store:
        s = open_store(pending.pop(0))
        db = cast(SqlStore, s).db
        with db.transaction():
            db.execute(f"TRUNCATE {TABLES} RESTART IDENTITY")
        return s

    return make


@settings(max_examples=40, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(fleet=fleets(), rnd=st.randoms(use_true_random=False))
def test_converges_postgres(pg_schemas: list[str], fleet: Fleet, rnd: random.Random) -> None:
    check(fleet, rnd, PRICING, _pg_maker(pg_schemas))


@settings(max_examples=25, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(fleet=fleets(), rnd=st.randoms(use_true_random=False))
def test_converges_with_included_quota_postgres(
    pg_schemas: list[str], fleet: Fleet, rnd: random.Random
) -> None:
    check(fleet, rnd, QUOTA_PRICING, _pg_maker(pg_schemas))

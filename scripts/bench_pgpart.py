#!/usr/bin/env python3
"""PostgreSQL month partitions (schema version 7) against the unpartitioned layout before
them (version 6), on the same data in the same run.

Two fresh schemas of one database: BEFORE is migrated only up to version 6 (plain
observations, buckets and ledger_postings), AFTER to the current version (partitioned by
month). Both receive the same fleet-shaped pages through ``store.apply`` — ``--sources``
sources x ``--series`` series, one item per source per minute, ~30 % of the series active
per minute — starting ``--minutes-before`` minutes before a month boundary and going on
``--minutes-after`` minutes into the next month; the two schemas alternate page by page
(which goes first alternating too), so drift of the machine hits both alike.

Printed:

* bytes per sample: pg_total_relation_size summed over observations, buckets and
  ledger_postings (every partition, its indexes and TOAST), and over the whole schema;
* the hot path: wall time of ``apply`` per page over the pages of the new month (whose
  partitions exist: the steady state), median and range, per layout;
* compaction to the month boundary, which leaves the old month's rows removable but each
  series' anchor: BEFORE removes them by the per-series DELETE steps, AFTER empties the
  month partition (its kept rows found per series, TRUNCATE, kept rows put back); wall
  time of ``compact()`` each, then of the ``VACUUM observations`` the removal leaves to do,
  and the observations' size before and after; ``--rounds`` times on fresh data (median
  and range).

    .venv/bin/python scripts/bench_pgpart.py --url postgresql://postgres@127.0.0.1:5432/test
    .venv/bin/python scripts/bench_pgpart.py --url ... --series 500 --rounds 1   # quick
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import cast

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import psycopg

from billing_cli.core.types import Item, Sample
from billing_cli.pricing import Pricing
from billing_cli.store import open_store, schema, sql
from billing_cli.store.base import Batch
from billing_cli.store.sql import SqlStore

S = 1_000_000_000
M = 60 * S
D = 86400 * S
BOUNDARY = 1_793_491_200 * S  # 2026-11-01T00:00:00Z
RETENTION = 35 * D
PRICING = Pricing(price_per_unit="0.01", unit="GiB", rule_version="bench")
TABLES = ("observations", "buckets", "ledger_postings")


@contextmanager
def schemas(url: str, n: int) -> Iterator[list[str]]:
    names = [f"bench_{uuid.uuid4().hex[:10]}" for _ in range(n)]
    with psycopg.connect(url, autocommit=True) as conn:
        for s in names:
            conn.execute(f"CREATE SCHEMA {s}")
    sep = "&" if "?" in url else "?"
    try:
        yield [f"{url}{sep}options=-csearch_path%3D{s}" for s in names]
    finally:
        with psycopg.connect(url, autocommit=True) as conn:
            for s in names:
                conn.execute(f"DROP SCHEMA {s} CASCADE")


def open_at(url: str, *, partitioned: bool) -> SqlStore:
    if partitioned:
        return cast(SqlStore, open_store(url))
    previous = schema.PARTITIONED_VERSION - 1
    saved = sql.SCHEMA_VERSION, sql.migrations
    sql.SCHEMA_VERSION = previous
    sql.migrations = lambda d: schema.migrations(d)[:previous]  # type: ignore[assignment]
    try:
        return cast(SqlStore, open_store(url))
    finally:
        sql.SCHEMA_VERSION, sql.migrations = saved  # type: ignore[assignment]


def pages(args: argparse.Namespace) -> Iterator[tuple[bool, list[Batch]]]:
    """Per minute: (in the new month, one batch per source)."""
    rnd = random.Random(args.seed)
    totals = [[0] * args.series for _ in range(args.sources)]
    for k in range(-args.minutes_before, args.minutes_after):
        t = BOUNDARY + k * M + 7 * S
        batches = []
        for src in range(args.sources):
            tot = totals[src]
            samples = []
            for i in range(args.series):
                if rnd.random() < 0.3:
                    tot[i] += rnd.randrange(1, 5_000_000)
                samples.append(Sample(f"u{i:05d}", "", "vless-in", tot[i], tot[i] // 3))
            item = Item(t, f"node-{src:02d}", "prod", None, samples)
            batches.append(Batch([item], 1, PRICING, f"node-{src:02d}"))
        yield k >= 0, batches


def sizes(store: SqlStore) -> tuple[int, int]:
    tables = int(
        store.db.execute(
            "SELECT COALESCE(sum(pg_total_relation_size(relid)), 0) FROM ("
            + " UNION ".join(
                f"SELECT relid FROM pg_partition_tree('{t}') UNION SELECT '{t}'::regclass"
                for t in TABLES
            )
            + ") p"
        )[0][0]
    )
    whole = int(
        store.db.execute(
            "SELECT sum(pg_total_relation_size(c.oid)) FROM pg_class c"
            " WHERE c.relnamespace = current_schema()::regnamespace AND c.relkind IN ('r', 'm')"
        )[0][0]
    )
    return tables, whole


def obs_size(store: SqlStore) -> int:
    return int(
        store.db.execute(
            "SELECT sum(pg_total_relation_size(r)) FROM (SELECT relid AS r FROM"
            " pg_partition_tree('observations') UNION SELECT 'observations'::regclass) p"
        )[0][0]
    )


def med(xs: list[float]) -> str:
    return (
        f"median {statistics.median(xs):.4f} s (min {min(xs):.4f}, max {max(xs):.4f}, n={len(xs)})"
    )


def load(args: argparse.Namespace, stores: dict[str, SqlStore]) -> dict[str, list[float]]:
    """Apply every page to every store, alternating; per layout the new month's page times."""
    times: dict[str, list[float]] = {k: [] for k in stores}
    order = list(stores)
    for n, (steady, batches) in enumerate(pages(args)):
        for name in order if n % 2 == 0 else order[::-1]:
            for b in batches:
                began = time.perf_counter()
                stores[name].apply(b)
                if steady:
                    times[name].append(time.perf_counter() - began)
    return times


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--url", required=True)
    ap.add_argument("--sources", type=int, default=2)
    ap.add_argument("--series", type=int, default=2000)
    ap.add_argument("--minutes-before", type=int, default=120)
    ap.add_argument("--minutes-after", type=int, default=60)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    samples = args.sources * args.series * (args.minutes_before + args.minutes_after)
    print(
        f"{args.sources} sources x {args.series} series, {args.minutes_before} min before"
        f" 2026-11-01 + {args.minutes_after} after: {samples:,} samples per layout"
    )
    compact: dict[str, list[float]] = {"before": [], "after": []}
    vacuum: dict[str, list[float]] = {"before": [], "after": []}
    obs_bytes: dict[str, list[int]] = {"before": [], "after": []}
    loaded: dict[str, list[int]] = {"before": [], "after": []}
    removed: dict[str, int] = {}
    for rnd in range(args.rounds):
        with schemas(args.url, 2) as (u_before, u_after):
            stores = {
                "before": open_at(u_before, partitioned=False),
                "after": open_at(u_after, partitioned=True),
            }
            try:
                assert not stores["before"].db.partitioned
                assert stores["after"].db.partitioned
                times = load(args, stores)
                for name, s in stores.items():
                    loaded[name].append(obs_size(s))
                if rnd == 0:
                    print("\nbytes per sample (v6 unpartitioned -> v7 month partitions):")
                    for name, s in stores.items():
                        tables, whole = sizes(s)
                        print(
                            f"  {name:6}  three tables {tables / samples:6.1f} B/sample,"
                            f" whole schema {whole / samples:6.1f} B/sample"
                            f" ({whole / 1e6:.1f} MB)"
                        )
                    print(
                        "\nhot path: apply per page (one item, all series of a source), new month:"
                    )
                    for name, ts in times.items():
                        print(f"  {name:6}  {med(ts)}")
                for name, s in stores.items():
                    began = time.perf_counter()
                    rep = s.compact(now_ns=BOUNDARY + RETENTION, retention_ns=RETENTION)
                    compact[name].append(time.perf_counter() - began)
                    assert rep.complete
                    removed[name] = rep.observations_removed
                    # What the removal leaves to do: VACUUM of its dead rows (none after a
                    # TRUNCATE), and the space the observations hold afterwards.
                    began = time.perf_counter()
                    s.db.execute("VACUUM observations")
                    vacuum[name].append(time.perf_counter() - began)
                    obs_bytes[name].append(obs_size(s))
            finally:
                for s in stores.values():
                    s.close()
    assert removed["before"] == removed["after"], removed
    print(f"\ncompaction to 2026-11-01 ({removed['after']:,} observations removed each):")
    print(f"  before (DELETE steps)        {med(compact['before'])}")
    print(f"  after  (partition emptied)   {med(compact['after'])}")
    print("then VACUUM observations:")
    print(f"  before                       {med(vacuum['before'])}")
    print(f"  after                        {med(vacuum['after'])}")
    print("observations (tables + indexes), loaded -> compacted and vacuumed (first round):")
    for name in ("before", "after"):
        print(f"  {name:6}  {loaded[name][0] / 1e6:.1f} MB -> {obs_bytes[name][0] / 1e6:.1f} MB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

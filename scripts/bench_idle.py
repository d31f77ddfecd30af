#!/usr/bin/env python3
"""Measure what idle samples cost: observation rows and bytes per sample, and the apply
time of a steady cron page, in the fleet shape (DESIGN §10: every series in every item,
about 30 % of them active in a minute).

One source of ``--series`` series, one item a minute for ``--minutes`` minutes, applied as
the steady cron minute applies it: a page of 3 items, the 2 previous (the overlap, known)
and the new one. Printed: observations rows per sample, bytes of the observations table
(SQLite: ``dbstat``; PostgreSQL: ``pg_total_relation_size``) per sample, whole database
bytes per sample, and the median (min-max) apply time of the pages after the first
``--warmup``. Run it against another checkout with ``--code DIR`` to compare.

  .venv/bin/python scripts/bench_idle.py
  .venv/bin/python scripts/bench_idle.py --postgres postgresql://postgres@127.0.0.1:5432/test
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

M = 60_000_000_000
T0 = 1_793_000_000 * 1_000_000_000 - (1_793_000_000 * 1_000_000_000) % M


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--series", type=int, default=2000)
    p.add_argument("--minutes", type=int, default=240)
    p.add_argument("--active", type=float, default=0.3)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--postgres", default=None)
    p.add_argument("--code", default=str(Path(__file__).resolve().parent.parent))
    a = p.parse_args()
    sys.path.insert(0, a.code)
    from billing_cli.core.types import Item, Sample
    from billing_cli.pricing import Pricing
    from billing_cli.store import open_store
    from billing_cli.store.base import Batch

    pricing = Pricing(price_per_unit="0.05", unit="GB", rule_version="bench")
    rnd = random.Random(7)
    totals = [[rnd.randrange(10**9), rnd.randrange(10**9)] for _ in range(a.series)]
    items = []
    for m in range(a.minutes):
        for i in rnd.sample(range(a.series), round(a.series * a.active)):
            totals[i][0] += rnd.randrange(1, 10**6)
            totals[i][1] += rnd.randrange(1, 10**6)
        samples = [
            Sample(f"u{i}", f"u{i}@x", "vless", up, down) for i, (up, down) in enumerate(totals)
        ]
        items.append(Item(T0 + m * M, "node-1", "prod", "e1", samples))

    if a.postgres:
        import psycopg

        schema = f"bench_{uuid.uuid4().hex[:10]}"
        with psycopg.connect(a.postgres, autocommit=True) as conn:
            conn.execute(f"CREATE SCHEMA {schema}")
        sep = "&" if "?" in a.postgres else "?"
        url = f"{a.postgres}{sep}options=-csearch_path%3D{schema}"
    else:
        tmp = tempfile.mkdtemp()
        url = os.path.join(tmp, "bench.db")
    store = open_store(url)
    times = []
    for m in range(a.minutes):
        page = items[max(0, m - 2) : m + 1]
        run = store.start_run("collect", ["src"])
        t = time.perf_counter()
        store.apply(Batch(page, run, pricing, "src"))
        times.append(time.perf_counter() - t)
    db = store.db  # type: ignore[attr-defined]
    rows = int(db.execute("SELECT count(*) FROM observations")[0][0])
    samples = a.series * a.minutes
    if a.postgres:
        obs_bytes = int(db.execute("SELECT pg_total_relation_size('observations')")[0][0])
        total = int(
            db.execute(
                "SELECT sum(pg_total_relation_size(c.oid)) FROM pg_class c JOIN pg_namespace n"
                " ON n.oid = c.relnamespace WHERE n.nspname = current_schema() AND c.relkind = 'r'"
            )[0][0]
        )
    else:
        obs_bytes = int(
            db.execute("SELECT sum(pgsize) FROM dbstat WHERE name = 'observations'")[0][0]
        )
        total = int(
            db.execute(
                "SELECT page_count * page_size FROM pragma_page_count(), pragma_page_size()"
            )[0][0]
        )
    store.close()
    steady = times[a.warmup :]
    print(
        f"{'postgres' if a.postgres else 'sqlite'} code={a.code}: {samples} samples,"
        f" observations rows/sample {rows / samples:.3f},"
        f" observations bytes/sample {obs_bytes / samples:.1f},"
        f" database bytes/sample {total / samples:.1f};"
        f" steady page apply median {statistics.median(steady) * 1000:.1f} ms"
        f" ({min(steady) * 1000:.1f}-{max(steady) * 1000:.1f}, {len(steady)} pages)"
    )
    if a.postgres:
        with psycopg.connect(a.postgres, autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA {schema} CASCADE")


if __name__ == "__main__":
    main()

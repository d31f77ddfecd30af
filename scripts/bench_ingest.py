#!/usr/bin/env python3
"""Measure the store write path: synthetic samples applied page by page (Store.apply).

The data is ``scripts/make_snapshots.py``'s generator (the same the other benchmarks and
the kill tests use): 2,000 series, one item per minute, about 30% of the series active in
each minute, a few counter restarts (epoch changes). Figures printed per back end:
samples/s of ``apply`` plus the final close (SQLite checkpoints its WAL then), wall time,
peak RSS of the process, database bytes per sample. With ``--parse`` a second figure
runs the same data as NDJSON through ``billing_cli.wire.iter_ingest`` + ``apply`` (what
``billing ingest`` does).

Examples:

  .venv/bin/python scripts/bench_ingest.py                         # 1,000,000 samples, SQLite
  .venv/bin/python scripts/bench_ingest.py --parse
  .venv/bin/python scripts/bench_ingest.py --postgres postgresql://postgres@127.0.0.1:5432/test
  .venv/bin/python scripts/bench_ingest.py --samples 200000 --page-samples 6000 --full-items
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import make_snapshots

from billing_cli._time import parse_rfc3339_ns
from billing_cli.core.types import Item, Sample
from billing_cli.pricing import Pricing
from billing_cli.store import open_store
from billing_cli.store.base import Batch

PRICING = Pricing(price_per_unit="0.05", unit="GB", rule_version="bench")


def _items(a: argparse.Namespace) -> Iterator[dict[str, Any]]:
    per_minute = max(1, round(a.series * a.active))
    minutes = -(-a.samples // per_minute)
    return make_snapshots.generate(
        series=a.series, minutes=minutes, nodes=1, active=a.active, restarts=a.restarts, seed=7
    )


def to_item(d: dict[str, Any], full: list[Sample] | None = None) -> Item:
    """A ``make_snapshots`` snapshot as an ``Item`` (with ``full``: every series in it)."""
    samples = [
        Sample(
            s["uuid"],
            s["email"],
            s["inbound_tag"],
            s["uplink_bytes_total"],
            s["downlink_bytes_total"],
        )
        for s in d["samples"]
    ]
    if full is not None:
        # "Full" items: every series is reported every minute (idle ones unchanged).
        by_uuid = {s.uuid: s for s in samples}
        for i, s in enumerate(full):
            full[i] = by_uuid.get(s.uuid, s)
        samples = list(full)
    return Item(
        parse_rfc3339_ns(d["collected_at"]), d["node_id"], d["env"], d["counter_epoch"], samples
    )


def pages(a: argparse.Namespace) -> Iterator[list[Item]]:
    full: list[Sample] | None = None
    if a.full_items:
        full = [
            Sample(f"u-000-{s:05d}", f"user{s}@example.com", ["vless-in", "trojan-in"][s % 2], 0, 0)
            for s in range(a.series)
        ]
    page: list[Item] = []
    count = 0
    for d in _items(a):
        it = to_item(d, full)
        if full is not None and it.counter_epoch != getattr(pages, "_epoch", it.counter_epoch):
            full[:] = [s._replace(uplink_total=0, downlink_total=0) for s in full]
            it = to_item(d, full)
        pages._epoch = it.counter_epoch  # type: ignore[attr-defined]
        page.append(it)
        count += len(it.samples)
        if count >= a.samples:
            break
        if sum(len(i.samples) for i in page) >= a.page_samples:
            yield page
            page = []
    if page:
        yield page


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def db_bytes(url: str) -> int:
    if not url.startswith("postgresql"):
        return sum(os.path.getsize(p) for p in (url, url + "-wal") if os.path.exists(p))
    store = open_store(url)
    db = store.db  # type: ignore[attr-defined]
    rows = db.execute(
        "SELECT COALESCE(SUM(pg_total_relation_size(c.oid)), 0) FROM pg_class c"
        " JOIN pg_namespace n ON n.oid = c.relnamespace"
        " WHERE n.nspname = current_schema() AND c.relkind IN ('r', 'm')"
    )
    store.close()
    return int(rows[0][0])


def run_store(label: str, url: str, a: argparse.Namespace) -> None:
    store = open_store(url)
    run_id = store.start_run("ingest", ["bench"])
    applied = 0.0
    cpu = 0.0
    n = 0
    postings = 0
    t_wall = time.perf_counter()
    for page in pages(a):
        t, c = time.perf_counter(), time.process_time()
        rep = store.apply(Batch(page, run_id, PRICING, "bench"))
        applied += time.perf_counter() - t
        cpu += time.process_time() - c
        n += rep.samples
        postings += rep.postings
    # What `billing ingest` pays after its last page: SQLite copies the WAL back into
    # the database file when the store closes. Counted, so big pages cannot hide work
    # in a WAL that no page paid for.
    t = time.perf_counter()
    store.close()
    applied += time.perf_counter() - t
    wall = time.perf_counter() - t_wall
    size = db_bytes(url)
    print(
        f"{label}: {n:,} samples in {applied:.2f} s apply+close ({n / applied:,.0f} samples/s;"
        f" this process's CPU {cpu:.2f} s = {n / cpu:,.0f} samples/CPU-s);"
        f" wall incl. generation {wall:.2f} s; postings {postings:,};"
        f" peak RSS {rss_mb():.0f} MB; DB {size / 1e6:.1f} MB = {size / n:.1f} bytes/sample"
    )


def run_parse(label: str, url: str, a: argparse.Namespace) -> None:
    from billing_cli.wire import iter_ingest

    with tempfile.NamedTemporaryFile(suffix=".ndjson", delete=False) as f:
        make_snapshots.write(f, _limit(_items(a), a.samples), "ndjson", 1)
        path = f.name
    store = open_store(url)
    run_id = store.start_run("ingest", ["bench"])
    n = 0
    t = time.perf_counter()
    with open(path, "rb") as fh:
        for items, rejections in iter_ingest(fh, a.page_samples):
            n += store.apply(Batch(items, run_id, PRICING, "bench", rejections)).samples
    took = time.perf_counter() - t
    store.close()
    os.unlink(path)
    print(
        f"{label} NDJSON parse+apply (active-only items, as make_snapshots writes them):"
        f" {n:,} samples in {took:.2f} s ({n / took:,.0f} samples/s);"
        f" peak RSS {rss_mb():.0f} MB"
    )


def _limit(items: Iterator[dict[str, Any]], limit: int) -> Iterator[dict[str, Any]]:
    n = 0
    for it in items:
        if n >= limit:
            return
        n += len(it["samples"])
        yield it


def _pg_schema(base: str) -> tuple[str, str]:
    import psycopg

    name = f"bench_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(base, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {name}")
    sep = "&" if "?" in base else "?"
    return name, f"{base}{sep}options=-csearch_path%3D{name}"


def _pg_drop(base: str, name: str) -> None:
    import psycopg

    with psycopg.connect(base, autocommit=True) as conn:
        conn.execute(f"DROP SCHEMA {name} CASCADE")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--samples", type=int, default=1_000_000)
    p.add_argument("--series", type=int, default=2000)
    p.add_argument("--active", type=float, default=0.3)
    p.add_argument("--restarts", type=int, default=3)
    p.add_argument("--page-samples", type=int, default=6000, help="samples per apply (page)")
    p.add_argument(
        "--full-items",
        action="store_true",
        help="every series in every item (idle ones unchanged) instead of active ones only",
    )
    p.add_argument("--sqlite", default=None, help="SQLite file (default: a temporary file)")
    p.add_argument("--no-sqlite", action="store_true")
    p.add_argument("--postgres", default=None, help="PostgreSQL URL (a fresh schema is used)")
    p.add_argument("--parse", action="store_true", help="also measure NDJSON parse + apply")
    p.add_argument(
        "--included-bytes",
        type=int,
        default=0,
        help="included quota per uuid per month (> 0 exercises quota re-rating)",
    )
    a = p.parse_args()
    global PRICING
    if a.included_bytes:
        PRICING = PRICING.model_copy(update={"included_bytes_default": a.included_bytes})
    print(
        f"# {a.samples:,} samples, {a.series} series, active {a.active:.0%},"
        f" {a.restarts} restarts, ~{a.page_samples} samples per page,"
        f" {'full' if a.full_items else 'active-only'} items,"
        f" included quota {a.included_bytes} B/uuid"
    )
    with tempfile.TemporaryDirectory() as tmp:
        if not a.no_sqlite:
            path = a.sqlite or os.path.join(tmp, "bench.db")
            for suffix in ("", "-wal", "-shm"):
                if os.path.exists(path + suffix):
                    os.unlink(path + suffix)
            run_store("sqlite", path, a)
            if a.parse:
                run_parse("sqlite", os.path.join(tmp, "bench-parse.db"), a)
        if a.postgres:
            name, url = _pg_schema(a.postgres)
            try:
                run_store("postgres", url, a)
            finally:
                _pg_drop(a.postgres, name)
            if a.parse:
                name, url = _pg_schema(a.postgres)
                try:
                    run_parse("postgres", url, a)
                finally:
                    _pg_drop(a.postgres, name)


if __name__ == "__main__":
    main()

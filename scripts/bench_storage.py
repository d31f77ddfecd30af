#!/usr/bin/env python3
"""Storage of the store in the fleet shape: bytes per sample, and the size over 60 days.

Two measurements, each in its own process (so each peak RSS is its own), on SQLite and,
with ``--pg URL``, on PostgreSQL (a fresh schema in that database, dropped afterwards):

``size``  ingest ``--samples`` samples in the fleet shape of issue 12 (``--series`` series
          per node, every series in every item with the idle ones unchanged, ~30 % active
          a minute, a few counter restarts; ``scripts/make_snapshots.py``'s generator) through
          ``Store.apply`` in pages, then report the database size divided by the samples,
          and rows and bytes per table. SQLite: ``page_count * page_size`` after a
          ``wal_checkpoint(TRUNCATE)``; PostgreSQL: ``pg_total_relation_size`` of every
          table (partitions included) in the store's schema.

``days``  simulate ``--days`` days (default 60) at a reduced series count (``--day-series``,
          one item a minute, the same shape), with the real default retention horizon
          (35 days), so the size must flatten once the horizon is reached. A simulated clock
          advances page by page (``--page-minutes`` of items each); after every page the
          store is compacted with ``compact(now_ns=<simulated now>, daily=True,
          budget_s=1)``, exactly as ``billing collect`` does after each run (a cycle at most
          once a day, bounded in time). At the end of each simulated day the database size
          is printed: day, samples so far, database bytes, growth that day. On PostgreSQL
          the store's tables are ``VACUUM``ed at the end of each simulated day (what
          autovacuum does during a real day; ``--no-vacuum`` to leave it out), so space freed
          by compaction can be reused as it would be. At the end: the mean daily growth
          after the horizon over the mean daily growth before it (1 = no flattening).

The items are dated from a fixed day (the 15th of a month, so that whole months fall
behind the horizon during 60 days); the run horizon of the commands (``run start -
retention``) is not applied, since the simulated clock is not the process clock: what is
refused is only what compaction has cut, as in ``tests/test_retention.py``.

Examples:

  .venv/bin/python scripts/bench_storage.py                                # both, SQLite
  .venv/bin/python scripts/bench_storage.py --pg postgresql://postgres@127.0.0.1:5432/test
  .venv/bin/python scripts/bench_storage.py --mode size --samples 1000000 --no-sqlite \\
      --pg postgresql://postgres@127.0.0.1:5432/test
  .venv/bin/python scripts/bench_storage.py --mode days --days 60 --day-series 100
  .venv/bin/python scripts/bench_storage.py --mode days --days 6 --retention-days 3  # quick
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT))

NS_PER_S = 1_000_000_000
NS_PER_MIN = 60 * NS_PER_S
NS_PER_DAY = 86_400 * NS_PER_S
# Day 1 of the simulation: a fixed day, the 15th of a month (months fall behind the horizon
# whole during a 60-day run, for a store that keeps data by month).
DAYS_START = datetime(2026, 1, 15, tzinfo=UTC)
TARGET_SQLITE_BYTES = 30  # per sample, issue 12
TARGET_PG_BYTES = 90
TARGET_RSS_MB = 300


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--mode", choices=["size", "days", "both"], default="both")
    p.add_argument(
        "--db",
        default=None,
        help="new SQLite file, kept (default: temporary); the days one is X-days.db",
    )
    p.add_argument("--no-sqlite", action="store_true", help="PostgreSQL only")
    p.add_argument("--pg", default=None, help="PostgreSQL URL (a fresh schema in it is used)")
    g = p.add_argument_group("size")
    g.add_argument("--samples", type=int, default=1_000_000, help="samples (default 1,000,000)")
    g.add_argument("--series", type=int, default=2000, help="series per node (default 2000)")
    g.add_argument("--nodes", type=int, default=1, help="nodes (default 1)")
    g.add_argument("--restarts", type=int, default=3, help="counter restarts (default 3)")
    g.add_argument("--page-samples", type=int, default=100_000, help="samples per apply")
    g = p.add_argument_group("days")
    g.add_argument("--days", type=int, default=60, help="simulated days (default 60)")
    g.add_argument("--day-series", type=int, default=100, help="series (default 100)")
    g.add_argument("--retention-days", type=int, default=None, help="default: the store's")
    g.add_argument("--day-restarts", type=int, default=6, help="counter restarts (default 6)")
    g.add_argument("--page-minutes", type=int, default=60, help="items per apply (default 60)")
    g.add_argument("--no-vacuum", action="store_true", help="no daily VACUUM on PostgreSQL")
    p.add_argument("--active", type=float, default=0.3, help="active share a minute (0.3)")
    p.add_argument("--json", action="store_true", help="one JSON line per measurement as well")
    p.add_argument("--child", nargs=2, metavar=("MODE", "BACKEND"), help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.retention_days is None:
        from billing_cli.store.base import DEFAULT_RETENTION_NS

        a.retention_days = DEFAULT_RETENTION_NS // NS_PER_DAY
    if a.days < 1 or a.retention_days < 1 or 1440 % a.page_minutes:
        p.error("--days and --retention-days must be >= 1, --page-minutes divide 1440")
    if a.no_sqlite and not a.pg:
        p.error("--no-sqlite needs --pg")
    return a


# --- data ------------------------------------------------------------------------------------


def items(
    *,
    series: int,
    nodes: int,
    minutes: int,
    active: float,
    restarts: int,
    start_ns: int | None,
    limit: int | None = None,
) -> Iterator[Any]:
    """``make_snapshots``' fleet shape (every series in every item, v4 UUIDs) as ``Item``s."""
    import make_snapshots
    from bench_ingest import to_item

    n = 0
    for d in make_snapshots.generate(
        series=series * nodes,
        minutes=minutes,
        nodes=nodes,
        active=active,
        restarts=restarts,
        seed=7,
        full_items=True,
        uuids="v4",
        start_ns=start_ns,
    ):
        if limit is not None and n >= limit:
            return
        it = to_item(d)
        n += len(it.samples)
        yield it


# --- sizes -----------------------------------------------------------------------------------


class Sizer:
    """Database size and per-table figures through a connection of its own (not the
    store's), so it measures whatever layout the store has."""

    def __init__(self, backend: str, target: str) -> None:
        self.backend = backend
        self.target = target

    def total(self) -> dict[str, int]:
        if self.backend == "sqlite":
            with sqlite3.connect(self.target) as c:
                busy, _, _ = c.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
                pages = c.execute("PRAGMA page_count").fetchone()[0]
                size = c.execute("PRAGMA page_size").fetchone()[0]
                free = c.execute("PRAGMA freelist_count").fetchone()[0]
            c.close()
            return {"bytes": pages * size, "free_bytes": free * size, "checkpoint_busy": busy}
        import psycopg

        with psycopg.connect(self.target, autocommit=True) as c:
            row = c.execute(
                "SELECT COALESCE(SUM(pg_total_relation_size(c.oid)), 0) FROM pg_class c"
                " JOIN pg_namespace n ON n.oid = c.relnamespace"
                " WHERE n.nspname = current_schema() AND c.relkind IN ('r', 'm')"
            ).fetchone()
        assert row is not None
        return {"bytes": int(row[0])}

    def vacuum(self) -> float:
        """VACUUM the schema's tables (never the database: other schemas are not ours)."""
        import psycopg

        t = time.perf_counter()
        with psycopg.connect(self.target, autocommit=True) as c:
            tables = [
                r[0]
                for r in c.execute(
                    "SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
                    " WHERE n.nspname = current_schema() AND c.relkind IN ('r', 'p')"
                    " AND NOT c.relispartition"
                )
            ]
            for name in tables:
                c.execute(f'VACUUM "{name}"')
        return time.perf_counter() - t

    def tables(self) -> list[tuple[str, int, int]]:
        """(table, rows, bytes with its indexes), largest first."""
        out: list[tuple[str, int, int]] = []
        if self.backend == "sqlite":
            with sqlite3.connect(self.target) as c:
                names = [
                    r[0]
                    for r in c.execute(
                        "SELECT name FROM sqlite_master WHERE type = 'table'"
                        " AND name NOT LIKE 'sqlite_%'"
                    )
                ]
                sizes = dict(
                    c.execute(
                        "SELECT m.tbl_name, SUM(d.pgsize) FROM dbstat d"
                        " JOIN sqlite_master m ON m.name = d.name GROUP BY m.tbl_name"
                    ).fetchall()
                )
                for name in names:
                    rows = c.execute(f'SELECT count(*) FROM "{name}"').fetchone()[0]
                    out.append((name, rows, int(sizes.get(name, 0))))
            c.close()
        else:
            import psycopg

            with psycopg.connect(self.target, autocommit=True) as c:
                # A partitioned table has no storage of its own: its partitions' sizes.
                sized = c.execute(
                    "SELECT c.relname, CASE WHEN c.relkind = 'p' THEN (SELECT"
                    " COALESCE(SUM(pg_total_relation_size(t.relid)), 0)"
                    " FROM pg_partition_tree(c.oid) t) ELSE pg_total_relation_size(c.oid) END"
                    " FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
                    " WHERE n.nspname = current_schema() AND c.relkind IN ('r', 'p')"
                    " AND NOT c.relispartition"
                ).fetchall()
                for name, size in sized:
                    row = c.execute(f'SELECT count(*) FROM "{name}"').fetchone()
                    assert row is not None
                    out.append((name, int(row[0]), int(size)))
        return sorted(out, key=lambda t: (-t[2], t[0]))


def print_tables(sizer: Sizer, samples: int) -> list[tuple[str, int, int]]:
    tables = sizer.tables()
    print(f"  {'table':<28} {'rows':>12} {'bytes':>14} {'B/sample':>9}")
    for name, rows, size in tables:
        if rows or size:
            print(f"  {name:<28} {rows:>12,} {size:>14,} {size / max(samples, 1):>9.1f}")
    return tables


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# --- the two measurements (each in a child process) ------------------------------------------


def sqlite_path(mode: str, db: str | None, tmp: str) -> str:
    """The days measurement writes beside ``--db``: ``X.db`` -> ``X-days.db``."""
    if db is None:
        return os.path.join(tmp, f"bench-storage-{mode}.db")
    if mode == "size":
        return db
    root, ext = os.path.splitext(db)
    return f"{root}-days{ext}"


def open_target(mode: str, backend: str, a: argparse.Namespace, tmp: str) -> tuple[str, str | None]:
    """The store URL and, for PostgreSQL, the fresh schema's name."""
    if backend == "sqlite":
        path = sqlite_path(mode, a.db, tmp)
        # Never measure (or overwrite) an existing database.
        if os.path.exists(path):
            raise SystemExit(f"{path} exists: give --db a new file")
        return path, None
    import psycopg

    name = f"bench_storage_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(a.pg, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {name}")
    sep = "&" if "?" in a.pg else "?"
    return f"{a.pg}{sep}options=-csearch_path%3D{name}", name


def drop_schema(a: argparse.Namespace, name: str) -> None:
    import psycopg

    with psycopg.connect(a.pg, autocommit=True) as conn:
        conn.execute(f"DROP SCHEMA {name} CASCADE")


def _pricing() -> Any:
    from billing_cli.pricing import Pricing

    return Pricing(price_per_unit="0.05", unit="GB", rule_version="bench")


def measure_size(backend: str, url: str, a: argparse.Namespace) -> dict[str, Any]:
    from billing_cli.store import open_store
    from billing_cli.store.base import DEFAULT_RETENTION_NS, Batch

    pricing = _pricing()
    minutes = -(-a.samples // (a.series * a.nodes))
    store = open_store(url)
    run_id = store.start_run("ingest", ["bench"])
    n = 0
    page: list[Any] = []
    in_page = 0
    t0 = time.perf_counter()
    applied = 0.0
    for it in items(
        series=a.series,
        nodes=a.nodes,
        minutes=minutes,
        active=a.active,
        restarts=a.restarts,
        start_ns=None,
        limit=a.samples,
    ):
        page.append(it)
        in_page += len(it.samples)
        if in_page >= a.page_samples:
            t = time.perf_counter()
            n += store.apply(
                Batch(page, run_id, pricing, "bench", retention_ns=DEFAULT_RETENTION_NS)
            ).samples
            applied += time.perf_counter() - t
            page, in_page = [], 0
    if page:
        t = time.perf_counter()
        n += store.apply(
            Batch(page, run_id, pricing, "bench", retention_ns=DEFAULT_RETENTION_NS)
        ).samples
        applied += time.perf_counter() - t
    t = time.perf_counter()
    store.close()
    applied += time.perf_counter() - t
    wall = time.perf_counter() - t0
    sizer = Sizer(backend, url)
    total = sizer.total()
    per_sample = total["bytes"] / n
    target = TARGET_SQLITE_BYTES if backend == "sqlite" else TARGET_PG_BYTES
    print(
        f"\n## size, {backend}: {n:,} samples ({a.nodes} node(s) x {a.series} series,"
        f" {minutes} items a node, every series in every item, ~{a.active:.0%} active,"
        f" {a.restarts} restarts), pages of ~{a.page_samples:,} samples"
    )
    print(
        f"  database {total['bytes']:,} bytes = {per_sample:.1f} bytes/sample"
        f" (target <= {target}: {'met' if per_sample <= target else 'NOT met'})"
        + (f"; free pages {total['free_bytes']:,} bytes" if "free_bytes" in total else "")
    )
    print(
        f"  apply+close {applied:.2f} s ({n / applied:,.0f} samples/s), wall incl. generation"
        f" {wall:.2f} s, peak RSS {rss_mb():.0f} MB"
    )
    tables = print_tables(sizer, n)
    return {
        "mode": "size",
        "backend": backend,
        "samples": n,
        "db_bytes": total["bytes"],
        "bytes_per_sample": round(per_sample, 1),
        "apply_s": round(applied, 2),
        "wall_s": round(wall, 2),
        "peak_rss_mb": round(rss_mb()),
        "tables": {t[0]: {"rows": t[1], "bytes": t[2]} for t in tables},
    }


def measure_days(backend: str, url: str, a: argparse.Namespace) -> dict[str, Any]:
    from billing_cli.store import open_store
    from billing_cli.store.base import Batch

    pricing = _pricing()
    retention_ns = a.retention_days * NS_PER_DAY
    start = int(DAYS_START.timestamp()) * NS_PER_S
    sizer = Sizer(backend, url)
    store = open_store(url)
    run_id = store.start_run("collect", ["bench"])
    vacuum = backend == "postgres" and not a.no_vacuum
    print(
        f"\n## days, {backend}: {a.days} simulated days from {DAYS_START:%Y-%m-%d},"
        f" {a.day_series} series, one item a minute (every series, ~{a.active:.0%} active),"
        f" {a.day_restarts} restarts, retention {a.retention_days} days, compact(daily=True)"
        f" after every page of {a.page_minutes} minutes"
        + ("; VACUUM at each day's end" if vacuum else "")
    )
    hdr = (
        f"  {'day':>4} {'samples':>12} {'db bytes':>14} {'growth':>12} {'B/sample':>9}"
        f" {'obs removed':>12} {'apply s':>8}"
    )
    print(hdr)
    per_day: list[dict[str, int | float]] = []
    at_horizon: list[tuple[str, int, int]] = []
    previous = sizer.total()["bytes"]
    n = 0
    page: list[Any] = []
    day = 1
    removed = 0
    apply_s = compact_s = vacuum_s = 0.0
    day_apply = 0.0
    t0 = time.perf_counter()
    stream = items(
        series=a.day_series,
        nodes=1,
        minutes=a.days * 1440,
        active=a.active,
        restarts=a.day_restarts,
        start_ns=start,
    )
    minute = 0
    for it in stream:
        page.append(it)
        minute += 1
        if len(page) < a.page_minutes:
            continue
        t = time.perf_counter()
        n += store.apply(Batch(page, run_id, pricing, "bench")).samples
        took = time.perf_counter() - t
        apply_s += took
        day_apply += took
        page = []
        # The simulated now: the end of the page's last minute (collect runs then).
        now = start + minute * NS_PER_MIN
        t = time.perf_counter()
        rep = store.compact(now_ns=now, retention_ns=retention_ns, budget_s=1.0, daily=True)
        compact_s += time.perf_counter() - t
        removed += rep.observations_removed
        if minute % 1440 == 0:
            if vacuum:
                vacuum_s += sizer.vacuum()
            size = sizer.total()["bytes"]
            row = {
                "day": day,
                "samples": n,
                "db_bytes": size,
                "growth": size - previous,
                "observations_removed": removed,
                "apply_s": round(day_apply, 2),
            }
            per_day.append(row)
            print(
                f"  {day:>4} {n:>12,} {size:>14,} {size - previous:>12,} {size / n:>9.1f}"
                f" {removed:>12,} {day_apply:>8.2f}",
                flush=True,
            )
            previous = size
            if day == a.retention_days:
                at_horizon = sizer.tables()
            day += 1
            removed = 0
            day_apply = 0.0
    store.close()
    wall = time.perf_counter() - t0
    sizes = [int(r["db_bytes"]) for r in per_day]
    r = a.retention_days
    ratio = None
    if len(sizes) > r:
        before = sizes[r - 1] / r  # from an empty store to the end of day r
        after = (sizes[-1] - sizes[r - 1]) / (len(sizes) - r)
        ratio = after / before if before else None
        print(
            f"  mean daily growth: days 1-{r} {before:,.0f} bytes, days {r + 1}-{len(sizes)}"
            f" {after:,.0f} bytes; flattening ratio {ratio:.3f} (1 = not flattening at all)"
        )
    else:
        print(f"  (no flattening ratio: {len(sizes)} days do not pass the {r}-day horizon)")
    print(
        f"  {n:,} samples in {wall:.1f} s (apply {apply_s:.1f} s, compact {compact_s:.1f} s"
        + (f", VACUUM {vacuum_s:.1f} s" if vacuum else "")
        + f"), peak RSS {rss_mb():.0f} MB; at the end:"
    )
    tables = print_tables(sizer, n)
    growth: dict[str, list[float]] = {}
    if at_horizon and len(sizes) > r:
        # Which tables keep growing once the horizon is reached (the ledger and buckets
        # are never compacted, DESIGN §6), which stop.
        then = {t[0]: t[2] for t in at_horizon}
        print(f"  mean daily growth by table, days 1-{r} and {r + 1}-{len(sizes)}:")
        for name, _, size in tables:
            b = then.get(name, 0) / r
            g = (size - then.get(name, 0)) / (len(sizes) - r)
            growth[name] = [round(b), round(g)]
            if b or g:
                print(f"  {name:<28} {b:>14,.0f} {g:>14,.0f}")
    return {
        "mode": "days",
        "table_daily_growth": growth,
        "backend": backend,
        "days": per_day,
        "flattening_ratio": None if ratio is None else round(ratio, 4),
        "samples": n,
        "wall_s": round(wall, 1),
        "apply_s": round(apply_s, 1),
        "compact_s": round(compact_s, 1),
        "vacuum_s": round(vacuum_s, 1),
        "peak_rss_mb": round(rss_mb()),
        "tables": {t[0]: {"rows": t[1], "bytes": t[2]} for t in tables},
    }


def child(a: argparse.Namespace) -> int:
    mode, backend = a.child
    with tempfile.TemporaryDirectory(prefix="bench-storage-") as tmp:
        url, schema = open_target(mode, backend, a, tmp)
        try:
            result = (measure_size if mode == "size" else measure_days)(backend, url, a)
        finally:
            if schema is not None:
                drop_schema(a, schema)
    print("RESULT " + json.dumps(result), flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    if a.child:
        return child(a)
    t0 = time.perf_counter()
    backends = ([] if a.no_sqlite else ["sqlite"]) + (["postgres"] if a.pg else [])
    modes = ["size", "days"] if a.mode == "both" else [a.mode]
    args = sys.argv[1:] if argv is None else argv
    results: list[dict[str, Any]] = []
    for mode in modes:
        for backend in backends:
            p = subprocess.Popen(
                [sys.executable, __file__, *args, "--child", mode, backend],
                stdout=subprocess.PIPE,
                text=True,
                cwd=ROOT,
            )
            assert p.stdout is not None
            for line in p.stdout:
                if line.startswith("RESULT "):
                    results.append(json.loads(line[7:]))
                    if a.json:
                        print(line[7:], end="")
                else:
                    print(line, end="", flush=True)
            if p.wait() != 0:
                print(f"{mode} on {backend} failed (exit {p.returncode})", file=sys.stderr)
                return 1
    print(f"\n# summary (cores={os.cpu_count()}, load average {os.getloadavg()[0]:.1f})")
    for r in results:
        ok = "met" if r["peak_rss_mb"] <= TARGET_RSS_MB else "NOT met"
        if r["mode"] == "size":
            print(
                f"  size {r['backend']:<8} {r['bytes_per_sample']:>6} bytes/sample,"
                f" {r['samples']:,} samples, peak RSS {r['peak_rss_mb']} MB ({ok})"
            )
        else:
            growth = [d["growth"] for d in r["days"]]
            print(
                f"  days {r['backend']:<8} {r['days'][-1]['db_bytes']:,} bytes after"
                f" {len(r['days'])} days, flattening ratio {r['flattening_ratio']},"
                f" median daily growth {statistics.median(growth):,.0f} bytes,"
                f" peak RSS {r['peak_rss_mb']} MB ({ok}), {r['wall_s']} s"
            )
    print(f"  whole command: {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

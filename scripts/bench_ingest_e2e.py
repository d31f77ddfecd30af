#!/usr/bin/env python3
"""``billing ingest`` end to end against the naive landing floor, measured in the same run.

Input: NDJSON in the fleet shape of issue 12, written by ``scripts/make_snapshots.py``
(``--full-items --uuids v4``): 2,000 series with random v4 UUIDs, every series in every
item (the idle ones unchanged), ~30 % active per minute, 3 counter restarts; 1,000,000
samples (500 items, ~167 MB) by default.

Every configuration runs in its own process, round after round (``--reps``), so each round
has its own floor and peak RSS is that process's:

  floor     the issue's naive landing floor: stdlib ``json.loads`` per line, then
            ``executemany`` of one row per sample into a SQLite table keyed by series and
            time (``PRIMARY KEY (node_id, env, uuid, inbound_tag, collected_at_ns)``), one
            transaction, with the store's PRAGMAs; closing included.
  sqlite    ``python -m billing_cli --db FILE ingest --json INPUT``: the real command,
            interpreter start-up and imports included, into a new SQLite file.
  postgres  the same into a fresh PostgreSQL schema (``--postgres URL``; dropped after).
  before-sqlite, before-postgres
            the same command from another checkout of the code (``--before DIR``, e.g.
            ``git archive COMMIT billing_cli | tar -x -C DIR``): the previous ingest,
            measured in the same rounds.

The split comes from the command's own ``-v`` log lines (``--log-format json``): parse
(reading and validating, spool writes excluded), spool write, spool read, apply (the
store's ``apply``, its commits and closing the store, spool reads excluded); "other" is
the rest of the wall time (interpreter start-up, imports, the registry, the summary).

  .venv/bin/python scripts/bench_ingest_e2e.py --reps 5 \\
      --postgres postgresql://postgres@127.0.0.1:5432/test
  .venv/bin/python scripts/bench_ingest_e2e.py --samples 200000 --reps 3 --configs floor,sqlite
  .venv/bin/python scripts/bench_ingest_e2e.py --before /tmp/old \\
      --configs floor,sqlite,before-sqlite
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT))

TARGETS = {"sqlite": 150_000, "postgres": 120_000}  # samples/s, issue 12
TARGET_RATIO = 0.7  # at most this many times the floor's time


def make_input(path: Path, a: argparse.Namespace) -> dict[str, Any]:
    import make_snapshots

    minutes = -(-a.samples // a.series)
    items = make_snapshots.generate(
        series=a.series,
        minutes=minutes,
        nodes=1,
        active=a.active,
        restarts=a.restarts,
        seed=7,
        full_items=True,
        uuids="v4",
    )
    with path.open("wb") as f:
        n = make_snapshots.write(f, items, "ndjson", 1)
    return {"samples": n, "items": minutes, "bytes": path.stat().st_size}


# --- the floor (a child process) -------------------------------------------------------------


def floor(path: str, db: str) -> int:
    import sqlite3

    from billing_cli._time import parse_rfc3339_ns

    conn = sqlite3.connect(db, isolation_level=None)
    for pragma in (
        "journal_mode = WAL",
        "synchronous = NORMAL",
        "cache_size = -65536",
        "temp_store = MEMORY",
        "wal_autocheckpoint = 65536",
    ):
        conn.execute(f"PRAGMA {pragma}")
    conn.execute(
        "CREATE TABLE obs (node_id TEXT NOT NULL, env TEXT NOT NULL, uuid TEXT NOT NULL,"
        " inbound_tag TEXT NOT NULL, collected_at_ns INTEGER NOT NULL,"
        " uplink_total INTEGER NOT NULL, downlink_total INTEGER NOT NULL,"
        " PRIMARY KEY (node_id, env, uuid, inbound_tag, collected_at_ns)) WITHOUT ROWID"
    )
    n = 0
    conn.execute("BEGIN IMMEDIATE")
    with open(path, "rb") as fh:
        for line in fh:
            d = json.loads(line)
            t = parse_rfc3339_ns(d["collected_at"])
            node, env = d["node_id"], d["env"]
            rows = [
                (node, env, s["uuid"], s["inbound_tag"], t, s["uplink_bytes_total"],
                 s["downlink_bytes_total"])
                for s in d["samples"]
            ]  # fmt: skip
            conn.executemany("INSERT INTO obs VALUES (?,?,?,?,?,?,?)", rows)
            n += len(rows)
    conn.execute("COMMIT")
    conn.close()
    return n


# --- running and measuring -------------------------------------------------------------------


def timed(cmd: list[str], env: dict[str, str], cwd: Path) -> tuple[float, float, str, str]:
    """Wall seconds, peak RSS (MB) of the child, its stdout and stderr."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        t = time.perf_counter()
        # Not run from the checkout: ``python -m`` would import the package found in the
        # current directory first, whatever PYTHONPATH says (see before-*).
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=env, cwd=cwd)
        _, status, usage = os.wait4(proc.pid, 0)
        took = time.perf_counter() - t
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read().decode(), err.read().decode()
    if proc.returncode:
        raise SystemExit(f"{cmd} failed ({proc.returncode}):\n{stderr}")
    return took, usage.ru_maxrss / 1024, stdout, stderr


def phases(stderr: str, wall: float) -> dict[str, float]:
    logged: dict[str, Any] = {}
    for line in stderr.splitlines():
        if line.startswith("{"):
            rec = json.loads(line)
            if rec.get("logger") == "billing_cli.ingest" and "phase" in rec:
                logged[rec["phase"]] = rec
    if "read" not in logged or "apply" not in logged:
        return {}  # a version of billing that does not log its phases
    read, apply = logged["read"], logged["apply"]
    out = {
        "parse": read["seconds"] - read["spool_write_seconds"],
        "spool_write": read["spool_write_seconds"],
        "spool_read": apply["spool_read_seconds"],
        "apply": apply["seconds"] - apply["spool_read_seconds"],
        "spool_bytes": read["spool_bytes"],
    }
    out["other"] = wall - read["seconds"] - apply["seconds"]
    return out


def pg_schema(base: str) -> tuple[str, str]:
    import psycopg

    name = f"bench_e2e_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(base, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {name}")
    sep = "&" if "?" in base else "?"
    return name, f"{base}{sep}options=-csearch_path%3D{name}"


def pg_drop(base: str, name: str) -> None:
    import psycopg

    with psycopg.connect(base, autocommit=True) as conn:
        conn.execute(f"DROP SCHEMA {name} CASCADE")


def unlink_db(db: Path) -> None:
    for suffix in ("", "-wal", "-shm"):
        Path(f"{db}{suffix}").unlink(missing_ok=True)


def run_one(config: str, data: Path, tmp: Path, a: argparse.Namespace) -> dict[str, Any]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BILLING_", "DATABASE_"))}
    env["PYTHONPATH"] = str(ROOT)
    if config.startswith("before-"):
        env["PYTHONPATH"] = str(Path(a.before).resolve())
    db = tmp / f"{config}.db"
    unlink_db(db)
    if config == "floor":
        cmd = [sys.executable, __file__, "--child-floor", str(data), str(db)]
        wall, rss, out, _ = timed(cmd, env, tmp)
        unlink_db(db)
        return {"s": wall, "rss_mb": rss, "samples": int(out.split()[-1])}
    schema = None
    url = str(db)
    if config.endswith("postgres"):
        schema, url = pg_schema(a.postgres)
    ingest = [
        "ingest",
        "--json",
        *(["--batch-samples", str(a.batch_samples)] if a.batch_samples else []),
    ]
    cmd = [sys.executable, "-m", "billing_cli", "--db", url, "--log-format", "json", "-v",
           *ingest, str(data)]  # fmt: skip
    try:
        wall, rss, out, err = timed(cmd, env, tmp)
    finally:
        if schema is not None:
            pg_drop(a.postgres, schema)
        unlink_db(db)
    summary = json.loads(out)
    return {"s": wall, "rss_mb": rss, "samples": summary["samples"], **phases(err, wall)}


def med_range(xs: list[float], fmt: str) -> str:
    return f"{fmt.format(statistics.median(xs))} ({fmt.format(min(xs))}-{fmt.format(max(xs))})"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--samples", type=int, default=1_000_000)
    p.add_argument("--series", type=int, default=2000)
    p.add_argument("--active", type=float, default=0.3)
    p.add_argument("--restarts", type=int, default=3)
    p.add_argument("--reps", type=int, default=3, help="rounds (default 3)")
    p.add_argument("--configs", default=None, help="default floor,sqlite[,postgres]")
    p.add_argument("--postgres", default=None, help="PostgreSQL URL (a fresh schema per run)")
    p.add_argument("--batch-samples", type=int, default=None, help="passed to billing ingest")
    p.add_argument(
        "--before", default=None, help="a checkout to measure as before-sqlite/-postgres"
    )
    p.add_argument("--input", default=None, help="use this NDJSON file instead of generating one")
    p.add_argument("--out", default=None, help="append the results as one JSON line here")
    p.add_argument("--child-floor", nargs=2, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child_floor:
        print(floor(*a.child_floor))
        return
    configs = (a.configs or "floor,sqlite" + (",postgres" if a.postgres else "")).split(",")
    if any(c.endswith("postgres") for c in configs) and not a.postgres:
        raise SystemExit("--configs postgres needs --postgres URL")
    if any(c.startswith("before-") for c in configs) and not a.before:
        raise SystemExit("--configs before-* needs --before DIR")
    with tempfile.TemporaryDirectory(prefix="bench-ingest-") as tmp_name:
        tmp = Path(tmp_name)
        if a.input:
            data = Path(a.input)
            info: dict[str, Any] = {"bytes": data.stat().st_size, "file": str(data)}
        else:
            data = tmp / "fleet.ndjson"
            info = make_input(data, a)
        print(f"# input {info}; load average {os.getloadavg()[0]:.1f}", flush=True)
        results: dict[str, list[dict[str, Any]]] = {c: [] for c in configs}
        for rep in range(a.reps):
            for c in configs:
                r = run_one(c, data, tmp, a)
                results[c].append(r)
                extra = "".join(
                    f", {k} {r[k]:.2f}"
                    for k in ("parse", "spool_write", "spool_read", "apply", "other")
                    if k in r
                )
                print(
                    f"round {rep} {c}: {r['s']:.2f} s, {r['samples'] / r['s']:,.0f} samples/s,"
                    f" peak RSS {r['rss_mb']:.0f} MB{extra}",
                    flush=True,
                )
    print(f"\n# load average at the end {os.getloadavg()[0]:.1f}")
    print(
        f"{'config':15} {'samples/s median (range)':>30} {'s median':>9}"
        f" {'x floor median (range)':>24} {'peak RSS':>9}"
    )
    fl = results.get("floor")
    summary: dict[str, Any] = {}
    for c, rs in results.items():
        sps = [r["samples"] / r["s"] for r in rs]
        ratios = [r["s"] / f["s"] for r, f in zip(rs, fl, strict=True)] if fl else []
        print(
            f"{c:15} {med_range(sps, '{:,.0f}'):>30} {statistics.median(r['s'] for r in rs):9.2f}"
            f" {med_range(ratios, '{:.2f}') if ratios else '-':>24}"
            f" {max(r['rss_mb'] for r in rs):6.0f} MB"
        )
        summary[c] = {
            "runs": rs,
            "samples_per_s_median": statistics.median(sps),
            "x_floor_median": statistics.median(ratios) if ratios else None,
        }
    for c, rs in results.items():
        if c == "floor" or "parse" not in rs[0]:
            continue
        split = {
            k: statistics.median(r[k] for r in rs)
            for k in ("parse", "spool_write", "spool_read", "apply", "other")
        }
        total = sum(split.values())
        print(
            f"{c} split (medians): "
            + ", ".join(f"{k} {v:.2f} s ({v / total:.0%})" for k, v in split.items())
            + f"; spool {rs[0]['spool_bytes'] / rs[0]['samples']:.1f} bytes/sample"
        )
        sps = summary[c]["samples_per_s_median"]
        ratio = summary[c]["x_floor_median"]
        if c not in TARGETS:
            continue
        print(
            f"{c} targets: >= {TARGETS[c]:,} samples/s: {'met' if sps >= TARGETS[c] else 'NOT met'}"
            + (
                f"; <= {TARGET_RATIO}x floor: {'met' if ratio <= TARGET_RATIO else 'NOT met'}"
                if ratio is not None
                else ""
            )
        )
    if a.out:
        with open(a.out, "a") as fh:
            fh.write(json.dumps({"args": vars(a), "input": info, "summary": summary}) + "\n")


if __name__ == "__main__":
    main()

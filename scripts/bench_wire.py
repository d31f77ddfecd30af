#!/usr/bin/env python3
"""Measure wire parsing + validation speed (orjson + the validation loop), no store.

Figures are CPU time of this process (best of several runs), so that other work on a
shared machine disturbs them less; the orjson-only line is the floor for this design.

Examples:

  .venv/bin/python scripts/bench_wire.py                 # 1,000,000 samples, NDJSON
  .venv/bin/python scripts/bench_wire.py --samples 200000
"""

from __future__ import annotations

import argparse
import io
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import make_snapshots
import orjson

from billing_cli.wire import iter_ingest, parse_window_page


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--samples", type=int, default=1_000_000)
    a = p.parse_args()
    minutes = a.samples // 600
    buf = io.BytesIO()
    n = make_snapshots.write(
        buf,
        make_snapshots.generate(
            series=2000, minutes=minutes, nodes=1, active=0.3, restarts=3, seed=1
        ),
        "ndjson",
        1,
    )
    raw = buf.getvalue()
    best = float("inf")
    for _ in range(3):
        t0 = time.process_time()
        got = 0
        for items, _rej in iter_ingest(io.BytesIO(raw), 50_000):
            got += sum(len(i.samples) for i in items)
        best = min(best, time.process_time() - t0)
    assert got == n, (got, n)
    json_only = float("inf")
    for _ in range(3):
        t0 = time.process_time()
        for line in io.BytesIO(raw):
            orjson.loads(line)
        json_only = min(json_only, time.process_time() - t0)
    print(f"ndjson: {n} samples, {len(raw) / 1e6:.1f} MB, best of 3 (CPU time): {best:.3f} s")
    print(f"ndjson: {n / best:,.0f} samples/s parse+validate")
    print(f"ndjson: {n / json_only:,.0f} samples/s orjson.loads alone (the floor)")

    # One big window page (the collector's shape): 100 items x 600 samples.
    buf = io.BytesIO()
    m = make_snapshots.write(
        buf,
        make_snapshots.generate(series=2000, minutes=100, nodes=1, active=0.3, restarts=0, seed=2),
        "window",
        1,
    )
    page = buf.getvalue()
    best = float("inf")
    for _ in range(5):
        t0 = time.process_time()
        wp = parse_window_page(page)
        best = min(best, time.process_time() - t0)
    assert sum(len(i.samples) for i in wp.items) == m
    print(f"window page: {m} samples, best of 5: {best * 1000:.1f} ms, {m / best:,.0f} samples/s")


if __name__ == "__main__":
    main()

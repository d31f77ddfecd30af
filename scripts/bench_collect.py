#!/usr/bin/env python3
"""End-to-end benchmark of ``billing collect`` over loopback HTTPS into SQLite.

A simulated fleet (default 20 sources x 2,000 series, ~30% active per minute) runs in its
own process with mTLS; for each window size (1x = 60 snapshots, 4x = 240) this measures,
each in a fresh process:

* the FLOOR: only downloading and JSON-parsing the very same pages (same chunks, same
  page limit, same concurrency, same TLS) — no store;
* ``billing collect --since <window>`` into a fresh SQLite file: wall time, samples/s,
  peak RSS (ru_maxrss of that process);

then ``--steady-minutes`` steady-state minutes (default 3), paced like cron: the fleet
advances to the current minute, the benchmark waits until the clock has passed the new
item (a minute after the previous run's, as cron would), and ``billing collect`` runs for
every source: 3 items a source (2 re-delivered by the 2-minute overlap, 1 new). One
warm-up minute before them is not counted (the fleet fell behind the clock during the
catch-up). Reported: the median wall time of the whole process including interpreter
start, and its peak RSS.

    .venv/bin/python scripts/bench_collect.py                 # the full benchmark
    .venv/bin/python scripts/bench_collect.py --nodes 4 --series 500 --windows 1   # quick
    .venv/bin/python scripts/bench_collect.py --windows 1 --no-floor --steady-minutes 3

Targets (issue 12, 2-core machine): one-hour catch-up (1x) >= 150,000 samples/s and at
most 2x the floor; steady minute < 1 s for the whole process; peak RSS <= 300 MB.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
NS_PER_MINUTE = 60_000_000_000

PRICING = """
[pricing]
currency = "USD"
unit = "GiB"
price_per_unit = "0.01"
rule_version = "bench"
"""


# --- the fleet process ----------------------------------------------------------------


def serve(args: argparse.Namespace) -> int:
    from billing_cli.simulator import Fleet, make_pki, registry_snippet

    pki = make_pki(Path(args.dir) / "pki")
    fleet = Fleet(
        args.nodes,
        series=args.series,
        minutes=args.minutes,
        activity=0.3,
        ssl_context=pki.server_context(require_client_cert=True),
    )
    fleet.start()
    snippet = registry_snippet(fleet, pki, mtls=True)
    out = Path(args.registry_out)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(f'[defaults]\nchunk = "1h"\n\n{snippet}{PRICING}')
    tmp.replace(out)
    print("ready", flush=True)
    for line in sys.stdin:
        if line.strip() == "advance":
            # Up to the current minute (at least one): a fleet behind the clock would give
            # a cron minute's 3-minute window fewer than its 3 items.
            behind = (time.time_ns() - fleet.next_minute_ns) // NS_PER_MINUTE + 1
            fleet.advance(max(1, behind))
            # The newest item's collected_at: a collect sees it once the clock passed it.
            print(max(n._times[-1] for n in fleet.nodes.values()), flush=True)
    fleet.stop()
    return 0


# --- the floor process ----------------------------------------------------------------


def floor(args: argparse.Namespace) -> int:
    import resource
    from concurrent.futures import ThreadPoolExecutor

    from billing_cli._time import NS_PER_SECOND, now_ns
    from billing_cli.collect.collector import PullSettings, PullTask, iter_source_batches
    from billing_cli.collect.transport import SourceClient, build_transport_config
    from billing_cli.registry.load import load_registry
    from billing_cli.registry.model import SourceConfig

    registry = load_registry(Path(args.registry), explicit=True)
    d = registry.defaults
    until = now_ns()
    since = until - int(args.since_s * NS_PER_SECOND)
    samples = 0
    lock = threading.Lock()

    def one(src: SourceConfig) -> None:
        # The collector's own pull loop (same chunks, adaptive page sizes, same checks),
        # minus the store: exactly the pages collect downloads and parses.
        nonlocal samples
        cfg = build_transport_config(src, budget_s=3600)
        task = PullTask(src, since_ns=since, until_ns=until)
        settings = PullSettings(chunk_s=d.chunk_s, page_limit=d.page_limit, budget_s=3600)
        n = 0
        with SourceClient(cfg) as client:
            for batch in iter_source_batches(
                task,
                client,
                pricing=registry.pricing,
                run_id=0,
                settings=settings,
                attempted_at_ns=until,
            ):
                n += sum(len(i.samples) for i in batch.items)
        with lock:
            samples += n

    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(one, registry.enabled_sources()))
    wall = time.perf_counter() - t0
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"samples": samples, "wall_s": wall, "rss_kib": rss}))
    return 0


# --- the collect process --------------------------------------------------------------

COLLECT = """
import json, os, resource, sys, time
from billing_cli.cli.app import run
t0 = time.perf_counter()
profile = os.environ.get("BENCH_PROFILE_DIR")
if profile:  # BENCH_PROFILE_DIR=/tmp/p: one cProfile file per collect process
    import cProfile
    prof = cProfile.Profile()
    code = prof.runcall(run, sys.argv[1:])
    prof.dump_stats(os.path.join(profile, f"collect-{os.getpid()}.prof"))
else:
    code = run(sys.argv[1:])
wall = time.perf_counter() - t0
print(json.dumps({"code": code, "wall_s": wall,
                  "rss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}),
      file=sys.stderr)
"""


def run_collect(registry: Path, db: Path, extra: list[str]) -> tuple[dict, dict, float]:
    t0 = time.perf_counter()
    p = subprocess.run(
        [
            PY,
            "-c",
            COLLECT,
            "--registry",
            str(registry),
            "--db",
            str(db),
            "collect",
            "--json",
            "--source-timeout",
            "30m",
            *extra,
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=False,
    )
    process_wall = time.perf_counter() - t0
    stats = json.loads(p.stderr.strip().splitlines()[-1])
    if stats["code"] not in (0,):
        raise SystemExit(f"collect failed ({stats['code']}): {p.stdout[-2000:]} {p.stderr[-2000:]}")
    return json.loads(p.stdout), stats, process_wall


def measure(args: argparse.Namespace, windows: int, workdir: Path) -> dict[str, object]:
    minutes = 60 * windows
    registry = workdir / f"fleet-{windows}.toml"
    server = subprocess.Popen(
        [
            PY,
            __file__,
            "--serve",
            "--dir",
            str(workdir / f"w{windows}"),
            "--registry-out",
            str(registry),
            "--nodes",
            str(args.nodes),
            "--series",
            str(args.series),
            "--minutes",
            str(minutes),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    assert server.stdout is not None
    assert server.stdin is not None
    try:
        if server.stdout.readline().strip() != "ready":
            raise SystemExit("fleet did not start")
        since_s = minutes * 60 + 600  # covers the whole history even if collect starts later
        if args.no_floor:
            floor_stats = {"samples": None, "wall_s": float("nan"), "rss_kib": 0}
        else:
            fl = subprocess.run(
                [PY, __file__, "--floor", "--registry", str(registry), "--since-s", str(since_s)],
                capture_output=True,
                text=True,
                cwd=ROOT,
                check=True,
            )
            floor_stats = json.loads(fl.stdout)
        db = workdir / f"bench-{windows}.db"
        doc, stats, _ = run_collect(registry, db, ["--since", f"{since_s}s"])
        samples = sum(s["samples"] for s in doc["sources"])
        result: dict[str, object] = {
            "window_snapshots": minutes,
            "samples": samples,
            "collect_wall_s": round(stats["wall_s"], 2),
            "collect_samples_per_s": round(samples / stats["wall_s"]),
            "collect_peak_rss_mib": round(stats["rss_kib"] / 1024, 1),
            "floor_wall_s": round(floor_stats["wall_s"], 2),
            "floor_samples_per_s": None
            if args.no_floor
            else round(floor_stats["samples"] / floor_stats["wall_s"]),
            "floor_peak_rss_mib": round(floor_stats["rss_kib"] / 1024, 1),
            "collect_over_floor": round(stats["wall_s"] / floor_stats["wall_s"], 2),
            "db_bytes_per_sample": round(
                sum(p.stat().st_size for p in workdir.glob(f"bench-{windows}.db*")) / samples, 1
            ),
        }
        if floor_stats["samples"] not in (None, samples):
            result["warning"] = f"floor saw {floor_stats['samples']} samples"
        if windows == 1 and args.steady_minutes > 0:
            # Cron minutes: the fleet advances to the current minute before each run, and
            # each run starts once the clock has passed the new item, a minute after the
            # previous one, so its window (checkpoint - 2 minutes overlap .. now) holds 3
            # items a source: 2 re-delivered, 1 new. The first run after the catch-up is
            # a warm-up, not counted: the fleet had fallen behind the clock during the
            # catch-up, so it brings more than one new item. The median is reported, every
            # run listed.
            sources = [a for s in doc["sources"] for a in ("--source", s["source_id"])]
            walls: list[float] = []
            in_run: list[float] = []
            rss: list[float] = []
            for k in range(args.steady_minutes + 1):
                server.stdin.write("advance\n")
                server.stdin.flush()
                newest_ns = int(server.stdout.readline())
                time.sleep(max(0.0, (newest_ns - time.time_ns()) / 1e9 + 0.5))
                doc2, stats2, process_wall = run_collect(registry, db, sources)
                if k == 0:
                    result["steady_warmup_samples"] = sum(s["samples"] for s in doc2["sources"])
                    continue
                walls.append(round(process_wall, 2))
                in_run.append(round(stats2["wall_s"], 2))
                rss.append(round(stats2["rss_kib"] / 1024, 1))
                samples2 = [s["samples"] for s in doc2["sources"]]
                new2 = [s["new_observations"] for s in doc2["sources"]]
                result.setdefault("steady_minute_runs_samples", []).append(sum(samples2))
                result.setdefault("steady_minute_runs_new_observations", []).append(sum(new2))
            result["steady_minute_process_wall_s"] = statistics.median(walls)
            result["steady_minute_in_run_s"] = statistics.median(in_run)
            result["steady_minute_peak_rss_mib"] = max(rss)
            result["steady_minute_runs_process_wall_s"] = walls
            result["steady_minute_samples"] = sum(s["samples"] for s in doc2["sources"])
            result["steady_minute_new_observations"] = sum(
                s["new_observations"] for s in doc2["sources"]
            )
            items_per_source = result["steady_minute_samples"] / (args.nodes * args.series)
            if items_per_source != 3:
                result["warning"] = (
                    f"a steady minute held {items_per_source:g} items a source, not 3"
                    " (the machine too slow for a minute's pace?)"
                )
        return result
    finally:
        server.stdin.close()
        server.wait(timeout=30)


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--nodes", type=int, default=20)
    p.add_argument("--series", type=int, default=2000)
    p.add_argument("--windows", default="1,4", help="window multiples of 60 snapshots")
    p.add_argument(
        "--steady-minutes", type=int, default=3, help="steady minutes after the 1x catch-up"
    )
    p.add_argument("--no-floor", action="store_true", help="skip the floor (quick looks)")
    p.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--floor", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--dir", help=argparse.SUPPRESS)
    p.add_argument("--registry-out", help=argparse.SUPPRESS)
    p.add_argument("--registry", help=argparse.SUPPRESS)
    p.add_argument("--since-s", type=float, help=argparse.SUPPRESS)
    p.add_argument("--minutes", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.serve:
        return serve(args)
    if args.floor:
        return floor(args)
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-collect-") as tmp:
        for w in (int(x) for x in args.windows.split(",")):
            r = measure(args, w, Path(tmp))
            results.append(r)
            print(json.dumps(r), flush=True)
    print(
        f"\n{args.nodes} sources x {args.series} series, ~30% active/minute, "
        f"loopback HTTPS (mTLS), SQLite, cores={os.cpu_count()}"
    )
    hdr = (
        f"{'window':>7} {'samples':>10} {'collect s':>9} {'samples/s':>10} {'RSS MiB':>8} "
        f"{'floor s':>8} {'x floor':>7} {'B/sample':>8}"
    )
    print(hdr)
    for r in results:
        print(
            f"{r['window_snapshots']:>7} {r['samples']:>10,} {r['collect_wall_s']:>9} "
            f"{r['collect_samples_per_s']:>10,} {r['collect_peak_rss_mib']:>8} "
            f"{r['floor_wall_s']:>8} {r['collect_over_floor']:>7} {r['db_bytes_per_sample']:>8}"
        )
    for r in results:
        if "steady_minute_process_wall_s" in r:
            print(
                f"steady-state minute (median of {r['steady_minute_runs_process_wall_s']}):"
                f" {r['steady_minute_process_wall_s']} s for the whole "
                f"process ({r['steady_minute_in_run_s']} s inside the run), "
                f"{r['steady_minute_samples']:,} samples, "
                f"{r['steady_minute_new_observations']:,} new observations, "
                f"peak RSS {r['steady_minute_peak_rss_mib']} MiB"
            )
        if "warning" in r:
            print(f"WARNING: {r['warning']}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())

#!/usr/bin/env python3
"""Write a synthetic exporter snapshot file for ``billing ingest``, benchmarks and kill tests.

Deterministic for a given ``--seed`` (but for the times: the data ends an hour before
now, so that it is always inside the retention horizon). Each node emits one item per
minute holding the samples of the series active in that minute (``--active`` of them), or with
``--full-items`` every series of the node, the idle ones unchanged (the fleet shape of
DESIGN §10: an exporter reports every account every minute); counters only grow, except
at restarts, where the node's ``counter_epoch`` changes and its counters start again from
zero. ``--uuids v4`` names the accounts with random version-4 UUIDs, as the simulator
and real fleets do, instead of the readable ``u-NODE-SERIES``.

Examples:

  scripts/make_snapshots.py --samples 1000000 --out /tmp/1m.ndjson
  scripts/make_snapshots.py --samples 1000000 --full-items --uuids v4 --out /tmp/fleet.ndjson
  scripts/make_snapshots.py --series 50 --minutes 10 --format window --out page.json
  scripts/make_snapshots.py --minutes 5 --env staging --format snapshots --out - | billing ingest -
"""

from __future__ import annotations

import argparse
import math
import random
import sys
import uuid
from collections.abc import Iterator
from typing import IO, Any

import orjson


def default_start_ns(minutes: int) -> int:
    """A start that ends the data an hour before now, at a minute boundary: inside the
    default retention horizon (35 days, DESIGN §6) whenever the script runs."""
    import time

    start = time.time_ns() - (minutes + 60) * 60_000_000_000
    return start - start % 60_000_000_000


def _rfc3339(ns: int) -> str:
    import time

    seconds, frac = divmod(ns, 1_000_000_000)
    base = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))
    return f"{base}.{frac:09d}Z"


def generate(
    *,
    series: int,
    minutes: int,
    nodes: int,
    active: float,
    restarts: int,
    seed: int,
    env: str = "prod",
    full_items: bool = False,
    uuids: str = "seq",
    start_ns: int | None = None,
) -> Iterator[dict[str, Any]]:
    """Yield items (dicts, wire shape) in (minute, node) order, from ``start_ns`` (a minute
    start; default: ending an hour ago).

    ``full_items``: every series in every item (idle ones unchanged) instead of the active
    ones only. ``uuids``: ``"seq"`` (``u-NODE-SERIES``) or ``"v4"`` (random, seeded).
    The activity drawn is the same either way.
    """
    start = default_start_ns(minutes) if start_ns is None else start_ns
    rng = random.Random(seed)
    per_node = max(1, series // nodes)
    if uuids == "v4":
        urng = random.Random(f"uuids-{seed}")
        names = [
            [str(uuid.UUID(int=urng.getrandbits(128), version=4)) for _ in range(per_node)]
            for _ in range(nodes)
        ]
    elif uuids == "seq":
        names = [[f"u-{node:03d}-{s:05d}" for s in range(per_node)] for node in range(nodes)]
    else:
        raise ValueError(f"uuids must be 'seq' or 'v4', got {uuids!r}")
    restart_at = {
        (rng.randrange(nodes), rng.randrange(1, max(2, minutes))) for _ in range(restarts)
    }
    totals: list[list[list[int]]] = [[[0, 0] for _ in range(per_node)] for _ in range(nodes)]
    epochs = [1] * nodes
    tags = ["vless-in", "trojan-in"]
    for minute in range(minutes):
        for node in range(nodes):
            if (node, minute) in restart_at:
                epochs[node] += 1
                totals[node] = [[0, 0] for _ in range(per_node)]
            k = max(1, round(per_node * active))
            chosen = sorted(rng.sample(range(per_node), k))
            samples = []
            node_totals = totals[node]
            for s in chosen:
                t = node_totals[s]
                t[0] += rng.randrange(0, 5_000_000)
                t[1] += rng.randrange(0, 50_000_000)
            for s in range(per_node) if full_items else chosen:
                t = node_totals[s]
                samples.append(
                    {
                        "uuid": names[node][s],
                        "email": f"user{s}@example.com",
                        "inbound_tag": tags[s % 2],
                        "uplink_bytes_total": t[0],
                        "downlink_bytes_total": t[1],
                    }
                )
            # Mid-minute, with nanoseconds, so several items never share a timestamp.
            ts = start + minute * 60_000_000_000 + 17_000_000_000 + node * 1_000 + 123
            yield {
                "node_id": f"node-{node:03d}",
                "env": env,
                "collected_at": _rfc3339(ts),
                "counter_epoch": f"boot-{epochs[node]}",
                "samples": samples,
            }


def write(
    out: IO[bytes], items: Iterator[dict[str, Any]], fmt: str, nodes: int, env: str = "prod"
) -> int:
    count = 0
    if fmt == "ndjson":
        for item in items:
            out.write(orjson.dumps(item))
            out.write(b"\n")
            count += len(item["samples"])
        return count
    everything = list(items)
    count = sum(len(i["samples"]) for i in everything)
    doc: Any
    if fmt == "array":
        doc = everything
    elif fmt == "snapshots":
        doc = {"snapshots": everything}
    else:  # window: one node's page, identity on the page only
        if nodes != 1:
            raise SystemExit("--format window needs --nodes 1")
        for i in everything:
            del i["node_id"], i["env"]
        doc = {
            "source_id": f"node-000-{env}",
            "node_id": "node-000",
            "env": env,
            "items": everything,
            "next_cursor": None,
            "has_more": False,
        }
    out.write(orjson.dumps(doc))
    return count


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--series", type=int, default=2000, help="series in total (default 2000)")
    p.add_argument("--nodes", type=int, default=1, help="nodes sharing the series (default 1)")
    p.add_argument("--minutes", type=int, default=None, help="minutes of data")
    p.add_argument("--samples", type=int, default=None, help="about this many samples")
    p.add_argument("--active", type=float, default=0.3, help="active share per minute")
    p.add_argument("--restarts", type=int, default=3, help="counter restarts (epoch changes)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument(
        "--full-items",
        action="store_true",
        help="every series in every item, idle ones unchanged (the fleet shape)",
    )
    p.add_argument(
        "--uuids", choices=["seq", "v4"], default="seq", help="account names (default seq)"
    )
    p.add_argument("--env", default="prod", help="env of every item (default prod)")
    p.add_argument("--format", choices=["ndjson", "array", "snapshots", "window"], default="ndjson")
    p.add_argument("--out", default="-", help="output file, - for stdout")
    a = p.parse_args()
    per_node = max(1, a.series // a.nodes)
    per_minute = (per_node if a.full_items else max(1, round(per_node * a.active))) * a.nodes
    minutes = a.minutes or (math.ceil(a.samples / per_minute) if a.samples else 10)
    items = generate(
        series=a.series,
        minutes=minutes,
        nodes=a.nodes,
        active=a.active,
        restarts=a.restarts,
        seed=a.seed,
        env=a.env,
        full_items=a.full_items,
        uuids=a.uuids,
    )
    if a.out == "-":
        n = write(sys.stdout.buffer, items, a.format, a.nodes, a.env)
    else:
        with open(a.out, "wb") as f:
            n = write(f, items, a.format, a.nodes, a.env)
    print(f"wrote {n} samples, {minutes} minutes x {a.nodes} node(s)", file=sys.stderr)


if __name__ == "__main__":
    main()

"""A small, hand-computed store for the read commands (``billing usage`` / ``billing ledger``).

Three series, priced at 0.5 EUR per MB (10^6 bytes), charge = total, no quota:

    A = node-a/prod/u1/vless    B = node-a/prod/u2/vless    C = node-b/staging/u1/trojan

Run 1 (one batch):
    node-a 10:00:30  A (0, 0)                B (0, 0)          baselines
    node-a 10:01:30  A (1_000_000, 2_000_000) B (500_000, 0)   -> A@10:01 3 MB, B@10:01 0.5 MB
    node-a 10:02:10  A (1_500_000, 2_000_000) B (500_000, 0)   -> A@10:02 0.5 MB, B idle
    node-a 11:05:00  A (1_500_000, 3_000_000)                  -> A@11:05 1 MB
    node-b 10:00:30  C (100, 100)                              baseline
    node-b 10:01:30  C (1_000_100, 100)                        -> C@10:01 1 MB
Run 2 (late item, between 10:01:30 and 10:02:10):
    node-a 10:01:50  A (1_200_000, 2_000_000)  -> A@10:01 becomes 3.2 MB, A@10:02 0.3 MB

Final buckets (uplink, downlink):  A@10:01 (1_200_000, 2_000_000)  A@10:02 (300_000, 0)
A@11:05 (0, 1_000_000)  B@10:01 (500_000, 0)  C@10:01 (1_000_000, 0).

Ledger: run 1 charges A@10:01 1.5, A@10:02 0.25, A@11:05 0.5, B@10:01 0.25, C@10:01 0.5;
run 2 adjusts A@10:01 by (+200_000 bytes, +0.1) and A@10:02 by (-200_000, -0.1).
"""

from __future__ import annotations

from typing import Any

from billing_cli._time import parse_rfc3339_ns
from billing_cli.core.types import Item, Sample
from billing_cli.pricing import Pricing
from billing_cli.store.base import Batch

PRICING = Pricing.model_validate(
    {"currency": "EUR", "unit": "MB", "price_per_unit": "0.5", "rule_version": "eur-2026"}
)

DAY = "2026-11-24"


def t(hms: str) -> int:
    return parse_rfc3339_ns(f"{DAY}T{hms}Z")


def _item(at: str, node: str, env: str, *samples: tuple[str, str, int, int]) -> Item:
    return Item(
        t(at),
        node,
        env,
        None,
        [Sample(uuid, f"{uuid}@example.org", tag, up, down) for uuid, tag, up, down in samples],
    )


RUN1 = [
    _item("10:00:30", "node-a", "prod", ("u1", "vless", 0, 0), ("u2", "vless", 0, 0)),
    _item("10:00:30", "node-b", "staging", ("u1", "trojan", 100, 100)),
    _item(
        "10:01:30",
        "node-a",
        "prod",
        ("u1", "vless", 1_000_000, 2_000_000),
        ("u2", "vless", 500_000, 0),
    ),
    _item("10:01:30", "node-b", "staging", ("u1", "trojan", 1_000_100, 100)),
    _item(
        "10:02:10",
        "node-a",
        "prod",
        ("u1", "vless", 1_500_000, 2_000_000),
        ("u2", "vless", 500_000, 0),
    ),
    _item("11:05:00", "node-a", "prod", ("u1", "vless", 1_500_000, 3_000_000)),
]
RUN2 = [_item("10:01:50", "node-a", "prod", ("u1", "vless", 1_200_000, 2_000_000))]


def populate(db_url: str) -> tuple[int, int]:
    """Apply both runs to a fresh store at ``db_url``; return their run ids."""
    from billing_cli.store import open_store

    store = open_store(db_url)
    try:
        run1 = store.start_run("ingest", [])
        store.apply(Batch(items=RUN1, run_id=run1, pricing=PRICING))
        store.finish_run(run1, "ok", {})
        run2 = store.start_run("ingest", [])
        store.apply(Batch(items=RUN2, run_id=run2, pricing=PRICING))
        store.finish_run(run2, "ok", {})
    finally:
        store.close()
    return run1, run2


def usage(node: str, env: str, uuid: str, tag: str, at: str, up: int, down: int) -> dict[str, Any]:
    return {
        "node_id": node,
        "env": env,
        "uuid": uuid,
        "inbound_tag": tag,
        "bucket_start": f"{DAY}T{at}Z",
        "uplink_bytes": up,
        "downlink_bytes": down,
        "total_bytes": up + down,
    }


A = ("node-a", "prod", "u1", "vless")
B = ("node-a", "prod", "u2", "vless")
C = ("node-b", "staging", "u1", "trojan")

MINUTE_USAGE = [
    usage(*A, "10:01:00", 1_200_000, 2_000_000),
    usage(*A, "10:02:00", 300_000, 0),
    usage(*A, "11:05:00", 0, 1_000_000),
    usage(*B, "10:01:00", 500_000, 0),
    usage(*C, "10:01:00", 1_000_000, 0),
]

REGISTRY = """\
[[sources]]
source_id = "a-prod"
node_id = "node-a"
env = "prod"
base_url = "http://127.0.0.1:9550"
auth_mode = "none"
allow_insecure_http = true

[[sources]]
source_id = "b-staging"
node_id = "node-b"
env = "staging"
base_url = "http://127.0.0.1:9551"
auth_mode = "none"
allow_insecure_http = true
"""


def sort_key(row: dict[str, Any]) -> tuple[str, ...]:
    return (row["bucket_start"], row["node_id"], row["env"], row["uuid"], row["inbound_tag"])

"""A small invoicing story for the period, statement and rerate CLI tests.

Registry: two sources, EUR, 0.001 EUR per KB (1,000 nano-EUR per byte), 1,000 bytes
included per month for u1. Hand-computed:

November 2025
    u1 (node-a, vless): baseline 23:50, 23:55 +(1000, 2000), 23:59 +(500, 1000)
        -> 4,500 B rated, 1,000 B included, charges 3,500,000 nano = 0.003500000
    u2 (node-b, trojan): baseline 23:50, 23:58 +(400, 100)
        -> 500 B, 0.000500000
December 2025 (first delivery)
    u1 00:10 +(500, 0): all included (its own December quota), 0.000000000
    u2 00:10 +(100, 0): 0.000100000

Late item, after November is closed: u2 at 23:59:50 (450, 100) splits u2's
23:58 -> 00:10 delta: the November 23:59 bucket gets +50 B (carried into December:
+0.000050000), December's 00:10 bucket drops to 50 B (-0.000050000).
Then a December item renames u1 (a later observation, new email).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson

# The story is dated 2025: a horizon of 100 years keeps it applicable (the default 35 days
# would refuse it as beyond_retention).
REGISTRY = """\
[defaults]
retention = "36500d"

[[sources]]
source_id = "a"
node_id = "node-a"
env = "prod"
base_url = "https://a.example.net:9550"
auth_mode = "bearer"
credential_ref = "env:TOKEN_A"
ca_bundle_ref = "system"

[[sources]]
source_id = "b"
node_id = "node-b"
env = "prod"
base_url = "https://b.example.net:9550"
auth_mode = "bearer"
credential_ref = "env:TOKEN_B"
ca_bundle_ref = "system"

[pricing]
currency = "EUR"
unit = "KB"
price_per_unit = "0.001"
rule_version = "r1"

[pricing.included_bytes]
u1 = 1000
"""


def item(node: str, at: str, uuid: str, up: int, down: int, email: str = "") -> dict[str, Any]:
    tag = "vless" if node == "node-a" else "trojan"
    return {
        "collected_at": at,
        "node_id": node,
        "env": "prod",
        "samples": [
            {
                "uuid": uuid,
                "email": email or f"{uuid}@example.org",
                "inbound_tag": tag,
                "uplink_bytes_total": up,
                "downlink_bytes_total": down,
            }
        ],
    }


FIRST = [
    item("node-a", "2025-11-30T23:50:00Z", "u1", 0, 0),
    item("node-a", "2025-11-30T23:55:00Z", "u1", 1000, 2000),
    item("node-a", "2025-11-30T23:59:30Z", "u1", 1500, 3000),
    item("node-a", "2025-12-01T00:10:00Z", "u1", 2000, 3000),
    item("node-b", "2025-11-30T23:50:00Z", "u2", 0, 0),
    item("node-b", "2025-11-30T23:58:00Z", "u2", 400, 100),
    item("node-b", "2025-12-01T00:10:00Z", "u2", 500, 100),
]
LATE = [
    item("node-b", "2025-11-30T23:59:50Z", "u2", 450, 100),
    item("node-a", "2025-12-01T00:20:00Z", "u1", 2000, 3000, email="u1-new@example.org"),
]


def write(path: Path, items: list[dict[str, Any]]) -> Path:
    path.write_bytes(b"".join(orjson.dumps(i) + b"\n" for i in items))
    return path


def setup(tmp_path: Path, cli: Any, db: str) -> tuple[list[str], Path]:
    """Registry and first delivery ingested; returns the global args and the late file."""
    reg = tmp_path / "sources.toml"
    reg.write_text(REGISTRY)
    base = ["--registry", str(reg), "--db", db]
    res = cli(*base, "ingest", str(write(tmp_path / "first.ndjson", FIRST)))
    assert res.exit_code == 0, res.output
    return base, write(tmp_path / "late.ndjson", LATE)

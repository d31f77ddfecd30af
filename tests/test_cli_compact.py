"""``billing compact``: the retention horizon through the real CLI, on SQLite and PostgreSQL.

Items are ingested with times relative to now (the horizon is measured from the clock),
under a long retention; then the registry's retention is lowered and compaction runs.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, cast

import orjson
import pytest
from conftest import CliRunnerFn

from billing_cli._time import parse_rfc3339_ns
from billing_cli.store import open_store
from billing_cli.store.sql import SqlStore

S = 1_000_000_000
H = 3600 * S
D = 24 * H

SOURCE = """\
[[sources]]
source_id = "a-prod"
node_id = "node-a"
env = "prod"
base_url = "https://a.example.net:9550"
auth_mode = "bearer"
credential_ref = "env:NODE_A_TOKEN"
ca_bundle_ref = "system"

[pricing]
currency = "EUR"
unit = "B"
price_per_unit = "0.001"
"""


def _rfc3339(ns: int) -> str:
    sec, frac = divmod(ns, S)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec)) + f".{frac:09d}Z"


def line(at_ns: int, uuid: str, up: int) -> bytes:
    return (
        orjson.dumps(
            {
                "collected_at": _rfc3339(at_ns),
                "node_id": "node-a",
                "env": "prod",
                "samples": [
                    {
                        "uuid": uuid,
                        "email": f"{uuid}@example.org",
                        "inbound_tag": "vless",
                        "uplink_bytes_total": up,
                        "downlink_bytes_total": 0,
                    }
                ],
            }
        )
        + b"\n"
    )


NOW = time.time_ns()
# Two series, one item every 6 hours for 40 days, ending an hour ago.
TIMES = [NOW - H - k * 6 * H for k in range(4 * 40)][::-1]
ITEMS = b"".join(line(t, u, i * 100 + k) for i, t in enumerate(TIMES) for k, u in enumerate("ab"))


class Setup:
    def __init__(self, cli: CliRunnerFn, tmp_path: Path, db: str) -> None:
        self.cli, self.db, self.registry = cli, db, tmp_path / "sources.toml"
        self.retention("60d")
        (tmp_path / "items.ndjson").write_bytes(ITEMS)
        res = self.run("ingest", str(tmp_path / "items.ndjson"), "--json")
        assert res.exit_code == 0, res.output
        assert orjson.loads(res.stdout)["new_observations"] == 2 * len(TIMES)

    def retention(self, value: str) -> None:
        self.registry.write_text(f'[defaults]\nretention = "{value}"\n\n{SOURCE}')

    def run(self, *args: str, input: bytes | None = None) -> Any:
        return self.cli("--registry", str(self.registry), "--db", self.db, *args, input=input)

    def json(self, *args: str, input: bytes | None = None) -> dict[str, Any]:
        res = self.run(*args, "--json", input=input)
        assert res.exit_code == 0, res.output
        out: dict[str, Any] = orjson.loads(res.stdout)
        return out

    def tables(self, *names: str) -> dict[str, list[Any]]:
        store = cast(SqlStore, open_store(self.db))
        try:
            return {
                t: sorted(map(tuple, store.db.execute(f"SELECT * FROM {t}")), key=repr)
                for t in names
            }
        finally:
            store.close()


KEPT = ("buckets", "ledger_postings", "uuid_period_usage", "series", "runs")
ALL = (*KEPT, "observations", "item_digests", "retention_state", "integrity_events")


@pytest.fixture
def setup(cli: CliRunnerFn, tmp_path: Path, db_url: str) -> Setup:
    return Setup(cli, tmp_path, db_url)


def hour_floor(ns: int) -> int:
    return ns - ns % H


def test_compact_keeps_each_series_last_observation_and_never_buckets(setup: Setup) -> None:
    setup.retention("30d")
    before = setup.tables(*KEPT)
    usage = setup.json("usage", "--totals")
    lo = hour_floor(time.time_ns() - 30 * D)
    doc = setup.json("compact")
    cut = parse_rfc3339_ns(doc["cut"])
    assert lo <= cut <= hour_floor(time.time_ns() - 30 * D)
    old = [t for t in TIMES if t < cut]
    assert doc["observations_removed"] == 2 * (len(old) - 1)
    assert (doc["series_kept"], doc["complete"], doc["ran"], doc["dry_run"]) == (
        2,
        True,
        True,
        False,
    )
    assert doc["cut_before"] is None
    assert doc["cut"] == doc["target"]
    assert setup.tables(*KEPT) == before
    assert setup.json("usage", "--totals") == usage
    # What remains: per series its last observation before the cut and everything after.
    store = cast(SqlStore, open_store(setup.db))
    try:
        rows = store.db.execute("SELECT DISTINCT collected_at_ns FROM counter_observations")
    finally:
        store.close()
    assert sorted(int(r[0]) for r in rows) == [old[-1], *(t for t in TIMES if t >= cut)]
    # Again: nothing left to do.
    again = setup.json("compact")
    assert (again["observations_removed"], again["cut_before"]) == (0, doc["cut"])


def test_dry_run_counts_and_writes_nothing(setup: Setup) -> None:
    setup.retention("30d")
    before = setup.tables(*ALL)
    dry = setup.json("compact", "--dry-run")
    assert dry["dry_run"] is True
    assert setup.tables(*ALL) == before
    real = setup.json("compact")
    assert (dry["observations_removed"], dry["series_kept"], dry["cut"]) == (
        real["observations_removed"],
        real["series_kept"],
        real["cut"],
    )


def test_data_older_than_the_horizon_is_refused_counted_and_recorded(setup: Setup) -> None:
    setup.retention("30d")
    late = line(NOW - 35 * D, "a", 1) + line(NOW - 35 * D + H, "b", 1)
    doc = setup.json("ingest", "-", input=late)
    assert (doc["beyond_retention"], doc["new_observations"], doc["postings"]) == (2, 0, 0)
    events = setup.json("integrity", "list", "--kind", "beyond_retention")
    assert [e["kind"] for e in events] == ["beyond_retention"]
    assert "2 items, 2 samples at" in events[0]["detail"]
    # After compaction, the same: refused, not a duplicate.
    setup.json("compact")
    again = setup.json("ingest", "-", input=late)
    assert (again["beyond_retention"], again["duplicates"]) == (2, 0)
    table = setup.run("ingest", "-", input=late)
    assert "beyond retention" in table.stdout


def test_table_output_says_what_was_removed(setup: Setup) -> None:
    setup.retention("30d")
    res = setup.run("compact", "--dry-run")
    assert res.exit_code == 0, res.output
    assert "observations removed" in res.stdout
    assert "compaction would remove" in res.stdout
    res = setup.run("compact")
    assert "compaction removed" in res.stdout
    assert setup.run("-q", "compact").stdout == ""


def test_without_a_registry_the_default_retention_is_used_with_a_warning(
    cli: CliRunnerFn, tmp_path: Path
) -> None:
    db = str(tmp_path / "b.db")
    (tmp_path / "items.ndjson").write_bytes(ITEMS)
    res = cli("--db", db, "ingest", str(tmp_path / "items.ndjson"), "--json")
    assert orjson.loads(res.stdout)["beyond_retention"] == 2 * sum(
        1 for t in TIMES if t < NOW - 35 * D
    )
    res = cli("--db", db, "compact", "--json")
    assert res.exit_code == 0, res.output
    assert "warning: no registry at" in res.stderr
    assert "default retention 35d" in res.stderr
    cut = parse_rfc3339_ns(orjson.loads(res.stdout)["cut"])
    assert hour_floor(NOW - 35 * D) <= cut <= hour_floor(time.time_ns() - 35 * D)


@pytest.mark.parametrize("value", ["12h", "0s", "-1d", "soon"])
def test_a_retention_below_a_day_is_a_config_error(
    cli: CliRunnerFn, tmp_path: Path, value: str
) -> None:
    reg = tmp_path / "sources.toml"
    reg.write_text(f'[defaults]\nretention = "{value}"\n\n{SOURCE}')
    res = cli("--registry", str(reg), "--db", str(tmp_path / "b.db"), "compact")
    assert res.exit_code == 2
    assert len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert "retention" in res.stderr
    assert not (tmp_path / "b.db").exists()

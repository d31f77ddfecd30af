"""Billing against the exporter as it is deployed (DESIGN §2a), end to end through the CLI.

The simulator speaks the deployed wire by default (blank inbound tags, per-account
samples, no epoch, identity-less empty pages, text/plain errors, 404 on ``latest`` before
the first snapshot); ``tests/fixtures/deployed/`` holds the exporter's exact bytes. Each
test checks billed bytes against the simulator's own counters.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
from _collect_support import MakeEnv, expected_usage, make, only, store_usage  # noqa: F401
from conftest import CliRunnerFn
from simfleet import DEFAULT_PRICING, SimFleet, sim_fleet  # noqa: F401

from billing_cli._time import NS_PER_MINUTE, minute_floor_ns, now_ns
from billing_cli.pricing import Pricing
from billing_cli.simulator import Fleet
from billing_cli.store import open_store
from billing_cli.store.base import Batch, CheckpointAdvance, RowFilter
from billing_cli.wire import parse_ingest

FIXTURES = Path(__file__).parent / "fixtures" / "deployed"
HOUR = 60 * NS_PER_MINUTE


def usage_by_minute(db: str) -> dict[tuple[str, int], int]:
    store = open_store(db)
    try:
        return {(r.uuid, r.bucket_start_ns): r.total_bytes for r in store.iter_usage(RowFilter())}
    finally:
        store.close()


def test_collect_bills_the_deployed_wire_exactly(make: MakeEnv, db_url: str) -> None:
    env = make(nodes=2, series=12, minutes=15, db=db_url)
    doc = env.json("collect")
    for sid in ("node-01", "node-02"):
        row = only(doc, sid)
        assert (row["status"], row["items"], row["samples"], row["rejected"]) == (
            "ok",
            15,
            180,
            0,
        )
        node = env.sim.fleet.node(sid)
        ats = node.collected_ats()
        assert store_usage(db_url, sid) == expected_usage(node, ats[0], ats[-1])
    store = open_store(db_url)
    try:
        rows = list(store.iter_usage(RowFilter()))
        assert rows
        assert {r.inbound_tag for r in rows} == {""}  # the account-level series
        assert store.integrity_event_counts() == {}
    finally:
        store.close()


def test_the_checkpoint_passes_a_three_hour_outage_and_bills_the_gap_in_its_first_minute(
    make: MakeEnv, db_url: str
) -> None:
    """The node was down for 3 hours (no snapshots), and billing had collected up to the
    start of the outage. The exporter answers the empty page for every window of the gap."""
    now = now_ns()
    gap_start = minute_floor_ns(now) - 3 * HOUR
    env = make(series=6, minutes=30, end_ns=gap_start, db=db_url)
    node = env.sim.fleet.node("node-01")
    pre_gap = node.collected_ats()
    # What the collects before the outage committed: the items and the checkpoint.
    items, rejections = parse_ingest(node.store_file_bytes())
    assert rejections == []
    store = open_store(db_url)
    try:
        run = store.start_run("collect", ["node-01"])
        store.apply(
            Batch(
                items,
                run,
                Pricing(),
                "node-01",
                checkpoint=CheckpointAdvance(
                    "node-01", "node-01", "prod", None, gap_start, gap_start, pre_gap[-1]
                ),
            )
        )
    finally:
        store.close()
    # Back: two new snapshots, counters went on growing meanwhile.
    node.generate_minutes(minute_floor_ns(now) - 2 * NS_PER_MINUTE, 2)
    post = node.collected_ats()[-2:]
    assert post[0] - pre_gap[-1] > 3 * HOUR - 2 * NS_PER_MINUTE

    # One collect walks the chunks of the gap (each the exporter's empty page) and on.
    doc = env.json("collect", "--source", "node-01")
    assert only(doc, "node-01")["status"] == "ok"
    store = open_store(db_url)
    try:
        cp = store.get_checkpoint("node-01")
    finally:
        store.close()
    assert cp is not None
    assert cp.last_successful_until_ns is not None
    assert cp.last_successful_until_ns > post[-1]
    assert cp.newest_collected_at_ns == post[-1]

    usage = usage_by_minute(db_url)
    before, first, second = node.totals(pre_gap[-1]), node.totals(post[0]), node.totals(post[1])
    for uuid in node.uuids:
        gap_delta = sum(first[uuid]) - sum(before[uuid])
        assert usage.get((uuid, minute_floor_ns(post[0])), 0) == gap_delta
        assert usage.get((uuid, minute_floor_ns(post[1])), 0) == sum(second[uuid]) - sum(
            first[uuid]
        )
    # Nothing at all was billed inside the gap.
    assert not [m for (_, m) in usage if gap_start <= m < minute_floor_ns(post[0])]
    # And everything since the first snapshot, exactly.
    assert store_usage(db_url, "node-01") == expected_usage(node, pre_gap[0], post[-1])


def test_status_is_not_fooled_by_a_stale_exporter_whose_requests_succeed(make: MakeEnv) -> None:
    # The exporter is up, its Xray is not: the last snapshot is 20 minutes old, every
    # window since is the empty page. Every request succeeds.
    env = make(series=4, minutes=10, end_ns=now_ns() - 20 * NS_PER_MINUTE)
    doc = env.json("collect")
    assert only(doc)["status"] == "ok"
    res = env.run("status", "--json")
    assert res.exit_code == 1, res.output
    [src] = orjson.loads(res.stdout)["sources"]
    assert (src["health"], src["consecutive_failures"]) == ("failing", 0)
    assert src["reasons"][0].startswith("stale: newest snapshot received is 2")
    assert src["lag_seconds"] > 20 * 60


def test_status_fails_a_source_whose_samples_are_all_refused(make: MakeEnv) -> None:
    env = make(series=5, minutes=4, end_ns=now_ns())  # fresh data: only billability fails
    env.sim.fleet.node("node-01").set_fault("bad_samples")  # every counter a string
    doc = env.json("collect")
    row = only(doc)
    assert (row["status"], row["samples"], row["rejected"]) == ("ok", 0, 20)
    res = env.run("status", "--json")
    assert res.exit_code == 1, res.output
    [src] = orjson.loads(res.stdout)["sources"]
    assert src["health"] == "failing"
    [reason] = src["reasons"]
    assert reason.startswith(
        "nothing billable: all 20 samples of the last run were refused: "
        "uplink_bytes_total must be a JSON integer"
    )
    assert src["last_run"]["counts"]["rejected"] == 20
    assert src["refused_share"] == 1.0


def test_legacy_latest_without_a_snapshot_yet_is_no_failure_then_bills_exactly(
    cli: CliRunnerFn, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The legacy single-source shim against the deployed exporter: plain HTTP on
    loopback, its token required, and 404 'no snapshot available' until it has one."""
    token = "internal-service-token-1234"
    # History starts ten minutes ago, so the minutes it gains stay in the past.
    end = now_ns() - 10 * NS_PER_MINUTE
    fleet = Fleet(["tokyo-1"], series=5, minutes=0, end_ns=end, tokens={"tokyo-1": token})
    fleet.start()
    try:
        monkeypatch.setenv("EXPORTER_BASE_URL", fleet.url)
        monkeypatch.setenv("EXPORTER_NODE_ID", "tokyo-1")
        monkeypatch.setenv("EXPORTER_ENV", "prod")
        monkeypatch.setenv("EXPORTER_TOKEN_REF", "env:EXPORTER_TOKEN")
        monkeypatch.setenv("EXPORTER_TOKEN", token)
        db = str(tmp_path / "billing.db")

        def collect() -> dict[str, Any]:
            res = cli("--db", db, "collect", "--source", "legacy", "--json")
            assert res.exit_code == 0, res.output
            doc: dict[str, Any] = orjson.loads(res.stdout)
            return only(doc, "legacy")

        first = collect()
        assert (first["status"], first["items"], first["error"]) == ("ok", 0, None)
        assert "no snapshot yet" in first["note"]
        status = cli("--db", db, "status", "--json")
        [src] = orjson.loads(status.stdout)["sources"]
        assert src["health"] == "healthy"  # a minute without data is no alarm yet
        assert src["newest_collected_at"] is None

        node = fleet.node("tokyo-1")
        for _ in range(3):  # one snapshot a minute, one collect a minute
            fleet.advance(1)
            row = collect()
            assert (row["status"], row["items"], row["rejected"], row["note"]) == (
                "ok",
                1,
                0,
                None,
            )
        ats = node.collected_ats()
        assert len(ats) == 3
        assert store_usage(db) == expected_usage(node, ats[0], ats[-1])
    finally:
        fleet.stop()


def test_ingest_of_the_exporters_store_file_bills_exactly(
    cli: CliRunnerFn, tmp_path: Path, db_url: str
) -> None:
    registry = tmp_path / "sources.toml"
    registry.write_text(
        # The recorded store file is dated 2026-11: a long horizon keeps it applicable.
        '[defaults]\nretention = "36500d"\n'
        '[[sources]]\nsource_id = "tokyo-1"\nnode_id = "tokyo-1"\nenv = "prod"\n'
        'base_url = "https://exporter.tokyo-1.example.net:9443"\nauth_mode = "bearer"\n'
        'credential_ref = "env:TOKYO_TOKEN"\nca_bundle_ref = "system"\n' + DEFAULT_PRICING
    )
    path = FIXTURES / "snapshots.json"
    args = ("--registry", str(registry), "--db", db_url, "ingest", "--source", "tokyo-1")
    res = cli(*args, str(path), "--json")
    assert res.exit_code == 0, res.output
    doc = orjson.loads(res.stdout)
    assert (doc["items"], doc["samples"], doc["rejected_samples"]) == (5, 8, 0)
    assert usage_by_minute(db_url) == {
        ("0b8e6f5c-3d2a-4b1e-9f7c-1a2b3c4d5e6f", 1795514460 * 10**9): 500 + 4000,
        ("0b8e6f5c-3d2a-4b1e-9f7c-1a2b3c4d5e6f", 1795514520 * 10**9): 1000 + 10000,
        ("0b8e6f5c-3d2a-4b1e-9f7c-1a2b3c4d5e6f", 1795514580 * 10**9): 100 + 100,
        ("legacy-user-42", 1795514460 * 10**9): 100 + 200,
        ("legacy-user-42", 1795514580 * 10**9): 300 + 1000,
    }
    again = orjson.loads(cli(*args, str(path), "--json").stdout)
    assert (again["new_observations"], again["duplicates"]) == (0, 8)


def test_ingest_of_a_simulated_store_file_matches_the_simulator(
    cli: CliRunnerFn, tmp_path: Path, sim_fleet: Callable[..., SimFleet]
) -> None:
    sim = sim_fleet(series=7, minutes=20)
    node = sim.fleet.node("node-01")
    path = node.write_store_file(tmp_path / "snapshots.json")
    db = str(tmp_path / "billing.db")
    res = cli("--db", db, "ingest", str(path), "--json")
    assert res.exit_code == 0, res.output
    ats = node.collected_ats()
    assert store_usage(db) == expected_usage(node, ats[0], ats[-1])


def test_an_exporter_with_its_snapshot_api_off_is_named_not_invalid_json(make: MakeEnv) -> None:
    env = make(series=2, minutes=2)
    env.sim.fleet.node("node-01").set_fault("snapshots_disabled")
    doc = env.json("collect", expect=1)
    error = only(doc)["error"]
    assert error.startswith("source 'node-01': exporter 127.0.0.1 answered an HTML page for ")
    assert "its snapshot API is off (the exporter needs EXPORTER_NODE_ID" in error


def test_a_wrong_base_url_quotes_the_exporters_404(make: MakeEnv) -> None:
    env = make(series=2, minutes=2)
    text = env.registry.read_text().replace("/nodes/node-01", "/nodes/node-01/api")
    env.registry.write_text(text)
    doc = env.json("collect", expect=1)
    assert only(doc)["error"] == (
        "source 'node-01': exporter 127.0.0.1 answered HTTP 404 for "
        "/nodes/node-01/api/v1/snapshots/window (404 page not found); check base_url "
        "(the exporter serves /v1/snapshots/ below it)"
    )

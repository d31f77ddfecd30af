"""``billing reconcile`` end to end against the simulated fleet over real TLS.

The report is checked against the store itself: the bucket changes it lists must be
exactly the difference between the usage rows before and after, and its adjustments must
be exactly the ledger rows the run appended. ``--dry-run`` must leave the database
unchanged row for row.
"""

from __future__ import annotations

import os
import re
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import orjson
import pytest
from _collect_support import (
    Env,
    MakeEnv,
    dump_sqlite,
    expected_usage,
    make,  # noqa: F401  (fixture)
    only,
    store_usage,
    usage_rows,
)
from simfleet import SimFleet, sim_fleet  # noqa: F401  (fixture)

from billing_cli._time import NS_PER_MINUTE, NS_PER_SECOND, format_rfc3339_ns, minute_floor_ns
from billing_cli.store import open_store
from billing_cli.store.base import RowFilter


def _late_item_outside_overlap(env: Env) -> int:
    """Collect, then make an item appear 10 minutes back: the 2m overlap cannot see it."""
    assert env.json("collect")["outcome"] == "ok"
    node = env.sim.fleet.node("node-01")
    ats = node.collected_ats()
    late = node.add_late_item(ats[-10] + 30 * NS_PER_SECOND, appear_after_minutes=0)
    row = only(env.json("collect", "--source", "node-01"))
    assert row["status"] == "ok"
    assert row["new_observations"] == 0  # outside the overlap: collect misses it
    return late


def _checkpoint(env: Env) -> Any:
    store = open_store(env.db)
    try:
        return store.get_checkpoint("node-01")
    finally:
        store.close()


def _ledger(env: Env) -> list[Any]:
    store = open_store(env.db)
    try:
        return list(store.iter_ledger(RowFilter()))
    finally:
        store.close()


def test_reconcile_repairs_a_late_item_and_the_report_matches(make: MakeEnv) -> None:
    env = make(series=5, minutes=20)
    late = _late_item_outside_overlap(env)
    before = usage_rows(env.db)
    ledger_before = {r.entry_id for r in _ledger(env)}
    cp_before = _checkpoint(env)

    doc = env.json("reconcile", "--source", "node-01", "--since", "2h")
    assert doc["dry_run"] is False
    assert doc["run_id"] is not None
    row = only(doc)
    assert row["status"] == "ok"
    assert row["new_observations"] == 5
    assert row["duplicates"] == 100
    assert row["conflicts"] == 0

    after = usage_rows(env.db)
    diff = {k: (before.get(k, (0, 0)), v) for k, v in after.items() if before.get(k) != v}
    diff.update({k: (v, (0, 0)) for k, v in before.items() if k not in after})
    listed = {
        (c["node_id"], c["uuid"], _ns(c["bucket_start"])): (
            (c["old_uplink_bytes"], c["old_downlink_bytes"]),
            (c["new_uplink_bytes"], c["new_downlink_bytes"]),
        )
        for c in row["bucket_changes"]
    }
    assert diff
    assert listed == diff
    assert row["buckets_repaired"] == len(diff)
    # An interpolated late item only moves bytes between minutes: the total is unchanged.
    assert row["bytes_delta"] == 0
    assert minute_floor_ns(late) in {k[2] for k in diff}

    new_rows = [r for r in _ledger(env) if r.entry_id not in ledger_before]
    adjustments = [r for r in new_rows if r.entry_type == "adjustment"]
    assert row["ledger_adjustments"] == len(adjustments)
    assert all(r.run_id == doc["run_id"] for r in new_rows)
    from billing_cli.core.money import format_amount

    assert row["adjustment_amount"] == format_amount(sum(r.amount_nano for r in adjustments))
    charges = [r for r in new_rows if r.entry_type == "charge"]
    assert row["charges"] == len(charges)
    assert row["charge_amount"] == format_amount(sum(r.amount_nano for r in charges))
    # The net money the run posted: every row it appended.
    assert row["amount"] == format_amount(sum(r.amount_nano for r in new_rows))
    assert doc["currency"] == "USD"
    assert row["completeness"]["missing_minutes"] is not None

    # Exact totals afterwards, and the checkpoint did not move.
    node = env.sim.fleet.node("node-01")
    ats = node.collected_ats()
    assert store_usage(env.db) == expected_usage(node, ats[0], ats[-1])
    assert _checkpoint(env) == cp_before

    # A second reconcile finds nothing left to repair.
    again = only(env.json("reconcile", "--source", "node-01", "--since", "2h"))
    assert again["new_observations"] == 0
    assert again["buckets_repaired"] == 0
    assert again["ledger_adjustments"] == 0


def test_the_report_counts_new_charges_in_the_amount(make: MakeEnv) -> None:
    """A reconcile of never-collected minutes posts charges, not adjustments: the amount is
    their sum (it was 0.000000000: only adjustments were counted) and matches what
    `billing ingest` calls charged_amount for the same data."""
    env = make(series=4, minutes=10)
    doc = env.json("reconcile", "--source", "node-01", "--since", "2h")
    row = only(doc)
    posted = [r for r in _ledger(env) if r.run_id == doc["run_id"]]
    assert posted
    assert all(r.entry_type == "charge" for r in posted)
    from billing_cli.core.money import format_amount

    total = format_amount(sum(r.amount_nano for r in posted))
    assert total != "0.000000000"
    assert row["amount"] == total
    assert row["charge_amount"] == total
    assert row["charges"] == len(posted)
    assert (row["ledger_adjustments"], row["adjustment_amount"]) == (0, "0.000000000")
    # People see the same figure.
    again = make(series=4, minutes=10)
    res = again.run("reconcile", "--source", "node-01", "--since", "2h")
    assert res.exit_code == 0, res.output
    assert total in res.stdout


def _ns(text: str) -> int:
    from billing_cli._time import parse_rfc3339_ns

    return parse_rfc3339_ns(text)


def test_dry_run_writes_nothing_and_reports_the_same(make: MakeEnv) -> None:
    env = make(series=5, minutes=20)
    _late_item_outside_overlap(env)
    snapshot = dump_sqlite(env.db)
    dry = env.json("reconcile", "--source", "node-01", "--since", "2h", "--dry-run")
    assert dry["dry_run"] is True
    assert dry["run_id"] is None
    assert dump_sqlite(env.db) == snapshot  # row for row, every table

    real = env.json("reconcile", "--source", "node-01", "--since", "2h")
    assert dump_sqlite(env.db) != snapshot
    a, b = only(dry), only(real)
    for key in (
        "new_observations",
        "duplicates",
        "conflicts",
        "buckets_repaired",
        "bucket_changes",
        "bytes_delta",
        "ledger_adjustments",
        "adjustment_amount",
        "completeness",
    ):
        assert a[key] == b[key], key
    assert a["buckets_repaired"] > 0


@pytest.mark.postgres
def test_dry_run_on_postgres_writes_nothing(make: MakeEnv, postgres_url: str) -> None:
    import psycopg

    def dump() -> dict[str, list[Any]]:
        with psycopg.connect(postgres_url) as conn:
            names = [
                r[0]
                for r in conn.execute(
                    "SELECT table_name FROM information_schema.tables "
                    "WHERE table_schema = current_schema() AND table_type = 'BASE TABLE'"
                )
            ]
            return {
                n: sorted(conn.execute(f'SELECT * FROM "{n}"').fetchall(), key=repr) for n in names
            }

    env = make(series=5, minutes=20, db=postgres_url)
    _late_item_outside_overlap(env)
    snapshot = dump()
    assert snapshot
    row = only(env.json("reconcile", "--source", "node-01", "--since", "2h", "--dry-run"))
    assert row["new_observations"] == 5
    assert dump() == snapshot


def test_holes_are_reported(make: MakeEnv) -> None:
    env = make(series=3, minutes=10)
    ats = env.sim.fleet.node("node-01").collected_ats()
    first, last = minute_floor_ns(ats[0]), minute_floor_ns(ats[-1])
    since = first - 5 * NS_PER_MINUTE
    until = last + 4 * NS_PER_MINUTE
    doc = env.json(
        "reconcile",
        "--source",
        "node-01",
        "--since",
        format_rfc3339_ns(since),
        "--until",
        format_rfc3339_ns(until),
    )
    comp = only(doc)["completeness"]
    assert comp["minutes"] == 18
    assert comp["minutes_with_items"] == 10
    assert comp["missing_minutes"] == 8
    assert comp["holes"] == [
        {"start": format_rfc3339_ns(since), "end": format_rfc3339_ns(first)},
        {"start": format_rfc3339_ns(last + NS_PER_MINUTE), "end": format_rfc3339_ns(until)},
    ]
    # People get the holes listed too.
    res = env.run(
        "reconcile",
        "--source",
        "node-01",
        "--since",
        format_rfc3339_ns(since),
        "--until",
        format_rfc3339_ns(until),
        "--dry-run",
    )
    assert res.exit_code == 0, res.output
    assert f"no items in [{format_rfc3339_ns(since)}, {format_rfc3339_ns(first)})" in res.stdout


def test_all_sources_and_flag_errors(make: MakeEnv) -> None:
    env = make(nodes=2, series=3, minutes=5)
    doc = env.json("reconcile", "--all", "--since", "2h")
    assert {s["source_id"] for s in doc["sources"]} == {"node-01", "node-02"}
    assert all(s["new_observations"] == 15 for s in doc["sources"])
    for args, needle in (
        (("reconcile", "--source", "node-01"), "--since is required"),
        (("reconcile", "--since", "1h"), "--source ID"),
        (("reconcile", "--all", "--source", "node-01", "--since", "1h"), "--source ID"),
        (("reconcile", "--source", "node-01", "--since", "1h", "--until", "2h"), "is not before"),
        (("reconcile", "--source", "nope", "--since", "1h"), "no source 'nope'"),
    ):
        res = env.run(*args)
        assert res.exit_code == 2, (args, res.output)
        assert needle in res.stderr, (args, res.stderr)
        assert "Traceback" not in res.output


def test_reconcile_takes_the_source_lock(make: MakeEnv) -> None:
    from billing_cli.collect.locks import locker_for

    env = make(series=3, minutes=5)
    held = locker_for(env.db).try_acquire("node-01")
    assert held is not None
    try:
        doc = env.json("reconcile", "--source", "node-01", "--since", "1h", expect=75)
        assert only(doc)["status"] == "skipped"
    finally:
        held.release()


def test_failed_source_exit_1(make: MakeEnv) -> None:
    env = make(series=3, minutes=5)
    env.sim.fleet.node("node-01").set_fault("wrong_node_id")
    row = only(env.json("reconcile", "--source", "node-01", "--since", "1h", expect=1))
    assert row["status"] == "failed"
    assert "node-01-impostor" in row["error"]
    assert store_usage(env.db) == {}


def test_without_a_price_reconcile_warns_that_everything_rates_at_zero(make: MakeEnv) -> None:
    env = make(series=3, minutes=5)
    assert env.run("collect").exit_code == 0
    env.registry.write_text(env.sim.registry_toml + '\n[pricing]\ncurrency = "EUR"\n')
    for args in (("--dry-run",), ()):
        res = env.run("reconcile", "--source", "node-01", "--since", "1h", *args)
        assert res.exit_code == 0, res.output
        assert [line for line in res.stderr.splitlines() if line.startswith("warning:")] == [
            f"warning: {env.registry}: [pricing] sets no price_per_unit: everything rates at "
            'zero (set price_per_unit, "0" to make it free on purpose)'
        ]


def _spawn(env: Env, *args: str) -> subprocess.Popen[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("BILLING_", "EXPORTER_"))}
    clean.pop("DATABASE_URL", None)
    return subprocess.Popen(
        [sys.executable, "-m", "billing_cli", "--registry", str(env.registry), "--db", env.db,
         *args],
        env=clean,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip


def test_a_long_dry_run_does_not_block_billing(make: MakeEnv) -> None:
    """While a dry run of one source runs in one process, a collect of another source, and
    the read commands, succeed in other processes — they finish before the dry run does.
    (Before: the dry run held the SQLite write lock from its first page to its last, and
    they failed after 30 s with "database is locked".)"""
    env = make(nodes=2, series=5, minutes=20, defaults="page_limit = 1")
    assert env.json("collect")["outcome"] == "ok"
    node = env.sim.fleet.node("node-01")
    node.set_fault("slow", delay_s=0.4)  # ~21 pages: the dry run takes ~9 s
    env.sim.fleet.advance(2)  # something for node-02's collect to apply
    served = len(node.requests)
    dry = _spawn(env, "reconcile", "--source", "node-01", "--since", "2h", "--dry-run", "--json")
    try:
        deadline = time.monotonic() + 30
        while len(node.requests) < served + 4:  # the dry run has applied pages by now
            assert dry.poll() is None, dry.communicate()
            assert time.monotonic() < deadline
            time.sleep(0.05)
        for args in (
            ("collect", "--source", "node-02", "--json"),
            ("usage", "--json"),
            ("ledger", "--json"),
            ("status", "--json"),
        ):
            proc = _spawn(env, *args)
            out, err = proc.communicate(timeout=60)
            assert proc.returncode in (0, 1), (args, err)
            assert "locked" not in err, (args, err)
            if args[0] == "collect":
                assert proc.returncode == 0, err
                assert only(orjson.loads(out), "node-02")["status"] == "ok"
            # Finished while the dry run still works: nothing waited for it.
            assert dry.poll() is None, (args, "the dry run ended first")
        out, err = dry.communicate(timeout=120)
        assert dry.returncode == 0, err
        assert only(orjson.loads(out))["status"] == "ok"
    finally:
        if dry.poll() is None:
            dry.kill()
            dry.communicate()


def test_until_in_the_future_is_capped_at_now_and_said_once(make: MakeEnv) -> None:
    """It walked ~27,000 empty hourly chunks up to 2030, for hours, holding the lock."""
    env = make(series=3, minutes=10)
    open_store(env.db).close()  # a dry run needs the database it compares against
    node = env.sim.fleet.node("node-01")
    before = time.time_ns()
    res = env.run(
        "reconcile", "--source", "node-01", "--since", "1h", "--until", "2030-01-01T00:00:00Z",
        "--dry-run", "--json",
    )  # fmt: skip
    after = time.time_ns()
    assert res.exit_code == 0, res.output
    assert res.stderr.count("--until 2030-01-01T00:00:00Z is in the future; using now") == 1
    doc = orjson.loads(res.stdout)
    assert before <= _ns(doc["until"]) <= after
    assert only(doc)["status"] == "ok"
    untils = [_ns(q["until"]) for ep, q in node.requests if ep == "window"]
    assert untils
    assert max(untils) < after  # nothing past now was asked for
    assert len(untils) <= 3  # one hour of 1h chunks (plus paging), not 27,000


def test_the_time_budget_stops_a_long_reconcile(make: MakeEnv) -> None:
    env = make(series=3, minutes=20, defaults="page_limit = 1")
    env.sim.fleet.node("node-01").set_fault("slow", delay_s=0.3)
    started = time.monotonic()
    row = only(
        env.json(
            "reconcile", "--source", "node-01", "--since", "2h", "--source-timeout", "1s",
            expect=1,
        )
    )  # fmt: skip
    assert time.monotonic() - started < 30
    assert row["status"] == "failed"
    assert "time budget of 1s" in row["error"]
    assert re.search(
        r"reconcile again with --since \S+Z \(or a --source-timeout above 1s\)", row["error"]
    )
    assert "checkpoint" not in row["error"]  # reconcile never moves checkpoints
    res = env.run("reconcile", "--source", "node-01", "--since", "1h", "--source-timeout", "0s")
    assert res.exit_code == 2
    assert res.stderr.startswith("error: --source-timeout")


def test_a_range_of_too_many_chunks_is_a_flag_error(make: MakeEnv) -> None:
    env = make(series=1, minutes=2)
    res = env.run("reconcile", "--source", "node-01", "--since", "1700-01-01")
    assert res.exit_code == 2, res.output
    assert "chunks of 1h" in res.stderr
    assert env.sim.fleet.node("node-01").requests == []


def test_a_dry_run_creates_and_migrates_nothing(make: MakeEnv, tmp_path: Path) -> None:
    """'Writes nothing': not a new database file, not a schema upgrade."""
    missing = tmp_path / "never-created.db"
    env = make(series=3, minutes=5, db=str(missing))
    res = env.run("reconcile", "--source", "node-01", "--since", "1h", "--dry-run")
    assert res.exit_code == 4, res.output
    assert "does not exist" in res.stderr
    assert not missing.exists()
    # An older schema is refused as it is, not upgraded by a dry run.
    older = tmp_path / "older.db"
    env2 = make(series=3, minutes=5, db=str(older))
    assert env2.run("collect").exit_code == 0
    con = sqlite3.connect(older)
    con.execute("DELETE FROM schema_version WHERE version > 1")
    con.commit()
    con.close()
    res = env2.run("reconcile", "--source", "node-01", "--since", "1h", "--dry-run")
    assert res.exit_code == 4, res.output
    assert "older than this billing" in res.stderr
    con = sqlite3.connect(older)
    assert con.execute("SELECT max(version) FROM schema_version").fetchone() == (1,)
    con.close()

"""``billing period list|close`` through the real CLI, on both back ends."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any, cast

import pytest
from _period_data import setup

from billing_cli.store import open_store
from billing_cli.store.sql import SqlStore

LIST_COLUMNS = [
    "period",
    "state",
    "closed_at",
    "close_run_id",
    "closed_by",
    "currency",
    "postings",
    "total_bytes",
    "rated_bytes",
    "amount",
]


def _json(res: Any) -> Any:
    assert res.exit_code == 0, res.output
    return json.loads(res.stdout)


def test_close_records_who_and_when_and_prints_the_final_totals(
    cli: Any, db_url: str, tmp_path: Path
) -> None:
    base, _ = setup(tmp_path, cli, db_url)
    doc = _json(cli(*base, "period", "close", "2025-11", "--by", "alice", "--json"))
    assert (doc["period"], doc["closed_now"], doc["state"], doc["closed_by"]) == (
        "2025-11",
        True,
        "closed",
        "alice",
    )
    assert doc["totals"] == [
        {
            "currency": "EUR",
            "accounts": 2,
            "uplink_bytes": 1900,
            "downlink_bytes": 3100,
            "total_bytes": 5000,
            "included_bytes_used": 1000,
            "rated_bytes": 5000,
            "charges": "0.004000000",
            "adjustments": "0.000000000",
            "amount": "0.004000000",
        }
    ]
    store = cast(SqlStore, open_store(db_url))
    try:
        runs = store.db.execute(
            "SELECT kind, outcome, actor, started_at_ns, sources FROM runs WHERE run_id = ?",
            (doc["close_run_id"],),
        )
    finally:
        store.close()
    assert [tuple(r[:3]) for r in runs] == [("period_close", "ok", "alice")]
    assert json.loads(runs[0][4]) == ["2025-11"]

    # Idempotent: the first close stands, nothing is recorded again.
    again = _json(cli(*base, "period", "close", "2025-11", "--by", "bob", "--json"))
    assert again["closed_now"] is False
    assert {k: again[k] for k in ("closed_at", "close_run_id", "closed_by", "totals")} == {
        k: doc[k] for k in ("closed_at", "close_run_id", "closed_by", "totals")
    }
    res = cli(*base, "period", "close", "2025-11")
    assert res.exit_code == 0
    assert "2025-11 was already closed at" in res.stdout
    assert "by alice" in res.stdout


def test_close_default_actor_is_user_at_host(cli: Any, db_url: str, tmp_path: Path) -> None:
    import getpass
    import socket

    base, _ = setup(tmp_path, cli, db_url)
    res = cli(*base, "period", "close", "2025-11")
    assert res.exit_code == 0, res.output
    assert f"by {getpass.getuser()}@{socket.gethostname()} (run " in res.stdout
    assert "0.004000000" in res.stdout  # the final totals


def test_a_period_that_has_not_ended_is_refused_with_its_end(
    cli: Any, db_url: str, tmp_path: Path
) -> None:
    base, _ = setup(tmp_path, cli, db_url)
    res = cli(*base, "period", "close", "2200-01")
    assert res.exit_code == 2
    assert res.stderr == (
        "error: period 2200-01 has not ended: it ends at 2200-02-01T00:00:00Z; "
        "close it after that\n"
    )
    assert _json(cli(*base, "period", "list", "--json"))[-1]["state"] == "open"


def test_close_warns_about_sources_not_collected_to_the_end(
    cli: Any, db_url: str, tmp_path: Path
) -> None:
    from billing_cli._time import parse_rfc3339_ns
    from billing_cli.store.base import CheckpointAdvance

    base, _ = setup(tmp_path, cli, db_url)
    store = open_store(db_url)
    try:
        run = store.start_run("collect", ["a", "b"])
        from billing_cli.pricing import Pricing
        from billing_cli.store.base import Batch

        for sid, node, until in (
            ("a", "node-a", "2025-12-01T00:30:00Z"),
            ("b", "node-b", "2025-11-30T23:59:00Z"),
        ):
            adv = CheckpointAdvance(sid, node, "prod", None, parse_rfc3339_ns(until), 0)
            store.apply(Batch([], run, Pricing(), sid, checkpoint=adv))
    finally:
        store.close()
    res = cli(*base, "period", "close", "2025-11")
    assert res.exit_code == 0, res.output
    assert res.stderr == (
        "warning: source 'b' has collected only up to 2025-11-30T23:59:00Z: its later data "
        "for 2025-11 will be carried into 2025-12 or later\n"
    )


def test_list_shows_every_period_with_its_totals(cli: Any, db_url: str, tmp_path: Path) -> None:
    base, late = setup(tmp_path, cli, db_url)
    close = _json(cli(*base, "period", "close", "2025-11", "--json"))
    assert cli(*base, "ingest", str(late)).exit_code == 0
    rows = _json(cli(*base, "period", "list", "--json"))
    assert rows == [
        {
            "period": "2025-11",
            "state": "closed",
            "closed_at": close["closed_at"],
            "close_run_id": close["close_run_id"],
            "closed_by": close["closed_by"],
            "currency": "EUR",
            "postings": 3,
            "total_bytes": 5000,
            "rated_bytes": 5000,
            "amount": "0.004000000",
        },
        {
            "period": "2025-12",
            "state": "open",
            "closed_at": None,
            "close_run_id": None,
            "closed_by": None,
            "currency": "EUR",
            # u1 and u2 at 00:10, u2's adjustment, and the correction carried from November
            "postings": 4,
            "total_bytes": 600,
            "rated_bytes": 600,
            "amount": "0.000100000",
        },
    ]
    res = cli(*base, "period", "list", "--format", "csv")
    table = list(csv.reader(io.StringIO(res.stdout)))
    assert table[0] == LIST_COLUMNS
    assert table[1][:2] == ["2025-11", "closed"]
    assert table[2] == ["2025-12", "open", "", "", "", "EUR", "4", "600", "600", "0.000100000"]
    text = cli(*base, "period", "list")
    assert text.exit_code == 0
    assert "2025-11" in text.stdout
    assert "closed" in text.stdout


def test_list_of_an_empty_store(cli: Any, tmp_path: Path) -> None:
    db = str(tmp_path / "e.db")
    open_store(db).close()
    assert _json(cli("--db", db, "period", "list", "--json")) == []
    assert "No periods yet" in cli("--db", db, "period", "list").stdout


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["close", "2025-1"], "PERIOD: not a period: '2025-1' (expected YYYY-MM"),
        (["close", "2025-11", "--by", " "], "--by"),
        (["close"], "PERIOD"),
        (["list", "--format", "xml"], "--format"),
    ],
)
def test_bad_arguments(cli: Any, tmp_path: Path, args: list[str], needle: str) -> None:
    db = str(tmp_path / "e.db")
    open_store(db).close()
    res = cli("--db", db, "period", *args)
    assert res.exit_code == 2, res.output
    assert needle in res.stderr
    assert "Traceback" not in res.output


def test_missing_database_is_not_created(cli: Any, tmp_path: Path) -> None:
    for args in (["list"], ["close", "2025-11"]):
        res = cli("--db", str(tmp_path / "none.db"), "period", *args)
        assert res.exit_code == 4
    assert not (tmp_path / "none.db").exists()


def test_close_warns_about_registered_sources_that_never_collected(
    cli: Any, db_url: str, tmp_path: Path
) -> None:
    base, _ = setup(tmp_path, cli, db_url)
    registry = tmp_path / "sources.toml"
    registry.write_text(
        '[defaults]\nca_bundle_ref = "system"\n'
        '[[sources]]\nsource_id = "never"\nnode_id = "n"\nenv = "prod"\n'
        'base_url = "https://n.example.net"\nauth_mode = "bearer"\ncredential_ref = "env:T"\n'
        '[[sources]]\nsource_id = "off"\nnode_id = "o"\nenv = "prod"\nenabled = false\n'
        'base_url = "https://o.example.net"\nauth_mode = "bearer"\ncredential_ref = "env:T"\n'
    )
    res = cli(*base, "--registry", str(registry), "period", "close", "2025-11")
    assert res.exit_code == 0, res.output
    assert res.stderr == (
        "warning: source 'never' has collected nothing yet: its later data for 2025-11 will "
        "be carried into 2025-12 or later\n"
    )

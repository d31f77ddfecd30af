"""``billing integrity list|ack`` on both stores, with events made by ``store.apply``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import pytest
from conftest import CliRunnerFn

from billing_cli._time import format_rfc3339_ns, parse_rfc3339_ns
from billing_cli.core.types import Item, Rejection, Sample
from billing_cli.pricing import Pricing
from billing_cli.store import open_store
from billing_cli.store.base import Batch

M = 60_000_000_000
T0 = parse_rfc3339_ns("2026-11-24T10:00:00Z")
PRICING = Pricing(price_per_unit="0.5", unit="KB", currency="EUR", rule_version="r7")
REGISTRY = """\
[[sources]]
source_id = "a"
node_id = "node-a"
env = "prod"
base_url = "https://a.example.net:9550"
auth_mode = "bearer"
credential_ref = "env:TOKEN_A"
ca_bundle_ref = "system"
"""
FIELDS = [
    "id",
    "kind",
    "node_id",
    "env",
    "uuid",
    "inbound_tag",
    "collected_at",
    "source_id",
    "run_id",
    "detail",
    "created_at",
    "acknowledged_at",
]


def _item(t: int, up: int) -> Item:
    return Item(t, "node-a", "prod", None, [Sample("u1", "u1@x", "vless", up, up)])


@pytest.fixture
def db(db_url: str) -> str:
    """Source ``a``: one conflict and one rejected sample, both through ``apply``; plus
    an identity mismatch without a source."""
    store = open_store(db_url)
    try:
        run = store.start_run("ingest", ["a"])
        store.apply(Batch([_item(T0, 0), _item(T0 + M, 100)], run, PRICING, "a"))
        rej = Rejection(T0 + M, "node-a", "prod", "u2", "vmess", "uplink_bytes_total: not an int")
        store.apply(Batch([_item(T0 + M, 999)], run, PRICING, "a", rejections=[rej]))
        store.record_integrity_event(
            "identity_mismatch", node_id="imp", env="prod", detail="page from [/] [bold]x"
        )
    finally:
        store.close()
    return db_url


def _list(cli: CliRunnerFn, db: str, *args: str) -> list[dict[str, Any]]:
    res = cli("--db", db, "integrity", "list", "--json", *args)
    assert res.exit_code == 0, res.output
    rows: list[dict[str, Any]] = orjson.loads(res.stdout)
    return rows


def _open_events(cli: CliRunnerFn, db: str, tmp_path: Path) -> tuple[int, int]:
    """(open events of source a, unattributed) as ``billing status --json`` counts them."""
    reg = tmp_path / "sources.toml"
    reg.write_text(REGISTRY)
    res = cli("--registry", str(reg), "--db", db, "status", "--json")
    assert res.exit_code in (0, 1), res.output
    doc = orjson.loads(res.stdout)
    (a,) = doc["sources"]
    return a["open_integrity_events"], doc["unattributed_integrity_events"]


def test_list_shows_apply_events_with_every_field(cli: CliRunnerFn, db: str) -> None:
    rows = _list(cli, db)
    assert [list(r) for r in rows] == [FIELDS] * 3
    assert sorted(r["kind"] for r in rows[:2]) == ["conflict", "rejected"]
    assert rows[2]["kind"] == "identity_mismatch"
    by_kind = {r["kind"]: r for r in rows}
    conflict, rejected = by_kind["conflict"], by_kind["rejected"]
    assert (conflict["node_id"], conflict["env"], conflict["uuid"]) == ("node-a", "prod", "u1")
    assert conflict["collected_at"] == format_rfc3339_ns(T0 + M)
    assert conflict["source_id"] == "a"
    assert isinstance(conflict["run_id"], int)
    assert "999" in conflict["detail"]
    assert conflict["created_at"].endswith("Z")
    assert conflict["acknowledged_at"] is None
    assert (rejected["uuid"], rejected["inbound_tag"]) == ("u2", "vmess")
    assert "not an int" in rejected["detail"]
    unattributed = by_kind["identity_mismatch"]
    assert (unattributed["source_id"], unattributed["collected_at"]) == (None, None)
    assert (unattributed["run_id"], unattributed["node_id"]) == (None, "imp")
    # Filters.
    assert [r["kind"] for r in _list(cli, db, "--kind", "rejected")] == ["rejected"]
    assert {r["source_id"] for r in _list(cli, db, "--source", "a")} == {"a"}
    assert _list(cli, db, "--source", "zz") == []
    assert len(_list(cli, db, "--since", "1h")) == 3
    assert _list(cli, db, "--since", "2099-01-01T00:00:00Z") == []
    # The table names each event by id and kind.
    res = cli("--db", db, "integrity", "list")
    assert res.exit_code == 0, res.output
    for r in rows:
        assert str(r["id"]) in res.stdout
    assert "conflict" in res.stdout
    assert "identity_mismatch" in res.stdout
    assert "page from [/] [bold]x" in res.stdout  # exporter text is not rich markup


def test_ack_changes_status_counts_and_list(cli: CliRunnerFn, db: str, tmp_path: Path) -> None:
    assert _open_events(cli, db, tmp_path) == (2, 1)
    rows = _list(cli, db)
    conflict = next(r for r in rows if r["kind"] == "conflict")

    res = cli("--db", db, "integrity", "ack", str(conflict["id"]))
    assert res.exit_code == 0, res.output
    assert "acknowledged 1 " in res.stdout
    assert _open_events(cli, db, tmp_path) == (1, 1)
    assert conflict["id"] not in [r["id"] for r in _list(cli, db)]
    # --all keeps acknowledged events, with their time.
    every = {r["id"]: r for r in _list(cli, db, "--all")}
    assert len(every) == 3
    assert every[conflict["id"]]["acknowledged_at"].endswith("Z")

    # Acknowledging again changes nothing.
    res = cli("--db", db, "integrity", "ack", str(conflict["id"]), "--json")
    assert orjson.loads(res.stdout) == {"acknowledged": 0}

    res = cli("--db", db, "integrity", "ack", "--source", "a", "--json")
    assert orjson.loads(res.stdout) == {"acknowledged": 1}
    assert _open_events(cli, db, tmp_path) == (0, 1)

    res = cli("--db", db, "integrity", "ack", "--all-open", "--json")
    assert orjson.loads(res.stdout) == {"acknowledged": 1}
    assert _open_events(cli, db, tmp_path) == (0, 0)
    assert _list(cli, db) == []
    res = cli("--db", db, "integrity", "list")
    assert "No open integrity events" in res.stdout


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (("list", "--kind", "bogus"), "--kind"),
        (("list", "--since", "yesterday"), "--since"),
        (("ack",), "--all-open"),
        (("ack", "x1"), "'x1'"),
        (("ack", "--all-open", "--source", "a"), "--all-open"),
    ],
)
def test_bad_flags_are_one_line_exit_2(
    cli: CliRunnerFn, tmp_path: Path, args: tuple[str, ...], needle: str
) -> None:
    db = str(tmp_path / "billing.db")
    open_store(db).close()
    res = cli("--db", db, "integrity", *args)
    assert res.exit_code == 2, res.output
    assert needle in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert "Traceback" not in res.output


def test_missing_database_is_one_line_and_not_created(cli: CliRunnerFn, tmp_path: Path) -> None:
    for args in (("list",), ("ack", "--all-open")):
        res = cli("--db", str(tmp_path / "none.db"), "integrity", *args)
        assert res.exit_code == 4, res.output
        assert len(res.stderr.strip().splitlines()) == 1
        assert "billing collect" in res.stderr
    assert not (tmp_path / "none.db").exists()


def test_source_is_one_repeatable_dash_s_flag(cli: CliRunnerFn, db: str) -> None:
    from billing_cli.store import open_store

    store = open_store(db)
    try:
        store.record_integrity_event("anomaly", node_id="n2", env="e", source_id="b", detail="d")
    finally:
        store.close()
    assert {r["source_id"] for r in _list(cli, db, "-s", "a", "-s", "b")} == {"a", "b"}
    assert {r["source_id"] for r in _list(cli, db, "--source", "b")} == {"b"}
    res = cli("--db", db, "integrity", "ack", "-s", "a", "-s", "b", "--json")
    assert res.exit_code == 0, res.output
    assert orjson.loads(res.stdout) == {"acknowledged": 3}
    assert [r["source_id"] for r in _list(cli, db)] == [None]  # the unattributed one is left

"""``billing ledger``: postings (charge, then adjustments), filters, --totals, json/csv shapes."""

from __future__ import annotations

import csv
import io
import json
import re
from pathlib import Path
from typing import Any

import pytest
from _read_data import PRICING, REGISTRY, t

from billing_cli.core.types import Item, Sample
from billing_cli.pricing import Pricing
from billing_cli.store.base import Batch

RFC3339_Z = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z")

COLUMNS = [
    "entry_id",
    "node_id",
    "env",
    "uuid",
    "inbound_tag",
    "bucket_start",
    "revision",
    "entry_type",
    "rated_bytes",
    "amount",
    "currency",
    "pricing_rule_version",
    "run_id",
    "created_at",
    "accounting_period",
    "uplink_bytes",
    "downlink_bytes",
    "included_bytes",
]


def _json(res: Any) -> list[dict[str, Any]]:
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert isinstance(data, list)
    return data


@pytest.fixture
def runs(db_url: str) -> tuple[str, int, int]:
    from _read_data import populate

    run1, run2 = populate(db_url)
    return db_url, run1, run2


def _essence(rows: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
    """What a posting says, without the store-assigned entry_id and created_at."""
    return sorted(
        (
            r["node_id"],
            r["env"],
            r["uuid"],
            r["inbound_tag"],
            r["bucket_start"],
            r["revision"],
            r["entry_type"],
            r["rated_bytes"],
            r["amount"],
            r["currency"],
            r["pricing_rule_version"],
            r["run_id"],
        )
        for r in rows
    )


def _expected(run1: int, run2: int) -> list[tuple[Any, ...]]:
    a = ("node-a", "prod", "u1", "vless")
    b = ("node-a", "prod", "u2", "vless")
    c = ("node-b", "staging", "u1", "trojan")
    tail = ("EUR", "eur-2026")
    return sorted(
        [
            (*a, "2026-11-24T10:01:00Z", 0, "charge", 3_000_000, "1.500000000", *tail, run1),
            (*a, "2026-11-24T10:02:00Z", 0, "charge", 500_000, "0.250000000", *tail, run1),
            (*a, "2026-11-24T11:05:00Z", 0, "charge", 1_000_000, "0.500000000", *tail, run1),
            (*b, "2026-11-24T10:01:00Z", 0, "charge", 500_000, "0.250000000", *tail, run1),
            (*c, "2026-11-24T10:01:00Z", 0, "charge", 1_000_000, "0.500000000", *tail, run1),
            (*a, "2026-11-24T10:01:00Z", 1, "adjustment", 200_000, "0.100000000", *tail, run2),
            (*a, "2026-11-24T10:02:00Z", 1, "adjustment", -200_000, "-0.100000000", *tail, run2),
        ]
    )


def test_postings_as_json_on_both_back_ends(cli: Any, runs: tuple[str, int, int]) -> None:
    url, run1, run2 = runs
    rows = _json(cli("--db", url, "ledger", "--format", "json"))
    assert _essence(rows) == _expected(run1, run2)
    for r in rows:
        assert list(r) == COLUMNS
        assert isinstance(r["amount"], str)  # exact decimal string, never a JSON number
        assert isinstance(r["entry_id"], int)
        assert RFC3339_Z.fullmatch(r["created_at"])
    assert len({r["entry_id"] for r in rows}) == len(rows)
    assert _json(cli("ledger", "--json", "--db", url)) == rows


@pytest.mark.parametrize(
    ("flags", "keep"),
    [
        (["--node-id", "node-b"], lambda r: r[0] == "node-b"),
        (["--env", "prod"], lambda r: r[1] == "prod"),
        (["--uuid", "u2"], lambda r: r[2] == "u2"),
        (
            ["--since", "2026-11-24T10:02:00Z", "--until", "2026-11-24T11:05:00Z"],
            lambda r: r[4] == "2026-11-24T10:02:00Z",
        ),
        (["--uuid", "nobody"], lambda r: False),
    ],
)
def test_filters(cli: Any, runs: tuple[str, int, int], flags: list[str], keep: Any) -> None:
    url, run1, run2 = runs
    rows = _json(cli("--db", url, "ledger", "--json", *flags))
    assert _essence(rows) == [r for r in _expected(run1, run2) if keep(r)]


def test_source_filter(cli: Any, runs: tuple[str, int, int], tmp_path: Path) -> None:
    url, run1, run2 = runs
    (tmp_path / "sources.toml").write_text(REGISTRY)
    rows = _json(cli("--db", url, "ledger", "--json", "--source", "a-prod"))
    assert _essence(rows) == [r for r in _expected(run1, run2) if r[0] == "node-a"]


def test_totals_per_uuid(cli: Any, runs: tuple[str, int, int]) -> None:
    url, _, _ = runs
    rows = _json(cli("--db", url, "ledger", "--json", "--totals"))
    # u1: A 3.2 + 0.3 + 1.0 MB, C 1.0 MB = 5.5 MB at 0.5 EUR/MB
    assert rows == [
        {"uuid": "u1", "rated_bytes": 5_500_000, "amount": "2.750000000", "currency": "EUR"},
        {"uuid": "u2", "rated_bytes": 500_000, "amount": "0.250000000", "currency": "EUR"},
    ]
    res = cli("--db", url, "ledger", "--format", "csv", "--totals")
    assert res.stdout == (
        "uuid,rated_bytes,amount,currency\nu1,5500000,2.750000000,EUR\nu2,500000,0.250000000,EUR\n"
    )


def test_totals_split_by_currency(cli: Any, db_url: str) -> None:
    from billing_cli.store import open_store

    usd = Pricing.model_validate(
        {"currency": "USD", "unit": "B", "price_per_unit": "0.0000000005", "rule_version": "r"}
    )
    store = open_store(db_url)
    try:
        run = store.start_run("ingest", [])
        store.apply(
            Batch(
                items=[
                    Item(t("10:00:00"), "n", "e", None, [Sample("u9", "", "x", 0, 0)]),
                    Item(t("10:01:00"), "n", "e", None, [Sample("u9", "", "x", 3, 0)]),
                ],
                run_id=run,
                pricing=PRICING,
            )
        )
        store.apply(
            Batch(
                items=[Item(t("10:02:00"), "n", "e", None, [Sample("u9", "", "y", 5, 0)])],
                run_id=run,
                pricing=usd,
            )
        )
        store.apply(
            Batch(
                items=[Item(t("10:03:00"), "n", "e", None, [Sample("u9", "", "y", 8, 0)])],
                run_id=run,
                pricing=usd,
            )
        )
    finally:
        store.close()
    rows = _json(cli("--db", db_url, "ledger", "--json", "--totals"))
    # EUR: 3 bytes at 0.5/MB = 0.0000015 EUR exactly. USD: 3 bytes at 0.5 nano/B = 1.5 nano,
    # rounded half-even to 2 nano (the series' first observation of tag y is a baseline).
    assert rows == [
        {"uuid": "u9", "rated_bytes": 3, "amount": "0.000001500", "currency": "EUR"},
        {"uuid": "u9", "rated_bytes": 3, "amount": "0.000000002", "currency": "USD"},
    ]


def test_csv_columns(cli: Any, runs: tuple[str, int, int]) -> None:
    url, run1, _ = runs
    res = cli("--db", url, "ledger", "--format", "csv", "--uuid", "u2")
    assert res.exit_code == 0, res.output
    table = list(csv.reader(io.StringIO(res.stdout)))
    assert table[0] == COLUMNS
    assert len(table) == 2
    row = dict(zip(COLUMNS, table[1], strict=True))
    assert row["amount"] == "0.250000000"
    assert row["entry_type"] == "charge"
    assert row["run_id"] == str(run1)
    assert row["bucket_start"] == "2026-11-24T10:01:00Z"


def test_table_and_empty(cli: Any, runs: tuple[str, int, int]) -> None:
    url, _, _ = runs
    res = cli("--db", url, "ledger", "--totals")
    assert res.exit_code == 0, res.output
    assert "2.750000000" in res.stdout
    assert "EUR" in res.stdout
    empty = cli("--db", url, "ledger", "--uuid", "nobody")
    assert empty.exit_code == 0
    assert "No ledger postings match" in empty.stdout
    assert cli("--db", url, "ledger", "--json", "--uuid", "nobody").stdout == "[]\n"


def test_errors(cli: Any, tmp_path: Path) -> None:
    res = cli("ledger", "--since", "soon")
    assert res.exit_code == 2
    assert "--since" in res.stderr
    res = cli("ledger")
    assert res.exit_code == 4
    assert "billing collect" in res.stderr
    assert "Traceback" not in res.output
    assert not (tmp_path / "billing.db").exists()


def test_help_has_examples(cli: Any) -> None:
    res = cli("ledger", "--help")
    assert res.exit_code == 0
    assert "Examples:" in res.stdout
    assert "--totals" in res.stdout


# --- accounting periods and posting time ------------------------------------------------


@pytest.fixture
def carried(db_url: str) -> str:
    """November 2025 closed, then a late item: its correction is accounted in December."""
    from billing_cli._time import parse_rfc3339_ns
    from billing_cli.core.periods import parse_period
    from billing_cli.store import open_store

    def at(text: str, up: int) -> Item:
        return Item(parse_rfc3339_ns(text), "n", "prod", None, [Sample("u1", "", "t", up, 0)])

    store = open_store(db_url)
    try:
        run = store.start_run("ingest", [])
        store.apply(
            Batch([at("2025-11-30T23:50:00Z", 0), at("2025-11-30T23:58:00Z", 3000)], run, PRICING)
        )
        store.close_period(
            parse_period("2025-11"), actor="ops", now_ns=parse_rfc3339_ns("2025-12-01T00:00:00Z")
        )
        store.apply(
            Batch([at("2025-11-30T23:54:00Z", 1000)], store.start_run("reconcile", []), PRICING)
        )
    finally:
        store.close()
    return db_url


def test_ledger_rows_name_their_accounting_period_and_bytes(cli: Any, carried: str) -> None:
    rows = _json(cli("--db", carried, "ledger", "--json"))
    assert [
        (
            r["bucket_start"],
            r["revision"],
            r["accounting_period"],
            r["uplink_bytes"],
            r["rated_bytes"],
        )
        for r in rows
    ] == [
        ("2025-11-30T23:54:00Z", 0, "2025-12", 1000, 1000),
        ("2025-11-30T23:58:00Z", 0, "2025-11", 3000, 3000),
        ("2025-11-30T23:58:00Z", 1, "2025-12", -1000, -1000),
    ]
    assert {(r["downlink_bytes"], r["included_bytes"]) for r in rows} == {(0, 0)}


def test_period_selects_postings_by_accounting_period(cli: Any, carried: str) -> None:
    nov = _json(cli("--db", carried, "ledger", "--json", "--period", "2025-11"))
    assert [(r["bucket_start"], r["revision"]) for r in nov] == [("2025-11-30T23:58:00Z", 0)]
    dec = _json(cli("--db", carried, "ledger", "--json", "--period", "2025-12"))
    # December holds the correction of the November buckets (it names them).
    assert [(r["bucket_start"], r["revision"]) for r in dec] == [
        ("2025-11-30T23:54:00Z", 0),
        ("2025-11-30T23:58:00Z", 1),
    ]
    # With --since/--until (bucket time) both apply.
    assert (
        _json(
            cli(
                "--db",
                carried,
                "ledger",
                "--json",
                "--period",
                "2025-12",
                "--since",
                "2025-11-30T23:55:00Z",
            )
        )
        == dec[1:]
    )
    totals = _json(cli("--db", carried, "ledger", "--json", "--totals", "--period", "2025-12"))
    assert totals == [{"uuid": "u1", "rated_bytes": 0, "amount": "0.000000000", "currency": "EUR"}]


def test_posted_since_and_until_filter_on_posting_time(
    cli: Any, runs: tuple[str, int, int]
) -> None:
    url, run1, run2 = runs
    rows = _json(cli("--db", url, "ledger", "--json"))
    second = min(r["created_at"] for r in rows if r["run_id"] == run2)
    late = _json(cli("--db", url, "ledger", "--json", "--posted-since", second))
    assert {r["run_id"] for r in late} == {run2}
    early = _json(cli("--db", url, "ledger", "--json", "--posted-until", second))
    assert {r["run_id"] for r in early} == {run1}
    assert len(late) + len(early) == len(rows)
    res = cli("--db", url, "ledger", "--posted-since", second, "--posted-until", second)
    assert res.exit_code == 2
    assert "--posted-since" in res.stderr
    res = cli("--db", url, "ledger", "--posted-since", "yesterday")
    assert (res.exit_code, "--posted-since" in res.stderr) == (2, True)

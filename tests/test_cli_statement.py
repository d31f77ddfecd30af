"""``billing statement``: per-account statements of a period, a pure read of the ledger.

The story of tests/_period_data.py, through the real CLI on both back ends: November's
statement, November closed, late data, November printed again byte-identical, December
carrying the correction as its own line.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

import pytest
from _period_data import setup

COLUMNS = [
    "period",
    "line",
    "uuid",
    "email",
    "corrects_period",
    "currency",
    "uplink_bytes",
    "downlink_bytes",
    "total_bytes",
    "included_bytes_used",
    "rated_bytes",
    "charges",
    "adjustments",
    "amount",
    "rule_versions",
]


def _doc(res: Any) -> dict[str, Any]:
    assert res.exit_code == 0, res.output
    doc: dict[str, Any] = json.loads(res.stdout)
    return doc


def _line(
    line: str,
    uuid: str,
    email: str,
    corrects: str,
    up: int,
    down: int,
    included: int,
    charges: str,
    adjustments: str,
    amount: str,
    versions: list[str],
    period: str,
) -> dict[str, Any]:
    return {
        "period": period,
        "line": line,
        "uuid": uuid,
        "email": email,
        "corrects_period": corrects,
        "currency": "EUR",
        "uplink_bytes": up,
        "downlink_bytes": down,
        "total_bytes": up + down,
        "included_bytes_used": included,
        "rated_bytes": up + down,
        "charges": charges,
        "adjustments": adjustments,
        "amount": amount,
        "rule_versions": versions,
    }


NOV_LINES = [
    _line("account", "u1", "u1@example.org", "", 1500, 3000, 1000, "0.003500000",
          "0.000000000", "0.003500000", ["r1"], "2025-11"),
    _line("account", "u2", "u2@example.org", "", 400, 100, 0, "0.000500000",
          "0.000000000", "0.000500000", ["r1"], "2025-11"),
    _line("total", "", "", "", 1900, 3100, 1000, "0.004000000", "0.000000000",
          "0.004000000", [], "2025-11"),
]  # fmt: skip


def test_statement_of_an_open_period(cli: Any, db_url: str, tmp_path: Path) -> None:
    base, _ = setup(tmp_path, cli, db_url)
    doc = _doc(cli(*base, "statement", "--period", "2025-11", "--json"))
    assert doc == {
        "period": "2025-11",
        "state": "open",
        "closed_at": None,
        "close_run_id": None,
        "closed_by": None,
        "lines": NOV_LINES,
    }
    dec = _doc(cli(*base, "statement", "--period", "2025-12", "--json"))
    assert [
        (x["line"], x["uuid"], x["included_bytes_used"], x["amount"]) for x in dec["lines"]
    ] == [
        ("account", "u1", 500, "0.000000000"),  # December's own quota covers it
        ("account", "u2", 0, "0.000100000"),
        ("total", "", 500, "0.000100000"),
    ]


def test_closed_statement_never_changes_and_the_next_period_carries_the_correction(
    cli: Any, db_url: str, tmp_path: Path
) -> None:
    base, late = setup(tmp_path, cli, db_url)
    res = cli(*base, "period", "close", "2025-11", "--by", "alice")
    assert res.exit_code == 0, res.output
    before = {
        fmt: cli(*base, "statement", "--period", "2025-11", "--format", fmt)
        for fmt in ("table", "json", "csv")
    }
    doc = _doc(before["json"])
    assert (doc["state"], doc["closed_by"], doc["lines"]) == ("closed", "alice", NOV_LINES)
    assert isinstance(doc["close_run_id"], int)
    assert doc["closed_at"].endswith("Z")
    assert "closed" in before["table"].stdout

    assert cli(*base, "ingest", str(late)).exit_code == 0
    for fmt, res in before.items():
        again = cli(*base, "statement", "--period", "2025-11", "--format", fmt)
        assert again.exit_code == 0
        assert again.stdout == res.stdout, fmt  # byte-identical

    dec = _doc(cli(*base, "statement", "--period", "2025-12", "--json"))
    assert dec["state"] == "open"
    assert dec["lines"] == [
        _line("account", "u1", "u1-new@example.org", "", 500, 0, 500, "0.000000000",
              "0.000000000", "0.000000000", ["r1"], "2025-12"),
        _line("account", "u2", "u2@example.org", "", 50, 0, 0, "0.000050000",
              "0.000050000", "0.000100000", ["r1"], "2025-12"),
        # the correction of November, as its own line naming the period it corrects
        _line("carried", "u2", "u2@example.org", "2025-11", 50, 0, 0, "0.000000000",
              "0.000050000", "0.000050000", ["r1"], "2025-12"),
        _line("total", "", "", "", 550, 0, 500, "0.000050000", "0.000050000",
              "0.000100000", [], "2025-12"),
    ]  # fmt: skip


def test_csv_reads_back_with_the_documented_columns(cli: Any, db_url: str, tmp_path: Path) -> None:
    base, late = setup(tmp_path, cli, db_url)
    assert cli(*base, "period", "close", "2025-11").exit_code == 0
    assert cli(*base, "ingest", str(late)).exit_code == 0
    res = cli(*base, "statement", "--period", "2025-12", "--format", "csv")
    assert res.exit_code == 0, res.output
    rows = list(csv.DictReader(io.StringIO(res.stdout)))
    assert list(rows[0]) == COLUMNS
    assert [(r["line"], r["uuid"], r["corrects_period"], r["amount"]) for r in rows] == [
        ("account", "u1", "", "0.000000000"),
        ("account", "u2", "", "0.000100000"),
        ("carried", "u2", "2025-11", "0.000050000"),
        ("total", "", "", "0.000100000"),
    ]
    assert rows[1]["rule_versions"] == "r1"
    assert rows[1]["total_bytes"] == "50"
    # The same numbers as the JSON lines (as text).
    doc = _doc(cli(*base, "statement", "--period", "2025-12", "--json"))
    for r, j in zip(rows, doc["lines"], strict=True):
        assert r["amount"] == j["amount"]
        assert int(r["rated_bytes"]) == j["rated_bytes"]


@pytest.mark.parametrize(
    ("flags", "uuids"),
    [
        (["--uuid", "u2"], ["u2"]),
        (["--uuid", "u2", "--uuid", "u1"], ["u1", "u2"]),
        (["--node-id", "node-a"], ["u1"]),
        (["--env", "prod"], ["u1", "u2"]),
        (["--env", "staging"], []),
        (["--source", "b"], ["u2"]),
        (["--uuid", "nobody"], []),
    ],
)
def test_filters(cli: Any, db_url: str, tmp_path: Path, flags: list[str], uuids: list[str]) -> None:
    base, _ = setup(tmp_path, cli, db_url)
    doc = _doc(cli(*base, "statement", "--period", "2025-11", "--json", *flags))
    assert [x["uuid"] for x in doc["lines"] if x["line"] == "account"] == uuids
    totals = [x for x in doc["lines"] if x["line"] == "total"]
    assert len(totals) == (1 if uuids else 0)


def test_table_and_empty_period(cli: Any, db_url: str, tmp_path: Path) -> None:
    base, _ = setup(tmp_path, cli, db_url)
    res = cli(*base, "statement", "--period", "2025-11")
    assert res.exit_code == 0, res.output
    assert "Statement 2025-11 (open)" in res.stdout
    for text in ("u1@example.org", "0.003500000", "0.004000000", "total"):
        assert text in res.stdout
    empty = cli(*base, "statement", "--period", "2024-01")
    assert (empty.exit_code, "No postings are accounted in 2024-01" in empty.stdout) == (0, True)
    assert _doc(cli(*base, "statement", "--period", "2024-01", "--json"))["lines"] == []
    csv_empty = cli(*base, "statement", "--period", "2024-01", "--format", "csv")
    assert csv_empty.stdout == ",".join(COLUMNS) + "\n"


@pytest.mark.parametrize(
    ("flags", "code", "needle"),
    [
        ([], 2, "--period"),
        (["--period", "2025-13"], 2, "--period: not a period"),
        (["--period", "2025-11", "--format", "xml"], 2, "--format"),
        (["--period", "2025-11", "--format", "csv", "--json"], 2, "--json"),
    ],
)
def test_bad_flags(cli: Any, tmp_path: Path, flags: list[str], code: int, needle: str) -> None:
    res = cli("--db", str(tmp_path / "b.db"), "statement", *flags)
    assert res.exit_code == code, res.output
    assert needle in res.stderr
    assert "Traceback" not in res.output


def test_missing_database_is_reported_not_created(cli: Any, tmp_path: Path) -> None:
    res = cli("--db", str(tmp_path / "none.db"), "statement", "--period", "2025-11")
    assert res.exit_code == 4
    assert not (tmp_path / "none.db").exists()

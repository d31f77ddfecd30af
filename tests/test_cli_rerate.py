"""``billing rerate``: a price change applied to an open period by posting differences."""

from __future__ import annotations

import json
from decimal import Decimal
from pathlib import Path
from typing import Any, cast

import pytest
from _period_data import FIRST, REGISTRY, setup, write

from billing_cli.store import open_store
from billing_cli.store.sql import SqlStore

NEW_PRICE = (
    REGISTRY.replace('price_per_unit = "0.001"', 'price_per_unit = "0.002"')
    .replace('rule_version = "r1"', 'rule_version = "r2"')
    .replace("u1 = 1000", "u1 = 4000")
)


def _json(res: Any) -> Any:
    assert res.exit_code == 0, res.output
    return json.loads(res.stdout)


def _bucket_sums(cli: Any, base: list[str]) -> dict[tuple[str, str], tuple[int, int, str]]:
    """Per bucket: the sums of its postings (rated bytes, included bytes, amount)."""
    acc: dict[tuple[str, str], list[Any]] = {}
    for r in _json(cli(*base, "ledger", "--json")):
        s = acc.setdefault((r["uuid"], r["bucket_start"]), [0, 0, 0])
        s[0] += r["rated_bytes"]
        s[1] += r["included_bytes"]
        s[2] += Decimal(r["amount"])  # exact decimal strings, never floats
    return {k: (v[0], v[1], str(v[2])) for k, v in acc.items()}


def _dump(db: str) -> dict[str, list[tuple[Any, ...]]]:
    store = cast(SqlStore, open_store(db))
    try:
        tables = ["buckets", "ledger_postings", "runs", "run_sources", "closed_periods"]
        return {
            t: sorted(map(tuple, store.db.execute(f"SELECT * FROM {t}")), key=repr) for t in tables
        }
    finally:
        store.close()


def test_rerate_equals_rating_from_scratch_and_twice_posts_nothing(
    cli: Any, db_url: str, tmp_path: Path
) -> None:
    base, _ = setup(tmp_path, cli, db_url)
    (tmp_path / "sources.toml").write_text(NEW_PRICE)
    for period in ("2025-11", "2025-12"):
        doc = _json(cli(*base, "rerate", "--period", period, "--json"))
        assert doc["dry_run"] is False
        assert doc["rule_version"] == "r2"
        assert doc["postings"] > 0
    # A fresh database rated under the new price from the start.
    scratch_dir = tmp_path / "scratch"
    scratch_dir.mkdir()
    (scratch_dir / "sources.toml").write_text(NEW_PRICE)
    scratch = ["--registry", str(scratch_dir / "sources.toml"), "--db", str(scratch_dir / "s.db")]
    assert cli(*scratch, "ingest", str(write(scratch_dir / "f.ndjson", FIRST))).exit_code == 0
    assert _bucket_sums(cli, base) == _bucket_sums(cli, scratch)
    assert _json(cli(*base, "ledger", "--totals", "--json")) == _json(
        cli(*scratch, "ledger", "--totals", "--json")
    )
    # u1's November: 4,500 B with 4,000 included -> 500 B at 2 µEUR = 0.001 EUR.
    nov = _json(cli(*base, "statement", "--period", "2025-11", "--json"))["lines"]
    assert [(x["uuid"], x["included_bytes_used"], x["amount"]) for x in nov[:2]] == [
        ("u1", 4000, "0.001000000"),
        ("u2", 0, "0.001000000"),
    ]
    assert nov[0]["rule_versions"] == ["r1", "r2"]
    # The differences are adjustments in the re-rated period with the new rule version.
    rerated = [
        r for r in _json(cli(*base, "ledger", "--json")) if r["pricing_rule_version"] == "r2"
    ]
    assert {(r["entry_type"], r["accounting_period"]) for r in rerated} == {
        ("adjustment", "2025-11"),
        ("adjustment", "2025-12"),
    }
    before = _dump(db_url)
    again = _json(cli(*base, "rerate", "--period", "2025-11", "--json"))
    assert (again["postings"], again["amount"], again["accounts"]) == (0, "0.000000000", [])
    after = _dump(db_url)
    assert after["ledger_postings"] == before["ledger_postings"]
    assert after["buckets"] == before["buckets"]


def test_dry_run_prints_what_would_be_posted_and_writes_nothing(
    cli: Any, db_url: str, tmp_path: Path
) -> None:
    base, _ = setup(tmp_path, cli, db_url)
    (tmp_path / "sources.toml").write_text(NEW_PRICE)
    before = _dump(db_url)
    dry = _json(cli(*base, "rerate", "--period", "2025-11", "--dry-run", "--json"))
    assert _dump(db_url) == before  # no posting, no bucket change, not even a run row
    assert (dry["dry_run"], dry["run_id"]) == (True, None)
    assert dry["accounts"] == [
        # u1: 3.5 mEUR -> 1 mEUR (more included, higher price); u2: 0.5 -> 1 mEUR
        {"uuid": "u1", "postings": 2, "rated_bytes": 0, "included_bytes": 3000,
         "amount": "-0.002500000"},
        {"uuid": "u2", "postings": 1, "rated_bytes": 0, "included_bytes": 0,
         "amount": "0.000500000"},
    ]  # fmt: skip
    assert dry["amount"] == "-0.002000000"
    text = cli(*base, "rerate", "--period", "2025-11", "--dry-run")
    assert text.exit_code == 0
    assert "would post 3 adjustments, amount -0.002000000 EUR" in text.stdout
    assert "dry run, nothing written" in text.stdout
    real = _json(cli(*base, "rerate", "--period", "2025-11", "--json"))
    assert {k: v for k, v in real.items() if k not in ("dry_run", "run_id")} == {
        k: v for k, v in dry.items() if k not in ("dry_run", "run_id")
    }
    store = cast(SqlStore, open_store(db_url))
    try:
        runs = store.db.execute(
            "SELECT kind, outcome FROM runs WHERE run_id = ?", (real["run_id"],)
        )
    finally:
        store.close()
    assert [tuple(r) for r in runs] == [("rerate", "ok")]


def test_a_closed_period_is_refused(cli: Any, db_url: str, tmp_path: Path) -> None:
    base, _ = setup(tmp_path, cli, db_url)
    assert cli(*base, "period", "close", "2025-11").exit_code == 0
    (tmp_path / "sources.toml").write_text(NEW_PRICE)
    before = _dump(db_url)
    for extra in ([], ["--dry-run"]):
        res = cli(*base, "rerate", "--period", "2025-11", *extra)
        assert res.exit_code == 2
        assert res.stderr == (
            "error: period 2025-11 is closed: a closed period is final and is never re-rated"
            " (later corrections go to the first open period)\n"
        )
    assert _dump(db_url) == before


@pytest.mark.parametrize(
    ("registry", "needle"),
    [
        (REGISTRY.split("[pricing]")[0], "no [pricing] table: everything rates at zero"),
        (REGISTRY.replace('currency = "EUR"', 'currency = "USD"'), "cannot change the currency"),
    ],
)
def test_a_rerate_that_would_zero_or_switch_currency_is_refused(
    cli: Any, db_url: str, tmp_path: Path, registry: str, needle: str
) -> None:
    base, _ = setup(tmp_path, cli, db_url)
    (tmp_path / "sources.toml").write_text(registry)
    before = _dump(db_url)
    res = cli(*base, "rerate", "--period", "2025-11")
    assert res.exit_code == 2, res.output
    assert needle in res.stderr
    assert len(res.stderr.splitlines()) == 1
    assert _dump(db_url) == before


def test_unchanged_pricing_posts_nothing(cli: Any, db_url: str, tmp_path: Path) -> None:
    base, _ = setup(tmp_path, cli, db_url)
    doc = _json(cli(*base, "rerate", "--period", "2025-11", "--json"))
    assert (doc["buckets"], doc["postings"], doc["accounts"]) == (3, 0, [])
    assert "posted 0 adjustments" in cli(*base, "rerate", "--period", "2025-11").stdout


@pytest.mark.parametrize(
    ("args", "needle"),
    [([], "--period is required"), (["--period", "11/2025"], "--period: not a period")],
)
def test_bad_flags(cli: Any, tmp_path: Path, args: list[str], needle: str) -> None:
    res = cli("--db", str(tmp_path / "x.db"), "rerate", *args)
    assert res.exit_code == 2
    assert needle in res.stderr
    assert not (tmp_path / "x.db").exists()

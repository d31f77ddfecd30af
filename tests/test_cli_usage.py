"""``billing usage``: filters, --by roll-ups, --totals and the json/csv/table shapes."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

import pytest
from _read_data import MINUTE_USAGE, REGISTRY, A, B, C, populate, sort_key, usage


def _json(res: Any) -> list[dict[str, Any]]:
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert isinstance(data, list)
    return data


@pytest.fixture
def store_url(db_url: str) -> str:
    populate(db_url)
    return db_url


def test_all_rows_as_json_on_both_back_ends(cli: Any, store_url: str) -> None:
    rows = _json(cli("--db", store_url, "usage", "--format", "json"))
    assert sorted(rows, key=sort_key) == sorted(MINUTE_USAGE, key=sort_key)
    # --json is a shorthand; key order of each object is the documented one
    again = _json(cli("usage", "--json", "--db", store_url))
    assert again == rows
    assert list(rows[0]) == [
        "node_id",
        "env",
        "uuid",
        "inbound_tag",
        "bucket_start",
        "uplink_bytes",
        "downlink_bytes",
        "total_bytes",
    ]


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (["--node-id", "node-b"], [MINUTE_USAGE[4]]),
        (["--env", "prod"], MINUTE_USAGE[:4]),
        (["--uuid", "u2"], [MINUTE_USAGE[3]]),
        (["--uuid", "u1", "--env", "staging"], [MINUTE_USAGE[4]]),
        # --since inclusive, --until exclusive, on bucket_start
        (["--since", "2026-11-24T10:02:00Z", "--until", "2026-11-24T11:05:00Z"], [MINUTE_USAGE[1]]),
        (["--since", "2026-11-24T11:05:00Z"], [MINUTE_USAGE[2]]),
        (["--until", "2026-11-24T10:02:00Z"], [MINUTE_USAGE[0], MINUTE_USAGE[3], MINUTE_USAGE[4]]),
        (["--since", "2026-11-24T19:05:00+09:00", "--until", "2026-11-24T10:06:00Z"], []),
        (["--uuid", "nobody"], []),
    ],
)
def test_filters(cli: Any, store_url: str, flags: list[str], expected: Any) -> None:
    rows = _json(cli("--db", store_url, "usage", "--json", *flags))
    assert sorted(rows, key=sort_key) == sorted(expected, key=sort_key)


def test_source_filter_resolves_through_the_registry(
    cli: Any, store_url: str, tmp_path: Path
) -> None:
    (tmp_path / "sources.toml").write_text(REGISTRY)
    rows = _json(cli("--db", store_url, "usage", "--json", "--source", "b-staging"))
    assert rows == [MINUTE_USAGE[4]]
    both = _json(
        cli("--db", store_url, "usage", "--json", "--source", "b-staging", "--source", "a-prod")
    )
    assert sorted(both, key=sort_key) == sorted(MINUTE_USAGE, key=sort_key)
    short = _json(cli("--db", store_url, "usage", "--json", "-s", "b-staging", "-s", "a-prod"))
    assert short == both
    ledger = cli("--db", store_url, "ledger", "--json", "-s", "b-staging")
    assert ledger.exit_code == 0, ledger.output
    assert {r["node_id"] for r in json.loads(ledger.stdout)} == {"node-b"}
    res = cli("--db", store_url, "usage", "--source", "nope")
    assert res.exit_code == 2
    assert "nope" in res.stderr
    assert "Traceback" not in res.output


def test_flags_other_than_source_need_no_registry(cli: Any, store_url: str) -> None:
    assert not Path("sources.toml").exists()
    assert _json(cli("--db", store_url, "usage", "--json", "--node-id", "node-b"))
    res = cli("--db", store_url, "usage", "--source", "a-prod")
    assert res.exit_code == 2
    assert "sources.toml" in res.stderr


def test_by_hour_and_day(cli: Any, store_url: str) -> None:
    hours = _json(cli("--db", store_url, "usage", "--json", "--by", "hour"))
    assert hours == [
        usage(*A, "10:00:00", 1_500_000, 2_000_000),
        usage(*B, "10:00:00", 500_000, 0),
        usage(*C, "10:00:00", 1_000_000, 0),
        usage(*A, "11:00:00", 0, 1_000_000),
    ]
    days = _json(cli("--db", store_url, "usage", "--json", "--by", "day", "--uuid", "u1"))
    assert days == [
        usage(*A, "00:00:00", 1_500_000, 3_000_000),
        usage(*C, "00:00:00", 1_000_000, 0),
    ]


def test_totals(cli: Any, store_url: str) -> None:
    rows = _json(cli("--db", store_url, "usage", "--json", "--totals"))
    assert rows == [
        {
            "uuid": "u1",
            "uplink_bytes": 2_500_000,
            "downlink_bytes": 3_000_000,
            "total_bytes": 5_500_000,
        },
        {"uuid": "u2", "uplink_bytes": 500_000, "downlink_bytes": 0, "total_bytes": 500_000},
    ]
    prod = _json(cli("--db", store_url, "usage", "--json", "--totals", "--env", "prod"))
    assert prod[0]["total_bytes"] == 4_500_000


def test_csv_shape(cli: Any, store_url: str) -> None:
    res = cli("--db", store_url, "usage", "--format", "csv", "--uuid", "u2")
    assert res.exit_code == 0, res.output
    assert res.stdout == (
        "node_id,env,uuid,inbound_tag,bucket_start,uplink_bytes,downlink_bytes,total_bytes\n"
        "node-a,prod,u2,vless,2026-11-24T10:01:00Z,500000,0,500000\n"
    )
    res = cli("--db", store_url, "usage", "--format", "csv", "--totals")
    assert list(csv.reader(io.StringIO(res.stdout))) == [
        ["uuid", "uplink_bytes", "downlink_bytes", "total_bytes"],
        ["u1", "2500000", "3000000", "5500000"],
        ["u2", "500000", "0", "500000"],
    ]


def test_table_for_people(cli: Any, store_url: str) -> None:
    res = cli("--db", store_url, "usage", "--uuid", "u2")
    assert res.exit_code == 0, res.output
    assert "u2" in res.stdout
    assert "500000" in res.stdout
    assert "u1" not in res.stdout
    empty = cli("--db", store_url, "usage", "--uuid", "nobody")
    assert empty.exit_code == 0
    assert "No usage matches" in empty.stdout


def test_empty_json_is_an_empty_list(cli: Any, store_url: str) -> None:
    res = cli("--db", store_url, "usage", "--json", "--uuid", "nobody")
    assert res.stdout == "[]\n"


@pytest.mark.parametrize(
    ("flags", "needle"),
    [
        (["--since", "yesterday"], "--since"),
        (["--until", "2026-11-24T10:00:00"], "--until"),  # no zone
        (["--since", "2026-11-24T11:00:00Z", "--until", "2026-11-24T10:00:00Z"], "--since"),
        (["--format", "csv", "--json"], "--json"),
        (["--by", "week"], "--by"),
    ],
)
def test_bad_flags_are_one_line_usage_errors(
    cli: Any, tmp_path: Path, flags: list[str], needle: str
) -> None:
    res = cli("--db", str(tmp_path / "none.db"), "usage", *flags)
    assert res.exit_code == 2, res.output
    assert needle in res.stderr
    assert "Traceback" not in res.output
    assert not (tmp_path / "none.db").exists()


def test_missing_database_is_one_line_error_and_not_created(cli: Any, tmp_path: Path) -> None:
    res = cli("usage")
    assert res.exit_code == 4
    assert res.stderr.count("\n") == 1
    assert "billing.db" in res.stderr
    assert "billing collect" in res.stderr
    assert "billing ingest" in res.stderr
    assert not (tmp_path / "billing.db").exists()


def test_help_has_examples(cli: Any) -> None:
    res = cli("usage", "--help")
    assert res.exit_code == 0
    assert "Examples:" in res.stdout
    assert "--by" in res.stdout


def test_json_and_csv_are_streamed(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each row is written before the next is pulled from the store (no list in memory)."""
    from billing_cli.cli._context import AppContext
    from billing_cli.cli._rows import OutputFormat, write_rows

    formats: list[OutputFormat] = ["json", "csv"]
    for fmt in formats:
        buf = io.StringIO()
        monkeypatch.setattr("sys.stdout", buf)

        def rows(buf: io.StringIO = buf) -> Any:
            for i in range(5):
                # by the time row i is requested, row i-1 is already written out
                if i:
                    assert f"u{i - 1}" in buf.getvalue()
                assert f"u{i}" not in buf.getvalue()
                yield {"uuid": f"u{i}", "total_bytes": i}

        app = AppContext(registry_path=Path("x"), registry_explicit=False, db_url="x")
        n = write_rows(app, fmt, ["uuid", "total_bytes"], rows(), title="t", empty_message="-")
        assert n == 5
        expected = [{"uuid": f"u{i}", "total_bytes": i} for i in range(5)]
        if fmt == "json":
            assert json.loads(buf.getvalue()) == expected
        else:
            assert buf.getvalue().splitlines()[-1] == "u4,4"


def test_json_keeps_integers_beyond_64_bits() -> None:
    """Totals can exceed 2^64 (orjson's limit); they are still written exactly."""
    from billing_cli.cli._rows import _dumps

    big = 2**70 + 3
    assert json.loads(_dumps({"uuid": "u", "total_bytes": big})) == {
        "uuid": "u",
        "total_bytes": big,
    }
    assert _dumps({"a": 1}) == '{"a":1}'


def test_table_is_capped_with_a_hint(
    cli: Any, store_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("billing_cli.cli._rows.TABLE_ROW_LIMIT", 2)
    res = cli("--db", store_url, "usage")
    assert res.exit_code == 0
    assert "showing the first 2 rows" in res.stderr
    assert res.stdout.count("2026-11-24 ") == 2
    # json is never capped
    assert len(_json(cli("--db", store_url, "usage", "--json"))) == 5


@pytest.mark.parametrize("fmt", ["json", "csv", "table"])
def test_reader_closing_the_pipe_is_not_an_error(tmp_path: Path, fmt: str) -> None:
    """`billing usage | head -1`: exit 0, nothing on stderr but the table hint, no traceback."""
    import subprocess
    import sys

    from billing_cli.core.types import Item, Sample
    from billing_cli.pricing import Pricing
    from billing_cli.store import open_store
    from billing_cli.store.base import Batch

    db = tmp_path / "big.db"
    store = open_store(str(db))
    try:
        run = store.start_run("ingest", [])
        minute = 60 * 10**9
        items = [
            Item(
                m * minute, "n", "e", None, [Sample(f"u{i}", "", "t", m + i, m) for i in range(100)]
            )
            for m in range(31)
        ]  # 3,000 buckets: far more than a pipe buffer holds
        store.apply(Batch(items=items, run_id=run, pricing=Pricing()))
    finally:
        store.close()
    proc = subprocess.Popen(
        [sys.executable, "-m", "billing_cli", "--db", str(db), "usage", "--format", fmt],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdout is not None
    proc.stdout.readline()
    proc.stdout.close()  # the reader goes away mid-stream
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert b"Traceback" not in err
    assert b"Error" not in err


def test_period_selects_the_buckets_of_a_calendar_month(cli: Any, store_url: str) -> None:
    rows = _json(cli("--db", store_url, "usage", "--json", "--period", "2026-11"))
    assert sorted(rows, key=sort_key) == sorted(MINUTE_USAGE, key=sort_key)
    assert _json(cli("--db", store_url, "usage", "--json", "--period", "2026-10")) == []
    assert _json(cli("--db", store_url, "usage", "--json", "--period", "2026-12")) == []
    totals = _json(cli("--db", store_url, "usage", "--json", "--totals", "--period", "2026-11"))
    assert [r["uuid"] for r in totals] == ["u1", "u2"]


@pytest.mark.parametrize(
    ("flags", "needle"),
    [
        (["--period", "2026-13"], "--period: not a period: '2026-13' (expected YYYY-MM"),
        (["--period", "November"], "--period"),
        (["--period", "2026-11", "--since", "2026-11-02T00:00:00Z"], "--period"),
    ],
)
def test_bad_period_is_a_flag_error(
    cli: Any, tmp_path: Path, flags: list[str], needle: str
) -> None:
    res = cli("--db", str(tmp_path / "none.db"), "usage", *flags)
    assert res.exit_code == 2, res.output
    assert needle in res.stderr
    assert len(res.stderr.splitlines()) == 1

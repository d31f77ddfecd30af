"""Every time and id flag is checked when it is parsed: a value the store cannot hold (64-bit
nanoseconds, 64-bit ids) is a one-line flag error (exit 2), never an OverflowError, a
database error or a traceback — through the real CLI of every command that takes one."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

import pytest
from _read_data import REGISTRY, populate
from conftest import CliRunnerFn
from hypothesis import given
from hypothesis import strategies as st

from billing_cli._errors import UsageError
from billing_cli._time import STORE_MAX_NS, STORE_MIN_NS, parse_rfc3339_ns
from billing_cli.cli._flags import id_flag, time_flag

OUT_OF_RANGE = [
    "9999-12-31T23:59:58Z",
    "2262-04-12T00:00:00Z",
    "0001-01-01T00:00:00Z",
    "1677-09-21T00:12:43Z",
    "999999999d",
    "99999999999d",
    "1000000d",
    "1" + "0" * 400 + "ms",
]


@pytest.fixture
def db(tmp_path: Path) -> str:
    url = str(tmp_path / "billing.db")
    populate(url)
    (tmp_path / "sources.toml").write_text(REGISTRY)
    return url


def _one_flag_error(res: Any, flag: str) -> None:
    assert res.exit_code == 2, res.output
    assert res.stdout == ""
    lines = res.stderr.splitlines()
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith(f"error: {flag}"), res.stderr
    assert "Traceback" not in res.stderr
    assert "database" not in lines[0]  # blamed on the flag, not the store


@pytest.mark.parametrize("value", OUT_OF_RANGE)
@pytest.mark.parametrize(
    "args",
    [
        ("usage", "--since"),
        ("usage", "--until"),
        ("ledger", "--since"),
        ("ledger", "--until"),
        ("integrity", "list", "--since"),
    ],
)
def test_read_commands_refuse_times_the_store_cannot_hold(
    cli: CliRunnerFn, db: str, args: tuple[str, ...], value: str
) -> None:
    _one_flag_error(cli("--db", db, *args, value), args[-1])


def test_the_issue_examples_are_flag_errors(cli: CliRunnerFn, db: str, tmp_path: Path) -> None:
    _one_flag_error(cli("--db", db, "usage", "--until", "2262-04-12T00:00:00Z"), "--until")
    _one_flag_error(cli("--db", db, "usage", "--since", "0001-01-01T00:00:00Z"), "--since")
    _one_flag_error(cli("--db", db, "usage", "--since", "999999999d"), "--since")
    _one_flag_error(cli("--db", db, "integrity", "list", "--since", "99999999999d"), "--since")
    res = cli("--db", db, "integrity", "ack", "99999999999999999999999")
    _one_flag_error(res, "integrity ack")
    assert "out of range" in res.stderr
    res = cli(
        "--db", db, "reconcile", "--source", "a-prod",
        "--since", "9999-12-31T23:59:58Z", "--until", "9999-12-31T23:59:59Z",
    )  # fmt: skip
    _one_flag_error(res, "--since")


def test_collect_since_out_of_range_stores_nothing(cli: CliRunnerFn, tmp_path: Path) -> None:
    (tmp_path / "sources.toml").write_text(REGISTRY)
    db = tmp_path / "fresh.db"
    res = cli("--db", str(db), "collect", "--source", "a-prod", "--since", "1000000d")
    _one_flag_error(res, "--since")
    assert "OverflowError" not in res.output
    # Refused before the store was opened: no run, no checkpoint, no last_error.
    assert not db.exists()


def test_integrity_ack_of_an_unknown_event(cli: CliRunnerFn, db: str) -> None:
    res = cli("--db", db, "integrity", "ack", "99999")
    _one_flag_error(res, "integrity ack")
    assert "no such event: 99999" in res.stderr
    for bad in ("12a", "0", "²", " ", "1e3"):
        _one_flag_error(cli("--db", db, "integrity", "ack", bad), "integrity ack")


def test_integrity_ack_with_one_unknown_id_acknowledges_nothing(
    cli: CliRunnerFn, tmp_path: Path
) -> None:
    from billing_cli.store import open_store

    url = str(tmp_path / "e.db")
    store = open_store(url)
    try:
        store.record_integrity_event("anomaly", node_id="n", env="e", detail="x")
    finally:
        store.close()
    res = cli("--db", url, "integrity", "ack", "1", "2")
    _one_flag_error(res, "integrity ack")
    assert "no such event: 2" in res.stderr
    con = sqlite3.connect(url)
    assert con.execute("SELECT acknowledged_at_ns FROM integrity_events").fetchall() == [(None,)]
    con.close()
    assert json.loads(cli("--db", url, "integrity", "ack", "1", "--json").stdout) == {
        "acknowledged": 1
    }


def _usage(cli: CliRunnerFn, db: str, *args: str) -> list[dict[str, Any]]:
    res = cli("--db", db, "usage", "--json", *args)
    assert res.exit_code == 0, res.output
    rows: list[dict[str, Any]] = json.loads(res.stdout)
    return rows


def test_plain_dates_mean_midnight_utc(cli: CliRunnerFn, db: str) -> None:
    by_date = _usage(cli, db, "--since", "2026-11-24", "--until", "2026-11-25")
    assert by_date == _usage(
        cli, db, "--since", "2026-11-24T00:00:00Z", "--until", "2026-11-25T00:00:00Z"
    )
    assert len(by_date) == 5
    assert _usage(cli, db, "--since", "2026-11-25") == []
    _one_flag_error(cli("--db", db, "usage", "--since", "2026-02-30"), "--since")
    res = cli("--db", db, "usage", "--since", "2026-11-24T10:00:00")
    _one_flag_error(res, "--since")
    assert "no zone" in res.stderr


# --- properties ----------------------------------------------------------------------------

# Strings near the accepted shapes (where the edge cases are), and anything at all.
_digits = st.text(alphabet="0123456789", min_size=1, max_size=25)
_near = st.one_of(
    st.builds(
        "{}-{}-{}T{}:{}:{}{}{}".format,
        st.integers(0, 99999).map(str),
        st.integers(0, 99).map("{:02d}".format),
        st.integers(0, 99).map("{:02d}".format),
        st.integers(0, 99).map("{:02d}".format),
        st.integers(0, 99).map("{:02d}".format),
        st.integers(0, 99).map("{:02d}".format),
        st.sampled_from(["", ".5", ".123456789", ".1234567891"]),
        st.sampled_from(["Z", "z", "+00:00", "-23:59", "+24:00", "", "+09:60"]),
    ),
    st.builds(
        "{}-{:02d}-{:02d}".format, st.integers(0, 99999), st.integers(0, 99), st.integers(0, 99)
    ),
    st.builds(
        "{}{}{}".format,
        st.sampled_from(["", "-", " "]),
        _digits,
        st.sampled_from(["ms", "s", "m", "h", "d", "w", "", "d1h"]),
    ),
)
TIME_STRINGS = st.one_of(_near, st.text(max_size=40))


@given(TIME_STRINGS)
def test_every_string_is_a_storable_time_or_one_flag_error(text: str) -> None:
    error: UsageError | None = None
    try:
        ns = time_flag("--since", text, now=parse_rfc3339_ns("2026-11-24T10:00:00Z"))
    except UsageError as exc:
        error = exc
    if error is not None:
        assert error.message.startswith("--since: ")
        assert "\n" not in error.message
        assert len(error.message) < 300  # the value is quoted, not dumped
        return
    assert ns is not None
    assert STORE_MIN_NS <= ns <= STORE_MAX_NS


@given(st.one_of(_digits, st.text(max_size=30)))
def test_every_string_is_a_storable_id_or_one_flag_error(text: str) -> None:
    try:
        n = id_flag("integrity ack: event id", text)
    except UsageError as exc:
        message = exc.message
    else:
        assert 1 <= n <= 2**63 - 1
        return
    assert "\n" not in message
    assert message.startswith("integrity ack: event id ")


@pytest.fixture(scope="module")
def module_db(tmp_path_factory: pytest.TempPathFactory) -> str:
    url = str(tmp_path_factory.mktemp("times") / "billing.db")
    populate(url)
    return url


@given(text=TIME_STRINGS)
def test_the_cli_answers_every_time_value_with_rows_or_one_error_line(
    module_db: str, text: str
) -> None:
    """Through the real CLI (argument parsing, error mapping): exit 0 with JSON, or exit 2
    with exactly one ``error: --since`` line; never a traceback or a store error."""
    res = CliRunnerFn()("--db", module_db, "usage", "--json", f"--since={text}")
    if res.exit_code == 0:
        assert isinstance(json.loads(res.stdout), list)
        return
    assert res.exit_code == 2, res.output
    lines = res.stderr.splitlines()
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith("error: "), res.stderr


@pytest.mark.parametrize(
    "args",
    [
        ("usage", "--since", "9" * 5000 + "d"),
        ("usage", "--until", "1" * 4400 + "s"),
        ("integrity", "list", "--since", "9" * 5000 + "h"),
        ("integrity", "ack", "9" * 5000),
        ("usage", "--period", "9999-12"),
        ("usage", "--period", "2262-04"),
        ("statement", "--period", "1677-09"),
        ("ledger", "--period", "0001-01"),
        ("period", "close", "9999-12"),
        ("usage", "--period", "٢٠٢٦-١١"),  # Arabic-Indic digits
    ],
)
def test_absurd_numbers_and_periods_are_flag_errors(
    cli: CliRunnerFn, db: str, args: tuple[str, ...]
) -> None:
    res = cli("--db", db, *args)
    assert res.exit_code == 2, res.output
    assert res.stderr.count("\n") == 1, res.stderr
    assert res.stderr.startswith("error: ")
    assert len(res.stderr) < 400


def test_the_first_and_last_storable_periods_are_accepted(cli: CliRunnerFn, db: str) -> None:
    for period in ("1677-10", "2262-03"):
        res = cli("--db", db, "usage", "--period", period, "--json")
        assert res.exit_code == 0, res.output

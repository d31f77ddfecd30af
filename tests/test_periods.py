"""Accounting periods (DESIGN §5a): calendar months UTC, and where a posting is accounted."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from billing_cli._time import parse_rfc3339_ns
from billing_cli.core.periods import (
    PeriodFormatError,
    accounting_period,
    format_period,
    next_period,
    parse_period,
    period_end_ns,
    period_of,
)


def ts(text: str) -> int:
    return parse_rfc3339_ns(text)


@pytest.mark.parametrize(
    ("at", "period"),
    [
        ("2026-11-01T00:00:00Z", "2026-11"),
        ("2026-11-30T23:59:00Z", "2026-11"),
        ("2026-12-01T00:00:00Z", "2026-12"),
        ("2024-02-29T23:59:59.999999999Z", "2024-02"),
        ("1969-12-31T23:59:00Z", "1969-12"),  # before the epoch: floor, not truncation
        ("2026-12-01T08:59:00+09:00", "2026-11"),  # UTC decides, not the local zone
    ],
)
def test_a_time_belongs_to_its_utc_calendar_month(at: str, period: str) -> None:
    assert format_period(period_of(ts(at))) == period
    assert period_of(ts(at)) == parse_period(period)


def test_period_bounds() -> None:
    nov = parse_period("2026-11")
    assert nov == ts("2026-11-01T00:00:00Z")
    assert period_end_ns(nov) == ts("2026-12-01T00:00:00Z")
    assert next_period(nov) == parse_period("2026-12")
    assert next_period(parse_period("2026-12")) == parse_period("2027-01")
    assert period_end_ns(parse_period("2024-02")) == ts("2024-03-01T00:00:00Z")


@pytest.mark.parametrize(
    "text", ["2026-13", "2026-00", "2026-1", "26-11", "2026/11", "2026-11-01", " 2026-11", ""]
)
def test_only_yyyy_mm_is_a_period(text: str) -> None:
    with pytest.raises(PeriodFormatError, match="YYYY-MM"):
        parse_period(text)


def test_an_open_period_keeps_its_postings() -> None:
    nov, dec = parse_period("2026-11"), parse_period("2026-12")
    assert accounting_period(nov, closed=()) == nov
    assert accounting_period(dec, closed={nov}) == dec


def test_a_closed_period_sends_its_adjustments_to_the_first_open_period_after_it() -> None:
    oct_, nov, dec, jan = (parse_period(p) for p in ("2026-10", "2026-11", "2026-12", "2027-01"))
    assert accounting_period(nov, closed={nov}) == dec
    assert accounting_period(nov, closed={nov, dec}) == jan
    # An open earlier period is not a target: corrections never move back in time.
    assert accounting_period(nov, closed={nov, dec}) != oct_
    assert accounting_period(oct_, closed={oct_, dec}) == nov


@given(
    st.integers(0, 40),
    st.sets(st.integers(0, 40), max_size=30),
)
def test_the_target_is_open_and_nothing_open_is_skipped(month: int, closed_idx: set[int]) -> None:
    base = parse_period("2025-01")
    periods = [base]
    for _ in range(80):
        periods.append(next_period(periods[-1]))
    closed = {periods[i] for i in closed_idx}
    got = accounting_period(periods[month], closed=closed)
    assert got not in closed
    assert got >= periods[month]
    # every period between the bucket's and the target is closed
    assert all(p in closed for p in periods if periods[month] <= p < got)

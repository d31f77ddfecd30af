"""Accounting periods (DESIGN §5a): which calendar month (UTC) a posting is accounted in.

Pure. A period is identified by the UTC epoch nanoseconds of its first instant (the
first of a month, 00:00Z) — an integer that sorts like time and that the stores keep in
``ledger_postings.period_start_ns``. Its text form is ``YYYY-MM``.

Every posting belongs to an accounting period: normally the period of its bucket. Once
a period is closed (its invoice issued) nothing may change its statement, so a posting
that corrects a bucket of a closed period is accounted in the *first open period after
it* (:func:`accounting_period`) — the one place that rule lives. The posting still names
the bucket it corrects (its series and ``bucket_start``).
"""

from __future__ import annotations

import re
from collections.abc import Collection
from datetime import UTC, datetime

from billing_cli._time import NS_PER_SECOND, datetime_to_ns

_PERIOD = re.compile(r"(\d{4})-(\d{2})", re.ASCII)


class PeriodFormatError(ValueError):
    """A period is not written ``YYYY-MM``."""


def period_of(ns: int) -> int:
    """The period (month start, UTC epoch ns) containing the instant ``ns``."""
    dt = datetime.fromtimestamp(ns // NS_PER_SECOND, tz=UTC)  # floor: right before 1970 too
    return datetime_to_ns(datetime(dt.year, dt.month, 1, tzinfo=UTC))


def next_period(period: int) -> int:
    """The period after ``period``."""
    dt = datetime.fromtimestamp(period // NS_PER_SECOND, tz=UTC)
    year, month = (dt.year + 1, 1) if dt.month == 12 else (dt.year, dt.month + 1)
    return datetime_to_ns(datetime(year, month, 1, tzinfo=UTC))


def period_end_ns(period: int) -> int:
    """The first instant after ``period`` (exclusive end): the start of the next one."""
    return next_period(period)


# The periods whose whole month the store can hold (64-bit nanoseconds: 1677-09-21 ..
# 2262-04-11): a period's start and its end must both be representable.
FIRST_PERIOD = (1677, 10)
LAST_PERIOD = (2262, 3)


def parse_period(text: str) -> int:
    """``YYYY-MM`` -> the period's start."""
    m = _PERIOD.fullmatch(text)
    if m is None or not 1 <= int(m.group(2)) <= 12 or int(m.group(1)) < 1:
        raise PeriodFormatError(f"not a period: {text[:40]!r} (expected YYYY-MM, e.g. 2026-11)")
    year, month = int(m.group(1)), int(m.group(2))
    if not FIRST_PERIOD <= (year, month) <= LAST_PERIOD:
        first, last = (f"{y:04d}-{mo:02d}" for y, mo in (FIRST_PERIOD, LAST_PERIOD))
        raise PeriodFormatError(
            f"{text!r} is outside the periods billing can store ({first} .. {last})"
        )
    return datetime_to_ns(datetime(year, month, 1, tzinfo=UTC))


def format_period(period: int) -> str:
    """The period's ``YYYY-MM``."""
    dt = datetime.fromtimestamp(period // NS_PER_SECOND, tz=UTC)
    return f"{dt.year:04d}-{dt.month:02d}"


def accounting_period(bucket_period: int, closed: Collection[int]) -> int:
    """Where a posting for a bucket of ``bucket_period`` is accounted, given the closed
    periods: the bucket's own period while it is open, else the first open period after
    it. Never an earlier period: a correction is carried forward, like the next invoice.
    """
    period = bucket_period
    while period in closed:
        period = next_period(period)
    return period
